"""The dashboard's first paint in Chromium: `performance.getEntriesByName('first-contentful-paint')` of a
page opened by a browser signed in through the login form, in a fresh browser context each load
(nothing cached but what the sign-in itself loaded: the stylesheet).

    .venv/bin/python bench/dashboard_paint.py --url http://127.0.0.1:8080 [--page overview] [--loads 10]

The key is read from KEEL_MASTER_KEY (or --key-env NAME). Debian's /usr/bin/chromium, driven by
Playwright (`make services` installs it; never a browser download). Target (issue 15): <= 1.5 s.
bench/dashboard.py, which fills a large log, and the browser tests call `first_contentful_paint`.
A figure, not an assert: a shared 2-core machine moves it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TARGET_MS = 1500.0

FCP = ("(() => { const e = performance.getEntriesByName('first-contentful-paint')[0]; "
       "return e ? e.startTime : null; })()")


def first_contentful_paint(browser: Any, url: str, key: str) -> float:
    """Milliseconds from navigation to the first contentful paint of `url` (a dashboard page), in a new
    context of a Playwright Chromium `browser`, signed in with `key` through the login form first."""
    context = browser.new_context()
    try:
        page = context.new_page()
        base = url.split("/dashboard", 1)[0]
        page.goto(f"{base}/dashboard/login")
        page.fill("#key", key)
        with page.expect_navigation():
            page.click("button[type=submit]")
        page.goto(url, wait_until="load")
        page.wait_for_function("() => performance.getEntriesByName('first-contentful-paint').length > 0")
        paint = page.evaluate(FCP)
        if paint is None:
            raise RuntimeError(f"Chromium reported no first-contentful-paint for {url}")
        return float(paint)
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway's base URL")
    parser.add_argument("--page", default="overview", help="the dashboard page")
    parser.add_argument("--loads", type=int, default=10)
    parser.add_argument("--key-env", default="KEEL_MASTER_KEY", help="the variable holding an admin key")
    args = parser.parse_args()
    key = os.environ.get(args.key_env)
    if not key:
        sys.exit(f"Set {args.key_env} to the gateway's master key (or a tenant admin key).")
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"{CHROMIUM} is missing: `make services` installs Debian's chromium.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            paints = [first_contentful_paint(browser, f"{args.url}/dashboard/{args.page}", key)
                      for _ in range(args.loads)]
        finally:
            browser.close()
    p50 = statistics.median(paints)
    print(f"/dashboard/{args.page}: first contentful paint p50 {p50:.0f} ms, max {max(paints):.0f} ms "
          f"over {len(paints)} loads (target <= {TARGET_MS:.0f} ms: {'met' if p50 <= TARGET_MS else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Run the demo: check the gateway answers (and takes the key), pick the chat model, run each step with a
progress bar, then print what was sent and what happened, and where the dashboard is."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import openai
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.demo import steps
from keel.demo.eval_step import CASES, eval_run
from keel.demo.steps import StepResult, Traffic

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEMO_MODEL = "demo"  # examples/demo.yaml's chat model; without it, the first model the gateway lists
STYLE = {"ok": "green", "skipped": "yellow", "failed": "red"}
MARK = {"ok": "✓", "skipped": "-", "failed": "✗"}


class DemoError(Exception):
    """The demo cannot start: no gateway there, or it refuses the key. The message says what to do."""


@dataclass
class DemoSettings:
    base_url: str = DEFAULT_BASE_URL
    key: str | None = None
    model: str | None = None  # default: DEMO_MODEL when served, else the first chat model listed
    chats: int = 12
    streams: int = 4
    results_url: str | None = None  # the request log the eval run is stored in (the gateway's store.url)
    concurrency: int = 4

    @property
    def root(self) -> str:
        """The gateway's root URL: a trailing slash or /v1 given by habit is dropped."""
        root = self.base_url.rstrip("/")
        return root[: -len("/v1")] if root.endswith("/v1") else root


async def run_demo(settings: DemoSettings, console: Console) -> list[StepResult]:
    """Send the mix through the gateway and print the summary; the steps' results, in order."""
    root = settings.root
    client = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=settings.key or "unused", max_retries=0, timeout=60)
    admin = httpx.AsyncClient(base_url=root, timeout=10,
                              headers={"authorization": f"Bearer {settings.key}"} if settings.key else {})
    try:
        models = await _served_models(client, root)
        model = _chat_model(settings.model, models)
        console.print(f"Sending the demo's traffic to [bold]{escape(root)}[/] (chat model [bold]{escape(model)}[/]).")
        with Progress(SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            traffic = Traffic(client, admin, model, models, concurrency=settings.concurrency)
            results = [await _step(progress, traffic, name, total, run) for name, total, run in
                       _plan(settings, traffic)]
        console.print(summary(results))
        console.print(f"Dashboard: [bold link={root}/dashboard]{escape(root)}/dashboard[/] "
                      f"{escape(await _dashboard_note(admin, settings.key))}", soft_wrap=True)
        return results
    finally:
        await client.close()
        await admin.aclose()


Step = Callable[[], Awaitable[StepResult]]


def _plan(settings: DemoSettings, t: Traffic) -> list[tuple[str, int | None, Step]]:
    """Each step: its name, the calls it will make (None: not known in advance) and how to run it."""
    return [
        ("chats", settings.chats, lambda: steps.chats(t, settings.chats)),
        ("streams", settings.streams, lambda: steps.streams(t, settings.streams)),
        ("cache", 2, lambda: steps.cache_hit(t)),
        ("injection", 1, lambda: steps.injection(t)),
        ("redaction", 1, lambda: steps.redaction(t)),
        ("budget", None, lambda: steps.budget(t)),
        ("fallback", 3, lambda: steps.fallback(t)),
        ("eval", len(CASES), lambda: eval_run(t, settings.root, settings.key, settings.results_url)),
    ]


async def _step(progress: Progress, t: Traffic, name: str, total: int | None, run: Step) -> StepResult:
    task = progress.add_task(name, total=total)
    t.tick = lambda: progress.advance(task)
    try:
        result = await run()
    except (openai.APIError, httpx.HTTPError, OSError) as exc:  # a step's calls are answered even when refused
        result = StepResult(name, 0, "failed", "error", f"{type(exc).__name__}: {exc}")
    progress.update(task, total=result.sent or 1, completed=result.sent or 1)
    style = STYLE[result.status]
    progress.console.print(f"[{style}]{MARK[result.status]}[/] {name}: {escape(result.outcome)}", highlight=False)
    return result


def summary(results: list[StepResult]) -> Table:
    table = Table(title="keel demo: what was sent and what happened", title_justify="left")
    table.add_column("step")
    table.add_column("calls", justify="right")
    table.add_column("outcome")
    table.add_column("what it showed", overflow="fold")
    for result in results:
        style = STYLE[result.status]
        table.add_row(result.step, str(result.sent), f"[{style}]{escape(result.outcome)}[/]", escape(result.detail))
    return table


async def _served_models(client: openai.AsyncOpenAI, root: str) -> list[str]:
    try:
        return [model.id async for model in client.models.list()]
    except openai.AuthenticationError:
        raise DemoError(f"the gateway at {root} refused the key: pass the gateway's key with --key, or set "
                        "KEEL_MASTER_KEY to it") from None
    except openai.APIConnectionError:
        raise DemoError(f"no gateway answers at {root}: start one (make run, or keel serve) or point --base-url "
                        "at yours") from None
    except openai.APIStatusError as exc:
        raise DemoError(f"{root}/v1/models answered {exc.status_code}: is --base-url a Keel gateway?") from None


def _chat_model(asked: str | None, models: list[str]) -> str:
    if asked is not None:
        if asked not in models:
            raise DemoError(f"the gateway serves no model {asked!r}; it serves {', '.join(models) or 'none'}")
        return asked
    if DEMO_MODEL in models:
        return DEMO_MODEL
    chat = [name for name in models if "embed" not in name and name != steps.FALLBACK_MODEL]
    if not chat:
        raise DemoError(f"the gateway serves no chat model to send the demo to (it serves {', '.join(models)})")
    return chat[0]


async def _dashboard_note(admin: httpx.AsyncClient, key: str | None) -> str:
    """How to get in: the dashboard takes the gateway's master key (or a tenant admin key), so a gateway
    without one cannot be signed in to; or that this gateway has no dashboard."""
    try:
        if (await admin.get("/dashboard", headers={"accept": "text/html"})).status_code == 404:
            return "(this gateway does not serve the dashboard: it needs a newer Keel)"
        if key is not None and (await admin.get("/admin/budgets")).status_code == 200:
            return "(sign in with the key given to --key or in $KEEL_MASTER_KEY)"
        # A made-up key let through: the gateway has no key of its own, so nobody can sign in.
        keyless = (await admin.get("/v1/models", headers={"authorization": "Bearer keel-demo-none"})).is_success
    except httpx.HTTPError:
        return ""
    if keyless:
        return ("(it takes the gateway's master key, and this gateway has none: restart it with "
                "KEEL_MASTER_KEY=<a secret of yours> make run, and sign in with that secret)")
    return "(sign in with the gateway's master key or a tenant admin key; the key given here is neither)"

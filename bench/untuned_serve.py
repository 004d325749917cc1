"""`keel serve` without the interpreter settings of `keel.server.runtime` (no frozen heap, CPython's
5 ms switch interval): the "before" that `bench/overhead.py --untuned` measures beside the gateway.

    .venv/bin/python bench/untuned_serve.py serve --config keel.yaml --port 8080
"""

from __future__ import annotations

import sys


def untune() -> None:
    """Make the runtime settings no-ops; call before `keel serve` starts."""
    from keel.server import runtime

    runtime.tune_interpreter = lambda: None
    runtime.freeze_heap = lambda: None


def main() -> None:
    untune()
    from keel.cli import app

    sys.argv = ["keel", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()

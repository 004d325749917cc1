"""`keel serve` and `keel chat`."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from keel.config import ConfigError, KeelConfig, default_config, load_config

app = typer.Typer(help="Keel: the production layer for LLM applications.", no_args_is_help=True)
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="keel.yaml; default: $KEEL_CONFIG, else the embedded model")
]


def _load(path: Path | None) -> KeelConfig:
    chosen = path or (Path(os.environ["KEEL_CONFIG"]) if os.environ.get("KEEL_CONFIG") else None)
    try:
        return load_config(chosen) if chosen else default_config()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="address to bind; default: server.host")] = None,
    port: Annotated[int | None, typer.Option(help="port; default: server.port (8080)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve the OpenAI-compatible gateway."""
    import uvicorn

    from keel.engine import Keel
    from keel.server import create_app

    cfg = _load(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keel = Keel(cfg)
    uvicorn.run(
        create_app(keel),
        host=host or cfg.server.host,
        port=port if port is not None else cfg.server.port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=int(cfg.server.graceful_timeout_s) or None,
    )


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="the user message")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name; default: the first")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they come")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens")] = None,
    config: ConfigOption = None,
) -> None:
    """Send one prompt through the pipeline, in-process, and print the answer."""
    from keel.engine import Keel
    from keel.errors import KeelError

    cfg = _load(config)
    keel = Keel(cfg)
    params: dict[str, object] = {
        "model": model or cfg.models[0].name,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    }
    if max_tokens:
        params["max_tokens"] = max_tokens

    async def run() -> None:
        async with keel:
            reply = await keel.chat(**params)
            if stream:
                async for chunk in reply:  # type: ignore[union-attr]
                    if chunk.choices and chunk.choices[0].delta.content:
                        sys.stdout.write(chunk.choices[0].delta.content)
                        sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                print(reply.choices[0].message.content)  # type: ignore[union-attr]

    try:
        asyncio.run(run())
    except KeelError as exc:
        err.print(f"[red]error ({exc.code}):[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None


if __name__ == "__main__":  # pragma: no cover
    app()

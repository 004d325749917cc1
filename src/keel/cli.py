"""`keel serve`, `keel chat`, `keel demo`, `keel report`, `keel check`, `keel keys`, `keel cache`, `keel eval`
and `keel fake-upstream`."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from keel.auth.cli import keys_app
from keel.config import ConfigError, ConfigSource, KeelConfig, find_config
from keel.evals.cli import eval_app
from keel.evals.drift_cli import drift

if TYPE_CHECKING:
    from keel.engine import Keel

app = typer.Typer(help="Keel: the production layer for LLM applications.", no_args_is_help=True)
err = Console(stderr=True)
app.add_typer(keys_app, name="keys")
cache_app = typer.Typer(help="The answer cache: clear entries.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
app.add_typer(eval_app, name="eval")
app.command("drift")(drift)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="keel.yaml; default: $KEEL_CONFIG, else ./keel.yaml, else the embedded model"),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"keel {version('keel')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Keel: the production layer for LLM applications."""


def _fail(message: str, code: int) -> typer.Exit:
    # soft_wrap: a config error names a key path; it must stay on one line to be found.
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _engine(cfg: KeelConfig) -> Keel:
    """The engine, or a clean exit when a provider refuses its settings (a bad template, say)."""
    from keel.engine import Keel
    from keel.observability.store import StoreError

    try:
        return Keel(cfg)
    except (ValueError, ImportError, StoreError) as exc:
        raise _fail(str(exc), 2) from None


def _preflight(cfg: KeelConfig) -> None:
    """Say what would fail start-up anyway before anything starts: the embedded model's files.
    (Found later, inside the server's start-up, it would come out as a traceback.)"""
    from keel.config import LocalDeployment, LocalEmbedderDeployment
    from keel.probes import probe_local, probe_local_embedder

    for i, model in enumerate(cfg.models):
        for j, dep in enumerate(model.deployments):
            if isinstance(dep, LocalDeployment) and not (probe := probe_local("", dep)).ok:
                raise _fail(f"models[{i}].deployments[{j}] (provider: local): {probe.detail}", 2)
            if isinstance(dep, LocalEmbedderDeployment) and not (probe := probe_local_embedder("", dep)).ok:
                raise _fail(f"models[{i}].deployments[{j}] (provider: local-embedder): {probe.detail}", 2)


def _load(path: Path | None, *, calls_upstreams: bool = True, code: int = 2) -> tuple[ConfigSource, KeelConfig]:
    """The config every command reads (`keel.config.find_config` says which), or a clean exit
    naming what is wrong. Only commands that call upstreams warn about unset key variables."""
    source = find_config(path)
    try:
        return source, source.load(warn_unset_keys=calls_upstreams)
    except ConfigError as exc:
        raise _fail(str(exc), code) from None


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="address to bind; default: server.host")] = None,
    port: Annotated[int | None, typer.Option(help="port; default: server.port (8080)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    workers: Annotated[
        int, typer.Option(min=1, help="processes serving the one port; above 1, limits, budgets and caches "
                                      "must be in Redis/PostgreSQL (docs/scale-out.md)")
    ] = 1,
) -> None:
    """Serve the OpenAI-compatible gateway."""
    import uvicorn

    from keel.server import create_app
    from keel.server.runtime import FrozenAfterStartup, tune_interpreter
    from keel.server.workers import SharedStateRequired, require_shared_state, run_workers

    # Logging first, so warnings found while loading the config come out formatted.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from keel.probes import safe_url

    source, cfg = _load(config)
    try:
        require_shared_state(cfg, workers)
    except SharedStateRequired as exc:
        raise _fail(str(exc), 2) from None
    _preflight(cfg)
    keel = _engine(cfg)
    # uvicorn re-raises SIGTERM at itself after its graceful shutdown; a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    bind_host, bind_port = host or cfg.server.host, port if port is not None else cfg.server.port
    logging.getLogger("keel").info(
        "serving %s at http://%s:%d/v1%s; request log: %s; config: %s", ", ".join(m.name for m in cfg.models),
        bind_host, bind_port, f" with {workers} workers" if workers > 1 else "", safe_url(cfg.store.url),
        source.describe(),
    )
    settings: dict[str, Any] = dict(
        host=bind_host,
        port=bind_port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # nothing reads the client's address: no X-Forwarded-* rewriting per request
        server_header=False,  # no "server: uvicorn" on every answer
        # Whole seconds, rounded up; 0 really means no grace (uvicorn reads None as "wait forever").
        timeout_graceful_shutdown=math.ceil(cfg.server.graceful_timeout_s),
    )
    if workers > 1:
        # Each worker builds its own engine from the same file (keel.server.workers); this one only
        # checked that it can be built.
        del keel
        if not run_workers(uvicorn.Config("keel.server.workers:worker_app", factory=True, workers=workers,
                                          **settings), source):
            raise _fail("a worker could not start (its log is above); stopped", 1)
        return
    tune_interpreter()
    uvicorn.run(FrozenAfterStartup(create_app(keel), settle=keel.writer.flush), **settings)  # see runtime.py


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="the user message")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="model name; default: the first")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="print tokens as they come")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="cap on generated tokens")] = None,
    config: ConfigOption = None,
) -> None:
    """Send one prompt through the pipeline, in-process, and print the answer."""
    from keel.errors import KeelError, ModelNotFound

    _, cfg = _load(config)
    name = model or cfg.models[0].name
    if cfg.model(name) is None:
        # Said before any provider starts: an unknown name must not wait for a model to load.
        raise _fail(f"({ModelNotFound.code}) {ModelNotFound(name, [m.name for m in cfg.models]).message}", 1)
    _preflight(cfg)
    keel = _engine(cfg)
    params: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens:
        params["max_tokens"] = max_tokens

    async def run() -> None:
        async with keel:
            if stream:
                try:
                    async for chunk in await keel.chat(stream=True, **params):
                        if chunk.choices and chunk.choices[0].delta.content:
                            sys.stdout.write(chunk.choices[0].delta.content)
                            sys.stdout.flush()
                finally:
                    sys.stdout.write("\n")  # also after a stream cut short, before the error
            else:
                reply = await keel.chat(stream=False, **params)
                print(reply.choices[0].message.content)

    try:
        asyncio.run(run())
    except KeelError as exc:
        sys.stdout.flush()
        raise _fail(f"({exc.code}) {exc.message}", 1) from None


@app.command()
def demo(
    base_url: Annotated[str, typer.Option(help="the running gateway's address")] = "http://127.0.0.1:8080",
    key: Annotated[
        str | None, typer.Option(envvar="KEEL_MASTER_KEY", show_default=False,
                                 help="the gateway's key (master or virtual); default: $KEEL_MASTER_KEY")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="the chat model; default: demo, else the first served")
    ] = None,
    chats: Annotated[int, typer.Option(min=1, max=1000, help="plain chats to send")] = 12,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="the gateway's keel.yaml: its store.url receives the eval run; "
                                            "default: $KEEL_CONFIG, else ./keel.yaml, else ./keel.db"),
    ] = None,
) -> None:
    """Send a realistic mix of traffic through a running gateway (chats, streams, a cache hit, a blocked
    injection, a redacted email, a budget refusal, a fallback, an eval run), then print what happened and
    the dashboard's address. `make run` serves examples/demo.yaml, which has what every step needs."""
    try:
        from keel.demo import DemoSettings, run_demo
        from keel.demo.run import DemoError
    except ImportError as exc:
        raise _fail(f"keel demo drives the gateway with the official openai client ({exc}): "
                    "pip install 'keel[demo]' (make run installs it)", 2) from None
    _, cfg = _load(config, calls_upstreams=False)
    settings = DemoSettings(base_url=base_url, key=key, model=model, chats=chats, results_url=cfg.store.url)
    try:
        results = asyncio.run(run_demo(settings, Console()))
    except DemoError as exc:
        raise _fail(str(exc), 2) from None
    if any(result.status == "failed" for result in results):
        raise typer.Exit(1)


@app.command(
    "fake-upstream",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def fake_upstream(ctx: typer.Context) -> None:
    """A fake OpenAI-compatible upstream with fault injection, for chaos tests.

    Its flags (`keel fake-upstream --help`) are keel.testing.fake_openai's, e.g.
    `--port 9100 --fail-rate 0.3 --fail-status 503`.
    """
    from keel.testing import fake_openai

    sys.argv[0] = "keel fake-upstream"  # the program name argparse shows in --help and errors
    fake_openai.main(list(ctx.args))


class ReportFormat(StrEnum):
    table = "table"
    json = "json"
    markdown = "markdown"


@app.command()
def report(
    config: ConfigOption = None,
    since: Annotated[str, typer.Option(help="the window, up to now: 30m, 24h, 7d")] = "24h",
    feature: Annotated[str | None, typer.Option(help="only calls with this feature tag")] = None,
    output_format: Annotated[ReportFormat, typer.Option("--format", help="table, json or markdown")] = (
        ReportFormat.table
    ),
    top: Annotated[int, typer.Option(help="rows per breakdown in table and markdown; 0: all")] = 20,
    check: Annotated[bool, typer.Option("--check", help="exit 1 when a target is missed (for CI)")] = False,
) -> None:
    """Latency, errors and cost against the SLO targets (slo: in keel.yaml), then tokens and spend
    by feature, model, user, dialect and prompt, from the request log (store.url)."""
    import time

    from keel.observability import report as slo
    from keel.observability.store import StoreError

    source, cfg = _load(config, calls_upstreams=False)
    try:
        window = slo.parse_window(since)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    named_by = (
        f"store.url in {source.path}" if source.path else
        "the default store.url: no config file was found (no --config, $KEEL_CONFIG or ./keel.yaml)"
    )
    try:
        store = slo.open_log(cfg.store.url, named_by)
        try:
            result = slo.build_report(
                store, since=time.time() - window, feature=feature, slo=cfg.slo, label=since.strip()
            )
        finally:
            store.close()
    except StoreError as exc:
        raise _fail(str(exc), 1) from None
    if output_format is ReportFormat.json:
        sys.stdout.write(slo.render_json(result) + "\n")
    elif output_format is ReportFormat.markdown:
        sys.stdout.write(slo.render_markdown(result, top) + "\n")
    else:
        Console().print(slo.render_table(result, top))
    if check and not result.passed:
        raise typer.Exit(1)


@app.command()
def check(
    config_file: Annotated[
        Path | None, typer.Argument(metavar="[CONFIG]", help="keel.yaml; default: as --config of the other commands")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds allowed to each probe")] = 5.0,
) -> None:
    """Validate a config, then try each backend (request log, Redis, OTLP) and each upstream it
    names, and print what works; exit 1 if anything fails."""
    from rich.table import Table

    from keel.probes import probe_config
    from keel.wording import counted

    source, cfg = _load(config_file, calls_upstreams=False, code=1)
    table = Table(title=f"keel check: {source.describe()}", title_justify="left")
    for header in ("what", "where", "result", "detail"):
        table.add_column(header, overflow="fold")
    table.add_row("config", str(source.path or "(default)"), "[bold green]OK[/]",
                  f"valid: {counted(len(cfg.models), 'model')}, "
                  f"{counted(sum(len(m.deployments) for m in cfg.models), 'deployment')}")
    probes = asyncio.run(probe_config(cfg, timeout))
    for probe in probes:
        verdict = "[bold green]OK[/]" if probe.ok else "[bold red]FAIL[/]"
        table.add_row(escape(probe.what), escape(probe.target), verdict, escape(probe.detail))
    Console(soft_wrap=False).print(table)
    failed = [probe for probe in probes if not probe.ok]
    if failed:
        err.print(f"[red]{counted(len(failed), 'check')} failed[/red]", highlight=False)
        raise typer.Exit(1)


def _in_memory(store: object) -> bool:
    from keel.cache.memory import MemoryStore
    from keel.cache.vectors import MemoryVectorStore

    return isinstance(store, MemoryStore | MemoryVectorStore)


def _store_names(stores: list[Any]) -> str:
    """"Redis", "PostgreSQL" or both, for what a clear reached."""
    from keel.cache.redis_store import RedisStore

    names = sorted({"Redis" if isinstance(store, RedisStore) else "PostgreSQL" for store in stores})
    return " and ".join(names)


@cache_app.command("clear")
def cache_clear(
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="only this model's entries")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's entries")] = None,
    older_than: Annotated[str | None, typer.Option(help="only entries at least this old: 30m, 24h, 7d")] = None,
    prefix: Annotated[str | None, typer.Option(help="only entries whose key starts with this: v2:<tenant>:")] = None,
) -> None:
    """Remove cache entries (exact and semantic) from the configured shared stores, Redis or PostgreSQL
    (every filter given must match; none: all), and print how many. An in-memory cache lives in the
    gateway: use DELETE /admin/cache."""
    from urllib.parse import urlencode

    from keel.cache.build import build_caches
    from keel.errors import KeelError, ModelNotFound
    from keel.observability.report import parse_window

    _, cfg = _load(config, calls_upstreams=False)
    if model is not None and cfg.model(model) is None:
        raise _fail(ModelNotFound(model, [m.name for m in cfg.models]).message, 2)
    try:
        older_than_s = parse_window(older_than) if older_than is not None else None
    except ValueError as exc:
        raise _fail(str(exc).replace("--since", "--older-than"), 2) from None

    def embedder() -> Any:  # only with the semantic cache on; never started: clearing embeds nothing
        from keel.embedding.shared import SharedEmbedder

        return SharedEmbedder()

    caches = build_caches(cfg, embedder)
    settings = [(name, s.store) for stage in (caches.exact, caches.semantic) if stage is not None
                for name, s in stage.settings.items() if model in (None, name)]
    in_memory = sorted({name for name, store in settings if _in_memory(store)})
    shared = list({id(store): store for _, store in settings if not _in_memory(store)}.values())

    async def clear() -> int:
        removed = 0
        try:
            for store in shared:
                removed += await store.clear(model, tenant, older_than_s, prefix)
        finally:
            for store in caches.stores():
                await store.close()
        return removed

    if shared:
        try:
            removed = asyncio.run(clear())
        except KeelError as exc:
            raise _fail(exc.message, 1) from None
        print(f"Removed {removed} cache {'entry' if removed == 1 else 'entries'} from {_store_names(shared)}.")
    elif not in_memory:
        print("No model here has a cache enabled (cache.exact.enabled, cache.semantic.enabled): nothing to clear.")
    if in_memory:
        query = {k: v for k, v in {"model": model, "tenant": tenant, "key_prefix": prefix}.items() if v is not None}
        if older_than_s is not None:
            query["older_than_s"] = f"{older_than_s:g}"
        host = "127.0.0.1" if cfg.server.host in ("0.0.0.0", "::", "") else cfg.server.host  # bound to all: local
        host = f"[{host}]" if ":" in host else host
        url = f"http://{host}:{cfg.server.port}/admin/cache" + (f"?{urlencode(query)}" if query else "")
        raise _fail(
            f"the cache of {', '.join(in_memory)} is in the memory of the running gateway (cache.backend: "
            f"memory), which this command cannot reach: nothing of it was cleared. Clear it through the gateway: "
            f"curl -X DELETE '{url}' -H \"Authorization: Bearer ${cfg.server.master_key_env}\"", 2,
        )


@cache_app.command("calibrate")
def cache_calibrate(
    pairs: Annotated[
        Path, typer.Option("--pairs", help='labelled JSONL lines: {"query", "cached", "duplicate": true|false}')
    ],
    target_precision: Annotated[
        float, typer.Option(help="share of served hits that must be right, with the guards")
    ] = 0.99,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="write the threshold as a keel.yaml snippet")] = None,
    quantize: Annotated[
        bool, typer.Option(help="embed as keel.yaml's embedder.quantize (default true) does: pass the same")
    ] = True,
) -> None:
    """Choose the semantic cache's threshold on labelled pairs: the lowest cosine at which hits served
    (cosine >= threshold and the guards pass) reach --target-precision; exit 1 when none does."""
    import json

    import yaml
    from rich.table import Table

    from keel.cache.calibrate import PairsFileError, calibrate, read_pairs
    from keel.errors import ModelNotLoaded
    from keel.wording import counted

    if not 0 < target_precision <= 1:
        raise _fail(f"--target-precision must be above 0 and at most 1, not {target_precision}", 2)
    try:
        labelled = read_pairs(pairs)
        result = calibrate(labelled, target_precision, progress=not json_output, quantize=quantize)
    except PairsFileError as exc:
        raise _fail(str(exc), 2) from None
    except ModelNotLoaded as exc:
        raise _fail(exc.message, 2) from None

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    if json_output:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
    else:
        table = Table(title=f"keel cache calibrate: {pairs} ({counted(result.pairs, 'pair')}, "
                            f"{counted(result.duplicates, 'duplicate')})", title_justify="left")
        for header in ("served when", "threshold", "precision", "recall", "true hits", "false hits"):
            table.add_column(header, justify="left" if header == "served when" else "right")
        rows = [("cosine and guards", result.guarded), ("cosine alone", result.unguarded)]
        if result.threshold_alone is not None:
            rows.append(("cosine alone, own target", result.threshold_alone))
        for name, point in rows:
            table.add_row(name, f"{point.threshold:.3f}", pct(point.precision), pct(point.recall),
                          f"{point.served_true:,}", f"{point.served_false:,}")
        Console(soft_wrap=False).print(table)
        if result.refused:
            refusals = ", ".join(
                f"{name} {dup + non:,} ({counted(dup, 'duplicate')})" for name, (dup, non) in result.refused.items()
            )
            print(f"Refused by the guards above the threshold: {refusals}.")
        if result.threshold is not None:
            print(f"Threshold: {result.threshold:.3f} (precision with guards {pct(result.guarded.precision)}, "
                  f"target {target_precision:g}; recall {pct(result.guarded.recall)}).")
    if result.threshold is None:
        best = result.best_guarded
        raise _fail(
            f"no threshold reaches precision {target_precision:g} with the guards; the best is "
            f"{pct(best.precision)} at {best.threshold:.3f} (recall {best.recall:.1%}). Label more "
            "pairs, or lower --target-precision", 1,
        )
    if out is not None:
        try:
            out.write_text(yaml.safe_dump({"cache": {"semantic": {"threshold": result.threshold}}}))
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc.strerror}; choose another --out", 2) from None
        if not json_output:
            print(f"Wrote {out}.")


if __name__ == "__main__":  # pragma: no cover
    app()

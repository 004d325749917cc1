"""`keel eval promote REQUEST_ID --dataset FILE.jsonl`: a production call (failed, flagged or reviewed)
becomes a golden case, so the golden set grows from real traffic (docs/review.md#promote).

The case is the call's stored input as chat messages, its answer as the reference (unless
`--reference` gives the right one), tagged with its feature and model, appended to a JSONL dataset
(made when missing) and read back with `load_dataset`: a file it would break is left as it was.
A call logged without its content (`store.log_content: false`) cannot be promoted, and says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from keel.evals.dataset import Case, DatasetInvalid, load_dataset
from keel.evals.review import ReviewError, ReviewQueue
from keel.observability.store import RecordStore, StoreError
from keel.wording import counted

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="keel.yaml: its store.url (the request log)"),
]


class PromoteRefused(Exception):
    """The call cannot become a case as asked; the message says what to do instead."""


def case_of(row: dict[str, Any], case_id: str | None = None, reference: str | None = None) -> dict[str, Any]:
    """A request-log row as a dataset case (one JSONL object)."""
    messages = [{**m, "content": m.get("content")} for m in row["input"] if isinstance(m, dict)]
    if not messages:
        raise PromoteRefused(f"The call {row['request_id']} has no chat messages to make a case of.")
    if reference is None:
        answer = (row.get("output") or {}).get("content")
        if not isinstance(answer, str) or not answer:
            why = f"it failed ({row.get('error_type')})" if row.get("error_type") else "its answer has no text"
            raise PromoteRefused(f"The call {row['request_id']} has no answer to use as the reference ({why}); "
                                 "give the right one with --reference TEXT.")
        reference = answer
    tags = [f"{name}:{row[name]}" for name in ("feature", "model") if row.get(name)]
    metadata = {"request_id": row["request_id"], "promoted_at": round(time.time(), 3)}
    if row.get("tenant"):
        metadata["tenant"] = row["tenant"]
    return {"id": case_id or row["request_id"], "input": messages, "reference": reference, "tags": tags,
            "metadata": metadata}


def promote_call(
    store: RecordStore, request_id: str, dataset: Path, *, reference: str | None = None,
    case_id: str | None = None,
) -> Case:
    """Append the call `request_id` of the request log to `dataset` (JSONL) as a golden case; the case as
    `load_dataset` reads it back. Raises PromoteRefused (or a ReviewError: no such call, no content)."""
    if dataset.suffix != ".jsonl":
        raise PromoteRefused(f"{dataset}: promote appends to a JSONL dataset (a .jsonl file).")
    entry = case_of(ReviewQueue(store).request(request_id), case_id, reference)
    before = dataset.read_bytes() if dataset.exists() else None
    if before is not None and before.strip():
        try:
            known = {case.id for case in load_dataset(dataset).cases}
        except DatasetInvalid as exc:
            raise PromoteRefused(f"The dataset cannot be read, so nothing was appended: {exc}") from None
        if entry["id"] in known:
            raise PromoteRefused(f"{dataset} already holds a case '{entry['id']}'; give another with --id.")
    dataset.parent.mkdir(parents=True, exist_ok=True)
    line = orjson.dumps(entry) + b"\n"
    with dataset.open("ab") as out:
        if before and not before.endswith(b"\n"):
            out.write(b"\n")
        out.write(line)
    try:
        cases = load_dataset(dataset).cases
    except DatasetInvalid as exc:  # the call's content made a case the format refuses: undo
        if before is None:
            dataset.unlink()
        else:
            dataset.write_bytes(before)
        raise PromoteRefused(f"The call does not make a valid case, so nothing was appended: {exc}") from None
    return next(case for case in cases if case.id == entry["id"])


def promote(
    request_id: Annotated[str, typer.Argument(metavar="REQUEST_ID", help="the call's id (x-keel-request-id)")],
    dataset: Annotated[Path, typer.Option("--dataset", help="the JSONL golden set to append to (made if missing)")],
    reference: Annotated[str | None, typer.Option(help="the right answer; default: the call's own answer")] = None,
    case_id: Annotated[str | None, typer.Option("--id", help="the case's id; default: the request id")] = None,
    config: ConfigOption = None,
) -> None:
    """Append a logged call to a golden dataset as a case: its messages, its answer (or --reference) as the
    reference, tagged with its feature and model."""
    from keel.cli import _fail, _load

    _, cfg = _load(config, calls_upstreams=False)
    try:
        store = RecordStore(cfg.store.url)
        try:
            case = promote_call(store, request_id, dataset, reference=reference, case_id=case_id)
        finally:
            store.close()
    except (PromoteRefused, ReviewError, StoreError) as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"appended case {case.id} to {dataset} ({counted(len(load_dataset(dataset)), 'case')})")


def review_list(
    status: Annotated[str | None, typer.Option(help="pending or labelled")] = "pending",
    source: Annotated[str | None, typer.Option(help="eval, production or semantic_cache")] = None,
    limit: Annotated[int, typer.Option(help="items shown, 1 to 500")] = 20,
    config: ConfigOption = None,
) -> None:
    """List review items, pending first, as JSON lines (id, source, ref, status, labels)."""
    from keel.cli import _fail, _load

    _, cfg = _load(config, calls_upstreams=False)
    store = RecordStore(cfg.store.url)
    try:
        page = ReviewQueue(store).list_items(status=status, source=source, limit=limit)  # type: ignore[arg-type]
    except (ReviewError, StoreError) as exc:
        raise _fail(str(exc), 1) from None
    finally:
        store.close()
    for item in page.items:
        typer.echo(orjson.dumps({k: v for k, v in item.as_dict().items() if k != "object"}).decode())


def review_label(
    item_id: Annotated[str, typer.Argument(metavar="ITEM_ID", help="the item's id (rev_...)")],
    reviewer: Annotated[str, typer.Option(help="who labels: a name or email")],
    label: Annotated[str | None, typer.Option(help="pass or fail")] = None,
    score: Annotated[float | None, typer.Option(help="a score (a 1 to 5 rubric, or 0 to 1)")] = None,
    comment: Annotated[str | None, typer.Option(help="why")] = None,
    config: ConfigOption = None,
) -> None:
    """Label a review item pass/fail and/or with a score."""
    from keel.cli import _fail, _load

    _, cfg = _load(config, calls_upstreams=False)
    store = RecordStore(cfg.store.url)
    try:
        item = ReviewQueue(store).label(item_id, reviewer, label=label, score=score, comment=comment)
    except (ReviewError, StoreError) as exc:
        raise _fail(str(exc), 1) from None
    finally:
        store.close()
    typer.echo(f"labelled {item.id}: {counted(len(item.labels), 'label')}")

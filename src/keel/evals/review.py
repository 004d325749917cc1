"""The review queue: calls and eval cases that people label pass/fail or with a score (tables
`review_items` and `review_labels`, revision 0007, in the request-log database).

Items come from eval runs (failed cases), sampled production calls and sampled semantic-cache hits
(`keel.evals.review_feed`), or are added by hand. An item is `pending` until its first label, then
`labelled`; any number of reviewers may label it, each label kept with who and when. Items are
tenant-scoped: every read and label takes the caller's tenant (None: every tenant, the master key).

An item's `judge` is a mapping of judge (or metric) name to its verdict, in `Score.as_dict()` shape
(`value`, `passed`, `reason`); `labelled_pairs` pairs each verdict with each human label, for the
agreement (Cohen's kappa) that tells whether a judge can be believed.

For a `semantic_cache` item, `input` is the query as a user message, `output` the answer served, and
`reference` what that answer was stored for: `{"cached_query", "similarity", "model"}`.

Blocking SQLAlchemy Core: async code reaches it with `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from sqlalchemy import Column, Table, case, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from keel.evals.tables import review_items, review_labels
from keel.ids import random_hex
from keel.observability.store import RecordStore, requests

Source = Literal["eval", "production", "semantic_cache"]
Status = Literal["pending", "labelled"]
Verdict = Literal["pass", "fail"]
SOURCES: tuple[str, ...] = get_args(Source)
STATUSES: tuple[str, ...] = get_args(Status)
VERDICTS: tuple[str, ...] = get_args(Verdict)
MAX_PAGE = 500


class ReviewError(ValueError):
    """A review request that cannot be done as asked; the message says what to change."""


class ItemNotFound(ReviewError):
    """No such item (or not the caller's tenant's: another tenant's item is not told of)."""


class BadLabel(ReviewError):
    """A label without a verdict or score, or with one out of range."""


class CallNotFound(ReviewError):
    """No such request in the request log (or not the caller's tenant's)."""


class ContentNotLogged(ReviewError):
    """The call is in the request log without its input and output (`store.log_content: false`)."""


@dataclass(frozen=True, slots=True)
class Label:
    reviewer: str
    created_at: float
    label: Verdict | None = None
    score: float | None = None
    comment: str | None = None
    item_id: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "reviewer": self.reviewer, "created_at": self.created_at,
                "label": self.label, "score": self.score, "comment": self.comment}


@dataclass(slots=True)
class ReviewItem:
    id: str
    source: Source
    created_at: float
    status: Status = "pending"
    tenant: str | None = None
    ref: str | None = None  # the request id (production, semantic_cache) or "<run id>/<case id>" (eval)
    input: Any = None
    output: Any = None
    reference: Any = None
    judge: dict[str, Any] | None = None
    labels: list[Label] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "review.item", "source": self.source, "ref": self.ref,
                "tenant": self.tenant, "status": self.status, "created_at": self.created_at, "input": self.input,
                "output": self.output, "reference": self.reference, "judge": self.judge,
                "labels": [label.as_dict() for label in self.labels]}


@dataclass(frozen=True, slots=True)
class Page:
    items: list[ReviewItem]
    total: int  # items matching the filters, on every page
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total


def item_id(source: str, ref: str | None) -> str:
    """The id of an item: the same source and ref always make the same id (a case of a resumed run, or a
    call sampled and then added by hand, is one item); without a ref, a random one."""
    if ref is None:
        return f"rev_{random_hex(12)}"
    return "rev_" + hashlib.sha256(f"{source}\x00{ref}".encode()).hexdigest()[:24]


def new_item(
    source: Source, *, ref: str | None = None, tenant: str | None = None, input: Any = None, output: Any = None,
    reference: Any = None, judge: Mapping[str, Any] | None = None, created_at: float | None = None,
) -> ReviewItem:
    if source not in SOURCES:
        raise ReviewError(f"An item's source is one of {', '.join(SOURCES)}, not '{source}'.")
    return ReviewItem(item_id(source, ref), source, time.time() if created_at is None else created_at,
                      tenant=tenant, ref=ref, input=input, output=output, reference=reference,
                      judge=dict(judge) if judge is not None else None)


def check_label(label: str | None, score: float | None) -> None:
    """A label says pass or fail, gives a finite score, or both."""
    if label is None and score is None:
        raise BadLabel("A label needs a verdict ('label': 'pass' or 'fail'), a 'score', or both.")
    if label is not None and label not in VERDICTS:
        raise BadLabel(f"'label' is 'pass' or 'fail', not '{label}'; give a number as 'score'.")
    if score is not None and (isinstance(score, bool) or not math.isfinite(score)):
        raise BadLabel(f"'score' is a finite number (a 1 to 5 rubric, or 0 to 1), not {score!r}.")


class ReviewQueue:
    """Add, list, label and export review items. `store` is the request log's; the tables are made
    (the schema migrated) on first use."""

    def __init__(self, store: RecordStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._migrated = False

    def ready(self) -> None:
        if not self._migrated:
            self.store.migrate()  # idempotent, and serialised across replicas
            self._migrated = True

    def add(self, item: ReviewItem) -> tuple[ReviewItem, bool]:
        """Store an item; (the stored item, True) or, when one with its id is there, (that one, False)."""
        self.ready()
        with self.store.transaction("add a review item to") as conn:
            found = conn.execute(select(review_items).where(review_items.c.id == item.id)).mappings().first()
            if found is None:
                conn.execute(insert(review_items).values(_row(item)))
        if found is not None:
            return _item(dict(found)), False
        return item, True

    def add_many(self, items: Sequence[ReviewItem]) -> int:
        """Store items in one transaction, skipping those already there (by id); how many were new."""
        if not items:
            return 0
        self.ready()
        unique = list({item.id: item for item in items}.values())
        with self.store.transaction("add review items to") as conn:
            present = set(conn.execute(select(review_items.c.id).where(
                review_items.c.id.in_([item.id for item in unique]))).scalars())
            rows = [_row(item) for item in unique if item.id not in present]
            if rows:
                conn.execute(insert(review_items), rows)
        return len(rows)

    def set_judge(self, item_id: str, name: str, verdict: Mapping[str, Any]) -> bool:
        """Add (or replace) one judge's verdict on an item; False when there is no such item."""
        self.ready()
        with self.store.transaction("record a judge verdict in") as conn:
            judge = conn.execute(select(review_items.c.judge).where(review_items.c.id == item_id)).first()
            if judge is None:
                return False
            merged = {**(judge[0] or {}), name: dict(verdict)}
            conn.execute(update(review_items).where(review_items.c.id == item_id).values(judge=merged))
        return True

    def get(self, item_id: str, tenant: str | None = None) -> ReviewItem:
        """The item with its labels, oldest label first; ItemNotFound when there is none (for `tenant`)."""
        self.ready()
        with self.store.connection() as conn:
            row = _tenants_row(conn, review_items, review_items.c.id, item_id, tenant)
            if row is None:
                raise ItemNotFound(f"There is no review item '{item_id}'; GET /admin/review lists the items you "
                                   "can see.")
            item = _item(row)
            item.labels = _labels(conn, [item_id]).get(item_id, [])
        return item

    def list_items(
        self, *, tenant: str | None = None, status: Status | None = None, source: Source | None = None,
        limit: int = 50, offset: int = 0,
    ) -> Page:
        """Items matching the filters, pending first, then oldest first; each with its labels."""
        if status is not None and status not in STATUSES:
            raise ReviewError(f"'status' is one of {', '.join(STATUSES)}, not '{status}'.")
        if source is not None and source not in SOURCES:
            raise ReviewError(f"'source' is one of {', '.join(SOURCES)}, not '{source}'.")
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise ReviewError(f"'limit' is 1 to {MAX_PAGE} and 'offset' 0 or more.")
        self.ready()
        where = _filters(tenant, status, source)
        pending_first = case((review_items.c.status == "pending", 0), else_=1)
        query = (select(review_items).where(*where)
                 .order_by(pending_first, review_items.c.created_at, review_items.c.id).limit(limit).offset(offset))
        with self.store.connection() as conn:
            total = conn.execute(select(func.count()).select_from(review_items).where(*where)).scalar_one()
            items = [_item(dict(row)) for row in conn.execute(query).mappings()]
            labels = _labels(conn, [item.id for item in items])
        for item in items:
            item.labels = labels.get(item.id, [])
        return Page(items, int(total), offset)

    def label(
        self, item_id: str, reviewer: str, *, label: str | None = None, score: float | None = None,
        comment: str | None = None, tenant: str | None = None,
    ) -> ReviewItem:
        """Add `reviewer`'s label to an item (of `tenant`, when given); the item, now `labelled`, with
        every label."""
        check_label(label, score)
        if not reviewer.strip():
            raise BadLabel("A label needs its reviewer: who says so.")
        self.get(item_id, tenant)  # ItemNotFound before anything is written
        row = {"item_id": item_id, "reviewer": reviewer, "created_at": self.clock(), "label": label,
               "score": float(score) if score is not None else None, "comment": comment}
        with self.store.transaction("label a review item in") as conn:
            conn.execute(insert(review_labels).values(row))
            conn.execute(update(review_items).where(review_items.c.id == item_id).values(status="labelled"))
        return self.get(item_id, tenant)

    def labelled_pairs(
        self, *, judge: str | None = None, tenant: str | None = None, source: Source | None = None,
        since: float | None = None,
    ) -> list[tuple[dict[str, Any], Label]]:
        """(judge verdict, human label) for every label of an item that has a verdict: one pair per label
        and verdict, so two reviewers of one item make two pairs. `judge` keeps that judge's verdicts
        only; each verdict carries its judge's name under "judge". Oldest label first."""
        self.ready()
        where = [*_filters(tenant, "labelled", source), review_items.c.judge.is_not(None)]
        if since is not None:
            where.append(review_labels.c.created_at >= since)
        query = (select(review_items.c.judge, review_labels)
                 .join(review_labels, review_labels.c.item_id == review_items.c.id).where(*where)
                 .order_by(review_labels.c.created_at, review_labels.c.id))
        pairs: list[tuple[dict[str, Any], Label]] = []
        with self.store.connection() as conn:
            for row in conn.execute(query).mappings():
                verdicts: dict[str, Any] = row["judge"] or {}
                human = _label(dict(row))
                for name, verdict in verdicts.items():
                    if (judge is None or name == judge) and isinstance(verdict, dict):
                        pairs.append(({**verdict, "judge": name}, human))
        return pairs

    def request(self, request_id: str, tenant: str | None = None) -> dict[str, Any]:
        """A call of the request log (of `tenant`, when given), as a row; CallNotFound or ContentNotLogged."""
        with self.store.connection() as conn:
            row = _tenants_row(conn, requests, requests.c.request_id, request_id, tenant)
        if row is None:
            raise CallNotFound(
                f"There is no call '{request_id}' in the request log at {self.store.safe_url}; the id is in the "
                "x-keel-request-id header of the answer (records are written within a second or so)."
            )
        if row["input"] is None:
            raise ContentNotLogged(
                f"The call '{request_id}' was logged without its content (store.log_content is false, or it was "
                "refused before it was read): there is nothing to review or promote. Turn store.log_content on."
            )
        return row

    def add_call(self, request_id: str, tenant: str | None = None, reference: Any = None) -> tuple[ReviewItem, bool]:
        """The call `request_id` of the request log as a `production` item (its tenant's)."""
        self.ready()
        row = self.request(request_id, tenant)
        return self.add(new_item("production", ref=request_id, tenant=row["tenant"], input=row["input"],
                                 output=row["output"], reference=reference))


def _tenants_row(conn: Any, table: Table, key: Column[Any], value: str, tenant: str | None) -> dict[str, Any] | None:
    """The row of `table` whose `key` is `value` (and whose tenant is `tenant`, when given)."""
    where = key == value
    if tenant is not None:
        where &= table.c.tenant == tenant
    row = conn.execute(select(table).where(where)).mappings().first()
    return None if row is None else dict(row)


def _filters(tenant: str | None, status: str | None, source: str | None) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if tenant is not None:
        where.append(review_items.c.tenant == tenant)
    if status is not None:
        where.append(review_items.c.status == status)
    if source is not None:
        where.append(review_items.c.source == source)
    return where


def _labels(conn: Any, item_ids: Iterable[str]) -> dict[str, list[Label]]:
    ids = list(item_ids)
    found: dict[str, list[Label]] = {}
    if not ids:
        return found
    query = (select(review_labels).where(review_labels.c.item_id.in_(ids))
             .order_by(review_labels.c.created_at, review_labels.c.id))
    for row in conn.execute(query).mappings():
        found.setdefault(row["item_id"], []).append(_label(dict(row)))
    return found


def _label(row: Mapping[str, Any]) -> Label:
    return Label(row["reviewer"], row["created_at"], row["label"], row["score"], row["comment"], row["item_id"])


def _row(item: ReviewItem) -> dict[str, Any]:
    return {"id": item.id, "tenant": item.tenant, "source": item.source, "ref": item.ref,
            "created_at": item.created_at, "input": item.input, "output": item.output,
            "reference": item.reference, "judge": item.judge, "status": item.status}


def _item(row: dict[str, Any]) -> ReviewItem:
    return ReviewItem(row["id"], row["source"], row["created_at"], row["status"], row["tenant"], row["ref"],
                      row["input"], row["output"], row["reference"], row["judge"])

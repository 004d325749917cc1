"""What feeds the review queue, and the online judge, without touching the request path.

- Production calls: `ReviewFeed.watch(sink)` wraps the request log's sink. Each finished chat call's
  record is offered on its way to the log: a share (`review.sample_rate`) becomes a review item, and
  every failed or flagged call too when `review.failed` / `review.flagged` say so. The decision is a
  random number and a few comparisons on the event loop; the item is queued in memory (bounded) and
  written by a thread of its own, with the request log's content policy (redaction, cut, or nothing
  when `store.log_content` is off, in which case no item is made).
- Semantic-cache hits: `ReviewFeed.semantic_hit` is the cache's `ReviewHook` (its models'
  `cache.semantic.review_sample_rate` choose the share).
- Eval runs: `enqueue_eval_results(queue, run_id, results, cases)` sends a run's failed cases.
- Online judging: a share (`review.judge_sample_rate`) of answered calls goes to `keel.review.judge`,
  an async callable taking the `RequestRecord`, run by worker tasks (started with the Keel, stopped
  with it) from a bounded queue. The judge calls models through Keel under the feature `keel.judge`,
  so a budget rule on that feature caps its spend; a `BudgetExceeded` drops that sample and is counted.
  A verdict it returns (a mapping) is stored with the call's time, model and deployment
  (keel.evals.online_scores: the drift monitor's judge score), and kept as the `online` judge of the
  call's review item, when the call was sampled for review too.

Keel's own calls (features `keel.*`: guardrails, router, judge) and eval runs (`eval:*`) are never
sampled: a judge must not judge itself. A full queue drops and counts; nothing here ever blocks or fails
a call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from keel.config import KeelConfig, ReviewConfig
from keel.errors import BudgetExceeded
from keel.evals.online_scores import ONLINE_JUDGE, OnlineScore, OnlineScores
from keel.evals.review import ReviewItem, ReviewQueue, new_item
from keel.observability.record import RequestRecord, SpanRecord
from keel.observability.stage import RecordSink
from keel.observability.store import RecordStore, StoreError
from keel.observability.writer import ContentPolicy

if TYPE_CHECKING:
    from keel.cache.semantic import SemanticHit
    from keel.evals.dataset import Case
    from keel.evals.results import CaseResult

log = logging.getLogger("keel.review")

JudgeHook = Callable[[RequestRecord], Awaitable[Mapping[str, Any] | None]]
"""The online judge: scores one finished call (its record, content unredacted); may return a verdict
(`Score.as_dict()` shape) to keep on the call's review item."""

INTERNAL_FEATURES = ("keel.", "eval:")
_ANSWERED = ("ok", "cached")
_FLAGS = ("flag", "block")


def internal(feature: str | None) -> bool:
    """A call of Keel's own (a guardrail's, the router's, a judge's) or of an eval run."""
    return feature is not None and feature.startswith(INTERNAL_FEATURES)


def failed(record: RequestRecord) -> bool:
    return record.outcome == "error"


def flagged(record: RequestRecord) -> bool:
    return record.outcome == "blocked" or any(v.get("action") in _FLAGS for v in record.guardrails or ())


class ReviewFeed:
    """The feeds of one Keel: its review queue, the sampling of its calls, and the online judge."""

    def __init__(
        self, queue: ReviewQueue, config: ReviewConfig, policy: ContentPolicy, *, rng: random.Random | None = None,
    ) -> None:
        self.queue = queue
        self.config = config
        self.policy = policy
        self.rng = rng or random.Random()
        self.writer = ItemWriter(queue, policy, config.queue_size)
        self.online = OnlineJudging(config.judge_queue_size, config.judge_concurrency)
        if config.sample_rate > 0 or config.failed or config.flagged:
            if not policy.keep:
                log.warning("review.sample_rate/failed/flagged are set but store.log_content is false: calls are "
                            "logged without content, so none can be sampled for review")

    @classmethod
    def of(cls, config: KeelConfig, store: RecordStore, rng: random.Random | None = None) -> ReviewFeed:
        return cls(ReviewQueue(store), config.review, ContentPolicy(config.store), rng=rng)

    @property
    def judge(self) -> JudgeHook | None:
        return self.online.judge

    @judge.setter
    def judge(self, judge: JudgeHook | None) -> None:
        """Set by the judge's module (or a test): what `review.judge_sample_rate` of the calls is sent to."""
        self.online.judge = judge

    @property
    def samples_calls(self) -> bool:
        config = self.config
        review = self.policy.keep and (config.sample_rate > 0 or config.failed or config.flagged)
        return review or config.judge_sample_rate > 0

    def watch(self, sink: RecordSink) -> RecordSink:
        """`sink`, with each record offered to the sampling on its way; `sink` itself when nothing samples
        calls (no cost on the path)."""
        return SamplingSink(sink, self) if self.samples_calls else sink

    def offer(self, record: RequestRecord) -> None:
        """Decide, on the event loop and at once, whether a finished call is reviewed and judged."""
        if record.endpoint != "chat" or internal(record.feature):
            return
        config, rng = self.config, self.rng
        reviewed = False
        if self.policy.keep and record.input is not None:
            bad = failed(record) or flagged(record)
            pool = bad if config.only_failed else bad or record.outcome in _ANSWERED
            reviewed = (config.failed and failed(record)) or (config.flagged and flagged(record)) or (
                pool and config.sample_rate > 0 and rng.random() < config.sample_rate)
        item_id = None
        if reviewed:
            item = new_item("production", ref=record.request_id, tenant=record.tenant, input=record.input,
                            output=record.output, created_at=record.ended_at)
            if self.writer.put(item):
                item_id = item.id
        if (config.judge_sample_rate > 0 and self.online.judge is not None and record.outcome in _ANSWERED
                and rng.random() < config.judge_sample_rate):
            self.online.offer(record, self._verdict_keeper(record, item_id))

    def _verdict_keeper(self, record: RequestRecord, item_id: str | None) -> Callable[[Mapping[str, Any]], None]:
        def keep(verdict: Mapping[str, Any]) -> None:
            self.writer.put_score(OnlineScore(record.request_id, record.started_at, record.model,
                                              record.deployment, dict(verdict)))
            if item_id is not None:
                self.writer.put_judge(item_id, ONLINE_JUDGE, verdict)

        return keep

    def semantic_hit(self, hit: SemanticHit) -> None:
        """The semantic cache's review hook: the hit as a `semantic_cache` item."""
        choices = hit.completion.get("choices") or [{}]
        self.writer.put(new_item(
            "semantic_cache", ref=hit.request_id, tenant=hit.tenant, input=[{"role": "user", "content": hit.query}],
            output=choices[0].get("message"),
            reference={"cached_query": hit.cached_query, "similarity": round(hit.similarity, 6), "model": hit.model},
        ))

    async def start(self) -> None:
        """Start the judge's workers when calls are judged (the item writer starts with its first item)."""
        if self.config.judge_sample_rate > 0:
            await self.online.start()

    async def close(self) -> None:
        """Stop judging (calls in flight are cancelled), then write what is queued."""
        await self.online.close()
        if self.writer.started:
            await asyncio.to_thread(self.writer.close)

    def stats(self) -> dict[str, int]:
        return {"queued": self.writer.depth, "written": self.writer.written, "dropped": self.writer.dropped,
                **{f"judge_{name}": value for name, value in self.online.stats().items()}}


class SamplingSink:
    """A request-log sink that offers each record to the review feed after handing it on."""

    def __init__(self, sink: RecordSink, feed: ReviewFeed) -> None:
        self.sink = sink
        self.feed = feed

    def submit(self, record: RequestRecord) -> None:
        self.sink.submit(record)
        try:
            self.feed.offer(record)
        except Exception:  # sampling must never change what the client gets
            log.exception("could not sample request %s for review", record.request_id)

    def submit_span(self, span: SpanRecord) -> None:
        self.sink.submit_span(span)


Op = tuple[str, Any]  # ("item", ReviewItem), ("judge", (item id, judge name, verdict)) or ("score", OnlineScore)


class ItemWriter:
    """Review items queued in memory (bounded) and written in batches by one thread, in order; a batch the
    database refuses, or one written while it is down, is dropped and counted (items are samples: the
    calls themselves are in the request log)."""

    def __init__(self, queue: ReviewQueue, policy: ContentPolicy, size: int) -> None:
        self.queue = queue
        self.scores = OnlineScores(queue.store)
        self.policy = policy
        self.size = size
        self.written = 0
        self.dropped = 0
        self._ops: deque[Op] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def depth(self) -> int:
        return len(self._ops)

    def put(self, item: ReviewItem) -> bool:
        """Queue an item; False when the queue is full (dropped, counted)."""
        return self._put(("item", item))

    def put_judge(self, item_id: str, name: str, verdict: Mapping[str, Any]) -> bool:
        return self._put(("judge", (item_id, name, dict(verdict))))

    def put_score(self, score: OnlineScore) -> bool:
        """Queue an online judge's score for the drift monitor."""
        return self._put(("score", score))

    def _put(self, op: Op) -> bool:
        if len(self._ops) >= self.size or self._stop:
            self.dropped += 1
            return False
        self._ops.append(op)
        if self._thread is None:
            self.start()  # on the first item: a Keel whose calls are never sampled has no thread
        self._wake.set()
        return True

    def start(self) -> None:
        with self._starting:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="keel-review-feed", daemon=True)
            self._thread.start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or dropped); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._ops and not self._busy, timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drain()  # finished late: write what is left from here
        self._stop = False  # a Keel started again writes again

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self._drain()
            if self._stop:
                return

    def _drain(self) -> None:
        while self._ops:
            with self._idle:
                self._busy = True
            batch: list[Op] = []
            while self._ops and len(batch) < 200:
                batch.append(self._ops.popleft())
            try:
                self._write(batch)
            except StoreError as exc:
                self.dropped += len(batch)
                log.warning("review queue: %d item(s) not written: %s", len(batch), exc)
            except Exception:
                self.dropped += len(batch)
                log.exception("review queue: %d item(s) not written", len(batch))
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()
        with self._idle:
            self._idle.notify_all()

    def _write(self, batch: Iterable[Op]) -> None:
        items: list[ReviewItem] = []
        scores: list[OnlineScore] = []
        for kind, value in batch:
            if kind == "item":
                item = self._kept(value)
                if item is not None:
                    items.append(item)
                continue
            if kind == "score":
                scores.append(value)
                continue
            self.written += self.queue.add_many(items)  # the item first: a verdict follows its item
            items = []
            self.queue.set_judge(*value)
        self.written += self.queue.add_many(items)
        if scores:
            self.queue.ready()  # the schema, once
            self.scores.save(scores)

    def _kept(self, item: ReviewItem) -> ReviewItem | None:
        """The item as the request log would keep it: redacted and cut; None when content is not kept."""
        policy = self.policy
        item.input = policy.apply(item.input)
        if item.input is None:
            return None
        item.output = policy.apply(item.output)
        item.reference = policy.apply(item.reference) if item.source == "semantic_cache" else item.reference
        return item


class OnlineJudging:
    """Finished calls waiting for the judge (bounded), and the worker tasks that judge them."""

    def __init__(self, size: int, concurrency: int) -> None:
        self.judge: JudgeHook | None = None
        self.size = size
        self.concurrency = concurrency
        self.judged = 0
        self.dropped = 0
        self.failed = 0
        self.over_budget = 0
        self._queue: asyncio.Queue[tuple[RequestRecord, Callable[[Mapping[str, Any]], None] | None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Task[None]] = []

    def stats(self) -> dict[str, int]:
        return {"judged": self.judged, "dropped": self.dropped, "failed": self.failed,
                "over_budget": self.over_budget}

    async def start(self) -> None:
        if self._workers:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.size)
        self._workers = [asyncio.create_task(self._work(), name=f"keel-online-judge-{i}")
                         for i in range(self.concurrency)]

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._queue = None

    async def idle(self) -> None:
        """Wait until every call offered so far has been judged (tests, and a graceful drain)."""
        if self._queue is not None:
            await self._queue.join()

    def offer(self, record: RequestRecord, keep: Callable[[Mapping[str, Any]], None] | None = None) -> None:
        queue, loop = self._queue, self._loop
        if queue is None or loop is None:
            self.dropped += 1
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(queue, record, keep)
        else:  # a finaliser run on another thread: hand it to the workers' loop
            loop.call_soon_threadsafe(self._put, queue, record, keep)

    def _put(self, queue: asyncio.Queue[Any], record: RequestRecord,
             keep: Callable[[Mapping[str, Any]], None] | None) -> None:
        try:
            queue.put_nowait((record, keep))
        except asyncio.QueueFull:
            self.dropped += 1

    async def _work(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            record, keep = await queue.get()
            try:
                await self._judged(record, keep)
            finally:
                queue.task_done()

    async def _judged(self, record: RequestRecord, keep: Callable[[Mapping[str, Any]], None] | None) -> None:
        judge = self.judge
        if judge is None:
            self.dropped += 1
            return
        try:
            verdict = await judge(record)
        except BudgetExceeded as exc:
            self.over_budget += 1
            if self.over_budget == 1:
                log.warning("online judging stopped by its budget (%s); samples are dropped until it resets",
                            exc.message)
            return
        except Exception:
            self.failed += 1
            log.exception("the online judge failed on request %s", record.request_id)
            return
        self.judged += 1
        if keep is not None and isinstance(verdict, Mapping):
            keep(verdict)


def failed_cases(results: Iterable[CaseResult]) -> list[CaseResult]:
    """The cases of a run that failed: an error, or a metric that did not pass."""
    return [r for r in results if r.error is not None or any(s.get("passed") is False for s in r.scores.values())]


def enqueue_eval_results(
    queue: ReviewQueue, run_id: str, results: Iterable[CaseResult], cases: Mapping[str, Case] | None = None,
    *, every: bool = False,
) -> int:
    """Send a run's failed cases (`every`: all its cases, as measuring a judge against people needs) to the
    review queue (blocking: `await asyncio.to_thread(...)` from async code); how many items were new. Each
    item's ref is "<run id>/<case id>", so a resumed run adds none twice; `cases` (by id) gives each item
    its input and reference; the metrics' scores are its verdicts."""
    items = []
    for result in list(results) if every else failed_cases(results):
        case = (cases or {}).get(result.case_id)
        input_: Any = None
        reference: Any = None
        if case is not None:
            input_ = list(case.messages) if case.messages else {"variables": case.variables}
            reference = case.reference if case.reference is not None else (
                {"criteria": case.criteria} if case.criteria else None)
        output = result.output if result.error is None else {"error": result.error}
        items.append(new_item("eval", ref=f"{run_id}/{result.case_id}", input=input_, output=output,
                              reference=reference, judge=result.scores or None))
    return queue.add_many(items)

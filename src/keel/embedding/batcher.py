"""Concurrent embedding calls grouped into batches, run off the event loop.

A call's texts join one queue. The first text to arrive at an idle queue waits `window_s` for
others (or until `max_batch` texts are waiting); then batches of at most `max_batch` texts run
one after another on one worker thread, and texts that arrive meanwhile join the next batch
without waiting again. onnxruntime releases the GIL, so the event loop keeps serving while a
batch runs. A call abandoned by its caller keeps no place: its texts still waiting are skipped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from keel.embedding.model import SentenceEmbedder, Vectors

if TYPE_CHECKING:
    import numpy.typing as npt


@dataclass(slots=True)
class _Call:
    """One caller's texts: its rows fill in as their batches finish."""

    future: asyncio.Future[Vectors]
    array: npt.NDArray[np.float32]
    tokens: list[int]
    missing: int = field(init=False)

    def __post_init__(self) -> None:
        self.missing = len(self.tokens)

    def put(self, index: int, vector: npt.NDArray[np.float32], tokens: int) -> None:
        self.array[index] = vector
        self.tokens[index] = tokens
        self.missing -= 1
        if self.missing == 0 and not self.future.done():
            self.future.set_result(Vectors(self.array, self.tokens))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Batcher:
    """Embeds texts for many concurrent callers in shared batches. Use it from one event loop."""

    def __init__(self, model: SentenceEmbedder, *, max_batch: int = 32, window_s: float = 0.002) -> None:
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches = 0  # batches run so far (tests and the benchmark read it)
        self._waiting: deque[tuple[str, _Call, int]] = deque()
        self._drain: asyncio.Task[None] | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="keel-embedder")

    async def embed(self, texts: list[str]) -> Vectors:
        """Unit vectors for `texts` (one row each, in order) and their token counts."""
        loop = asyncio.get_running_loop()
        call = _Call(loop.create_future(), np.empty((len(texts), self.model.dimensions), np.float32), [0] * len(texts))
        self._waiting.extend((text, call, i) for i, text in enumerate(texts))
        if self._drain is None or self._drain.done():
            self._drain = loop.create_task(self._run())
        return await call.future

    async def close(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
        for _, call, _ in self._waiting:
            call.fail(RuntimeError("the embedder was closed"))
        self._waiting.clear()
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if len(self._waiting) < self.max_batch and self.window_s > 0:
            await asyncio.sleep(self.window_s)  # let calls arriving together share the first batch
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            batch = [item for item in batch if not item[1].future.done()]  # abandoned or failed calls
            if not batch:
                continue
            try:
                vectors = await loop.run_in_executor(self._worker, self.model.encode, [text for text, _, _ in batch])
            except Exception as exc:
                for _, call, _ in batch:
                    call.fail(exc)
                continue
            self.batches += 1
            for row, (_, call, index) in enumerate(batch):
                call.put(index, vectors.array[row], vectors.tokens[row])

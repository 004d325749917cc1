"""The `local-embedder` deployment: the embedded embedding model (all-MiniLM-L6-v2, int8 ONNX,
384 dimensions) serving /v1/embeddings in-process, offline, at no cost.

Inputs are strings (one, or a list); token-id arrays are refused, because their ids would have
to be the model's own WordPiece ids, which no client sends. Inputs longer than
`max_input_tokens` (256 by default) are cut to it, as sentence-transformers does; usage counts
the tokens embedded. `dimensions` may only be 384: the model cannot shorten its vectors.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from keel.config import LocalEmbedderDeployment
from keel.embedding import DIMENSIONS, MODEL_NAME, Batcher, load_embedder
from keel.errors import NotSupported
from keel.pipeline import Call, Completion
from keel.types import ChatRequest, EmbeddingRequest


class LocalEmbedderProvider:
    def __init__(self, config: LocalEmbedderDeployment, name: str) -> None:
        self.config = config
        self.name = name
        self.model = Path(config.model_path).stem if config.model_path else MODEL_NAME
        self._batcher: Batcher | None = None
        self._starting = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        """The model is in memory (`/readyz` reads this)."""
        return self._batcher is not None

    async def start(self) -> None:
        async with self._starting:
            if self._batcher is not None:
                return
            config = self.config
            model = await asyncio.to_thread(
                load_embedder, config.model_path, config.tokenizer_path,
                max_tokens=config.max_input_tokens, threads=config.n_threads, quantize=config.quantize,
            )
            self._batcher = Batcher(model, max_batch=config.max_batch, window_s=config.batch_window_ms / 1000)

    async def close(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.close()

    async def chat(self, request: ChatRequest, call: Call) -> Completion:
        raise NotSupported(
            f"deployment '{self.name}' is an embedding model ({self.model}) and cannot chat; "
            "send chat completions to a chat model (with no keel.yaml: 'local')",
            param="model",
        )

    async def embed(self, request: EmbeddingRequest, call: Call) -> Completion:
        texts = self._texts(request)
        if self._batcher is None:
            await self.start()
        assert self._batcher is not None
        vectors = await self._batcher.embed(texts)
        as_base64 = request.encoding_format == "base64"
        data = [
            {"object": "embedding", "index": i,
             # OpenAI's base64 is the little-endian float32 bytes; the floats are the same float32 values.
             "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") if as_base64 else row.tolist()}
            for i, row in enumerate(vectors.array)
        ]
        tokens = sum(vectors.tokens)
        usage: dict[str, Any] = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Completion({"object": "list", "data": data, "model": self.model, "usage": usage})

    def _texts(self, request: EmbeddingRequest) -> list[str]:
        """The request's strings, or a 400 saying what this deployment cannot take."""
        if request.dimensions is not None and request.dimensions != DIMENSIONS:
            raise NotSupported(
                f"deployment '{self.name}' ({self.model}) makes {DIMENSIONS}-dimensional vectors only; "
                f"omit dimensions or send {DIMENSIONS}",
                param="dimensions",
            )
        value = request.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, str) for item in value):
            return [str(item) for item in value]
        raise NotSupported(
            f"deployment '{self.name}' (the local embedder) takes text only, not token ids: "
            "send input as a string or a list of strings",
            param="input",
        )

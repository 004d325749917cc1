"""The local embedder: all-MiniLM-L6-v2 (384 dimensions) as int8 ONNX on onnxruntime, batched and
run off the event loop. The `local-embedder` provider serves it on /v1/embeddings; the semantic
cache, routing and evals use it through `Batcher.embed`.

    model = load_embedder()                  # blocking, ~0.1 s (the first time ~2 s: it quantizes, then caches)
    batcher = Batcher(model)
    vectors = await batcher.embed(["hello", "hi there"])   # vectors.array: float32, shape (2, 384)
"""

from keel.embedding.batcher import Batcher
from keel.embedding.model import DIMENSIONS, MODEL_NAME, SentenceEmbedder, Vectors, load_embedder

__all__ = ["DIMENSIONS", "MODEL_NAME", "Batcher", "SentenceEmbedder", "Vectors", "load_embedder"]

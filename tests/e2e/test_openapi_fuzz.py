"""Schemathesis against Keel's own OpenAPI document (`GET /openapi.json`), over a real `keel serve`
with the simulated provider: every documented operation, the hot routes (chat, embeddings, responses,
messages, completions) and the admin and dashboard APIs included (called with the master key).

Properties: no answer is a 5xx; every answer, errors included, conforms to the document (errors in
OpenAI's shape, Anthropic's on /v1/messages); the status and content type are documented ones; a
request that breaks the document is refused with a 4xx. Not checked: that every schema-valid request
is accepted (JSON Schema's `integer` takes 1.0, which Keel's strict parser refuses, as OpenAI does, with
a 400 that says so; the dialects' bodies are described by their main fields only).

And the gateway's memory stays bounded: its peak resident size (VmHWM) after the fuzz is under
`PEAK_RSS_MB`. Schemathesis found requests of a few bytes that made the simulated model build gigabytes
(`dimensions` of 2.7 * 10^12 on /v1/embeddings: 7 GB, then a MemoryError; a JSON schema whose smallest
value has 10^12 items: 16 GB); the largest answer it may build now (2,048 inputs of 3,072 dimensions)
peaks near 500 MB.

Bounded for `make test` (a fixed number of examples per operation, derandomized: the same cases on
every run); KEEL_FUZZ_EXAMPLES=<n> runs more (`make soak` runs 500 per operation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import GatewayProcess
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from observability_helpers import store_section
from schemathesis import Case, GenerationMode
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "sk-keel-openapi-fuzz"
EXAMPLES = int(os.environ.get("KEEL_FUZZ_EXAMPLES", "25"))
PEAK_RSS_MB = 1024  # the gateway's peak resident size after the fuzz: it starts near 120 MB
HOT = ["/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages", "/v1/completions"]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("openapi-fuzz")
    config: dict[str, Any] = {
        "models": [{"name": "sim", "deployments": [{"provider": "simulated"}]}],
        "store": store_section(f"sqlite:///{tmp / 'keel.db'}", tmp),
    }
    process = GatewayProcess(config, tmp, {"KEEL_MASTER_KEY": KEY})
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def document(gw: GatewayProcess) -> dict[str, Any]:
    answer = httpx.get(gw.url + "/openapi.json", headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.fixture(scope="module")
def api_schema(gw: GatewayProcess, document: dict[str, Any]) -> Any:
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=gw.url)
    return schema


def test_the_document_describes_every_route_the_gateway_serves(gw: GatewayProcess, document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in HOT:
        assert "post" in paths[path], path
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["model"] == {"type": "string", "enum": ["sim"]}
    for path in ("/v1/models", "/v1/models/{model}", "/metrics", "/healthz", "/readyz", "/admin/keys",
                 "/admin/budgets", "/admin/requests", "/admin/cache", "/dashboard/api/overview",
                 "/v1/responses/{response_id}"):
        assert path in paths, path
    for operations in paths.values():
        for operation in operations.values():
            assert "422" not in operation["responses"]  # Keel never answers FastAPI's {"detail": ...}
            assert "default" in operation["responses"]
    assert httpx.get(gw.url + "/openapi.json", timeout=30).status_code == 401  # behind the key, as /v1/models


def operations(api_schema: Any) -> list[APIOperation]:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_in_its_documented_shape_and_never_a_5xx(
    gw: GatewayProcess, api_schema: Any, mode: GenerationMode,
) -> None:
    """Each operation in turn, with `EXAMPLES` cases: valid ones (POSITIVE) and ones that break the
    document (NEGATIVE: those must be refused with a 4xx); then the gateway's peak memory is in bounds."""
    failures: list[str] = []
    seen: set[tuple[str, str]] = set()
    for operation in operations(api_schema):
        seen.add((operation.method.upper(), operation.path))

        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                   excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:  # NEGATIVE: nothing in this operation can break the document (no body, string ids)
            pass
        except Exception as exc:  # every operation is tried; the failures are reported together
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert {("POST", path) for path in HOT} <= seen
    peak = peak_rss_mb(gw)  # first: memory grown without bound also fails the calls that follow (timeouts)
    assert peak < PEAK_RSS_MB, f"the gateway's resident size peaked at {peak} MB under the fuzz"
    assert not failures, "\n\n".join(failures)


def peak_rss_mb(gw: GatewayProcess) -> int:
    """The gateway process's peak resident size so far (Linux's VmHWM), in MB."""
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway is not running"
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    [line] = [line for line in status.splitlines() if line.startswith("VmHWM:")]
    return int(line.split()[1]) // 1024  # "VmHWM:   123456 kB"


def test_a_bad_parameter_of_the_admin_api_is_a_400_in_openai_shape(gw: GatewayProcess) -> None:
    """What the fuzz found: FastAPI answered a path parameter that does not validate with its own 422
    `{"detail": [...]}`; Keel answers a 400 in OpenAI's shape naming the parameter."""
    answer = httpx.delete(gw.url + "/admin/budgets/not-a-number", headers={"authorization": f"Bearer {KEY}"},
                          timeout=30)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "index" and error["type"] == "invalid_request_error"
    assert "'index'" in error["message"] and "not-a-number" in error["message"]

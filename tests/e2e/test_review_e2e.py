"""Acceptance: the review queue's admin API through a real `keel serve` with virtual keys.

A call made with the openai SDK is added to the queue by its request id (its input and output copied
from the request log), labelled by two reviewers of its tenant (each label kept with who), and
invisible to another tenant's admin key; errors come in OpenAI's shape with precise codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
from conftest import GatewayProcess

MASTER = "sk-master-review-e2e"


def admin(gw: GatewayProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=10)


def new_key(gw: GatewayProcess, **spec: Any) -> str:
    made = admin(gw, MASTER).post("/admin/keys", json=spec)
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def added(client: httpx.Client, request_id: str) -> httpx.Response:
    """POST the call to the queue, waiting (a bound to fail on) for the request log's writer to store it."""
    deadline = time.monotonic() + 15
    while True:  # each poll is a real request; the deadline is a bound to fail on, not a wait
        answer = client.post("/admin/review", json={"request_id": request_id})
        if answer.status_code != 404 or time.monotonic() > deadline:
            return answer


def error(answer: httpx.Response, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_a_call_is_added_labelled_by_two_reviewers_and_hidden_from_another_tenant(
    gateway: Callable[..., GatewayProcess], tmp_path: Path,
) -> None:
    config = {"models": [{"name": "chat", "deployments": [{"provider": "simulated"}]}],
              "store": {"url": f"sqlite:///{tmp_path / 'keel.db'}", "flush_interval_ms": 20},
              "auth": {"virtual_keys": True}}
    gw = gateway(config, env={"KEEL_MASTER_KEY": MASTER})
    alice = new_key(gw, tenant="team-a", owner="alice", admin=True)
    bob = new_key(gw, tenant="team-a", owner="bob", admin=True)
    carol = new_key(gw, tenant="team-b", owner="carol", admin=True)

    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=alice, max_retries=0, timeout=10)
    raw = sdk.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "What is the capital of France?"}])
    request_id = raw.headers["x-keel-request-id"]
    answer_text = raw.parse().choices[0].message.content

    as_alice, as_bob, as_carol, as_master = (admin(gw, k) for k in (alice, bob, carol, MASTER))
    assert error(as_carol.post("/admin/review", json={"request_id": request_id}), 404)["code"] == "request_not_found"
    made = added(as_alice, request_id)
    assert made.status_code == 201, made.text
    item = made.json()
    assert (item["source"], item["ref"], item["tenant"], item["status"]) == ("production", request_id, "team-a",
                                                                            "pending")
    assert item["input"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert item["output"]["content"] == answer_text
    assert as_bob.post("/admin/review", json={"request_id": request_id}).status_code == 200  # already there

    url = f"/admin/review/{item['id']}"
    assert as_alice.post(url + "/labels", json={"label": "pass", "comment": "right"}).status_code == 201
    labelled = as_bob.post(url + "/labels", json={"label": "fail", "score": 2})
    assert labelled.status_code == 201, labelled.text
    seen = as_alice.get(url).json()
    assert seen["status"] == "labelled"
    assert [(lbl["reviewer"], lbl["label"], lbl["score"], lbl["comment"]) for lbl in seen["labels"]] == [
        ("alice", "pass", None, "right"), ("bob", "fail", 2.0, None)]
    assert all(lbl["created_at"] > 0 for lbl in seen["labels"])

    # Another tenant's admin key: the item does not exist for it.
    assert error(as_carol.get(url), 404)["code"] == "review_item_not_found"
    assert error(as_carol.post(url + "/labels", json={"label": "pass"}), 404)["code"] == "review_item_not_found"
    assert as_carol.get("/admin/review").json()["data"] == []
    assert error(as_carol.get("/admin/review", params={"tenant": "team-a"}), 403)["type"] == "permission_error"
    listed = as_alice.get("/admin/review", params={"status": "labelled"}).json()
    assert [i["id"] for i in listed["data"]] == [item["id"]] and listed["total"] == 1

    # The master key sees every tenant and says who labels; bad labels and unknown items are precise.
    assert error(as_master.post(url + "/labels", json={"label": "pass"}), 400)["code"] == "invalid_label"
    assert as_master.post(url + "/labels", json={"label": "pass", "reviewer": "lead"}).status_code == 201
    assert error(as_alice.post(url + "/labels", json={"label": "maybe"}), 400)["code"] == "invalid_label"
    assert error(as_alice.post(url + "/labels", json={"comment": "no verdict"}), 400)["param"] is None
    assert error(as_alice.post(url + "/labels", content=b"{"), 400)["code"] == "invalid_json"
    assert error(as_alice.get("/admin/review/rev_nope"), 404)["code"] == "review_item_not_found"
    assert error(as_alice.get("/admin/review", params={"status": "done"}), 400)["code"] == "invalid_request"
    assert error(as_alice.get("/admin/review", params={"limit": "x"}), 400)["param"] == "limit"
    assert [lbl["reviewer"] for lbl in as_master.get(url).json()["labels"]] == ["alice", "bob", "lead"]

    # By hand: the tenant admin's item is its tenant's.
    hand = as_bob.post("/admin/review", json={"input": "Is 2+2 4?", "output": "yes", "reference": "yes"})
    assert hand.status_code == 201 and hand.json()["tenant"] == "team-a"
    assert as_alice.get("/admin/review").json()["data"][0]["id"] == hand.json()["id"]  # pending first
    assert error(as_bob.post("/admin/review", json={"request_id": request_id, "input": "x"}), 400)

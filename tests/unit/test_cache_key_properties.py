"""Properties of the exact cache's key (keel.cache.key): equal requests up to the order of their
dict keys get equal keys; a change of any field that determines the answer changes the key, one
that only changes delivery does not; and two tenants never share a key."""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from keel.cache.key import KeyScope, cache_key
from keel.types import ChatRequest

TEXT = st.text(max_size=20)
# Integers as a parsed body holds them: orjson reads a larger one as a float.
INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT})
PARAMS = st.dictionaries(st.text(min_size=1, max_size=5), INT | TEXT | st.booleans(), max_size=3)
REQUEST = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=12).filter(lambda s: s.isprintable()),
     "messages": st.lists(MESSAGE, min_size=1, max_size=3)},
    optional={"temperature": st.floats(min_value=0, max_value=2), "top_p": st.floats(min_value=0, max_value=1),
              "max_tokens": st.integers(min_value=1, max_value=4096), "seed": INT,
              "stop": TEXT | st.lists(TEXT, max_size=3),
              "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
                  {"name": st.from_regex(r"[a-z]{1,8}", fullmatch=True), "parameters": st.fixed_dictionaries(
                      {"type": st.just("object"), "properties": st.dictionaries(
                          st.from_regex(r"[a-z]{1,5}", fullmatch=True),
                          st.fixed_dictionaries({"type": st.sampled_from(["string", "integer"])}), max_size=3)})})}),
                  min_size=1, max_size=2),
              "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
              "unknown_vendor_param": PARAMS})
TENANT = st.none() | st.text(max_size=10)


def reordered(value: Any, rng: st.DataObject) -> Any:
    """`value` with the keys of every dict in it in another order (the same JSON value)."""
    if isinstance(value, dict):
        keys = rng.draw(st.permutations(list(value)))
        return {k: reordered(value[k], rng) for k in keys}
    if isinstance(value, list):
        return [reordered(item, rng) for item in value]
    return value


def key(fields: dict[str, Any], tenant: str | None = None) -> str:
    return cache_key(ChatRequest.model_validate(fields), tenant)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(REQUEST, TENANT, st.data())
def test_the_order_of_dict_keys_does_not_change_the_key(fields: dict[str, Any], tenant: str | None,
                                                        data: st.DataObject) -> None:
    assert key(reordered(fields, data), tenant) == key(fields, tenant)


# Each: a change to a field that determines the answer.
CHANGES = st.sampled_from([
    ("model", lambda r: r["model"] + "x"),
    ("messages", lambda r: [*r["messages"], {"role": "user", "content": "and?"}]),
    ("messages", lambda r: [{**r["messages"][0], "content": r["messages"][0]["content"] + "."}, *r["messages"][1:]]),
    ("messages", lambda r: [{**r["messages"][0], "role": "developer"}, *r["messages"][1:]]),
    ("temperature", lambda r: 0.5 if r.get("temperature") != 0.5 else 0.25),
    ("seed", lambda r: (r.get("seed") or 0) + 1),
    ("max_tokens", lambda r: (r.get("max_tokens") or 1) + 1),
    ("stop", lambda r: ["\n\n\n", *(r.get("stop") or [])] if isinstance(r.get("stop"), list) else "END!"),
    ("response_format", lambda r: {"type": "json_object" if r.get("response_format", {}).get("type") != "json_object"
                                   else "text"}),
    ("tools", lambda r: [{"type": "function", "function": {"name": "zz_" + str(len(r.get("tools") or []))}},
                         *(r.get("tools") or [])]),
    ("unknown_vendor_param", lambda r: {**(r.get("unknown_vendor_param") or {}), "new": 1}),
    ("logprobs", lambda r: True),
])


@settings(max_examples=80, derandomize=True, deadline=None)
@given(REQUEST, TENANT, CHANGES)
def test_a_change_that_determines_the_answer_changes_the_key(fields: dict[str, Any], tenant: str | None,
                                                            change: tuple[str, Any]) -> None:
    name, new = change
    changed = {**fields, name: new(fields)}
    assume(changed != fields)
    assert key(changed, tenant) != key(fields, tenant), f"changing {name} kept the key"


USER = st.from_regex(r"[a-z0-9-]{0,12}", fullmatch=True)
METADATA = st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), TEXT, max_size=3)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(REQUEST, TENANT, st.booleans(), USER, METADATA)
def test_delivery_fields_do_not_change_the_key(fields: dict[str, Any], tenant: str | None, stream: bool,
                                               user: str, metadata: dict[str, str]) -> None:
    delivered = {**fields, "stream": stream, "user": user, "metadata": metadata}
    if stream:
        delivered["stream_options"] = {"include_usage": True}
    assert key(delivered, tenant) == key(fields, tenant)


@settings(max_examples=80, derandomize=True, deadline=None)
@given(REQUEST, TENANT, TENANT)
def test_two_tenants_never_share_a_key_and_each_scope_finds_only_its_own(fields: dict[str, Any], a: str | None,
                                                                        b: str | None) -> None:
    assume(a != b)
    key_a, key_b = key(fields, a), key(fields, b)
    assert key_a != key_b
    if a is not None:
        assert KeyScope(tenant=a).matches(key_a)
        assert not KeyScope(tenant=a).matches(key_b)
        assert KeyScope(tenant=a, model=fields["model"]).matches(key_a)

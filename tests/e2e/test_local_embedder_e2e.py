"""The official `openai` SDK against a real `keel serve` running the default config (what
`make run` serves with no keel.yaml): the embedded embedding model answers /v1/embeddings
offline next to the embedded chat model, and /readyz names both."""

from __future__ import annotations

import base64
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from conftest import GatewayProcess
from openai import BadRequestError, OpenAI
from spec import EMBEDDINGS, validate

from keel.config import default_config
from keel.embedding.model import model_file
from keel.errors import ModelNotLoaded

try:
    model_file()
    import llama_cpp  # noqa: F401  (the default config serves the chat model too)
    import onnxruntime  # noqa: F401

    MISSING = None
except (ModelNotLoaded, ImportError) as exc:
    MISSING = str(exc)
pytestmark = [
    pytest.mark.local_model,
    pytest.mark.skipif(MISSING is not None, reason=f"the local extra is not installed: {MISSING}"),
]


def test_the_sdk_gets_embeddings_from_the_default_config(gateway: Callable[..., GatewayProcess]) -> None:
    gw = gateway(default_config().model_dump(mode="json", exclude_unset=True))
    checks = httpx.get(gw.url + "/readyz").json()["checks"]
    assert checks["model:local"]["ok"] and checks["model:local-embedder"]["ok"]
    client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)

    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue rose 4%."]
    answer = client.embeddings.create(model="local-embed", input=texts)
    assert answer.model == "all-MiniLM-L6-v2" and [d.index for d in answer.data] == [0, 1, 2]
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > len(texts) * 2
    vectors = np.array([d.embedding for d in answer.data])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # the paraphrase is the closer one

    # The raw body, as the spec describes it; base64 carries the same float32 values.
    raw = httpx.post(gw.url + "/v1/embeddings", json={"model": "local-embed", "input": texts[0]})
    validate(EMBEDDINGS, raw.json())
    packed = httpx.post(gw.url + "/v1/embeddings",
                        json={"model": "local-embed", "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == raw.json()["data"][0]["embedding"] == answer.data[0].embedding

    with pytest.raises(BadRequestError) as refused:
        client.embeddings.create(model="local-embed", input="hi", dimensions=256)
    assert refused.value.body is not None and "384-dimensional" in str(refused.value.body)
    with pytest.raises(BadRequestError, match="cannot chat"):
        client.chat.completions.create(model="local-embed", messages=[{"role": "user", "content": "hi"}])

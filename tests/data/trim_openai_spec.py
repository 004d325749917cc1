"""Write tests/data/openai-spec/openapi.json: OpenAI's API description cut down to the schemas the
tests validate against and everything they reference (45 KB instead of 3.4 MB).

    python tests/data/trim_openai_spec.py PATH/TO/openai-openapi/openapi.json

A test that needs another schema adds its name to ROOTS and runs this again on the full file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "ErrorResponse",
    "Response",  # the Responses API (/v1/responses): its objects and its event stream
    "ResponseStreamEvent",
    "CreateCompletionResponse",  # legacy /v1/completions: answers and stream chunks alike
)
REF_PREFIX = "#/components/schemas/"
OUT = Path(__file__).with_name("openai-spec") / "openapi.json"


def references(node: Any) -> list[str]:
    """The schema names `node` refers to through `$ref`, at any depth."""
    if isinstance(node, list):
        return [name for item in node for name in references(item)]
    if not isinstance(node, dict):
        return []
    found = [name for value in node.values() for name in references(value)]
    ref = node.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith(REF_PREFIX):
            raise ValueError(f"a reference outside components/schemas: {ref}")
        found.append(ref.removeprefix(REF_PREFIX))
    return found


def trimmed(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    kept: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept.add(name)
            todo += references(schemas[name])
    return {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "components": {"schemas": {name: schemas[name] for name in sorted(kept)}},
    }


if __name__ == "__main__":
    full = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    OUT.write_text(json.dumps(trimmed(full), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")

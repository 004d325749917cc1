"""Golden datasets: cases in JSONL or YAML, each an input (a string, chat messages, or a prompt
template's variables), a reference answer or criteria, and tags. A dataset's version is the hash of
its content, so a result always says exactly which cases it was measured on.

Each case is one JSON object (a JSONL line, or an item of a YAML list):

    {"id": "paris", "input": "Capital of France?", "reference": "Paris", "tags": ["geo"]}
    {"input": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "ideal": ["4", "four"]}
    {"variables": {"text": "..."}, "criteria": "names the main risk"}

`ideal` (the openai/evals registry's name) is read as `reference`; a list means any of them is right.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

ROLES = ("system", "developer", "user", "assistant", "tool")
KEYS = {"id", "input", "variables", "reference", "ideal", "criteria", "tags", "metadata"}


class DatasetInvalid(Exception):
    """A dataset file cannot be used; the message names the file, the case and what to change."""


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    messages: tuple[dict[str, Any], ...] = ()  # empty when the case gives template variables instead
    variables: dict[str, Any] | None = None
    reference: Any = None  # a string, a number, an object, or a list of acceptable answers
    criteria: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    digest: str = ""  # sha256 of the case's content

    @property
    def references(self) -> list[Any]:
        """The acceptable answers: `reference` itself, or each item of a list."""
        if self.reference is None:
            return []
        return list(self.reference) if isinstance(self.reference, list) else [self.reference]

    @property
    def question(self) -> str:
        """The last user turn's text (or the variables, as JSON): what a judge is shown as the question."""
        for message in reversed(self.messages):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                return str(message["content"])
        return orjson.dumps(self.variables or {}).decode()


@dataclass(frozen=True, slots=True)
class Dataset:
    name: str
    path: Path
    cases: tuple[Case, ...]
    version: str  # the first 12 hex digits of the sha256 of every case's content, in order

    def __len__(self) -> int:
        return len(self.cases)


def load_dataset(path: str | Path) -> Dataset:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetInvalid(f"cannot read the dataset {path}: {exc}") from None
    entries = _entries(path, text)
    if not entries:
        raise DatasetInvalid(f"{path} holds no cases; add one JSON object per line (JSONL) or a YAML list")
    cases = [_case(entry, path, i) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, case in enumerate(cases):
        if case.id in seen:
            raise DatasetInvalid(
                f"{path}: cases {seen[case.id] + 1} and {i + 1} share the id {case.id!r}; ids are unique")
        seen[case.id] = i
    version = hashlib.sha256("".join(case.digest for case in cases).encode()).hexdigest()[:12]
    return Dataset(path.stem, path, tuple(cases), version)


def _entries(path: Path, text: str) -> list[Any]:
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(orjson.loads(line))
                except orjson.JSONDecodeError as exc:
                    raise DatasetInvalid(f"{path}:{number} is not a JSON object ({exc})") from None
        return entries
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DatasetInvalid(f"{path} is not valid YAML: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("cases"), list):
            data = data["cases"]
        if data is not None and not isinstance(data, list):
            raise DatasetInvalid(f"{path}: a YAML dataset is a list of cases (or a mapping with `cases:`)")
        return data or []
    raise DatasetInvalid(f"{path}: a dataset is a .jsonl, .yaml or .yml file")


def _case(entry: Any, path: Path, i: int) -> Case:
    where = f"{path}: case {i + 1}"
    if not isinstance(entry, dict):
        raise DatasetInvalid(f"{where} is not an object")
    unknown = set(entry) - KEYS
    if unknown:
        raise DatasetInvalid(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a case has "
                             f"{', '.join(sorted(KEYS))}")
    messages = _messages(entry.get("input"), where)
    variables = entry.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise DatasetInvalid(f"{where}: `variables` is an object of a prompt template's variables")
    if not messages and variables is None:
        raise DatasetInvalid(f"{where} has no input: give `input` (text or chat messages) or `variables`")
    reference = entry["ideal"] if "reference" not in entry and "ideal" in entry else entry.get("reference")
    tags = entry.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise DatasetInvalid(f"{where}: `tags` is a list of strings")
    criteria = entry.get("criteria")
    if criteria is not None and not isinstance(criteria, str):
        raise DatasetInvalid(f"{where}: `criteria` is text (what a good answer does)")
    content = {"input": messages, "variables": variables, "reference": reference, "criteria": criteria}
    digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
    case_id = entry.get("id")
    return Case(
        id=str(case_id) if case_id is not None else digest[:12], messages=tuple(messages), variables=variables,
        reference=reference, criteria=criteria, tags=tuple(tags), metadata=dict(entry.get("metadata") or {}),
        digest=digest,
    )


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ROLES and "content" in m for m in value
    ):
        return [dict(m) for m in value]
    raise DatasetInvalid(f"{where}: `input` is text or a list of chat messages ({{role, content}})")

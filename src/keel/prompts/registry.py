"""The prompt templates of a directory (`prompts.dir` in keel.yaml), by name and version, and the
version a call gets when it names a prompt without one: the latest, or the configured A/B split.

A split is sticky: the version is chosen from a hash of the caller (the user, else the key, else the
request id), so a user keeps seeing one variant and the shares hold over many callers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from keel.prompts.template import PromptFileInvalid, PromptNotFound, PromptTemplate

SUFFIXES = (".yaml", ".yml")


def version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: "2" < "10", "v1.9" < "v1.10", "2024-06-01" < "2024-11-01"."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|\D+", version))


class PromptRegistry:
    def __init__(self, templates: Iterable[PromptTemplate], splits: Mapping[str, Mapping[str, float]] | None = None
                 ) -> None:
        self.versions: dict[str, dict[str, PromptTemplate]] = {}
        for template in templates:
            known = self.versions.setdefault(template.name, {})
            if template.version in known and known[template.version].digest != template.digest:
                raise PromptFileInvalid(
                    f"prompt {template.name!r} version {template.version} is defined twice with different "
                    "content; give the new one a new version"
                )
            known[template.version] = template
        self.splits: dict[str, list[tuple[str, float]]] = {}
        for name, shares in (splits or {}).items():
            self.splits[name] = self._split(name, shares)

    @classmethod
    def load(cls, directory: str | Path, splits: Mapping[str, Mapping[str, float]] | None = None) -> PromptRegistry:
        """Every prompt in the YAML files of `directory` (a file holds one prompt, a list, or several
        YAML documents)."""
        root = Path(directory)
        if not root.is_dir():
            raise PromptFileInvalid(f"prompts.dir {root} is not a directory; create it or fix the path in keel.yaml")
        templates = []
        for path in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
            templates += [PromptTemplate.of(entry, str(path)) for entry in _entries(path)]
        return cls(templates, splits)

    def get(self, name: str, version: str | None = None, caller: str | None = None) -> PromptTemplate:
        """The template `name` at `version`; without one, the split's pick for `caller`, else the latest."""
        known = self.versions.get(name)
        if not known:
            listed = ", ".join(sorted(self.versions)) or "none (set prompts.dir in keel.yaml)"
            raise PromptNotFound(f"There is no prompt {name!r}. Prompts served here: {listed}.", param="prompt")
        if version is None:
            version = self._pick(name, caller) if name in self.splits else max(known, key=version_order)
        template = known.get(version)
        if template is None:
            listed = ", ".join(sorted(known, key=version_order))
            raise PromptNotFound(f"Prompt {name!r} has no version {version!r}; its versions: {listed}.",
                                 param="prompt_version")
        return template

    def _split(self, name: str, shares: Mapping[str, float]) -> list[tuple[str, float]]:
        known = self.versions.get(name, {})
        missing = [version for version in shares if version not in known]
        if missing or not shares:
            raise PromptFileInvalid(
                f"prompts.splits.{name} names version(s) {', '.join(missing) or '(none)'} that prompt {name!r} does "
                f"not have; its versions: {', '.join(sorted(known, key=version_order)) or 'none'}"
            )
        total = sum(shares.values())
        if total <= 0 or any(share < 0 for share in shares.values()):
            raise PromptFileInvalid(f"prompts.splits.{name}: shares are positive numbers (weights or percentages)")
        cumulative, edges = 0.0, []
        for version, share in shares.items():
            cumulative += share / total
            edges.append((version, cumulative))
        return edges

    def _pick(self, name: str, caller: str | None) -> str:
        digest = hashlib.sha256(f"{name}\0{caller or ''}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
        edges = self.splits[name]
        return next((version for version, edge in edges if point < edge), edges[-1][0])


def _entries(path: Path) -> list[Any]:
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PromptFileInvalid(f"{path}: cannot read it as YAML ({exc})") from None
    return [entry for doc in documents for entry in (doc if isinstance(doc, list) else [doc])]

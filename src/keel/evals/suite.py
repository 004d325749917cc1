"""A suite file (YAML): the dataset, the target, the request parameters, the metrics with thresholds and
the judge route.

    name: capitals
    dataset: capitals.jsonl            # relative to the suite file
    target: {model: sim}               # or {prompt: summarise, version: "2"}, or
                                       # {base_url: http://host/v1, model: gpt-4o-mini, api_key_env: OPENAI_API_KEY}
    params: {temperature: 0, max_tokens: 32}
    concurrency: 8
    judge: {model: local}              # the route LLM-as-judge metrics ask
    metrics:
      - {type: exact_match, threshold: 0.9}
      - {type: regex, pattern: "^[A-Z]"}
      - {type: latency, max_ms: 2000, threshold: 1500}   # latency and cost: the threshold is a ceiling
"""

from __future__ import annotations

import hashlib
import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jsonschema
import orjson
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from keel.evals.dataset import Dataset, load_dataset
from keel.evals.metrics import Contains, Cost, Embed, ExactMatch, JsonValid, Latency, Numeric, Regex, Semantic
from keel.evals.scoring import Metric

TARGET_MODEL = "eval-target"  # the model name a base_url target is served under inside the runner


class SuiteInvalid(Exception):
    """A suite file cannot be used; the message names the file and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Target(_Strict):
    model: str | None = Field(default=None, description="a model of keel.yaml, or the upstream's model with base_url")
    prompt: str | None = Field(default=None, description="a prompt template of prompts.dir")
    version: str | None = Field(default=None, description="the template's version; default: the latest")
    base_url: str | None = Field(default=None, description="any OpenAI-compatible server, called through Keel")
    api_key_env: str | None = Field(default=None, description="the environment variable holding its API key")

    @model_validator(mode="after")
    def _one_kind(self) -> Target:
        if self.model is None and self.prompt is None:
            raise ValueError("the target names a model, a prompt, or a base_url with a model")
        if self.base_url is not None and (self.model is None or self.prompt is not None):
            raise ValueError("a base_url target names the upstream's model (and no prompt)")
        return self

    def describe(self) -> str:
        if self.base_url:
            return f"{self.model} at {self.base_url}"
        if self.prompt:
            return f"prompt {self.prompt}@{self.version or 'latest'}" + (f" on {self.model}" if self.model else "")
        return f"model {self.model}"


class MetricSpec(_Strict):
    model_config = ConfigDict(extra="allow")  # each metric type has its own settings, checked when built

    type: Literal["exact_match", "contains", "regex", "json_valid", "numeric", "semantic", "latency", "cost",
                  "judge"]
    threshold: float | None = Field(default=None, description="the aggregate (mean) the run must reach")
    name: str | None = Field(default=None, description="the metric's key in results; default: from its type")

    def settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class JudgeRoute(_Strict):
    model: str = Field(description="a model of keel.yaml that judges")
    runs: int = Field(default=1, ge=1, le=20, description="times each case is judged (k > 1: its stability)")


class Suite(_Strict):
    name: str
    dataset: str
    target: Target
    params: dict[str, Any] = Field(default_factory=dict, description="request parameters for every case")
    metrics: list[MetricSpec] = Field(min_length=1)
    judge: JudgeRoute | None = None
    concurrency: int = Field(default=8, ge=1, le=1024)
    path: Path | None = Field(default=None, exclude=True)

    @property
    def dataset_path(self) -> Path:
        base = self.path.parent if self.path is not None else Path()
        return base / self.dataset

    def load_dataset(self) -> Dataset:
        return load_dataset(self.dataset_path)

    def target_digest(self) -> str:
        """What a case's answer depends on besides the case: cached answers are reused only under it."""
        content = {"target": self.target.model_dump(), "params": self.params}
        return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SuiteInvalid(f"cannot read the suite {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SuiteInvalid(f"{path}: a suite is a mapping with name, dataset, target and metrics")
    data.setdefault("name", path.stem)
    try:
        suite = Suite.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise SuiteInvalid(f"{path} is invalid: {problems}") from None
    suite.path = path
    keys = [spec.name or spec.type for spec in suite.metrics]
    if len(set(keys)) != len(keys):
        raise SuiteInvalid(f"{path}: two metrics share a name; give one a `name:` of its own")
    return suite


# How a `judge` metric is built: the judges module registers itself here (keel.evals.judges).
JudgeFactory = Callable[[MetricSpec, "Suite"], Metric]
judge_factory: JudgeFactory | None = None


def build_metrics(suite: Suite, embed: Embed | None = None) -> list[Metric]:
    """The suite's metrics; a bad setting is a SuiteInvalid naming the metric."""
    metrics: list[Metric] = []
    for spec in suite.metrics:
        try:
            metric = _metric(spec, suite, embed)
        except (TypeError, ValueError, re.error, jsonschema.SchemaError) as exc:
            raise SuiteInvalid(f"{suite.path}: metric {spec.name or spec.type}: {exc}") from None
        if spec.name:
            metric.key = spec.name
        metrics.append(metric)
    return metrics


def _metric(spec: MetricSpec, suite: Suite, embed: Embed | None) -> Metric:
    settings, threshold = spec.settings(), spec.threshold
    simple: dict[str, Callable[..., Metric]] = {
        "exact_match": ExactMatch, "contains": Contains, "regex": Regex, "json_valid": JsonValid,
        "numeric": Numeric, "latency": Latency, "cost": Cost,
    }
    if spec.type in simple:
        return simple[spec.type](threshold=threshold, **settings)
    if spec.type == "semantic":
        if embed is None:
            raise ValueError("the semantic metric needs the local embedder (pip install 'keel[local]')")
        return Semantic(embed, threshold=threshold, **settings)
    if judge_factory is None:
        importlib.import_module("keel.evals.judges")  # registers judge_factory
    if judge_factory is None or suite.judge is None:
        raise ValueError("a judge metric needs `judge: {model: ...}` in the suite")
    return judge_factory(spec, suite)

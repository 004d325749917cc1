"""The shipped drift demo (examples/evals/drift_demo.py): the simulated provider's silent update fires the
drift alert, and the same provider in both phases fires nothing (fixed seeds)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from typer.testing import CliRunner

from keel.cli import app

DEMO = Path(__file__).parents[2] / "examples" / "evals" / "drift_demo.py"


def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("drift_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_update_fires_and_keel_drift_sees_it_in_the_log(tmp_path: Path) -> None:
    report = await demo().run_demo(tmp_path, shifted=True, calls=150)
    drifted = {row.metric for row in report.drifted}
    assert {"output tokens", "latency ms", "upstream_model", "canary answers"} <= drifted, report.rows
    result = CliRunner().invoke(app, ["drift", "--config", str(tmp_path / "keel.yaml"), "--no-embed", "--check",
                                      "--format", "json"])
    assert result.exit_code == 1, result.output


async def test_the_same_provider_in_both_phases_fires_nothing(tmp_path: Path) -> None:
    report = await demo().run_demo(tmp_path, shifted=False, calls=150)
    # Latency is the one measured on the wall clock: on a loaded machine its tail can move by more than
    # the 10% floor. What must not happen is a moved median (the update's signature: 200 -> 450 ms).
    noise = [row for row in report.drifted if row.metric == "latency ms" and abs(row.window / row.baseline - 1) < 0.1]
    assert [row for row in report.drifted if row not in noise] == [], report.drifted
    assert {row.metric for row in report.rows if row.verdict == "ok"} >= {"output tokens", "upstream_model",
                                                                          "canary answers", "error rate"}

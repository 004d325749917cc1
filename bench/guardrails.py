"""The guardrails' measured quality and speed: prompt injection, then PII and secrets.

    .venv/bin/python bench/guardrails.py [--quick]

Runs `bench/guardrails_injection.py` (detection and false positives per layer and per source on the
held-out part of the labelled set, latency per KB) and `bench/guardrails_pii.py` (recall and false
positives per entity type, latency per KB per recognizer), each in its own process so one's loaded
models do not weigh on the other's timings. `--quick` runs fewer latency rounds. Each script takes
its own flags when run alone; their docstrings say what each figure means.

Targets (the issue's, on this machine): non-model checks <= 2 ms p99 per KB; injection >= 90%
detected at <= 3% false positives on text from sources the classifier never trained on; PII
recall >= 95% on the pattern entity types.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer latency rounds")
    args = parser.parse_args()
    runs = [
        [str(HERE / "guardrails_injection.py"), *(["--latency-rounds", "60"] if args.quick else [])],
        [str(HERE / "guardrails_pii.py"), *(["--rounds", "2", "--no-compare"] if args.quick else [])],
    ]
    failed = 0
    for run in runs:
        print(f"\n=== {Path(run[0]).name}", flush=True)
        failed |= subprocess.run([sys.executable, *run], check=False).returncode
    return failed


if __name__ == "__main__":
    sys.exit(main())

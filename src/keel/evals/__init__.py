"""Evaluation (docs/evals.md): golden datasets and suites, metrics and judges, the runner and its CI gate,
comparisons, human review and drift."""

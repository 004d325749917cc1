"""`keel eval promote`: a logged call appended to a JSONL golden set reads back with `load_dataset` (its
messages, its answer or the given reference, tags from feature and model); a call without logged content,
a failed call without --reference, and a repeated id are refused and leave the file as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from keel.evals.dataset import load_dataset
from keel.evals.review import ContentNotLogged
from keel.evals.review_cli import PromoteRefused, promote, promote_call
from keel.observability.record import RequestRecord
from keel.observability.store import RecordStore

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France? ünï"}]


@pytest.fixture
def store(tmp_path: Path) -> RecordStore:
    opened = RecordStore(f"sqlite:///{tmp_path / 'keel.db'}")
    opened.migrate()
    opened.write([
        RequestRecord(request_id="req_ok", started_at=1.0, ended_at=2.0, feature="geo", model="chat",
                      input=MESSAGES, output={"role": "assistant", "content": "Paris"}),
        RequestRecord(request_id="req_failed", started_at=1.0, ended_at=2.0, model="chat", input=MESSAGES,
                      outcome="error", error_type="upstream_timeout"),
        RequestRecord(request_id="req_dark", started_at=1.0, ended_at=2.0, model="chat"),
    ])
    return opened


def test_a_promoted_call_reads_back_as_a_golden_case(store: RecordStore, tmp_path: Path) -> None:
    dataset = tmp_path / "golden" / "set.jsonl"
    dataset.parent.mkdir()
    dataset.write_text('{"id": "first", "input": "2+2?", "reference": "4"}')  # no final newline
    case = promote_call(store, "req_ok", dataset)
    loaded = load_dataset(dataset)
    assert [c.id for c in loaded.cases] == ["first", "req_ok"]
    again = loaded.cases[1]
    assert case == again
    assert list(again.messages) == MESSAGES and again.reference == "Paris"
    assert again.tags == ("feature:geo", "model:chat") and again.metadata["request_id"] == "req_ok"
    given = promote_call(store, "req_failed", dataset, reference="Paris", case_id="timeout-case")
    assert given.reference == "Paris" and len(load_dataset(dataset)) == 3


def test_refusals_leave_the_dataset_as_it_was(store: RecordStore, tmp_path: Path) -> None:
    dataset = tmp_path / "set.jsonl"
    promote_call(store, "req_ok", dataset)
    before = dataset.read_bytes()
    with pytest.raises(ContentNotLogged, match="log_content"):
        promote_call(store, "req_dark", dataset)
    with pytest.raises(PromoteRefused, match="--reference"):
        promote_call(store, "req_failed", dataset)
    with pytest.raises(PromoteRefused, match="--id"):
        promote_call(store, "req_ok", dataset)
    with pytest.raises(PromoteRefused, match="JSONL"):
        promote_call(store, "req_ok", tmp_path / "set.yaml")
    assert dataset.read_bytes() == before


def test_the_command_appends_and_exits_1_with_the_reason(store: RecordStore, tmp_path: Path) -> None:
    config = tmp_path / "keel.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "chat", "deployments": [{"provider": "simulated"}]}],
                                      "store": {"url": store.url}}))
    app = typer.Typer()
    app.command()(promote)
    app.command("noop")(lambda: None)  # two commands: typer then expects the command's name
    dataset = tmp_path / "set.jsonl"
    done = CliRunner().invoke(app, ["promote", "req_ok", "--dataset", str(dataset), "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert f"appended case req_ok to {dataset} (1 case)" in done.output
    refused = CliRunner().invoke(app, ["promote", "req_dark", "--dataset", str(dataset), "--config", str(config)])
    assert refused.exit_code == 1 and "log_content" in refused.output
    assert len(load_dataset(dataset)) == 1


def test_review_list_and_label_commands(store: RecordStore, tmp_path: Path) -> None:
    from keel.evals.review import ReviewQueue
    from keel.evals.review_cli import review_label, review_list

    config = tmp_path / "keel.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "chat", "deployments": [{"provider": "simulated"}]}],
                                      "store": {"url": store.url}}))
    item, _ = ReviewQueue(store).add_call("req_ok")
    app = typer.Typer()
    app.command("list")(review_list)
    app.command("label")(review_label)
    listed = CliRunner().invoke(app, ["list", "--config", str(config)])
    assert listed.exit_code == 0 and item.id in listed.output and '"status":"pending"' in listed.output
    done = CliRunner().invoke(app, ["label", item.id, "--reviewer", "alice", "--label", "pass", "--config",
                                    str(config)])
    assert done.exit_code == 0 and "1 label" in done.output, done.output
    bad = CliRunner().invoke(app, ["label", item.id, "--reviewer", "alice", "--label", "meh", "--config",
                                   str(config)])
    assert bad.exit_code == 1 and "'pass' or 'fail'" in bad.output
    assert [lbl.reviewer for lbl in ReviewQueue(store).get(item.id).labels] == ["alice"]

"""`domaintune data prepare --stream/--no-stream --workers N`: the flags pick the path and the
worker count, auto by size without them, and both paths write the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ticket_rows, write_jsonl, write_recipe
from test_dedup import ONE_WORD_CHANGED, TICKET
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.data import stream

runner = CliRunner()


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    train = ticket_rows(10, seed=7) + [{"text": TICKET, "label": "billing"},
                                        {"text": ONE_WORD_CHANGED, "label": "billing"}]
    evaluation = ticket_rows(3, seed=8) + [{"text": TICKET.upper(), "label": "billing"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", train)
    write_jsonl(tmp_path / "data" / "eval.jsonl", evaluation)
    return write_recipe(tmp_path / "recipe.yaml", {"name": "t", "task": "classification", "base_model": "minilm-l6",
                                                   "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl"}})


@pytest.fixture
def streamed(monkeypatch) -> list[int | None]:
    """The ``workers`` of each call to the streaming path."""
    calls: list[int | None] = []
    real = stream.prepare_streaming

    def recorded(spec, root, directory, console=None, workers=None, **options):
        calls.append(workers)
        return real(spec, root, directory, console, workers, **options)

    monkeypatch.setattr(stream, "prepare_streaming", recorded)
    return calls


def _prepare(recipe: Path, out: Path, *flags: str) -> dict:
    done = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(out), "--json", *flags])
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / "data" / name).read_text(encoding="utf-8").splitlines()]


def test_help_documents_the_flags():
    done = runner.invoke(app, ["data", "prepare", "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0
    assert "--stream" in done.output and "--no-stream" in done.output and "--workers" in done.output


def test_stream_with_workers_writes_what_no_stream_writes(recipe, tmp_path, streamed):
    memory = _prepare(recipe, tmp_path / "memory", "--no-stream")
    assert streamed == []
    streaming = _prepare(recipe, tmp_path / "stream", "--stream", "--workers", "2")
    assert streamed == [2]
    for name in ("train.jsonl", "eval.jsonl"):
        assert _rows(tmp_path / "stream", name) == _rows(tmp_path / "memory", name)
    for key in ("rows_in", "kept", "dropped", "dropped_total"):
        assert streaming[key] == memory[key], key
    assert streaming["dropped"]["dedup"]["train"] == 1 and streaming["dropped"]["leakage"]["eval"] == 1


def test_without_a_flag_the_input_size_decides(recipe, tmp_path, streamed, monkeypatch):
    _prepare(recipe, tmp_path / "small", "--workers", "1")
    assert streamed == []
    monkeypatch.setattr("domaintune.data.prepare.STREAM_FROM_BYTES", 1)
    _prepare(recipe, tmp_path / "large")
    assert streamed == [None]  # None: as many workers as CPUs
    _prepare(recipe, tmp_path / "forced", "--no-stream")
    assert streamed == [None]


def test_workers_must_be_at_least_one(recipe, tmp_path):
    done = runner.invoke(app, ["data", "prepare", str(recipe), "-o", str(tmp_path / "out"), "--workers", "0"])
    assert done.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_inspect_streams_a_large_input_and_reports_what_the_in_memory_path_reports(recipe, streamed, monkeypatch):
    train = recipe.parent / "data" / "train.jsonl"
    train.write_text(train.read_text(encoding="utf-8") + '{"text": "a row without its label"}\n', encoding="utf-8")

    def inspect(*flags: str) -> dict:
        done = runner.invoke(app, ["data", "inspect", str(recipe), "--json", *flags])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)

    memory = inspect("--no-stream")
    assert streamed == []
    monkeypatch.setattr("domaintune.data.prepare.STREAM_FROM_BYTES", 1)  # as if the files were large
    streaming = inspect("--workers", "2")
    assert streamed == [2]
    for key in ("rows_in", "kept", "dropped", "dropped_total", "pii", "dedup", "labels", "lengths", "schema", "tokens"):
        assert streaming[key] == memory[key], key
    # the bad row, the near duplicate and the leak, in the order of the steps, both ways
    assert streaming["problems"] == memory["problems"]
    lines = len(train.read_text(encoding="utf-8").splitlines())
    assert [(p["where"], p["step"]) for p in memory["problems"]] == [
        (f"{train}:{lines}", "validate"), (f"{train}:{lines - 1}", "dedup"), (memory["problems"][2]["where"], "leakage")]
    assert "label" in memory["problems"][0]["reason"]
    assert memory["tokens"]["train"]["rows"] == memory["kept"]["train"]
    assert "processed" not in streaming  # nothing of the scratch folder is reported

"""The command line: exit codes, one-line errors without tracebacks, --json, --set, --version."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domaintune import __version__
from domaintune.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_models_lists_the_catalog():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "smollm2-135m-instruct" in result.output and "minilm-l6" in result.output


def test_help_names_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "quickstart", "models"):
        assert command in result.output


def test_bad_row_exits_2_with_file_and_line_and_no_traceback(classification_recipe):
    data = classification_recipe.parent / "data" / "tickets.csv"
    lines = data.read_text().splitlines()
    lines.insert(5, "a row,with,too,many,fields")  # becomes line 6 of the file
    data.write_text("\n".join(lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "domaintune", "run", str(classification_recipe)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "tickets.csv:6" in done.stderr
    assert "5 fields but the header has 3" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_unknown_model_lists_the_catalog(classification_recipe):
    result = runner.invoke(app, ["run", str(classification_recipe), "--set", "base_model=no-such-model"])
    assert result.exit_code == 2
    assert "unknown base model 'no-such-model'" in result.output
    assert "minilm-l6" in result.output


def test_unknown_recipe_key_names_its_line(classification_recipe):
    text = classification_recipe.read_text().replace("training:\n", "training:\n  epoch: 3\n")
    classification_recipe.write_text(text)
    line = text.splitlines().index("  epoch: 3") + 1
    result = runner.invoke(app, ["run", str(classification_recipe)])
    assert result.exit_code == 2
    assert f"recipe.yaml:{line}" in result.output
    assert "training.epoch" in result.output and "epochs" in result.output


def test_bad_override_exits_2(classification_recipe):
    result = runner.invoke(app, ["run", str(classification_recipe), "--set", "training.epochs"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_run_json_with_overrides(classification_recipe, tmp_path):
    result = runner.invoke(app, ["run", str(classification_recipe), "--json", "-o", str(tmp_path / "out"),
                                 "--set", "training.epochs=2", "--set", "method=full"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"run_dir", "base", "tuned", "eval_rows"} <= set(summary)
    assert summary["run_dir"].startswith(str(tmp_path / "out"))
    resolved = (tmp_path / "out").glob("tiny-intents/*/recipe.yaml")
    text = next(resolved).read_text()
    assert "epochs: 2" in text and "method: full" in text


def test_quickstart_rejects_unknown_example():
    result = runner.invoke(app, ["quickstart", "--only", "nope"])
    assert result.exit_code == 2
    assert "support-intents" in result.output


@pytest.mark.parametrize("kind", ["sft", "pretrain"])
def test_dry_run_resolves_the_recipe_writes_nothing_and_counts_the_steps_a_run_takes(kind, request, tmp_path):
    recipe = request.getfixturevalue(f"{kind}_recipe")
    runs = tmp_path / "runs"
    shown = runner.invoke(app, ["run", str(recipe), "--dry-run", "--json", "--output-dir", str(runs)])
    assert shown.exit_code == 0, shown.output
    plan = json.loads(shown.stdout)
    assert not runs.exists()  # nothing trained, nothing written
    assert plan["recipe"]["training"]["weight_decay"] is not None and plan["speed"]["device"] in ("cpu", "cuda")
    ran = runner.invoke(app, ["run", str(recipe), "--json", "--no-register", "--output-dir", str(runs)])
    assert ran.exit_code == 0, ran.output
    summary = json.loads(ran.stdout)
    logged = (Path(summary["run_dir"]) / "train_log.jsonl").read_text().splitlines()
    assert plan["steps"] == len(logged)  # the loop's count, pretraining's blocks of tokens included
    assert plan["train_rows"] == summary["train_rows"]


def test_dry_run_prints_what_would_run_and_refuses_what_run_would(sft_recipe):
    text = runner.invoke(app, ["run", str(sft_recipe), "--dry-run", "--set", "training.epochs=2"])
    assert text.exit_code == 0, text.output
    for expected in ("tiny-colours: sft on", "optimiser steps", "learning rate 0.01", "this machine:",
                     "resolved recipe:", "nothing was trained or written (--dry-run)"):
        assert expected in text.stdout, expected
    bad = runner.invoke(app, ["run", str(sft_recipe), "--dry-run", "--set", "training.epochs=-1"])
    assert bad.exit_code == 2 and "training.epochs" in bad.output
    gate = runner.invoke(app, ["run", str(sft_recipe), "--dry-run", "--gate", "tuned.accuracy >>= 1"])
    assert gate.exit_code == 2 and "gate" in gate.output.lower()


def test_errors_and_cards_print_the_data_s_brackets_as_written(tmp_path):
    """Labels like "[refund]" and roles like "[/INST]" are data, not rich markup."""
    from conftest import write_jsonl

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "[/INST]", "content": "x"}]}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\ntask: sft\nbase_model: smollm2-135m-instruct\ndata:\n  train: chat.jsonl\n")
    done = subprocess.run([sys.executable, "-m", "domaintune", "data", "prepare", str(recipe), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert f"{chat}:1" in done.stderr and "'[/INST]'" in done.stderr and "Traceback" not in done.stderr

    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "".join(f"ticket {i},[{'refund' if i % 2 else 'login'}]\n" for i in range(10)))
    result = runner.invoke(app, ["data", "inspect", str(table)])
    assert result.exit_code == 0, result.output
    assert "[refund]" in result.output and "[login]" in result.output

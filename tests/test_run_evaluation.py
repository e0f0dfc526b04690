"""What a run's evaluation records beyond the headline: gates, significance, calibration, slices,
bias probes, and the report that shows them."""

from __future__ import annotations

import json

import pytest
from conftest import ticket_rows, write_csv
from typer.testing import CliRunner

from domaintune import run
from domaintune.cli import app
from domaintune.errors import RecipeError

runner = CliRunner()


def _with_gendered_rows(recipe):
    rows = ticket_rows()
    for i, row in enumerate(rows[:40]):
        row["text"] = ("he says " if i % 2 else "she says ") + row["text"]
    write_csv(recipe.parent / "data" / "tickets.csv", rows)
    return recipe


def test_classification_run_records_gates_significance_calibration_slices_and_bias(classification_recipe, tmp_path):
    recipe = _with_gendered_rows(classification_recipe)
    result = run(recipe, overrides={"evaluate.slices": ["channel"]}, output_dir=tmp_path / "runs",
                 gates=["tuned.accuracy >= 0", "tuned.accuracy >= base.accuracy + 2"])
    metrics = json.loads((result.run_dir / "metrics.json").read_text())

    assert [g["passed"] for g in metrics["gates"]] == [True, False]
    assert not result.passed
    assert "tuned.accuracy >= base.accuracy + 2 (" in metrics["gates"][1]["failing"][0]

    mcnemar = metrics["significance"]["accuracy"]
    assert 0 <= mcnemar["p_value"] <= 1 and mcnemar["b"] + mcnemar["c"] <= metrics["eval_rows"]

    for model in ("base", "tuned"):
        assert 0 <= metrics[model]["ece"] <= 1
        assert sum(b["count"] for b in metrics["calibration"][model]) == metrics["eval_rows"]
    confusion = metrics["confusion"]
    assert sum(map(sum, confusion["tuned"])) == metrics["eval_rows"]
    correct = sum(confusion["tuned"][i][i] for i in range(len(confusion["labels"])))
    assert correct / metrics["eval_rows"] == pytest.approx(metrics["tuned"]["accuracy"])

    channel = metrics["slices"][0]
    assert channel["field"] == "channel" and set(channel["slices"]) == {"chat", "email"}
    assert sum(s["rows"] for s in channel["slices"].values()) == metrics["eval_rows"]

    gender = metrics["bias"]["tuned"]["gender"]
    gendered_eval = sum(1 for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()
                        if json.loads(line)["text"].split()[0] in ("he", "she"))
    assert gender["rows"] == gendered_eval > 0
    assert 0 <= gender["rate"] <= 1

    from domaintune.registry.store import Registry

    with Registry() as registry:
        version = registry.get("tiny-intents")
    assert result.registered == f"tiny-intents:{version.version}" and version.stage == "candidate"

    report = (result.run_dir / "report.html").read_text()
    for section in ("Gates", "Calibration", "Confusion matrix", "By channel", "Counterfactual bias probes"):
        assert section in report


def test_cli_exits_3_with_the_failing_clause_when_a_gate_fails(classification_recipe, tmp_path):
    done = runner.invoke(app, ["run", str(classification_recipe), "-o", str(tmp_path / "runs"), "--quiet",
                               "--gate", "tuned.accuracy > 1.5"])
    assert done.exit_code == 3, done.output
    assert "gate failed" in done.output and "tuned.accuracy > 1.5 (" in done.output
    assert list((tmp_path / "runs").glob("*/*/metrics.json")), "the run directory is written even when a gate fails"


def test_a_gate_with_bad_syntax_fails_before_any_training(classification_recipe, tmp_path):
    with pytest.raises(RecipeError, match="gate"):
        run(classification_recipe, output_dir=tmp_path / "runs", gates=["tuned.accuracy >>> 1"])
    assert not (tmp_path / "runs").exists()


def test_sft_run_records_per_row_scores_and_significance(sft_recipe, tmp_path):
    result = run(sft_recipe, output_dir=tmp_path / "runs")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["significance"]) == {"exact_match", "rouge_l"}
    assert 0 <= metrics["significance"]["rouge_l"]["p_value"] <= 1
    rows = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["tuned_exact"] for r in rows) / len(rows) == pytest.approx(metrics["tuned"]["exact_match"])


def test_sft_bias_probes_swap_terms_in_the_prompts(sft_recipe, tmp_path):
    from conftest import colour_rows, write_jsonl

    rows = colour_rows()
    for i, row in enumerate(rows[:24]):
        row["prompt"] = ("he asks " if i % 2 else "she asks ") + row["prompt"]
    write_jsonl(sft_recipe.parent / "data" / "colours.jsonl", rows)
    result = run(sft_recipe, output_dir=tmp_path / "runs", overrides={"evaluate.bias_rows": 100})
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    gendered = sum(1 for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()
                   if json.loads(line)["prompt"].split()[0] in ("he", "she"))
    for model in ("base", "tuned"):
        gender = metrics["bias"][model]["gender"]
        assert gender["rows"] == gendered > 0
        assert 0 <= gender["rate"] <= 1
    assert "Counterfactual bias probes" in (result.run_dir / "report.html").read_text()

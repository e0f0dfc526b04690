"""`domaintune eval` and `domaintune compare`: a finished run evaluated again, on its own rows or
another file, and several runs side by side."""

from __future__ import annotations

import json

import pytest
from conftest import ticket_rows, write_csv
from typer.testing import CliRunner

from domaintune import run
from domaintune.errors import DataError
from domaintune.evaluate.run_eval import compare_runs, evaluate_run

runner = CliRunner()


@pytest.fixture()
def classification_run(classification_recipe, tmp_path):
    return run(classification_recipe, output_dir=tmp_path / "runs", register=False).run_dir


def test_evaluate_run_reproduces_the_runs_own_metrics(classification_run):
    recorded = json.loads((classification_run / "metrics.json").read_text())
    again = evaluate_run(classification_run)
    assert again["eval_rows"] == recorded["eval_rows"]
    for model in ("base", "tuned"):
        assert again[model]["accuracy"] == pytest.approx(recorded[model]["accuracy"])
        assert again[model]["macro_f1"] == pytest.approx(recorded[model]["macro_f1"])
    for which in ("base", "tuned", "difference"):
        assert again["intervals"]["accuracy"][which] == pytest.approx(recorded["intervals"]["accuracy"][which])
    assert again["significance"]["accuracy"]["p_value"] == pytest.approx(recorded["significance"]["accuracy"]["p_value"])


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("placed", ["as planned here", "bfloat16 on the CPU"])
def test_sft_run_reproduces_its_metrics(sft_recipe, tmp_path, monkeypatch, method, placed):
    from domaintune.train import speed

    # On a GPU a run trains and evaluates in bfloat16 there; `eval` places the model the same way.
    # The second case shows that on the CPU.
    if placed != "as planned here":
        monkeypatch.setattr(speed, "plan_speed", lambda *args, **kwargs: speed.SpeedPlan(bf16=True))
    run_dir = run(sft_recipe, overrides={"method": method}, output_dir=tmp_path / "runs", register=False).run_dir
    recorded = json.loads((run_dir / "metrics.json").read_text())
    again = evaluate_run(run_dir)
    for model in ("base", "tuned"):
        for name in ("exact_match", "rouge_l", "perplexity"):
            assert again[model][name] == pytest.approx(recorded[model][name], rel=1e-4), (model, name)


def test_another_file_goes_through_the_runs_data_steps(classification_run, tmp_path):
    train_text = json.loads((classification_run / "data" / "train.jsonl").read_text().splitlines()[0])["text"]
    rows = ticket_rows(5, seed=7)
    rows[0]["text"] = rows[0]["text"] + " write to jane.doe@example.com"
    rows[1]["text"] = train_text  # seen in training: must not count
    rows[2]["text"] = "   "  # empty: a bad row
    path = write_csv(tmp_path / "other.csv", rows)
    with pytest.raises(DataError, match="empty") as bad:  # the run's recipe says on_bad_rows: error
        evaluate_run(classification_run, path)
    assert bad.value.hint.startswith("fix those rows of the --data file or leave them out")  # no recipe key to set
    del rows[2]
    path = write_csv(tmp_path / "other.csv", rows)
    result = evaluate_run(classification_run, path)
    assert result["data"]["dropped"] == {"leakage": 1}
    [leak] = result["data"]["dropped_rows"]  # the row itself, to find in the file: its line 3 (row 1)
    assert leak["where"].endswith("other.csv:3") and leak["step"] == "leakage" and "duplicate of" in leak["reason"]
    assert result["eval_rows"] == len(rows) - 1
    assert 0 <= result["tuned"]["accuracy"] <= 1


def test_compare_runs_scores_the_same_rows_through_each_run(classification_recipe, tmp_path):
    first = run(classification_recipe, output_dir=tmp_path / "runs", register=False).run_dir
    second = run(classification_recipe, overrides={"training.epochs": 1}, output_dir=tmp_path / "runs",
                 register=False).run_dir
    compared = compare_runs([first, second])
    assert list(compared["runs"]) == [str(first), str(second)]
    assert {m["eval_rows"] for m in compared["runs"].values()} == {compared["eval_rows"]}
    assert compared["runs"][str(first)]["leaked_rows"] == 0
    recorded = json.loads((first / "metrics.json").read_text())
    assert compared["runs"][str(first)]["tuned"]["accuracy"] == pytest.approx(recorded["tuned"]["accuracy"])
    # The second run against the first, paired on the same rows.
    assert list(compared["versus_first"]) == [str(second)]
    versus = compared["versus_first"][str(second)]["accuracy"]
    accuracy = [compared["runs"][str(r)]["tuned"]["accuracy"] for r in (first, second)]
    assert versus["change"] == pytest.approx(accuracy[1] - accuracy[0])
    assert versus["difference"][0] <= versus["change"] <= versus["difference"][1] and 0 < versus["p_value"] <= 1

    from domaintune.cli.evaluate import compare

    import typer

    app = typer.Typer()
    app.command("compare")(compare)
    app.command("other")(lambda: None)
    done = runner.invoke(app, ["compare", str(first), str(second), "--quiet"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert f"tuned against {first.name}'s tuned" in done.output and f"{versus['change']:+.4f}" in done.output


def test_cli_eval_prints_json_and_exits_3_on_a_failed_gate(classification_run):
    from domaintune.cli.evaluate import eval_

    import typer

    app = typer.Typer()
    app.command("eval")(eval_)
    app.command("other")(lambda: None)  # more than one command: typer then expects the name
    done = runner.invoke(app, ["eval", str(classification_run), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["tuned"]["accuracy"] >= 0
    done = runner.invoke(app, ["eval", str(classification_run), "--gate", "tuned.accuracy > 1.5"])
    assert done.exit_code == 3
    assert "tuned.accuracy > 1.5 (" in done.output


def test_running_out_of_gpu_memory_in_evaluation_says_which_setting_to_lower(sft_recipe, tmp_path, monkeypatch):
    import torch

    from domaintune.errors import ResourceError
    from domaintune.train import causal

    def generate(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(causal, "generate", generate)
    with pytest.raises(ResourceError, match=r"out of GPU memory while evaluating the base model, 16 rows at a time"
                                            r"(.|\n)*fix: lower evaluate.batch_size"):
        run(sft_recipe, output_dir=tmp_path / "runs", register=False)
    assert not list((tmp_path / "runs").rglob("metrics.json"))  # no run directory is left half-made


def test_gates_and_run_directories_are_checked_before_any_model_loads(classification_run, sft_recipe, tmp_path,
                                                                       monkeypatch):
    from domaintune.errors import DomaintuneError, RecipeError
    from domaintune.evaluate import run_eval

    sft_run = run(sft_recipe, overrides={"training.epochs": 1}, output_dir=tmp_path / "sft", register=False).run_dir

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_eval, "load_run_model", no_load)
    with pytest.raises(RecipeError, match="no metric 'acc' in classification runs"):
        evaluate_run(classification_run, gates=["tuned.acc > 0.5"])
    with pytest.raises(RecipeError, match="no metric 'accuracy' in sft runs"):
        compare_runs([sft_run], gates=["tuned.accuracy > 0.5"])
    with pytest.raises(DomaintuneError, match="is a sft run and .* a classification run"):
        compare_runs([classification_run, sft_run])
    with pytest.raises(DomaintuneError, match="not a finished run directory"):
        compare_runs([classification_run, tmp_path])


def test_another_file_s_errors_name_it_and_what_the_run_expects(classification_run, tmp_path):
    train = [json.loads(line) for line in (classification_run / "data" / "train.jsonl").read_text().splitlines()]
    seen = write_csv(tmp_path / "seen.csv", [{"text": r["text"], "label": r["label"], "channel": "chat"} for r in train[:6]])
    with pytest.raises(DataError, match=r"no row of the file is left to evaluate on .*\(6 by leakage\)") as info:
        evaluate_run(classification_run, seen)
    assert info.value.where == str(seen)
    wrong = write_csv(tmp_path / "wrong.csv", [{"body": "my invoice", "label": "billing"}])
    with pytest.raises(DataError, match="no column 'text'") as info:
        evaluate_run(classification_run, wrong)
    assert "trained on the columns text, label" in info.value.hint and "data.text_field" not in info.value.hint
    with pytest.raises(DataError, match="--data file does not exist"):
        evaluate_run(classification_run, tmp_path / "missing.csv")


def test_another_file_without_a_slice_column_is_evaluated_without_that_slice(classification_recipe, tmp_path):
    sliced = run(classification_recipe, overrides={"evaluate.slices": ["channel"], "training.epochs": 1},
                 output_dir=tmp_path / "runs", register=False).run_dir
    assert json.loads((sliced / "metrics.json").read_text())["slices"][0]["field"] == "channel"
    rows = [{"text": r["text"], "label": r["label"]} for r in ticket_rows(4, seed=11)]  # no channel column
    result = evaluate_run(sliced, write_csv(tmp_path / "plain.csv", rows))
    assert result["slices"] == [] and result["eval_rows"] > 0

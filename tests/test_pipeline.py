"""Every task × method end to end on tiny random models: the run directory, its contents, a
training loss that goes down, and saved weights that reload to the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from domaintune import catalog, run
from domaintune.catalog import sha256_file
from domaintune.evaluate.gates import METRICS

EXPECTED_FILES = {"recipe.yaml", "metrics.json", "lineage.json", "model_card.md", "report.html", "train_log.jsonl",
                  "predictions.jsonl"}


def _check_run_dir(result, task: str, method: str) -> dict:
    run_dir = result.run_dir
    assert run_dir.is_dir()
    assert EXPECTED_FILES <= {p.name for p in run_dir.iterdir()}
    assert not list(run_dir.parent.glob(".*.partial"))
    assert any((run_dir / "adapter").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == task
    assert metrics["eval_rows"] == result.eval_rows > 0
    headline = {"classification": "accuracy", "sft": "exact_match", "pretrain": "perplexity"}[task]
    assert headline in metrics["base"] and headline in metrics["tuned"]
    for which in ("base", "tuned"):  # what a gate's names are checked against before training
        assert set(metrics[which]) - {"model"} == set(METRICS[task])

    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["method"] == method
    assert all(resolved["training"][k] is not None for k in ("epochs", "learning_rate", "batch_size", "max_seq_length"))

    lineage = json.loads((run_dir / "lineage.json").read_text())
    for entry in lineage["data"]:
        assert entry["sha256"] == sha256_file(entry["file"])
    for entry in lineage["adapter"]:
        assert entry["sha256"] == sha256_file(run_dir / entry["file"])
    assert lineage["base_model"]["files"], "base weights must be hashed"
    assert lineage["libraries"]["torch"]
    on_cpu = task == "classification" or not torch.cuda.is_available()  # the recipes' speed: auto
    assert lineage["training"]["processes"] == 1 and lineage["training"]["device"] == ("cpu" if on_cpu else "cuda")
    assert lineage["training"]["sparse_dropout"] is on_cpu and lineage["training"]["fused_lora"] is on_cpu
    assert lineage["training"]["evaluation"] == ("cpu float32" if on_cpu else "cuda bfloat16")
    assert f"scored with their weights in {lineage['training']['evaluation'].replace(' ', ', ')};" in \
        (run_dir / "model_card.md").read_text()
    assert lineage["machine"]["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    quarter = max(1, len(log) // 4)
    first = sum(r["loss"] for r in log[:quarter]) / quarter
    last = sum(r["loss"] for r in log[-quarter:]) / quarter
    assert last < first, f"training loss did not go down: {first:.3f} -> {last:.3f}"

    card = (run_dir / "model_card.md").read_text()
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Evaluation data", "Training data",
                    "Quantitative analyses", "Ethical considerations", "Caveats and recommendations"):
        assert f"## {section}" in card  # the sections of Mitchell et al.'s model cards
    headline = {"classification": "accuracy", "sft": "exact_match", "pretrain": "perplexity"}[task]
    assert f"| {headline} | {metrics['base'][headline]:.4f}" in card
    report = (run_dir / "report.html").read_text()
    assert "Headline metrics" in report
    return metrics


@pytest.mark.parametrize("method", ["lora", "full"])
def test_classification_run(classification_recipe, tmp_path, method):
    from domaintune.train.classification import load_classifier, predict_proba

    result = run(classification_recipe, overrides={"method": method}, output_dir=tmp_path / "runs")
    metrics = _check_run_dir(result, "classification", method)
    assert set(metrics["tuned"]) >= {"accuracy", "macro_f1", "per_label"}
    assert set(metrics["tuned"]["per_label"]) <= {"billing", "account", "shipping", "product"}
    # Keywords decide the label: even a tiny random encoder learns them.
    assert metrics["tuned"]["accuracy"] >= 0.75
    ci = metrics["intervals"]["accuracy"]
    for which in ("base", "tuned"):
        assert ci[which][0] <= metrics[which]["accuracy"] <= ci[which][1]
    diff = metrics["tuned"]["accuracy"] - metrics["base"]["accuracy"]
    assert ci["difference"][0] <= diff <= ci["difference"][1]
    assert f"[{ci['tuned'][0]:.3f}, {ci['tuned'][1]:.3f}]" in (result.run_dir / "model_card.md").read_text()

    base = catalog.resolve(yaml.safe_load(classification_recipe.read_text())["base_model"])
    model, labels = load_classifier(result.run_dir / "adapter", lambda: catalog.load_encoder(base))
    samples = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    tokenizer = catalog.load_tokenizer(base)
    proba = predict_proba(model, tokenizer, [s["text"] for s in samples], 32)
    assert [labels[i] for i in proba.argmax(1)] == [s["tuned"] for s in samples]
    assert proba.max(1) == pytest.approx([s["tuned_confidence"] for s in samples], abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sft_run(sft_recipe, tmp_path, method):
    from domaintune.train.causal import load_causal, perplexity, tokenize_chat
    from domaintune.data.examples import chat_examples
    from domaintune.data.readers import read_rows
    from domaintune.data.split import holdout_split

    result = run(sft_recipe, overrides={"method": method}, output_dir=tmp_path / "runs")
    metrics = _check_run_dir(result, "sft", method)
    assert set(metrics["tuned"]) >= {"exact_match", "rouge_l", "perplexity"}
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    ci = metrics["intervals"]["exact_match"]["tuned"]
    assert ci[0] <= metrics["tuned"]["exact_match"] <= ci[1]

    # The saved weights give the same answer perplexity as the model evaluated in the run.
    base = catalog.resolve(yaml.safe_load(sft_recipe.read_text())["base_model"])
    model = load_causal(result.run_dir / "adapter", lambda: catalog.load_causal_lm(base))
    tokenizer = catalog.load_tokenizer(base)
    examples = chat_examples(read_rows(sft_recipe.parent / "data" / "colours.jsonl"))
    _, evaluation = holdout_split(examples, 0.25, 42)
    ppl, _ = perplexity(model, tokenizer, [tokenize_chat(tokenizer, e, 64) for e in evaluation])
    # on a GPU the run evaluated its bfloat16 weights there; reloaded here, they are float32 on the CPU
    assert ppl == pytest.approx(metrics["tuned"]["perplexity"], rel=2e-2 if torch.cuda.is_available() else 1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_pretrain_run(pretrain_recipe, tmp_path, method):
    result = run(pretrain_recipe, overrides={"method": method}, output_dir=tmp_path / "runs")
    metrics = _check_run_dir(result, "pretrain", method)
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_base_tuned_and_extras_are_evaluated_on_the_weights_as_placed_for_training(sft_recipe, tmp_path,
                                                                                   monkeypatch, method):
    """On a GPU the plan puts the model there in bfloat16 and every evaluation runs there with it.
    The same plan's dtype on the CPU shows that each evaluation gets the placed weights, the base
    copies the extras load (full fine-tuning has no adapter to switch off) included."""
    import math

    from domaintune.evaluate import forgetting, run_eval
    from domaintune.train import speed

    monkeypatch.setattr(speed, "plan_speed", lambda *args, **kwargs: speed.SpeedPlan(bf16=True))
    seen = []

    def spy(module, name):
        original = getattr(module, name)

        def recorded(model, *args, **kwargs):
            seen.append((name, speed.placement(model)))
            return original(model, *args, **kwargs)
        monkeypatch.setattr(module, name, recorded)

    spy(run_eval, "score_causal")
    spy(forgetting, "general_ability")
    result = run(sft_recipe, overrides={"method": method, "evaluate.privacy_audit": True}, output_dir=tmp_path / "runs")
    assert seen == [("score_causal", "cpu bfloat16")] * 2 + [("general_ability", "cpu bfloat16")] * 2
    assert json.loads((result.run_dir / "lineage.json").read_text())["training"]["evaluation"] == "cpu bfloat16"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert all(math.isfinite(metrics[side]["perplexity"]) for side in ("base", "tuned"))
    assert all(math.isfinite(c["exposure"]["tuned"]) for c in metrics["privacy"]["canaries"])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_gpu_s_plan_trains_and_evaluates_end_to_end_on_the_cpu(sft_recipe, tmp_path, monkeypatch, method):
    """Everything `auto` does on a GPU but Liger's kernels, on the CPU: bfloat16 weights, autocast,
    the logit-free loss, the fused LoRA forward, full fine-tuning's stochastically rounded AdamW."""
    from domaintune.train import bf16_adamw, speed

    gpu_like = speed.SpeedPlan(bf16=True, fused_loss=True, fused_lora=True, pack_mixed_lengths=False)
    monkeypatch.setattr(speed, "plan_speed", lambda *args, **kwargs: gpu_like)
    steps = []
    original = bf16_adamw.BF16AdamW.step
    monkeypatch.setattr(bf16_adamw.BF16AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    result = run(sft_recipe, overrides={"method": method, "training.learning_rate": 1e-2 if method == "lora" else 1e-3},
                 output_dir=tmp_path / "runs")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    lineage = json.loads((result.run_dir / "lineage.json").read_text())
    assert lineage["training"]["bf16"] and lineage["training"]["evaluation"] == "cpu bfloat16"
    log = [json.loads(line)["loss"] for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    assert sum(log[-3:]) / 3 < sum(log[:3]) / 3
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    assert (len(steps) == len(log)) is (method == "full")  # bfloat16 weights step with stochastic rounding


def test_failed_run_leaves_nothing_behind(classification_recipe, tmp_path):
    from domaintune.errors import RecipeError

    with pytest.raises(RecipeError, match="lora.target_modules"):
        run(classification_recipe, overrides={"lora.target_modules": ["no_such_module"]}, output_dir=tmp_path / "runs")
    leftovers = list((tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else []
    assert not leftovers, leftovers  # not even the recipe's empty folder


def test_a_gate_on_a_metric_the_task_lacks_and_a_file_as_output_dir_fail_before_any_work(classification_recipe,
                                                                                          tmp_path, monkeypatch):
    import domaintune.pipeline as pipeline
    from domaintune.errors import RecipeError

    def no_work(*args, **kwargs):
        raise AssertionError("the data steps ran")

    monkeypatch.setattr(pipeline, "prepare", no_work)
    with pytest.raises(RecipeError, match="no metric 'acuracy' in classification runs") as typo:
        run(classification_recipe, gates=["tuned.acuracy >= base.accuracy"], output_dir=tmp_path / "runs")
    assert typo.value.where == "--gate"
    with pytest.raises(RecipeError, match="no metric 'f1' in classification runs") as typo:  # the recipe's own gate
        run(classification_recipe, overrides={"evaluate.gates": ["tuned.f1 >= 0.5"]}, output_dir=tmp_path / "runs")
    assert typo.value.where == "evaluate.gates" and typo.value.hint.startswith("write e.g. evaluate.gates: [")
    (tmp_path / "a-file").write_text("x")
    monkeypatch.undo()
    with pytest.raises(RecipeError, match="is a file"):
        run(classification_recipe, output_dir=tmp_path / "a-file")


def test_sft_rows_whose_answer_lies_beyond_max_seq_length_are_counted_out(sft_recipe, tmp_path):
    from conftest import colour_rows, write_jsonl
    from domaintune.pipeline import dry_run

    long = [{"prompt": "please tell me " + "and then some more words " * 20 + f"about item {i}",
             "completion": "blue ."} for i in range(12)]
    write_jsonl(sft_recipe.parent / "data" / "colours.jsonl", colour_rows() + long)
    plan = dry_run(sft_recipe)
    assert plan["rows_too_long"] > 0
    result = run(sft_recipe, overrides={"training.epochs": 1}, output_dir=tmp_path / "runs", register=False)
    assert result.train_rows == plan["train_rows"] == json.loads((result.run_dir / "metrics.json").read_text())["train_rows"]
    lineage = json.loads((result.run_dir / "lineage.json").read_text())
    assert lineage["training"]["rows_too_long"] == plan["rows_too_long"]
    card = (result.run_dir / "model_card.md").read_text()
    assert f"{result.train_rows} trained on" in card and f"and {plan['rows_too_long']} whose answer starts after" in card
    data_card = json.loads((result.run_dir / "data_card.json").read_text())
    assert data_card["kept"]["train"] == result.train_rows + plan["rows_too_long"]


def test_unseen_eval_label_is_reported_with_its_row(classification_recipe, tmp_path):
    from conftest import write_csv
    from domaintune.errors import DataError

    write_csv(tmp_path / "data" / "eval.csv", [{"text": "my invoice", "label": "billing", "channel": "chat"},
                                               {"text": "hello again", "label": "greeting", "channel": "chat"}])
    with pytest.raises(DataError, match=r"eval\.csv:3 \('greeting'\)"):
        run(classification_recipe, overrides={"data.eval": "data/eval.csv"}, output_dir=tmp_path / "runs")


def test_an_encoder_folder_cannot_be_the_base_of_an_sft_run(sft_recipe, tiny_bert):
    from domaintune.errors import ModelError
    from domaintune.pipeline import dry_run

    with pytest.raises(ModelError, match="is an encoder \\(BertModel\\) and cannot generate text for task sft"):
        dry_run(sft_recipe, overrides={"base_model": str(tiny_bert)})


def test_a_generative_base_folder_and_a_missing_slice_column_fail_before_training(classification_recipe, tiny_llama,
                                                                                   tmp_path):
    from domaintune.errors import ModelError, RecipeError
    from domaintune.pipeline import dry_run

    with pytest.raises(ModelError, match="is a generative model \\(LlamaForCausalLM\\)"):
        dry_run(classification_recipe, overrides={"base_model": str(tiny_llama)})
    # ticket_rows carry a channel column; "region" is none of the data's columns
    with pytest.raises(RecipeError, match="no evaluation row has the slice field 'region'") as missing:
        dry_run(classification_recipe, overrides={"evaluate.slices": ["channel", "region"]})
    assert missing.value.where == "evaluate.slices" and "channel" in missing.value.hint
    with pytest.raises(RecipeError, match="slice field 'region'"):
        run(classification_recipe, overrides={"evaluate.slices": ["region"]}, output_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # refused before a model was loaded or a run directory made

"""Fine-tuning methods on tiny random models: each supported task × method trains, saves and
reloads to the same outputs; unsupported combinations and machines fail early and clearly."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from domaintune import catalog, run
from domaintune.errors import ModelError, RecipeError
from domaintune.recipe import METHODS_BY_TASK, TASK_DEFAULTS, load_recipe
from domaintune.train.methods import IA3_TARGETS, LORA_TARGETS, apply_method, lora_targets


def _loss_went_down(run_dir) -> bool:
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    quarter = max(1, len(log) // 4)
    return sum(r["loss"] for r in log[-quarter:]) < sum(r["loss"] for r in log[:quarter])


def test_every_supported_combination_has_defaults():
    supported = {(task, method) for task, methods in METHODS_BY_TASK.items() for method in methods}
    assert set(TASK_DEFAULTS) == supported
    # small sets of weights (scaling vectors, virtual tokens) need far larger steps than LoRA
    for task in ("sft", "pretrain"):
        lora = TASK_DEFAULTS[(task, "lora")]["learning_rate"]
        assert TASK_DEFAULTS[(task, "ia3")]["learning_rate"] > lora
        assert TASK_DEFAULTS[(task, "prompt_tuning")]["learning_rate"] >= 10 * lora


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "qlora"])
def test_unsupported_combination_names_the_supported_ones(tmp_path, method):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: x\ntask: classification\nbase_model: m\nmethod: {method}\ndata:\n  train: t.csv\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert f"recipe.yaml:4: method: Value error, {method} does not support task classification" in message
    assert "lora, dora, ia3, full" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_qlora_without_a_gpu_fails_before_loading_anything(sft_recipe, tmp_path):
    # a base model that does not exist: the GPU check must come first
    with pytest.raises(ModelError, match="needs a CUDA GPU"):
        run(sft_recipe, overrides={"method": "qlora", "base_model": str(tmp_path / "missing")},
            output_dir=tmp_path / "runs", register=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="qlora needs a CUDA GPU and bitsandbytes")
def test_qlora_trains_on_a_gpu(sft_recipe, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = run(sft_recipe, overrides={"method": "qlora"}, output_dir=tmp_path / "runs", register=False)
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert result.tuned["perplexity"] < result.base["perplexity"]
    assert result.training["evaluation"] == "cuda 4-bit"


def test_report_to_a_missing_tracker_fails_before_loading(classification_recipe, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    # mlflow is a dev dependency: hide it, as on a machine without it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    with pytest.raises(RecipeError, match="mlflow is not installed"):
        run(classification_recipe, overrides={"training.report_to": "mlflow"}, output_dir=tmp_path / "runs",
            register=False)


def test_report_to_mlflow_logs_every_step_with_its_telemetry_off(classification_recipe, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")  # a dev dependency (mlflow-skinny): installed wherever the suite runs
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store needs no server
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("DO_NOT_TRACK", raising=False)
    assert not MLFLOW_DISABLE_TELEMETRY.get()  # MLflow's own default (it also stays quiet under pytest and CI)
    result = run(classification_recipe, overrides={"training.report_to": "mlflow", "training.epochs": 2},
                 output_dir=tmp_path / "runs", register=False)
    assert MLFLOW_DISABLE_TELEMETRY.get()
    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    client = MlflowClient(tracking_uri=store)
    [tracked] = client.search_runs(experiment_ids=["0"])
    assert tracked.info.run_name == "tiny-intents" and tracked.data.params["learning_rate"]
    history = client.get_metric_history(tracked.info.run_id, "loss")
    assert [m.step for m in history] == [r["step"] for r in log]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in log])


def test_report_to_tensorboard_logs_every_step_of_the_run(classification_recipe, tmp_path):
    pytest.importorskip("tensorboard")  # a dev dependency: installed wherever the suite runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(classification_recipe, overrides={"training.report_to": "tensorboard", "training.epochs": 2},
                 output_dir=tmp_path / "runs", register=False)
    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(result.run_dir / "tensorboard")).Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in log]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert "config" in "".join(events.Tags()["tensors"])


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_classification_methods_train_and_reload(classification_recipe, tmp_path, method):
    from domaintune.train.classification import load_classifier, predict_proba

    # IA3's scaling vectors barely move the tiny random encoder at the recipe's 1e-2 (its loss went
    # up or down by under 0.03 by the seed, both ways of drawing dropout); at 1e-1 it fell by 0.07-0.15
    overrides = {"method": method, **({"training.learning_rate": 1e-1} if method == "ia3" else {})}
    result = run(classification_recipe, overrides=overrides, output_dir=tmp_path / "runs", register=False)
    assert _loss_went_down(result.run_dir)
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3" if method == "ia3" else saved["use_dora"]
    base = catalog.resolve(yaml.safe_load(classification_recipe.read_text())["base_model"])
    model, labels = load_classifier(result.run_dir / "adapter", lambda: catalog.load_encoder(base))
    samples = [json.loads(line) for line in (result.run_dir / "predictions.jsonl").read_text().splitlines()]
    proba = predict_proba(model, catalog.load_tokenizer(base), [s["text"] for s in samples], 32)
    assert proba.max(1) == pytest.approx([s["tuned_confidence"] for s in samples], abs=1e-5)


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_causal_methods_train_and_reload(sft_recipe, tmp_path, method):
    from domaintune.data.examples import chat_examples
    from domaintune.data.readers import read_rows
    from domaintune.data.split import holdout_split
    from domaintune.train.causal import load_causal, perplexity, tokenize_chat

    result = run(sft_recipe, overrides={"method": method, "prompt.num_virtual_tokens": 4},
                 output_dir=tmp_path / "runs", register=False)
    assert _loss_went_down(result.run_dir)
    assert result.tuned["perplexity"] < result.base["perplexity"]
    base = catalog.resolve(yaml.safe_load(sft_recipe.read_text())["base_model"])
    model = load_causal(result.run_dir / "adapter", lambda: catalog.load_causal_lm(base))
    tokenizer = catalog.load_tokenizer(base)
    _, evaluation = holdout_split(chat_examples(read_rows(sft_recipe.parent / "data" / "colours.jsonl")), 0.25, 42)
    ppl, _ = perplexity(model, tokenizer, [tokenize_chat(tokenizer, e, 64) for e in evaluation])
    assert ppl == pytest.approx(result.tuned["perplexity"], rel=1e-4)


def test_pretrain_with_prompt_tuning(pretrain_recipe, tmp_path):
    result = run(pretrain_recipe, overrides={"method": "prompt_tuning"}, output_dir=tmp_path / "runs", register=False)
    assert result.tuned["perplexity"] < result.base["perplexity"]


def test_target_module_presets_and_overrides(tiny_llama, tiny_bert, tmp_path):
    from domaintune.recipe import Recipe

    llama = catalog.load_causal_lm(catalog.resolve(str(tiny_llama)))
    bert = catalog.load_encoder(catalog.resolve(str(tiny_bert)))
    spec = Recipe.model_validate({"name": "x", "task": "sft", "base_model": "m", "data": {"train": "t"}})
    assert lora_targets(llama, spec.lora) == LORA_TARGETS["llama"]
    assert lora_targets(bert, spec.lora) == LORA_TARGETS["bert"]

    def adapted(model) -> set[str]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}

    lora = apply_method(llama, spec, task_type="CAUSAL_LM")
    assert adapted(lora) == set(LORA_TARGETS["llama"])
    only_q = spec.model_copy(update={"lora": spec.lora.model_copy(update={"target_modules": ["q_proj"]})})
    fresh_llama = catalog.load_causal_lm(catalog.resolve(str(tiny_llama)))
    assert adapted(apply_method(fresh_llama, only_q, "CAUSAL_LM")) == {"q_proj"}
    ia3 = spec.model_copy(update={"method": "ia3"})
    ia3_model = apply_method(catalog.load_causal_lm(catalog.resolve(str(tiny_llama))), ia3, "CAUSAL_LM")
    assert adapted(ia3_model) == set(IA3_TARGETS["llama"][0])
    ia3_bert = apply_method(bert, ia3.model_copy(update={"task": "classification"}), None)
    assert {"key", "value", "dense"} == adapted(ia3_bert)


def test_bad_target_modules_name_the_recipe_key(tiny_llama):
    from domaintune.recipe import Recipe

    spec = Recipe.model_validate({"name": "x", "task": "sft", "base_model": "m", "method": "ia3",
                                  "data": {"train": "t"},
                                  "ia3": {"target_modules": ["nope"], "feedforward_modules": []}})
    with pytest.raises(RecipeError, match="ia3.target_modules"):
        apply_method(catalog.load_causal_lm(catalog.resolve(str(tiny_llama))), spec, "CAUSAL_LM")


def test_qlora_loads_onto_the_gpu_of_its_process(monkeypatch):
    """Under torchrun every process quantises its copy onto its own GPU (LOCAL_RANK), not all onto the first."""
    from transformers import AutoModelForCausalLM

    from domaintune.train.methods import load_quantized_causal_lm

    asked = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kwargs: asked.append(kwargs))
    monkeypatch.setenv("LOCAL_RANK", "3")
    load_quantized_causal_lm("somewhere")
    monkeypatch.delenv("LOCAL_RANK")
    load_quantized_causal_lm("somewhere")
    assert [a["device_map"] for a in asked] == [{"": 3}, {"": 0}]
    assert asked[0]["quantization_config"].load_in_4bit

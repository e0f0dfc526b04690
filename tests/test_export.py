"""`domaintune export RUN_DIR --merged OUT`: the merged model loads with plain transformers and
gives the adapter model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from domaintune import catalog
from domaintune.cli.export import export
from domaintune.errors import DomaintuneError, ModelError
from domaintune.pipeline import run
from domaintune.train.export import export_merged


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(export)
    app.command("unused")(lambda: None)  # two commands, so that `export` is named on the command line
    return app


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_causal_lm_equals_the_adapter_model(sft_recipe, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.train.causal import load_causal

    result = run(sft_recipe, overrides={"method": method, "training.epochs": 1}, output_dir=tmp_path / "runs",
                 register=False)
    out = tmp_path / "merged"
    invoked = CliRunner().invoke(_cli(), ["export", str(result.run_dir), "--merged", str(out)])
    assert invoked.exit_code == 0, invoked.output
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the template trained on travels with the weights
    base = catalog.resolve(yaml.safe_load(sft_recipe.read_text())["base_model"])
    adapted = load_causal(result.run_dir / "adapter", lambda: catalog.load_causal_lm(base))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is the colour of sky ?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, catalog.load_causal_lm(base)(input_ids=ids).logits, atol=1e-3)  # training changed it


def test_merged_classifier_equals_the_adapter_model(classification_recipe, tmp_path):
    from transformers import AutoModel

    from domaintune.train.classification import load_classifier, predict_proba

    result = run(classification_recipe, overrides={"method": "dora", "training.epochs": 2},
                 output_dir=tmp_path / "runs", register=False)
    out = export_merged(result.run_dir, tmp_path / "merged")
    assert AutoModel.from_pretrained(out).config.model_type == "bert"
    assert json.loads((out / "classifier.json").read_text())["merged_from"] == "dora"
    base = catalog.resolve(yaml.safe_load(classification_recipe.read_text())["base_model"])
    tokenizer = catalog.load_tokenizer(base)
    texts = ["my invoice is wrong", "the parcel is late again", "please help with my login"]
    merged, labels = load_classifier(out, lambda: pytest.fail("a merged model needs no base"))
    adapted, _ = load_classifier(result.run_dir / "adapter", lambda: catalog.load_encoder(base))
    assert predict_proba(merged, tokenizer, texts, 32) == pytest.approx(predict_proba(adapted, tokenizer, texts, 32),
                                                                      abs=1e-5)


def test_prompt_tuning_cannot_be_merged_and_nothing_is_written(sft_recipe, tmp_path):
    result = run(sft_recipe, overrides={"method": "prompt_tuning", "training.epochs": 1},
                 output_dir=tmp_path / "runs", register=False)
    with pytest.raises(ModelError, match="cannot be merged"):
        export_merged(result.run_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    invoked = CliRunner().invoke(_cli(), ["export", str(result.run_dir), "--merged", str(tmp_path / "merged")])
    assert invoked.exit_code == 2 and "cannot be merged" in invoked.output


def test_export_refuses_a_non_run_and_a_non_empty_target(tmp_path):
    with pytest.raises(DomaintuneError, match="not a finished run directory"):
        export_merged(tmp_path, tmp_path / "merged")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "x").write_text("x")
    (tmp_path / "recipe.yaml").write_text("")
    (tmp_path / "adapter").mkdir()
    with pytest.raises(DomaintuneError, match="not empty"):
        export_merged(tmp_path, tmp_path / "merged")


SYSTEM = 'You name colours.\nAnswer "blue", \'red\' or {{ other }} %} only.'


@pytest.fixture(scope="module")
def system_prompt_run(tmp_path_factory, tiny_llama):
    """An sft run whose recipe gives every training row a system prompt."""
    from conftest import colour_rows, write_jsonl, write_recipe

    root = tmp_path_factory.mktemp("system-prompt-run")
    write_jsonl(root / "data" / "colours.jsonl", colour_rows())
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "tiny-colours", "task": "sft", "base_model": str(tiny_llama), "method": "lora",
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.25, "dedup": {"exact": False, "near": False},
                 "system_prompt": SYSTEM},
        "training": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 4, "forgetting": False, "bias_probes": False, "explain_rows": 0},
    })
    return run(recipe, output_dir=root / "runs", register=False).run_dir


def test_the_merged_chat_template_defaults_to_the_recipes_system_prompt(system_prompt_run, tmp_path):
    from transformers import AutoTokenizer

    out = export_merged(system_prompt_run, tmp_path / "merged")
    exported, trained = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(system_prompt_run / "adapter")
    user = [{"role": "user", "content": "what is the colour of sky ?"}]
    for generation_prompt in (True, False):
        assert (exported.apply_chat_template(user, tokenize=False, add_generation_prompt=generation_prompt)
                == trained.apply_chat_template([{"role": "system", "content": SYSTEM}, *user], tokenize=False,
                                               add_generation_prompt=generation_prompt))
    other = [{"role": "system", "content": "You are terse."}, *user]  # an explicit system message is kept
    assert (exported.apply_chat_template(other, tokenize=False, add_generation_prompt=True)
            == trained.apply_chat_template(other, tokenize=False, add_generation_prompt=True))


@pytest.mark.slow
def test_smollm2s_template_takes_the_system_prompt_in_place_of_its_own_default():
    from domaintune.train.export import with_default_system_prompt

    tokenizer = catalog.load_tokenizer(catalog.resolve("smollm2-135m-instruct"))
    user = [{"role": "user", "content": "Chest pain, 54 years old."}]
    expected = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *user], tokenize=False,
                                             add_generation_prompt=True)
    assert "SmolLM" in tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = with_default_system_prompt(tokenizer.chat_template, SYSTEM)
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == expected


def test_bad_export_targets_are_refused_before_any_merge(system_prompt_run, tmp_path, monkeypatch):
    import domaintune.train.export as export_module

    monkeypatch.setattr(export_module, "export_merged",
                        lambda *a, **k: pytest.fail("the targets must be checked before the merge"))
    a_file = tmp_path / "afile"
    a_file.write_text("")
    cases = [
        (["--merged", str(a_file)], "is a file"),
        (["--merged", str(a_file / "sub")], "is a file"),
        (["--gguf", str(tmp_path / "no-such-dir" / "x.gguf")], "does not exist"),
        (["--gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q4_0"], "unknown GGUF type"),
        # a good --merged is not written when the --gguf that follows cannot be
        (["--merged", str(tmp_path / "merged"), "--gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q4_0"],
         "unknown GGUF type"),
    ]
    for args, message in cases:
        invoked = CliRunner().invoke(_cli(), ["export", str(system_prompt_run), *args])
        assert invoked.exit_code == 2, (args, invoked.output, invoked.exception)
        assert message in invoked.output and "fix:" in invoked.output
    assert not (tmp_path / "merged").exists() and not (tmp_path / "x.gguf").exists()

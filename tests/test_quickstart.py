"""Integration: the packaged foundation models, and the quickstart exactly as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from domaintune import catalog

pytestmark = pytest.mark.slow


def test_packaged_models_are_ready_offline():
    for name in catalog.CATALOG:
        model = catalog.pull(name)  # installed by the set-up: prepares, downloads nothing
        assert (model.path / "config.json").is_file()
        assert model.weight_files and all(p.is_file() for p in model.weight_files)


def test_smollm2_answers_a_chat_prompt():
    from domaintune.train.causal import generate, render

    base = catalog.resolve("smollm2-135m-instruct")
    tokenizer, model = catalog.load_tokenizer(base), catalog.load_causal_lm(base)
    text = render(tokenizer, [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    from rich.console import Console

    [answer] = generate(model, tokenizer, [prompt], 16, 1, Console(quiet=True), "")
    assert "Paris" in answer


def test_quickstart_beats_the_base(tmp_path):
    done = subprocess.run([sys.executable, "-m", "domaintune", "quickstart", "--json", "-o", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = {s["task"]: s for s in json.loads(done.stdout)}
    intents, triage = summaries["classification"], summaries["sft"]

    assert intents["tuned"]["accuracy"] > intents["base"]["accuracy"]
    assert intents["tuned"]["macro_f1"] > intents["base"]["macro_f1"]
    assert triage["tuned"]["exact_match"] >= triage["base"]["exact_match"] + 0.3
    assert triage["tuned"]["perplexity"] < triage["base"]["perplexity"]
    for summary in summaries.values():
        run_dir = tmp_path / summary["run_dir"].split(str(tmp_path) + "/", 1)[1]
        assert (run_dir / "report.html").is_file() and (run_dir / "adapter").is_dir()


def test_data_inspect_on_the_shipped_recipes_counts_tokens_and_finds_the_signatures():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    done = subprocess.run([sys.executable, "-m", "domaintune", "data", "inspect",
                           str(recipes / "support-intents" / "recipe.yaml"), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = json.loads(done.stdout)
    assert card["rows_in"] == 720 and card["kept"]["train"] + card["kept"]["eval"] == 720
    assert card["tokens"]["train"]["max"] <= 128  # the classification default max_seq_length truncates nothing
    assert card["pii"]["found"]["email"] >= 5  # the tickets quote e-mail addresses

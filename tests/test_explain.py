"""Explanations: occlusion attributions for classifiers, token log-probability shifts for
generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import KEYWORDS

from domaintune import run
from domaintune.evaluate.explain import explain_classification, explain_generation, occlusion

LABELS = ["negative", "positive"]


def keyword_model(signal: str = "refund"):
    """A classifier built to decide on one word: 'positive' with probability 0.9 when it is present."""
    def predict_proba(texts: list[str]) -> np.ndarray:
        p = np.array([0.9 if signal in t.split() else 0.2 for t in texts])
        return np.stack([1 - p, p], axis=1)
    return predict_proba


def test_occlusion_points_at_the_planted_signal_word():
    texts = ["please help with my refund today", "the parcel is late again", "refund"]
    explained = occlusion(keyword_model(), texts, LABELS)
    first = explained[0]
    assert first["prediction"] == "positive" and first["confidence"] == pytest.approx(0.9)
    top_word, top_score = max(first["words"], key=lambda w: w[1])
    assert top_word == "refund" and top_score == pytest.approx(0.7)
    assert all(score == 0 for word, score in first["words"] if word != "refund")
    assert explained[1]["prediction"] == "negative" and all(s == 0 for _, s in explained[1]["words"])
    assert [w for w, _ in explained[2]["words"]] == ["refund"]  # a one-word text is explained by that word
    indicative = explain_classification(keyword_model(), texts, LABELS)["indicative"]
    assert indicative["positive"][0][0] == "refund" and "negative" not in indicative or not indicative["negative"]


def test_a_trained_classifier_is_explained_by_its_label_keywords(classification_recipe, tmp_path):
    result = run(classification_recipe, output_dir=tmp_path / "runs", register=False,
                 overrides={"evaluate.explain_rows": 24})
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    explained = metrics["explanations"]
    assert explained["method"] == "occlusion" and len(explained["rows"]) == 24
    right = [row for row, line in zip(explained["rows"], (result.run_dir / "predictions.jsonl").read_text().splitlines())
             if json.loads(line)["label"] == row["prediction"]]
    # the data's labels follow keywords: the word that matters most should be the keyword
    hits = sum(max(row["words"], key=lambda w: w[1])[0] in KEYWORDS[row["prediction"]] for row in right)
    assert right and hits / len(right) >= 0.7, (hits, len(right))
    assert "Explanations: word occlusion" in (result.run_dir / "report.html").read_text()


def test_generation_explanations_find_the_tokens_tuning_made_likelier(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.train.causal import Tokenized

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_llama)  # noqa: E731
    model = get_peft_model(load(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = tokenizer("the sky is blue . the grass is green .", add_special_tokens=False)["input_ids"]
    unchanged = explain_generation(model, tokenizer, load, [Tokenized(ids, ids)])
    assert all(change == pytest.approx(0, abs=1e-5) for _, change in unchanged["rows"][0]["tokens"])

    blue = tokenizer.convert_tokens_to_ids("blue")
    tuned = load()  # a fully "tuned" model: one token made likelier everywhere by a bias on the output layer
    with torch.no_grad():
        tuned.lm_head.bias = torch.nn.Parameter(torch.zeros(len(tokenizer)))
        tuned.lm_head.bias[blue] = 5.0
    changed = explain_generation(tuned, tokenizer, load, [Tokenized(ids, ids)])
    assert changed["favoured"][0][0] == "blue"
    assert changed["rows"][0]["largest"][0][0] == "blue"
    assert all(token != "blue" for token, _ in changed["disfavoured"])

"""report.html: every section is there, and what the evaluation planted (a weak slice, a biased
model, a memorised canary) is what the page shows."""

from __future__ import annotations

import random

import numpy as np

from domaintune.evaluate.bias import flip_rate, load_term_groups
from domaintune.evaluate.comparison import compare_classification
from domaintune.evaluate.explain import explain_classification
from domaintune.evaluate.report import write_report
from domaintune.evaluate.slices import classification_score, slice_metrics
from domaintune.recipe import Recipe

LABELS = ["billing", "shipping"]


def _spec(task: str) -> Recipe:
    return Recipe.model_validate({"name": "report-test", "task": task, "base_model": "some-model",
                                  "data": {"train": "train.csv"}})


def _rows(seed: int = 0) -> list[dict]:
    """Tickets from two regions; the tuned model is right on every EU row and on half the US rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(80):
        label = LABELS[i % 2]
        region = "EU" if i < 40 else "US"
        text = f"{'he' if i % 3 else 'she'} asks about the {'invoice' if label == 'billing' else 'parcel'}"
        tuned = label if region == "EU" or rng.random() < 0.5 else LABELS[1 - LABELS.index(label)]
        rows.append({"text": text, "label": label, "base": LABELS[rng.randrange(2)], "tuned": tuned,
                     "meta": {"region": region}})
    return rows


def _proba(predictions: list[str], confidence: float) -> np.ndarray:
    return np.array([[confidence, 1 - confidence] if p == LABELS[0] else [1 - confidence, confidence]
                     for p in predictions])


def biased_predict(texts: list[str]) -> list[str]:
    """A model built to be biased: the pronoun decides the label."""
    return ["billing" if t.split()[0].lower() == "she" else "shipping" for t in texts]


def test_the_counterfactual_probe_catches_a_model_built_to_be_biased_and_clears_a_fair_one():
    texts = [r["text"] for r in _rows()]
    groups = {"gender": load_term_groups()["gender"]}
    biased = flip_rate(biased_predict, texts, groups)["gender"]
    fair = flip_rate(lambda ts: ["billing" if "invoice" in t else "shipping" for t in ts], texts, groups)["gender"]
    assert biased["rows"] == len(texts) and biased["rate"] == 1.0
    assert fair["rows"] == len(texts) and fair["rate"] == 0.0


def test_the_report_shows_every_section_and_finds_the_planted_slice_gap(tmp_path):
    rows = _rows()
    truth = [r["label"] for r in rows]
    compared = compare_classification(truth, LABELS, _proba([r["base"] for r in rows], 0.6),
                                      _proba([r["tuned"] for r in rows], 0.9))
    region = slice_metrics(rows, "region", classification_score)
    assert region["worst"]["tuned"] == "US" and region["gap"]["tuned"] > 0.3
    texts = [r["text"] for r in rows]
    metrics = {"task": "classification", "eval_rows": len(rows), "train_rows": 200, "base": compared.base,
               "tuned": compared.tuned, "intervals": compared.intervals, **compared.extra, "slices": [region],
               "bias": {m: flip_rate(biased_predict, texts, {"gender": load_term_groups()["gender"]})
                        for m in ("base", "tuned")},
               "explanations": explain_classification(
                   lambda ts: _proba(biased_predict(ts), 0.9), texts[:5], LABELS),
               "gates": [{"expr": "tuned.accuracy > 0.99", "passed": False, "failing": ["tuned.accuracy > 0.99 (0.8 > 0.99)"]}]}
    samples = [{**r, "base_confidence": 0.6, "tuned_confidence": 0.9} for r in rows]
    write_report(tmp_path / "report.html", _spec("classification"), metrics, samples,
                 [{"step": s, "loss": 1 / s} for s in range(1, 30)])
    page = (tmp_path / "report.html").read_text()
    for section in ("Headline metrics", "Gates", "Per-label F1", "Calibration", "Confusion matrix",
                    "By region", "Counterfactual bias probes", "Explanations: word occlusion", "Training loss"):
        assert section in page, section
    assert "worst slice <b>US</b>" in page
    # the biased model's explanations point at the pronoun
    assert "she (" in page or "he (" in page


def test_a_causal_report_shows_forgetting_privacy_and_token_shifts(tmp_path):
    spec = _spec("pretrain")
    metrics = {"task": "pretrain", "eval_rows": 10, "train_rows": 50,
               "base": {"perplexity": 20.0}, "tuned": {"perplexity": 12.0}, "intervals": {},
               "explanations": {"rows": [{"tokens": [["the", 0.1], ["refund", 2.5]], "largest": [["refund", 2.5]],
                                          "mean_change": 1.3}],
                                "favoured": [["refund", 2.5]], "disfavoured": [["weather", -1.0]]},
               "forgetting": {"base": {"perplexity": 30.0, "qa_accuracy": 0.5},
                              "tuned": {"perplexity": 45.0, "qa_accuracy": 0.4}, "texts": 20, "questions": 20,
                              "changed": [{"question": "What is the capital of Italy?", "base": "Rome",
                                           "tuned": "Refund", "base_correct": True, "tuned_correct": False}]},
               "privacy": {"candidates": 1000, "max_exposure": 9.97,
                           "canaries": [{"canary": "my secret code is 1234-5678", "repeats": 16,
                                         "exposure": {"base": 0.4, "tuned": 9.97}}],
                           "controls": [{"canary": "my secret code is 8765-4321", "exposure": {"base": 1.1, "tuned": 0.9}}],
                           "regurgitation": {"rows": 32, "tokens": 32, "verbatim": {"base": 0.0, "tuned": 0.25},
                                             "examples": []}}}
    write_report(tmp_path / "report.html", spec, metrics, [], [])
    page = (tmp_path / "report.html").read_text()
    for section in ("Explanations: where tuning changed token probabilities", "Forgetting: general ability",
                    "Privacy audit"):
        assert section in page, section
    assert "What is the capital of Italy?" in page and "9.97" in page and "25.0%" in page
    assert "<td class='worse'>9.97</td>" in page  # the memorised canary is flagged

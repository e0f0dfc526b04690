"""model_card.md says what the run did: the training actually done (not the recipe's plan), the
held-out rows actually scored, the bias groups actually probed, and p-values read correctly."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from domaintune.pipeline import run
from domaintune.registry.model_card import write_model_card

TRAINING = {"epochs": 9, "learning_rate": 1e-3, "batch_size": 8, "max_seq_length": 64, "seed": 42, "max_steps": None,
            "max_minutes": None, "early_stopping_patience": None, "eval_every": None}


def _run_dir(tmp_path, training=None, log=None, metrics=None, evaluate=None, eval_rows=64):
    """The files the card is written from, as a finished sft run leaves them."""
    recipe = {"name": "card", "task": "sft", "base_model": "tiny", "method": "full",
              "training": {**TRAINING, **(training or {})}, "evaluate": {"max_rows": None, **(evaluate or {})}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    scores = {"exact_match": 0.5, "rouge_l": 0.5, "perplexity": 3.0}
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "sft", "eval_rows": 16, "base": dict(scores),
                                                       "tuned": dict(scores), **(metrics or {})}))
    (tmp_path / "lineage.json").write_text(json.dumps({"domaintune_version": "0", "run_id": "r", "data": []}))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text("{}\n" * eval_rows)
    if log is not None:
        (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return tmp_path


def _log(steps, per_epoch, evals=None, elapsed=1.0, stopped=None):
    log = [{"step": s, "epoch": round(s / per_epoch, 4), "loss": 1.0, "elapsed_s": elapsed * s / steps,
            **({"eval_loss": evals[s]} if evals and s in evals else {})} for s in range(1, steps + 1)]
    if stopped:
        log[-1]["stopped"] = stopped
    return log


def _training_line(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("- Training:"))


@pytest.mark.parametrize("training, log, expected", [
    ({"max_steps": 5}, _log(5, 18),
     "5 optimiser steps (0.28 of the 9 epochs planned; stopped by training.max_steps=5)"),
    ({}, _log(162, 18), "9 epochs (162 optimiser steps)"),
    ({"epochs": 1, "max_steps": 30}, _log(30, 18), "30 optimiser steps (1.67 epochs: training.max_steps=30 replaced"),
    ({"max_minutes": 0.5}, _log(40, 18, elapsed=31.0),
     "40 optimiser steps (2.22 of the 9 epochs planned; stopped by training.max_minutes=0.5)"),
    ({"eval_every": 10, "early_stopping_patience": 2}, _log(40, 18, evals={10: 2.0, 20: 1.5, 30: 1.6, 40: 1.5}),
     "40 optimiser steps (2.22 of the 9 epochs planned; stopped early: the held-out loss did not improve for 2 "
     "evaluations, and the weights of the best evaluation were kept)"),
    ({}, None, "9 epochs planned (the run has no train_log.jsonl"),
    # the log says why: early stopping at a step past max_minutes' time, which a guess would call max_minutes
    ({"max_minutes": 0.5, "eval_every": 10, "early_stopping_patience": 2},
     _log(40, 18, evals={10: 2.0, 20: 1.5, 30: 1.6, 40: 1.5}, elapsed=31.0, stopped="early_stopping"),
     "40 optimiser steps (2.22 of the 9 epochs planned; stopped early: the held-out loss did not improve for 2 "
     "evaluations, and the weights of the best evaluation were kept)"),
    # a reason no guess finds: time ran out although elapsed_s (rounded, another process's clock) falls short
    ({"max_minutes": 0.5}, _log(40, 18, elapsed=29.0, stopped="max_minutes"),
     "40 optimiser steps (2.22 of the 9 epochs planned; stopped by training.max_minutes=0.5)"),
])
def test_the_card_states_the_training_done_and_why_it_stopped(tmp_path, training, log, expected):
    card = write_model_card(_run_dir(tmp_path, training, log)).read_text()
    assert expected in _training_line(card)
    if log and log[-1]["epoch"] < 9:
        assert "- Training: 9 epochs" not in card


def test_the_card_says_how_many_of_the_held_out_rows_were_scored(tmp_path):
    card = write_model_card(_run_dir(tmp_path, log=_log(5, 5), evaluate={"max_rows": 16})).read_text()
    assert "16 of the 64 held-out rows (the first 16 in `data/eval.jsonl`; evaluate.max_rows=16)" in card
    assert "- 16 held-out rows" not in card
    other = tmp_path / "all"
    other.mkdir()
    assert "- 16 held-out rows (`data/eval.jsonl`)." in write_model_card(_run_dir(other, eval_rows=16)).read_text()


def test_only_bias_groups_with_probed_rows_are_named_as_probed(tmp_path):
    def group(rows, flipped):
        return {"rows": rows, "flipped": flipped, "rate": flipped / rows if rows else None}

    bias = {"base": {"gender": group(6, 0), "names": group(0, 0), "age": group(0, 0)},
            "tuned": {"gender": group(6, 1), "names": group(0, 0), "age": group(0, 0)}}
    card = write_model_card(_run_dir(tmp_path, metrics={"bias": bias})).read_text()
    assert "- Counterfactual term swaps probed: gender (see Ethical considerations); no held-out row had terms of " \
           "names or age to swap." in card
    none = {side: {g: group(0, 0) for g in ("gender", "names")} for side in ("base", "tuned")}
    other = tmp_path / "none"
    other.mkdir()
    card = write_model_card(_run_dir(other, metrics={"bias": none})).read_text()
    assert "probed: gender" not in card
    assert "no held-out row had terms of gender or names to swap, so none were probed" in card


def test_p_values_are_worded_as_what_they_are(tmp_path):
    significance = {"exact_match": {"p_value": 0.0654, "method": "exact"},
                    "rouge_l": {"p_value": 0.5, "method": "paired bootstrap"}}
    card = write_model_card(_run_dir(tmp_path, metrics={"significance": significance})).read_text()
    assert "that the change is chance" not in card
    assert ("- exact_match: p = 0.065 (McNemar's exact test): the chance of a difference at least this large if the "
            "two models were equally good.") in card
    assert "- rouge_l: p = 0.5 (paired bootstrap): the chance of a difference" in card


@pytest.mark.parametrize("recipe", ["sft_recipe", "classification_recipe"])
def test_a_run_cut_short_by_max_steps_says_so(recipe, tmp_path, request):
    result = run(request.getfixturevalue(recipe), output_dir=tmp_path / "runs", register=False,
                 overrides={"training.max_steps": 2, "evaluate.max_rows": 5, "evaluate.forgetting": False,
                            "evaluate.explain_rows": 0})
    log = [json.loads(line) for line in (result.run_dir / "train_log.jsonl").read_text().splitlines()]
    epochs = yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["training"]["epochs"]
    assert log[-1]["step"] == 2 and log[-1]["epoch"] < epochs
    card = (result.run_dir / "model_card.md").read_text()
    line = _training_line(card)
    assert re.search(rf"2 optimiser steps \(0\.\d+ of the {epochs} epochs planned; stopped by training\.max_steps=2\)",
                     line), line
    held_out = len((result.run_dir / "data" / "eval.jsonl").read_text().splitlines())
    assert f"- 5 of the {held_out} held-out rows" in card

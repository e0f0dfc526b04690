"""Candidate against production on the same rows, row by row, so that the 95% interval of their
difference is a paired one: both models are scored on each resampled row, which makes the
interval as narrow as their disagreements allow rather than as wide as two separate intervals.

The result is shaped like metrics.json with ``base`` = production and ``tuned`` = candidate, so
the update gates are ordinary gate expressions (``difference.accuracy.low >= -0.02``).
A classification row whose label production never learned counts as wrong for production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from domaintune.evaluate import metrics as M
from domaintune.evaluate.intervals import paired_intervals
from domaintune.evaluate.run_eval import LoadedRun, read_processed, score_causal, sft_max_new_tokens


def compare_runs_on(candidate: LoadedRun, production: LoadedRun, eval_file: Path, console: Console) -> dict[str, Any]:
    """Both runs on the processed rows of ``eval_file`` (a run's data/eval.jsonl), with the
    candidate's evaluation settings for both: ``{"eval_rows", "base", "tuned", "intervals"}``."""
    spec = candidate.spec
    rows = read_processed(eval_file, spec.task)
    if spec.evaluate.max_rows:
        rows = rows[:spec.evaluate.max_rows]
    if spec.task == "classification":
        truth = [e.label for e in rows]
        scored = [_classify(run, [e.text for e in rows], truth, int(spec.training.max_seq_length))
                  for run in (production, candidate)]
        (prod, prod_rows), (cand, cand_rows) = scored
    else:
        train = read_processed(candidate.run_dir / "data" / "train.jsonl", spec.task)
        max_new = sft_max_new_tokens(spec, candidate.tokenizer, train) if spec.task == "sft" else 0
        prod, prod_rows, _ = score_causal(production.model, candidate.tokenizer, spec, rows, max_new, console, "production")
        cand, cand_rows, _ = score_causal(candidate.model, candidate.tokenizer, spec, rows, max_new, console, "candidate")
    intervals = {name: paired_intervals(prod_rows[name], cand_rows[name]) for name in cand_rows}
    return {"eval_rows": len(rows), "base": prod, "tuned": cand, "intervals": intervals}


def _classify(run: LoadedRun, texts: list[str], truth: list[str], max_length: int) -> tuple[dict, dict[str, list]]:
    from domaintune.train.classification import predict_proba

    proba = predict_proba(run.model, run.tokenizer, texts, max_length)
    predicted = [run.labels[i] for i in np.asarray(proba).argmax(1)]
    metrics = M.classification_metrics(truth, predicted, sorted(set(run.labels) | set(truth)))
    return metrics, {"accuracy": [float(p == y) for p, y in zip(predicted, truth)]}

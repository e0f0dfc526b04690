"""When a version may move to staging or production.

The rules, each refusable and each overridable only with ``--force`` and a written justification:
- production takes versions from staging (a candidate is staged first);
- every gate recorded in metrics.json (``gates: [{"expr": ..., "passed": ...}]``) must have passed;
  a run without gates (no ``gates`` key, or an empty list) is allowed; an update records there the
  gates it checked candidate against production with (each with its ``eval_set``), so a version
  the update rejected stays refused;
- the tuned model must not be worse than its own base: on the task's headline metric
  (classification: accuracy, sft: exact_match, pretrain: perplexity, lower is better) it is
  refused when the paired 95% interval of tuned − base lies entirely on the worse side of 0
  (a run without that interval is not checked, and the check says so);
- no regression against the current production version (for production): on the headline
  metric the candidate is refused when even the favourable end of its 95% interval is
  worse than production's point value (without a recorded interval, its point value is used),
  and when the two versions are for different tasks.

The regression check compares the metrics each run recorded on its own held-out rows, which is
only fair when both were evaluated on the same rows. Given ``EvalRows`` (the sha256 of each
version's data/eval.jsonl), the check's line says when the rows differ or cannot be told apart,
and how to compare the two runs on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domaintune.evaluate.metrics import HEADLINE, LOWER_IS_BETTER

EVAL_FILE = "data/eval.jsonl"  # the held-out rows a run scored, as lineage.json's processed_data names them


@dataclass
class Decision:
    """What the policy found: ``refusals`` block the promotion, ``passed`` says what was checked."""

    refusals: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.refusals


@dataclass(frozen=True)
class EvalRows:
    """Which held-out rows the candidate and production were scored on (sha256 of each one's
    data/eval.jsonl, None when its lineage does not record it) and their run directories."""

    candidate: str | None
    production: str | None
    candidate_run: str
    production_run: str


def eval_rows_sha256(lineage: dict[str, Any]) -> str | None:
    """The sha256 of the held-out rows a run was scored on, as its lineage.json recorded it."""
    return next((entry.get("sha256") for entry in lineage.get("processed_data", []) if entry.get("file") == EVAL_FILE),
                None)


def check_promotion(stage: str, to: str, metrics: dict[str, Any],
                    production: tuple[str, dict[str, Any]] | None, eval_rows: EvalRows | None = None) -> Decision:
    """Check moving a version in ``stage`` with ``metrics`` to ``to`` ("staging" or "production");
    ``production`` is the current production version of the same name (its ref and metrics), if
    any, and ``eval_rows`` says which rows each was scored on."""
    decision = Decision()
    if to == "production" and stage != "staging":
        decision.refusals.append(f"it is {stage}: production takes versions from staging")
    _check_gates(metrics, decision)
    _check_base(metrics, decision)
    if to == "production" and production is not None:
        _check_regression(metrics, *production, decision, eval_rows)
    return decision


def headline_metric(task: str) -> str:
    """The one metric a task's versions are ranked by."""
    return HEADLINE[task][0]


def _check_gates(metrics: dict[str, Any], decision: Decision) -> None:
    gates = metrics.get("gates")
    if not gates:
        decision.passed.append("no gate recorded")
        return
    failed = [gate_name(gate) for gate in gates if not gate.get("passed")]
    decision.refusals += [f"gate {name} failed" for name in failed]
    if not failed:
        decision.passed.append(f"all {len(gates)} recorded gates passed")


def gate_name(gate: dict[str, Any]) -> str:
    """A recorded gate as the policy and the cards name it: its expression, and the eval set it was
    checked on where that is not the run's own (an update's gates, checked on each earlier version's rows)."""
    return f"`{gate.get('expr', '?')}`" + (f" on {gate['eval_set']}" if gate.get("eval_set") else "")


def _check_base(metrics: dict[str, Any], decision: Decision) -> None:
    # A run without gates passes every other check even when fine-tuning made the model worse
    # than the base it started from; the paired interval is what says "worse", not noise.
    metric = headline_metric(metrics["task"])
    interval = metrics.get("intervals", {}).get(metric, {}).get("difference")
    if not interval:
        decision.passed.append(f"no tuned − base interval of {metric} recorded: not compared with its base")
        return
    low, high = interval
    lower = metric in LOWER_IS_BETTER
    shown = f"{metric} tuned − base 95% interval {low:+.4f} to {high:+.4f}"
    if (low > 0) if lower else (high < 0):
        decision.refusals.append(f"worse than its base model: {shown} lies entirely {'above' if lower else 'below'} 0")
    else:
        decision.passed.append(f"not worse than its base model: {shown}")


def _check_regression(metrics: dict[str, Any], prod_ref: str, prod_metrics: dict[str, Any], decision: Decision,
                      eval_rows: EvalRows | None) -> None:
    task = metrics["task"]
    if prod_metrics.get("task") != task:
        decision.refusals.append(f"task {task} differs from production {prod_ref} ({prod_metrics.get('task')}): "
                                 "their metrics cannot be compared")
        return
    metric = headline_metric(task)
    value, reference = metrics["tuned"].get(metric), prod_metrics["tuned"].get(metric)
    if value is None or reference is None:
        decision.refusals.append(f"{metric} is not recorded for both this version and production {prod_ref}")
        return
    lower = metric in LOWER_IS_BETTER
    interval = metrics.get("intervals", {}).get(metric, {}).get("tuned")
    favourable = (min(interval) if lower else max(interval)) if interval else value
    shown = f"{metric} {value:.4f}" + (f" (95% interval {interval[0]:.4f}-{interval[1]:.4f})" if interval else "")
    if (favourable > reference) if lower else (favourable < reference):
        decision.refusals.append(f"regression: {shown} is worse than production {prod_ref}'s {reference:.4f}"
                                 + _rows_caveat(eval_rows))
    else:
        decision.passed.append(f"no regression: {shown} against production {prod_ref}'s {reference:.4f}"
                               + _rows_caveat(eval_rows))


def _rows_caveat(eval_rows: EvalRows | None) -> str:
    """Nothing when both versions were scored on the same rows; otherwise why the numbers may not
    be comparable and the command that compares them on the same rows."""
    if eval_rows is None or (eval_rows.candidate is not None and eval_rows.candidate == eval_rows.production):
        return ""
    if eval_rows.candidate and eval_rows.production:
        differ = "on different eval rows"
    else:
        differ = "the eval rows of one of them are not recorded, so they may differ"
    return (f" ({differ}: compare them on the same rows with "
            f"`domaintune compare {eval_rows.production_run} {eval_rows.candidate_run}`)")

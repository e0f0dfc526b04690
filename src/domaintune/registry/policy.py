"""When a version may move to staging or production.

The rules, each refusable and each overridable only with ``--force`` and a written justification:
- production takes versions from staging (a candidate is staged first);
- every gate recorded in metrics.json (``gates: [{"expr": ..., "passed": ...}]``) must have passed;
  a run without gates (no ``gates`` key, or an empty list) is allowed;
- no regression against the current production version: on the task's headline metric
  (classification: accuracy, sft: exact_match, pretrain: perplexity, lower is better) the
  candidate is refused when even the favourable end of its 95% bootstrap interval is worse than
  production's point value (without a recorded interval, its point value is used), and when the
  two versions are for different tasks.

The comparison uses the metrics each run recorded on its own held-out rows: it is only fair when
both runs were evaluated on the same rows, which the registry does not check beyond noting it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domaintune.evaluate.metrics import HEADLINE, LOWER_IS_BETTER


@dataclass
class Decision:
    """What the policy found: ``refusals`` block the promotion, ``passed`` says what was checked."""

    refusals: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.refusals


def check_promotion(stage: str, to: str, metrics: dict[str, Any],
                    production: tuple[str, dict[str, Any]] | None) -> Decision:
    """Check moving a version in ``stage`` with ``metrics`` to ``to`` ("staging" or "production");
    ``production`` is the current production version of the same name (its ref and metrics), if any."""
    decision = Decision()
    if to == "production" and stage != "staging":
        decision.refusals.append(f"it is {stage}: production takes versions from staging")
    _check_gates(metrics, decision)
    if to == "production" and production is not None:
        _check_regression(metrics, *production, decision)
    return decision


def headline_metric(task: str) -> str:
    """The one metric a task's versions are ranked by."""
    return HEADLINE[task][0]


def _check_gates(metrics: dict[str, Any], decision: Decision) -> None:
    gates = metrics.get("gates")
    if not gates:
        decision.passed.append("no gate recorded")
        return
    failed = [gate.get("expr", "?") for gate in gates if not gate.get("passed")]
    decision.refusals += [f"gate `{expr}` failed" for expr in failed]
    if not failed:
        decision.passed.append(f"all {len(gates)} recorded gates passed")


def _check_regression(metrics: dict[str, Any], prod_ref: str, prod_metrics: dict[str, Any], decision: Decision) -> None:
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
        decision.refusals.append(f"regression: {shown} is worse than production {prod_ref}'s {reference:.4f}")
    else:
        decision.passed.append(f"no regression: {shown} against production {prod_ref}'s {reference:.4f}")

"""update_report.md: what an update trained on, and candidate vs production vs base on every eval set."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from domaintune.evaluate.metrics import HEADLINE
from domaintune.update.assemble import REPLAY_FLOOR

if TYPE_CHECKING:
    from domaintune.update.updater import UpdateResult


def write_update_report(path: Path, result: UpdateResult) -> None:
    """Write the report of ``result`` (after its comparisons) to ``path``."""
    a, s = result.assembly, result.settings
    sources = ", ".join(f"{n} {kind}" for kind, n in sorted(a.train_rows.items())) or "none"
    lines = [
        f"# Update of {result.parent}",
        "",
        f"Verdict: **{'passed' if result.passed else 'rejected'}**"
        + (f" ({result.registered})" if result.registered else ""),
        "",
        "## Training data",
        f"- Training rows by source: {sources}; {a.eval_rows} new held-out rows"
        + ("" if a.new_eval else " (none new: production's eval set was used)") + ".",
        f"- Replay: {a.train_rows.get('replay', 0)} of {a.replay_pool} earlier training rows "
        f"(update.replay_ratio {s.replay_ratio:g}"
        + (f", and at least {REPLAY_FLOOR} of each label" if result.task == "classification" and s.replay_ratio > 0
           else "") + ").",
        f"- Dropped: {len(a.earlier_duplicates)} rows that earlier versions trained or were evaluated on; "
        f"{a.data_dropped} by the data steps.",
        f"- Personal data found: {sum(a.pii.values())}" + (f" ({_counts(a.pii)})" if a.pii else "") + ".",
        f"- Feedback: {len(a.feedback_ids)} corrections used"
        + (f"; not used: {_counts(a.feedback_skipped)}" if a.feedback_skipped else "") + ".",
        "",
        "## Candidate against production and the base",
        "Forgetting is the candidate's change on the earlier eval sets: negative is forgotten. The interval is "
        "the paired 95% bootstrap interval of candidate − production.",
        "",
        "| eval set | rows | metric | base | production | candidate | change (95% interval) | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result.comparisons:
        for metric in HEADLINE[result.task]:
            interval = c["intervals"].get(metric, {}).get("difference")
            change = c["candidate"][metric] - c["production"][metric]
            shown = f"{change:+.4f}" + (f" ({interval[0]:+.4f} to {interval[1]:+.4f})" if interval else "")
            base = c["base"].get(metric)
            verdict = _verdict(metric, c["gates"])
            lines.append(f"| {c['eval_set']} | {c['eval_rows']} | {metric} | "
                         f"{'' if base is None else f'{base:.4f}'} | {c['production'][metric]:.4f} | "
                         f"{c['candidate'][metric]:.4f} | {shown} | {verdict} |")
    lines += ["", "## Gates"]
    for c in result.comparisons:
        for g in c["gates"]:
            lines.append(f"- {c['eval_set']}: `{g['expr']}`: " + ("held" if g["passed"] else
                                                                   "failed: " + "; ".join(g["failing"])))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _verdict(metric: str, gates: list[dict]) -> str:
    """The gates' verdict on one metric: only a metric a gate names held or failed; the others
    were not checked, whatever happened to the set's gate (a drop in perplexity is not "held"
    because exact match was what the gate looked at)."""
    named = re.compile(rf"\b{re.escape(metric)}\b")
    if any(named.search(clause) for g in gates for clause in g["failing"]):
        return "**failed**"
    return "held" if any(named.search(g["expr"]) for g in gates) else "not gated"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))

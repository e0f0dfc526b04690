"""report.html: the base-vs-tuned comparison as one self-contained page, readable offline."""

from __future__ import annotations

import html
from pathlib import Path

from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline
from domaintune.recipe import Recipe

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.better{color:#176e2c;font-weight:bold}.worse{color:#a3121b;font-weight:bold}
.bar{display:inline-block;height:10px;background:#4a78c2}"""


def _e(value) -> str:
    return html.escape(str(value))


def _change_class(name: str, base: float, tuned: float) -> str:
    gain = (base - tuned) if name in LOWER_IS_BETTER else (tuned - base)
    return "better" if gain > 0 else "worse" if gain < 0 else ""


def write_report(path: Path, spec: Recipe, metrics: dict, samples: list[dict], train_log: list[dict]) -> None:
    parts = [f"<h1>{_e(spec.name)}: base vs tuned</h1>",
             f"<p>Task <b>{_e(spec.task)}</b>, base model <b>{_e(spec.base_model)}</b>, method <b>{_e(spec.method)}</b>; "
             f"{metrics['train_rows']} training rows, {metrics['eval_rows']} held-out rows.</p>",
             f"<p>Base: {_e(metrics['base'].get('model', ''))}. Tuned: {_e(metrics['tuned'].get('model', ''))}.</p>",
             "<h2>Headline metrics</h2><table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"]
    for name, b, t in headline(spec.task, metrics["base"], metrics["tuned"]):
        parts.append(f"<tr><td>{_e(name)}</td><td>{b:.4f}</td><td>{t:.4f}</td>"
                     f"<td class='{_change_class(name, b, t)}'>{t - b:+.4f}</td></tr>")
    parts.append("</table>")

    if spec.task == "classification":
        parts.append("<h2>Per-label F1</h2><table><tr><th>label</th><th>support</th><th>base F1</th><th>tuned F1</th></tr>")
        base_pl, tuned_pl = metrics["base"]["per_label"], metrics["tuned"]["per_label"]
        for label in sorted(set(base_pl) | set(tuned_pl)):
            b = base_pl.get(label, {}).get("f1", 0.0)
            t = tuned_pl.get(label, {}).get("f1", 0.0)
            support = tuned_pl.get(label, base_pl.get(label, {})).get("support", 0)
            parts.append(f"<tr><td>{_e(label)}</td><td>{support}</td><td>{b:.3f}</td>"
                         f"<td class='{_change_class('f1', b, t)}'>{t:.3f}</td></tr>")
        parts.append("</table>")
        changed = [s for s in samples if s["base"] != s["tuned"]][:30]
        parts.append(f"<h2>Rows where base and tuned disagree ({len(changed)} shown)</h2>"
                     "<table><tr><th>text</th><th>label</th><th>base</th><th>tuned</th></tr>")
        for s in changed:
            parts.append(f"<tr><td>{_e(s['text'])}</td><td>{_e(s['label'])}</td><td>{_e(s['base'])}</td><td>{_e(s['tuned'])}</td></tr>")
        parts.append("</table>")
    elif spec.task == "sft":
        parts.append("<h2>Examples</h2><table><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>")
        ordered = sorted(samples, key=lambda s: s["base_exact"] - s["tuned_exact"])[:30]
        for s in ordered:
            parts.append(f"<tr><td>{_e(s['prompt'])}</td><td>{_e(s['reference'])}</td><td>{_e(s['base'])}</td>"
                         f"<td>{_e(s['tuned'])}</td></tr>")
        parts.append("</table>")

    if train_log:
        parts.append("<h2>Training loss</h2><table><tr><th>step</th><th>loss</th><th></th></tr>")
        stride = max(1, len(train_log) // 20)
        top = max(r["loss"] for r in train_log) or 1.0
        for r in train_log[::stride] + ([train_log[-1]] if (len(train_log) - 1) % stride else []):
            width = int(300 * r["loss"] / top)
            parts.append(f"<tr><td>{r['step']}</td><td>{r['loss']:.4f}</td><td><span class='bar' style='width:{width}px'></span></td></tr>")
        parts.append("</table>")

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(spec.name)} report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")

"""report.html: the base-vs-tuned comparison as one self-contained page, readable offline."""

from __future__ import annotations

import html
from pathlib import Path

from domaintune.evaluate import plots
from domaintune.evaluate.calibration import confusion_html, reliability_svg
from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline
from domaintune.recipe import Recipe

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}.better{color:#176e2c;font-weight:bold}.worse{color:#a3121b;font-weight:bold}
img{display:block;margin:1em 0;max-width:100%}.note{color:#666}"""


def _e(value) -> str:
    return html.escape(str(value))


def _change_class(name: str, base: float, tuned: float) -> str:
    gain = (base - tuned) if name in LOWER_IS_BETTER else (tuned - base)
    return "better" if gain > 0 else "worse" if gain < 0 else ""


def write_report(path: Path, spec: Recipe, metrics: dict, samples: list[dict], train_log: list[dict]) -> None:
    """Write report.html for one run: ``metrics`` as in metrics.json, ``samples`` as in
    predictions.jsonl, ``train_log`` as in train_log.jsonl. Charts come next to the tables when
    matplotlib is installed; without it the page says so and keeps the tables."""
    charts = plots.available()
    parts = [f"<h1>{_e(spec.name)}: base vs tuned</h1>",
             f"<p>Task <b>{_e(spec.task)}</b>, base model <b>{_e(spec.base_model)}</b>, method <b>{_e(spec.method)}</b>; "
             f"{metrics['train_rows']} training rows, {metrics['eval_rows']} held-out rows.</p>",
             f"<p>Base: {_e(metrics['base'].get('model', ''))}. Tuned: {_e(metrics['tuned'].get('model', ''))}.</p>",
             "" if charts else "<p class='note'>Charts are left out: matplotlib is not installed "
                               "(<code>pip install matplotlib</code>); the tables hold the same numbers.</p>",
             "<h2>Headline metrics</h2><p>Brackets: 95% intervals (Wilson's for accuracy and exact match, the "
             "bootstrap's for ROUGE-L); the change is paired (the same rows resampled for both models). p: the chance of a difference this large if the models were equally good.</p>"
             "<table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th><th>p</th></tr>"]
    intervals, significance = metrics.get("intervals", {}), metrics.get("significance", {})
    for name, b, t in headline(spec.task, metrics["base"], metrics["tuned"]):
        p = significance.get(name, {}).get("p_value")
        parts.append(f"<tr><td>{_e(name)}</td><td>{b:.4f}{_ci(intervals, name, 'base')}</td>"
                     f"<td>{t:.4f}{_ci(intervals, name, 'tuned')}</td>"
                     f"<td class='{_change_class(name, b, t)}'>{t - b:+.4f}{_ci(intervals, name, 'difference')}</td>"
                     f"<td>{'' if p is None else f'{p:.2g}'}</td></tr>")
    parts.append("</table>")
    if charts:
        parts.append(plots.metric_bars(metrics))
    if metrics.get("gates"):
        parts.append("<h2>Gates</h2><ul>")
        for gate in metrics["gates"]:
            verdict = "<span class='better'>passed</span>" if gate["passed"] else "<span class='worse'>failed</span>"
            parts.append(f"<li>{verdict}: <code>{_e(gate['expr'])}</code> {_e('; '.join(gate['failing']))}</li>")
        parts.append("</ul>")
    parts.append("<p>The data: see <a href='data_card.md'>data_card.md</a> (sources, what each step dropped, "
                 "personal data redacted, duplicates and leakage).</p>")

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
        if "calibration" in metrics:
            parts.append("<h2>Calibration</h2><p>Expected calibration error: base "
                         f"{metrics['base']['ece']:.3f}, tuned {metrics['tuned']['ece']:.3f} (lower: confidence "
                         "closer to accuracy).</p>" + _reliability(metrics["calibration"], charts))
        if "confusion" in metrics:
            matrix, labels = metrics["confusion"]["tuned"], metrics["confusion"]["labels"]
            parts.append("<h2>Confusion matrix (tuned; rows: true label)</h2>" + confusion_html(matrix, labels)
                         + (plots.confusion_plot(matrix, labels) if charts else ""))
        mistakes = sorted((s for s in samples if s["tuned"] != s["label"]), key=lambda s: -s["tuned_confidence"])[:15]
        if mistakes:
            parts.append("<h2>Most confident mistakes (tuned)</h2><table><tr><th>text</th><th>label</th><th>tuned</th>"
                         "<th>confidence</th></tr>")
            for s in mistakes:
                parts.append(f"<tr><td>{_e(s['text'])}</td><td>{_e(s['label'])}</td><td>{_e(s['tuned'])}</td>"
                             f"<td>{s['tuned_confidence']:.2f}</td></tr>")
            parts.append("</table>")
        changed = [s for s in samples if s["base"] != s["tuned"]][:30]
        parts.append(f"<h2>Rows where base and tuned disagree ({len(changed)} shown)</h2>"
                     "<table><tr><th>text</th><th>label</th><th>base</th><th>tuned</th></tr>")
        for s in changed:
            parts.append(f"<tr><td>{_e(s['text'])}</td><td>{_e(s['label'])}</td><td>{_e(s['base'])}</td><td>{_e(s['tuned'])}</td></tr>")
        parts.append("</table>")
    elif spec.task == "sft":
        parts.append("<h2>Examples where base and tuned differ most</h2>"
                     "<table><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>")
        ordered = sorted(samples, key=lambda s: -abs(s["tuned_rouge_l"] - s["base_rouge_l"]))[:30]
        for s in ordered:
            parts.append(f"<tr><td>{_e(s['prompt'])}</td><td>{_e(s['reference'])}</td><td>{_e(s['base'])}</td>"
                         f"<td>{_e(s['tuned'])}</td></tr>")
        parts.append("</table>")

    for sliced in metrics.get("slices", []):
        parts.append(_slice_table(sliced) + (plots.slice_chart(sliced) if charts else ""))
    if metrics.get("bias"):
        parts.append(_bias_table(metrics["bias"]))
    if metrics.get("explanations"):
        parts.append(_explanations(metrics["explanations"], spec.task))
    if metrics.get("forgetting"):
        parts.append(_forgetting(metrics["forgetting"]))
    if metrics.get("privacy"):
        parts.append(_privacy(metrics["privacy"]))

    if train_log:
        parts.append(_training(train_log, charts))

    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(spec.name)} report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")


def _ci(intervals: dict, name: str, which: str) -> str:
    lo_hi = intervals.get(name, {}).get(which)
    return f" <small>[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]</small>" if lo_hi else ""


def _reliability(calibration: dict, charts: bool) -> str:
    if charts:
        return plots.reliability_plot(calibration["base"], calibration["tuned"])
    # without matplotlib the hand-drawn SVG diagrams stand in
    return ("<div>" + reliability_svg(calibration["base"], title="base")
            + reliability_svg(calibration["tuned"], title="tuned") + "</div>")


def _training(train_log: list[dict], charts: bool) -> str:
    """The curves, and about 20 evenly spaced steps (the last included) as a table."""
    parts = ["<h2>Training loss</h2>", plots.training_curves(train_log) if charts else "",
             "<table><tr><th>step</th><th>loss</th><th>learning rate</th></tr>"]
    stride = max(1, len(train_log) // 20)
    for r in train_log[::stride] + ([train_log[-1]] if (len(train_log) - 1) % stride else []):
        lr = f"{r['lr']:.3g}" if "lr" in r else ""
        parts.append(f"<tr><td>{r['step']}</td><td>{r['loss']:.4f}</td><td>{lr}</td></tr>")
    return "".join(parts) + "</table>"


def _slice_table(sliced: dict) -> str:
    metric, worst, gap = sliced["metric"], sliced["worst"], sliced["gap"]
    rows = [f"<h2>By {_e(sliced['field'])} ({_e(metric)})</h2>"]
    if gap.get("tuned") is not None:  # a worst slice of None: every ranked slice scores the same
        base = (f"base: {_e(worst['base'])}, gap {gap['base']:.3f}" if worst.get("base") is not None
                else "base: every slice the same")
        rows.append(f"<p>Tuned: worst slice <b>{_e(worst['tuned'])}</b>, {gap['tuned']:.3f} below the best ({base}).</p>"
                    if worst.get("tuned") is not None else f"<p>Tuned: every slice scores the same ({base}).</p>")
    rows.append("<table><tr><th>value</th><th>rows</th><th>base</th><th>tuned</th></tr>")
    for value, s in sliced["slices"].items():
        mark = " class='worse'" if value == worst.get("tuned") else ""
        small = " <small>(too few rows to rank)</small>" if s["too_small"] else ""
        rows.append(f"<tr><td{mark}>{_e(value)}{small}</td><td>{s['rows']}</td><td>{s['base'][metric]:.3f}</td>"
                    f"<td>{s['tuned'][metric]:.3f}</td></tr>")
    return "".join(rows) + "</table>"


def _bias_table(bias: dict) -> str:
    rows = ["<h2>Counterfactual bias probes</h2><p>Share of held-out rows whose prediction changes when only the "
            "terms of a group are swapped (he ↔ she, one first name for another, young ↔ old). Lower is better; "
            "rows without such a term are not counted.</p><table><tr><th>group</th><th>rows</th>"
            "<th>base flips</th><th>tuned flips</th><th>example</th></tr>"]
    for group, tuned in bias.get("tuned", {}).items():
        base = bias.get("base", {}).get(group, {})
        example = (tuned.get("examples") or base.get("examples") or [{}])[0]
        shown = (f"{_e(example['text'])} → {_e(example['counterfactual'])}: {_e(example['prediction'])} → "
                 f"{_e(example['counterfactual_prediction'])}") if example else ""

        def rate(r: dict) -> str:
            return "–" if r.get("rate") is None else f"{r['rate']:.3f} ({r['flipped']})"

        rows.append(f"<tr><td>{_e(group)}</td><td>{tuned['rows']}</td><td>{rate(base)}</td><td>{rate(tuned)}</td>"
                    f"<td>{shown}</td></tr>")
    return "".join(rows) + "</table>"


def _shaded(pieces: list[list], scale: float) -> str:
    """Words or tokens on a background: green where the score is positive, red where negative."""
    spans = []
    for text, score in pieces:
        alpha = min(1.0, abs(score) / scale) if scale else 0.0
        rgb = "23,110,44" if score > 0 else "163,18,27"
        spans.append(f"<span style='background:rgba({rgb},{alpha:.2f})' title='{score:+.3f}'>{_e(text)}</span>")
    return " ".join(spans)


def _explanations(explained: dict, task: str) -> str:
    rows = explained["rows"]
    if task == "classification":
        parts = ["<h2>Explanations: word occlusion (tuned)</h2><p>Each word is dropped in turn; its score is the fall "
                 "in the predicted label's probability (green: the word supports the label, red: it argues against).</p>"
                 "<table><tr><th>label</th><th>most indicative words (summed over the sample)</th></tr>"]
        for label, words in explained["indicative"].items():
            parts.append(f"<tr><td>{_e(label)}</td><td>{_e(', '.join(f'{w} ({s:.2f})' for w, s in words))}</td></tr>")
        parts.append("</table><table><tr><th>prediction</th><th>text</th></tr>")
        for row in rows[:15]:
            scale = max((abs(s) for _, s in row["words"]), default=0.0)
            parts.append(f"<tr><td>{_e(row['prediction'])} ({row['confidence']:.2f})</td>"
                         f"<td>{_shaded(row['words'], scale)}</td></tr>")
        return "".join(parts) + "</table>"
    parts = ["<h2>Explanations: where tuning changed token probabilities</h2><p>Log-probability of each reference "
             "token under the tuned model minus under the base (green: tuned finds it likelier).</p>",
             f"<p>Favoured most: {_e(', '.join(f'{t!r} ({c:+.2f})' for t, c in explained['favoured']))}. "
             f"Disfavoured most: {_e(', '.join(f'{t!r} ({c:+.2f})' for t, c in explained['disfavoured']))}.</p>"
             "<table><tr><th>mean change</th><th>reference tokens</th></tr>"]
    for row in rows[:15]:
        scale = max((abs(c) for _, c in row["tokens"]), default=0.0)
        parts.append(f"<tr><td>{row['mean_change']:+.3f}</td><td>{_shaded(row['tokens'], scale)}</td></tr>")
    return "".join(parts) + "</table>"


def _forgetting(f: dict) -> str:
    parts = [f"<h2>Forgetting: general ability</h2><p>Base and tuned on the general-ability set shipped with "
             f"domaintune: perplexity on {f['texts']} paragraphs of everyday English and the share of {f['questions']} "
             "general questions answered correctly. A large rise in perplexity or fall in answers is what the "
             "domain tuning cost elsewhere.</p><table><tr><th>metric</th><th>base</th><th>tuned</th><th>change</th></tr>"]
    for name in ("perplexity", "qa_accuracy"):
        b, t = f["base"][name], f["tuned"][name]
        parts.append(f"<tr><td>{name}</td><td>{b:.4f}</td><td>{t:.4f}</td>"
                     f"<td class='{_change_class(name, b, t)}'>{t - b:+.4f}</td></tr>")
    parts.append("</table>")
    if f["changed"]:
        parts.append("<table><tr><th>question</th><th>base</th><th>tuned</th></tr>")
        for c in f["changed"]:
            mark = "better" if c["tuned_correct"] else "worse"
            parts.append(f"<tr><td>{_e(c['question'])}</td><td>{_e(c['base'])}</td>"
                         f"<td class='{mark}'>{_e(c['tuned'])}</td></tr>")
        parts.append("</table>")
    return "".join(parts)


def _privacy(p: dict) -> str:
    parts = [f"<h2>Privacy audit</h2><p>Canaries (random secrets) were planted in the training rows. Exposure ranks "
             f"each among {p['candidates']} random secrets of the same format: about 1 means not learned, "
             f"{p['max_exposure']:.1f} means it is the model's first guess (memorised). Controls were never planted.</p>"
             "<table><tr><th>canary</th><th>copies in training</th><th>base exposure</th><th>tuned exposure</th></tr>"]
    for c in [*p["canaries"], *({**c, "repeats": 0} for c in p["controls"])]:
        risky = " class='worse'" if c["repeats"] and c["exposure"]["tuned"] > p["max_exposure"] / 2 else ""
        parts.append(f"<tr><td>{_e(c['canary'])}</td><td>{c['repeats'] or 'control'}</td>"
                     f"<td>{c['exposure']['base']:.2f}</td><td{risky}>{c['exposure']['tuned']:.2f}</td></tr>")
    parts.append("</table>")
    r = p["regurgitation"]
    if r["rows"]:
        parts.append(f"<p>Regurgitation: {r['rows']} training rows prompted with their beginning; continued verbatim "
                     f"for {r['tokens']} tokens by the base in {r['verbatim']['base']:.1%} and by the tuned model in "
                     f"{r['verbatim']['tuned']:.1%} of them.</p>")
    return "".join(parts)

"""The report's charts: each function returns one ``<img>`` tag holding a small PNG as a data URI,
so report.html stays a single file that any browser opens offline.

matplotlib is optional: :func:`available` says whether it can be imported, and the report leaves
the charts out (its tables carry the same numbers) when it cannot. Figures are drawn with the
object-oriented API on an Agg canvas rather than through pyplot, so nothing opens a window, no
global backend is switched under the caller, and no figure outlives the call.
"""

from __future__ import annotations

import base64
import html
import io

from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline

DPI = 100  # small PNGs keep report.html light; the numbers themselves are in the tables
BASE_COLOR, TUNED_COLOR, WORSE_COLOR = "#9aa5b1", "#4a78c2", "#a3121b"


def available() -> bool:
    """Whether matplotlib can be imported, i.e. whether the other functions here can draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _img(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(alt, quote=True)}'>"


def metric_bars(metrics: dict) -> str:
    """Base vs tuned for each headline metric of ``metrics["task"]``, one small panel per metric
    (their scales differ: accuracy vs perplexity), with the 95% intervals of ``metrics["intervals"]``
    as error bars where there are any."""
    names = headline(metrics["task"], metrics["base"], metrics["tuned"])
    figure = _figure(2.2 * len(names) + 0.4, 2.6)
    intervals = metrics.get("intervals", {})
    for axes, (name, base, tuned) in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        values = [base, tuned]
        yerr = None  # perplexity and the like come without a per-row interval
        if name in intervals:
            bounds = [intervals[name].get(model) or [value, value] for model, value in zip(("base", "tuned"), values)]
            yerr = [[max(0.0, v - lo) for v, (lo, _) in zip(values, bounds)],
                    [max(0.0, hi - v) for v, (_, hi) in zip(values, bounds)]]
        axes.bar(["base", "tuned"], values, yerr=yerr, capsize=4, color=[BASE_COLOR, TUNED_COLOR])
        axes.set_title(f"{name} ({'lower' if name in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9)
        axes.tick_params(labelsize=8)
    return _img(figure, "headline metrics, base vs tuned, with 95% intervals: "
                + "; ".join(f"{name} {base:.3f} → {tuned:.3f}" for name, base, tuned in names))


def confusion_plot(matrix: list[list[int]], labels: list[str]) -> str:
    """A heat map of the confusion matrix (rows: true label), shaded by each cell's share of its
    row so a weak label stands out whatever its support; cells show the counts."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(8.0, 1.6 + 0.45 * len(labels))
    figure = _figure(side + 0.8, side)
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true label")
    ticks = range(len(labels))
    axes.set_xticks(ticks, [str(label) for label in labels], rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, [str(label) for label in labels], fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (i, j), count in np.ndenumerate(counts):
        axes.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=7,
                  color="white" if shares[i, j] > 0.5 else "#222")
    return _img(figure, f"confusion matrix over {len(labels)} labels, rows: true label, columns: predicted")


def reliability_plot(bins_base: list[dict], bins_tuned: list[dict]) -> str:
    """Reliability diagrams of both models side by side: accuracy per confidence bin as bars
    (bins as from :func:`domaintune.evaluate.calibration.reliability_bins`) and the diagonal of
    perfect calibration; a bar below the diagonal is overconfidence in that range."""
    figure = _figure(5.6, 2.8)
    for axes, (title, bins, color) in zip(figure.subplots(1, 2, sharey=True),
                                          (("base", bins_base, BASE_COLOR), ("tuned", bins_tuned, TUNED_COLOR))):
        filled = [b for b in bins if b["count"]]
        axes.bar([b["lo"] for b in filled], [b["accuracy"] for b in filled],
                 width=[b["hi"] - b["lo"] for b in filled], align="edge", color=color, edgecolor="white")
        axes.plot([0, 1], [0, 1], linestyle="--", color=WORSE_COLOR, linewidth=1)
        axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=title)
        axes.tick_params(labelsize=8)
    figure.axes[0].set_ylabel("accuracy")
    return _img(figure, "reliability diagrams, base and tuned: accuracy per confidence bin against the diagonal")


def slice_chart(sliced: dict) -> str:
    """One entry of ``metrics["slices"]`` (see :func:`domaintune.evaluate.slices.slice_metrics`) as
    paired horizontal bars per slice value; the tuned model's worst slice is labelled in red and
    slices too small to rank are drawn faint."""
    import numpy as np

    metric, values = sliced["metric"], list(sliced["slices"])
    figure = _figure(5.6, 0.9 + 0.32 * len(values))
    axes = figure.subplots()
    rows = np.arange(len(values))
    for offset, model, color in ((-0.2, "base", BASE_COLOR), (0.2, "tuned", TUNED_COLOR)):
        bars = axes.barh(rows + offset, [sliced["slices"][v][model][metric] for v in values], height=0.4,
                         color=color, label=model)
        for bar, value in zip(bars, values):
            if sliced["slices"][value]["too_small"]:
                bar.set_alpha(0.35)
    axes.set_yticks(rows, [f"{v} ({sliced['slices'][v]['rows']})" for v in values], fontsize=8)
    for tick, value in zip(axes.get_yticklabels(), values):
        if value == sliced["worst"].get("tuned"):
            tick.set_color(WORSE_COLOR)
    axes.invert_yaxis()  # largest slice on top, as in the table
    axes.set_xlabel(metric, fontsize=9)
    axes.set_title(f"by {sliced['field']} (rows per value in brackets)", fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    figure.legend(fontsize=8, loc="outside right upper")
    return _img(figure, f"{metric} by {sliced['field']}, base vs tuned, for {len(values)} values")


def training_curves(train_log: list[dict]) -> str:
    """Training loss per step (and the held-out loss where the log has ``eval_loss``) next to the
    learning rate per step, from the records of train_log.jsonl; the learning-rate panel is left
    out when the log has no ``lr``."""
    with_lr = any("lr" in r for r in train_log)
    figure = _figure(6.4 if with_lr else 3.6, 2.6)
    panels = figure.subplots(1, 2 if with_lr else 1, squeeze=False)[0]
    loss = panels[0]
    loss.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], color=TUNED_COLOR, label="train")
    evaluated = [r for r in train_log if r.get("eval_loss") is not None]
    if evaluated:
        loss.plot([r["step"] for r in evaluated], [r["eval_loss"] for r in evaluated], marker="o", markersize=3,
                  color=WORSE_COLOR, label="held out")
        loss.legend(fontsize=8)
    loss.set(xlabel="step", title="loss")
    if with_lr:
        logged = [r for r in train_log if "lr" in r]
        panels[1].plot([r["step"] for r in logged], [r["lr"] for r in logged], color=BASE_COLOR)
        panels[1].set(xlabel="step", title="learning rate")
        panels[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axes in panels:
        axes.tick_params(labelsize=8)
    return _img(figure, f"training loss{' and learning rate' if with_lr else ''} over {len(train_log)} steps")

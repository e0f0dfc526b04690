"""How far a classifier's confidence can be trusted, and where its errors go.

Both come with a self-contained renderer (inline SVG / an HTML table with inline styles) so the
report stays a single file that opens offline.
"""

from __future__ import annotations

import html

import numpy as np


def reliability_bins(confidences, correct, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: each ``{lo, hi, count, confidence, accuracy}``.

    ``confidence`` and ``accuracy`` are the bin's means (None for an empty bin). A bin holds the
    confidences in [lo, hi); the last one also holds 1.0. Counts add up to the number of rows.
    """
    conf = np.asarray(confidences, dtype=float)
    hits = np.asarray(correct, dtype=float)
    if conf.shape != hits.shape or conf.ndim != 1:
        raise ValueError(f"confidences and correct must be two equally long lists, got {conf.shape} and {hits.shape}")
    if conf.size and (conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidences must lie in [0, 1]")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Searching the very edges that are reported keeps "lo <= confidence < hi" exact.
    index = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
    bins = []
    for i in range(n_bins):
        members = index == i
        count = int(members.sum())
        bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": count,
                     "confidence": float(conf[members].mean()) if count else None,
                     "accuracy": float(hits[members].mean()) if count else None})
    return bins


def expected_calibration_error(confidences, correct, n_bins: int = 15) -> float:
    """ECE: the gap between mean confidence and accuracy per bin, weighted by the bin's share of rows."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        raise ValueError("expected_calibration_error needs at least one row")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def reliability_svg(bins: list[dict], size: int = 260, title: str = "Reliability") -> str:
    """An inline SVG reliability diagram: accuracy per bin as bars, the perfect-calibration diagonal.

    A bar below the diagonal means overconfidence in that range; hovering a bar shows its numbers.
    """
    margin = 36
    plot = size - 2 * margin

    def x(value: float) -> float:
        return margin + value * plot

    def y(value: float) -> float:
        return size - margin - value * plot

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{size}' height='{size}' "
             f"viewBox='0 0 {size} {size}' role='img' aria-label='{html.escape(title)}' "
             "font-family='system-ui,sans-serif' font-size='10'>",
             f"<text x='{size / 2}' y='14' text-anchor='middle' font-size='12'>{html.escape(title)}</text>",
             f"<rect x='{margin}' y='{margin}' width='{plot}' height='{plot}' fill='none' stroke='#999'/>"]
    for b in bins:
        if not b["count"]:
            continue
        top = y(b["accuracy"])
        tip = (f"{b['lo']:.2f}–{b['hi']:.2f}: {b['count']} rows, "
               f"confidence {b['confidence']:.3f}, accuracy {b['accuracy']:.3f}")
        parts.append(f"<rect x='{x(b['lo']):.1f}' y='{top:.1f}' width='{x(b['hi']) - x(b['lo']) - 1:.1f}' "
                     f"height='{y(0) - top:.1f}' fill='#4a78c2' fill-opacity='0.8'><title>{tip}</title></rect>")
    parts.append(f"<line x1='{x(0)}' y1='{y(0)}' x2='{x(1)}' y2='{y(1)}' stroke='#a3121b' stroke-dasharray='4 3'/>")
    for tick in (0, 0.5, 1):
        parts.append(f"<text x='{x(tick)}' y='{y(0) + 12}' text-anchor='middle'>{tick:g}</text>")
        parts.append(f"<text x='{x(0) - 4}' y='{y(tick) + 3}' text-anchor='end'>{tick:g}</text>")
    parts.append(f"<text x='{size / 2}' y='{size - 6}' text-anchor='middle'>confidence</text>")
    parts.append(f"<text x='10' y='{size / 2}' text-anchor='middle' "
                 f"transform='rotate(-90 10 {size / 2})'>accuracy</text>")
    parts.append("</svg>")
    return "".join(parts)


def confusion_matrix(y_true: list[str], y_pred: list[str], labels: list[str]) -> list[list[int]]:
    """Counts with rows = true label and columns = predicted label, both in the order of ``labels``."""
    from sklearn.metrics import confusion_matrix as sklearn_confusion

    return sklearn_confusion(y_true, y_pred, labels=labels).tolist()


def confusion_html(matrix: list[list[int]], labels: list[str]) -> str:
    """The matrix as an HTML table; each cell is shaded by its share of the true label's row,
    so a weak label stands out whatever its support (blue on the diagonal, red off it)."""
    head = "".join(f"<th>{html.escape(str(label))}</th>" for label in labels)
    rows = []
    for i, (label, counts) in enumerate(zip(labels, matrix)):
        total = sum(counts) or 1
        cells = []
        for j, count in enumerate(counts):
            share = count / total
            rgb = "74,120,194" if i == j else "163,18,27"
            ink = "#fff" if share > 0.5 else "#222"
            cells.append(f"<td style='background:rgba({rgb},{share:.2f});color:{ink};text-align:right' "
                         f"title='{share:.0%} of {html.escape(str(label))}'>{count}</td>")
        rows.append(f"<tr><th>{html.escape(str(label))}</th>{''.join(cells)}</tr>")
    return ("<table class='confusion'><tr><th>true \\ predicted</th>" + head + "</tr>"
            + "".join(rows) + "</table>")

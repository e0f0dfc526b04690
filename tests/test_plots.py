"""The report's charts: each is a real PNG drawn from the numbers it is given, a run's report.html
carries them next to its tables, and a report is still written, without charts, when matplotlib
cannot be imported."""

from __future__ import annotations

import base64
import io
import re
import sys

import numpy as np
import pytest
from PIL import Image

from domaintune import run
from domaintune.evaluate import plots
from domaintune.evaluate.calibration import reliability_bins
from domaintune.evaluate.comparison import compare_classification
from domaintune.evaluate.report import write_report
from domaintune.evaluate.slices import classification_score, slice_metrics
from domaintune.recipe import Recipe

LABELS = ["billing", "refund", "shipping"]
IMG = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)' alt='([^']*)'>")


def _decode(tag: str) -> Image.Image:
    """The one PNG in an <img> tag, checked to be a whole, non-blank picture."""
    found = IMG.fullmatch(tag)
    assert found, tag[:120]
    data = base64.b64decode(found.group(1), validate=True)
    Image.open(io.BytesIO(data)).verify()  # raises on a truncated or corrupt PNG
    image = Image.open(io.BytesIO(data)).convert("RGB")
    assert image.width >= 200 and image.height >= 150
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "a blank or near-blank picture"
    return image


def _rows(seed: int = 0) -> list[dict]:
    """Tickets from two channels; the tuned model errs mostly on chat."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(90):
        label = LABELS[i % 3]
        channel = "email" if i < 60 else "chat"
        wrong = rng.random() < (0.1 if channel == "email" else 0.6)
        rows.append({"label": label, "base": LABELS[rng.integers(3)],
                     "tuned": LABELS[(LABELS.index(label) + 1) % 3] if wrong else label,
                     "meta": {"channel": channel}})
    return rows


def _proba(predictions: list[str], confidence: float) -> np.ndarray:
    rest = (1 - confidence) / (len(LABELS) - 1)
    return np.array([[confidence if label == p else rest for label in LABELS] for p in predictions])


def _metrics() -> dict:
    rows = _rows()
    compared = compare_classification([r["label"] for r in rows], LABELS, _proba([r["base"] for r in rows], 0.5),
                                      _proba([r["tuned"] for r in rows], 0.85))
    return {"task": "classification", "eval_rows": len(rows), "train_rows": 300, "base": compared.base,
            "tuned": compared.tuned, "intervals": compared.intervals, **compared.extra,
            "slices": [slice_metrics(rows, "channel", classification_score)]}


def _train_log(steps: int = 40) -> list[dict]:
    return [{"step": s, "loss": 2.0 / s + 0.1, "lr": 2e-4 * min(1.0, s / 5) * (1 - s / (steps + 1)),
             **({"eval_loss": 2.5 / s + 0.2} if s % 10 == 0 else {})} for s in range(1, steps + 1)]


def _spec() -> Recipe:
    return Recipe.model_validate({"name": "plots-test", "task": "classification", "base_model": "some-model",
                                  "data": {"train": "train.csv"}})


def test_every_chart_is_a_decodable_non_blank_png_with_a_description():
    metrics = _metrics()
    tags = {
        "metric_bars": plots.metric_bars(metrics),
        "confusion_plot": plots.confusion_plot(metrics["confusion"]["tuned"], metrics["confusion"]["labels"]),
        "reliability_plot": plots.reliability_plot(metrics["calibration"]["base"], metrics["calibration"]["tuned"]),
        "slice_chart": plots.slice_chart(metrics["slices"][0]),
        "training_curves": plots.training_curves(_train_log()),
    }
    for name, tag in tags.items():
        _decode(tag)
        assert IMG.fullmatch(tag).group(2), f"{name} has no alt text"
        assert len(tag) < 60_000, f"{name} is {len(tag)} characters: too heavy for the report"
    # the alt text carries the headline numbers for a reader who cannot see the picture
    assert f"accuracy {metrics['base']['accuracy']:.3f} → {metrics['tuned']['accuracy']:.3f}" in IMG.fullmatch(
        tags["metric_bars"]).group(2)


def test_the_pictures_follow_the_numbers():
    confident = reliability_bins([0.95] * 50, [1] * 50)
    overconfident = reliability_bins([0.95] * 50, [1] * 10 + [0] * 40)
    assert plots.reliability_plot(confident, confident) != plots.reliability_plot(confident, overconfident)
    assert plots.confusion_plot([[9, 1], [0, 10]], ["a", "b"]) != plots.confusion_plot([[5, 5], [0, 10]], ["a", "b"])
    narrow = {"task": "classification", "base": {"accuracy": 0.6, "macro_f1": 0.5},
              "tuned": {"accuracy": 0.8, "macro_f1": 0.7},
              "intervals": {"accuracy": {"base": [0.58, 0.62], "tuned": [0.78, 0.82]}}}
    wide = {**narrow, "intervals": {"accuracy": {"base": [0.4, 0.8], "tuned": [0.6, 0.95]}}}
    assert plots.metric_bars(narrow) != plots.metric_bars(wide), "the intervals are not drawn"


def test_training_curves_draw_a_log_without_learning_rate_or_held_out_loss():
    with_everything = _decode(plots.training_curves(_train_log()))
    loss_only = _decode(plots.training_curves([{"step": s, "loss": 1 / s} for s in range(1, 30)]))
    assert loss_only.width < with_everything.width  # one panel instead of two


def test_the_report_shows_each_chart_next_to_its_table(tmp_path):
    write_report(tmp_path / "report.html", _spec(), _metrics(), [], _train_log())
    page = (tmp_path / "report.html").read_text()
    images = IMG.findall(page)
    # headline bars, reliability, confusion, one slice, training curves
    assert len(images) == 5
    for encoded, _ in images:
        _decode(f"<img src='data:image/png;base64,{encoded}' alt='x'>")
    assert "Charts are left out" not in page
    for table in ("<th>metric</th><th>base</th>", "true \\ predicted", "By channel", "<th>step</th><th>loss</th>"):
        assert table in page, table
    assert page.index("By channel") < page.index("alt='accuracy by channel")


def test_without_matplotlib_the_report_is_written_with_its_tables_and_a_note(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it now raises ImportError
    assert not plots.available()

    write_report(tmp_path / "report.html", _spec(), _metrics(), [], _train_log())
    page = (tmp_path / "report.html").read_text()
    assert "<img" not in page
    assert "Charts are left out: matplotlib is not installed" in page
    assert "<svg" in page  # the hand-drawn reliability diagrams stand in
    for section in ("Headline metrics", "Calibration", "Confusion matrix", "By channel", "Training loss"):
        assert section in page, section


def test_a_tiny_runs_report_carries_the_charts(classification_recipe, tmp_path):
    result = run(classification_recipe, overrides={"evaluate.slices": ["channel"]}, output_dir=tmp_path / "runs",
                 register=False)
    page = (result.run_dir / "report.html").read_text()
    alts = [alt for _, alt in IMG.findall(page)]
    for start in ("headline metrics", "reliability diagrams", "confusion matrix", "accuracy by channel",
                  "training loss and learning rate"):
        assert any(alt.startswith(start) for alt in alts), (start, alts)
    for encoded, _ in IMG.findall(page):
        _decode(f"<img src='data:image/png;base64,{encoded}' alt='x'>")


@pytest.fixture(autouse=True)
def _no_figures_left_open():
    """The charts never go through pyplot, so no figure is left for a caller's pyplot to show."""
    yield
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()

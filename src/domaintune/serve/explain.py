"""Why a classifier chose its label: occlusion, the drop in the label's probability when one
word is left out. Model-agnostic and cheap for short texts (one extra row per word)."""

from __future__ import annotations

from typing import Callable

import numpy as np

MAX_WORDS = 64  # longer texts are explained by their first words only


def occlusion(predict: Callable[[list[str]], np.ndarray], text: str, label: int, full_probability: float,
              top: int = 5) -> list[dict]:
    """The ``top`` words whose removal lowers the probability of ``label`` most, with that drop.

    ``predict`` maps texts to label probabilities (one row per text)."""
    words = text.split()
    if len(words) < 2:
        return []
    shown = words[:MAX_WORDS]
    variants = [" ".join(words[:i] + words[i + 1:]) for i in range(len(shown))]
    drops = full_probability - predict(variants)[:, label]
    order = np.argsort(-drops)[:top]
    return [{"word": shown[i], "weight": round(float(drops[i]), 6)} for i in order]

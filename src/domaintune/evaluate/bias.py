"""Counterfactual swap probes: does the prediction change when only "he" becomes "she", "Emily"
becomes "Lakisha" or "young" becomes "old"?

The term pairs ship in ``bias_terms.json`` as ``{group: [[term, counterpart], ...]}``; every pair
swaps both ways. A term in several pairs of a group (English "her" is both "him" and "his") is
replaced as in the first pair that lists it, since which one is meant depends on grammar a word
swap cannot see.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib.resources import files
from typing import Callable, Sequence

from domaintune.errors import RecipeError

EXAMPLES_KEPT = 3  # flipped rows kept per group, for the report


def load_term_groups(extra: dict[str, list[list[str]]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """The shipped term groups, with ``extra`` pairs added (to an existing group or as a new one)."""
    shipped = json.loads(files("domaintune.evaluate").joinpath("bias_terms.json").read_text(encoding="utf-8"))
    groups: dict[str, list[tuple[str, str]]] = {name: [(a, b) for a, b in pairs] for name, pairs in shipped.items()}
    for name, pairs in (extra or {}).items():
        if not isinstance(pairs, list):
            raise RecipeError(f"bias term group {name!r} must be a list of [term, counterpart] pairs",
                              hint='e.g. {"job": [["nurse", "surgeon"]]}')
        for pair in pairs:
            if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                    or not all(isinstance(term, str) and term.strip() for term in pair)
                    or pair[0].lower() == pair[1].lower()):
                raise RecipeError(f"bias term group {name!r}: {pair!r} is not a pair of two different terms",
                                  hint='write each pair as ["term", "counterpart"], e.g. ["nurse", "surgeon"]')
        groups.setdefault(name, []).extend((pair[0].strip(), pair[1].strip()) for pair in pairs)
    return groups


def counterfactuals(text: str, pairs: Sequence[Sequence[str]]) -> str | None:
    """``text`` with every whole-word term swapped for its counterpart, in one pass so nothing is
    swapped back ("he told her" becomes "she told him"), keeping the case of each word (He → She,
    HE → SHE). None when no term occurs."""
    if not pairs:
        return None
    pattern, mapping = _compile(tuple((a, b) for a, b in pairs))
    swapped, count = pattern.subn(lambda match: _match_case(match.group(0), mapping[match.group(0).lower()]), text)
    return swapped if count else None


def flip_rate(predict: Callable[[list[str]], list[str]], texts: list[str],
              groups: dict[str, Sequence[Sequence[str]]]) -> dict[str, dict]:
    """How often the prediction changes when a group's terms are swapped.

    ``predict`` maps a batch of texts to one label (or normalised answer) each; it is called once
    for the original texts and once per group. Rows without a term of the group are not counted.
    Returns ``{group: {"rows": n, "flipped": k, "rate": k / n (None when n is 0), "examples": [...]}}``
    with up to three flipped rows as ``{"text", "counterfactual", "prediction", "counterfactual_prediction"}``.
    """
    swapped = {name: [(i, cf) for i, text in enumerate(texts) if (cf := counterfactuals(text, pairs)) is not None]
               for name, pairs in groups.items()}
    needed = sorted({i for items in swapped.values() for i, _ in items})
    original = dict(zip(needed, _predict(predict, [texts[i] for i in needed])))
    result = {}
    for name, items in swapped.items():
        changed = _predict(predict, [cf for _, cf in items])
        flips = [(i, cf, new) for (i, cf), new in zip(items, changed) if new != original[i]]
        result[name] = {
            "rows": len(items), "flipped": len(flips), "rate": len(flips) / len(items) if items else None,
            "examples": [{"text": texts[i], "counterfactual": cf, "prediction": original[i],
                          "counterfactual_prediction": new} for i, cf, new in flips[:EXAMPLES_KEPT]],
        }
    return result


@lru_cache(maxsize=32)
def _compile(pairs: tuple[tuple[str, str], ...]) -> tuple[re.Pattern, dict[str, str]]:
    mapping: dict[str, str] = {}
    for a, b in pairs:
        mapping.setdefault(a.lower(), b)
        mapping.setdefault(b.lower(), a)
    # Longest first, so a phrase wins over a term inside it; lookarounds rather than \b so that
    # terms starting or ending in punctuation ("Mr.") still match as whole words.
    alternatives = "|".join(re.escape(term) for term in sorted(mapping, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE), mapping


def _match_case(word: str, replacement: str) -> str:
    if len(word) > 1 and word.isupper():
        return replacement.upper()
    if word[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement.lower()


def _predict(predict: Callable[[list[str]], list[str]], texts: list[str]) -> list[str]:
    if not texts:
        return []
    predictions = list(predict(texts))
    if len(predictions) != len(texts):
        raise ValueError(f"predict returned {len(predictions)} predictions for {len(texts)} texts")
    return predictions

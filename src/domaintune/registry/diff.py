"""What changed between two registered versions: recipe, metrics and lineage, key by key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Change:
    """One key whose value differs; ``None`` on a side where the key is absent."""

    section: str  # "version", "recipe", "metrics" or "lineage"
    key: str
    a: Any
    b: Any


def diff_records(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[Change]:
    """Compare two versions given as ``{section: nested dict}``; keys are dotted paths, and lists
    of files (``[{"file": ..., "sha256": ...}]``) are keyed by file name so that reordering is no change."""
    changes = []
    for section in a.keys() | b.keys():
        flat_a, flat_b = flatten(a.get(section, {})), flatten(b.get(section, {}))
        changes += [Change(section, key, flat_a.get(key), flat_b.get(key))
                    for key in sorted(flat_a.keys() | flat_b.keys()) if flat_a.get(key) != flat_b.get(key)]
    order = {"version": 0, "metrics": 1, "recipe": 2, "lineage": 3}
    return sorted(changes, key=lambda c: (order.get(c.section, 9), c.section))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists of scalars stay whole, lists of mappings are
    keyed by their ``file`` entry when they have one, else by position."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = [(v["file"], {k: x for k, x in v.items() if k != "file"}) if "file" in v else (str(i), v)
                 for i, v in enumerate(value)]
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, inner in items:
        flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return flat

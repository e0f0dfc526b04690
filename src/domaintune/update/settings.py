"""The ``update:`` section of a recipe: how ``domaintune update`` trains and judges a new version.

Read from the production version's resolved recipe, so an update uses the settings the model was
made with; command-line options override them for one update.

``preference`` and ``beta`` say whether corrections of answers rated bad are also trained as
preference pairs, with DPO (see ``domaintune.update.updater``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from domaintune.errors import RecipeError
from domaintune.evaluate.metrics import HEADLINE, LOWER_IS_BETTER
from domaintune.recipe import UpdateConfig

__all__ = ["UpdateConfig", "default_gates", "update_config"]


def update_config(recipe: dict[str, Any], overrides: dict[str, Any]) -> UpdateConfig:
    """The ``update:`` section of a resolved recipe dict with ``overrides`` (None values ignored)."""
    raw = {**(recipe.get("update") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return UpdateConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"update.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"invalid update settings: {problems}", where="update:",
                          hint=f"allowed keys: {', '.join(UpdateConfig.model_fields)}") from None


def default_gates(task: str, tolerance: float) -> tuple[str, str]:
    """(gate on each earlier eval set, gate on the new eval rows) over the task's headline metric.

    Earlier sets: the lower end of the paired 95% interval of candidate − production must stay
    above −tolerance (perplexity, which has no per-row interval: within ``tolerance`` relative).
    New rows: the candidate must be no worse than production. Not "better": once production is
    already right on the new rows (feedback that confirms it, rows like those it learned) no
    candidate could pass, however good."""
    metric = HEADLINE[task][0]
    if metric in LOWER_IS_BETTER:
        return (f"tuned.{metric} <= base.{metric} * {1 + tolerance:g}", f"tuned.{metric} <= base.{metric}")
    return (f"difference.{metric}.low >= -{tolerance:g}", f"difference.{metric} >= 0")

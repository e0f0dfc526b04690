"""Resumable training state: the trainable weights, the optimiser, every random generator, the
step and the log so far, written atomically so that a process killed at any moment leaves
either the previous checkpoint or the new one, never half of one."""

from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domaintune.errors import RecipeError
from domaintune.train import fsdp

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainState:
    """Where training stands; everything here goes into a checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    log: list[dict] = field(default_factory=list)
    best_eval_loss: float = math.inf
    evals_without_improvement: int = 0
    stopped: str | None = None  # why training ended before its last step, if it did


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the weights that train (the adapter, the head; everything for ``full``)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in weights.items():
        params[name].copy_(value)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    plan: dict[str, Any], best_weights: dict[str, torch.Tensor] | None, write: bool = True) -> Path:
    """Write ``directory/checkpoint.pt`` atomically (a temporary file, then a rename). A sharded
    model (``train.fsdp``) is gathered whole, which every process must take part in; only those
    with ``write`` write the file."""
    path = directory / CHECKPOINT_FILE
    if fsdp.is_sharded(model):
        weights = fsdp.whole(trainable_state(model), keep=write)
        optimizer_state = fsdp.full_optimizer_state(model, optimizer)  # whole in rank 0 only
        best_weights = fsdp.whole(best_weights, keep=write) if best_weights is not None else None
    else:
        weights, optimizer_state = trainable_state(model), optimizer.state_dict()
    if not write:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    torch.save({"plan": plan, "state": asdict(state), "weights": weights, "optimizer": optimizer_state,
                "rng": _rng_state(), "best_weights": best_weights}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _change(key: str, before: Any, now: Any) -> str:
    """One difference between the checkpoint's plan and this run's, as a person reads it."""
    if key == "weights":  # trainable tensors and their shapes: another base model, method or rank
        before, now = before or {}, now or {}
        return (f"the trainable weights ({len(before)} tensors, {sum(map(math.prod, before.values())):,} values, "
                f"then; {len(now)} tensors, {sum(map(math.prod, now.values())):,} values now: another base_model, "
                "method or LoRA setting)")
    return f"{key} was {before!r}, is {now!r}"


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    plan: dict[str, Any]) -> tuple[TrainState, dict[str, torch.Tensor] | None] | None:
    """Restore the latest checkpoint in ``directory`` into ``model``, ``optimizer`` and the random
    generators; None when there is none yet (the run was killed before its first one)."""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    if saved["plan"] != plan:
        changed = sorted(k for k in plan.keys() | saved["plan"].keys() if plan.get(k) != saved["plan"].get(k))
        shown = "; ".join(_change(k, saved["plan"].get(k), plan.get(k)) for k in changed)
        raise RecipeError(f"the checkpoint was written by a different training set-up: {shown}",
                          where=str(path), hint="resume with the recipe and --set overrides of the original run")
    best_weights = saved["best_weights"]
    if fsdp.is_sharded(model):
        load_trainable_state(model, fsdp.shards_like(model, saved["weights"]))
        fsdp.load_full_optimizer_state(model, optimizer, saved["optimizer"])
        best_weights = fsdp.shards_like(model, best_weights) if best_weights is not None else None
    else:
        load_trainable_state(model, saved["weights"])
        optimizer.load_state_dict(saved["optimizer"])
    _restore_rng(saved["rng"])
    return TrainState(**saved["state"]), best_weights

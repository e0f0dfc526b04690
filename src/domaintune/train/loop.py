"""The training loop, written out: AdamW, linear warm-up then linear decay, gradient clipping,
a live progress bar, and one log record per step. Tasks supply the batches and the loss."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclass
class LoopConfig:
    epochs: float
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    seed: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters, without weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_loop(
    model: torch.nn.Module,
    groups: list[dict],
    batches_for_epoch: Callable[[int], list[dict]],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    config: LoopConfig,
    console: Console,
    description: str = "training",
) -> list[dict]:
    """Run the optimisation and return one record per step (loss, lr, tokens/s).

    ``batches_for_epoch(epoch)`` returns that epoch's batches (shuffled by the caller with the
    seed and the epoch number, so reruns are identical); ``loss_fn`` returns the mean loss and
    the number of tokens (or rows) it covered, for the throughput shown.
    """
    steps_per_epoch = len(batches_for_epoch(0))
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = int(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    model.train()
    log: list[dict] = []
    step = 0
    started = time.perf_counter()
    tokens_seen = 0
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f} lr {task.fields[lr]:.1e} {task.fields[speed]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(description, total=total_steps, loss=float("nan"), lr=0.0, speed="")
        epoch = 0
        while step < total_steps:
            for batch in batches_for_epoch(epoch):
                if step >= total_steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = config.learning_rate * factor(step)
                loss, n_tokens = loss_fn(model, batch)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += n_tokens
                elapsed = time.perf_counter() - started
                record = {
                    "step": step,
                    "epoch": round(step / steps_per_epoch, 4),
                    "loss": float(loss.detach()),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens_seen / elapsed if elapsed > 0 else 0.0,
                    "elapsed_s": round(elapsed, 3),
                }
                log.append(record)
                progress.update(bar, advance=1, loss=record["loss"], lr=record["lr"],
                                speed=f"{record['tokens_per_s']:.0f} tok/s")
            epoch += 1
    model.eval()
    return log

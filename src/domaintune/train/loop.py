"""The training loop, written out: AdamW, warm-up then a linear, cosine or constant schedule,
gradient accumulation and clipping, held-out loss with early stopping, a wall-clock budget,
resumable checkpoints, a live progress bar, and one log record per step. Tasks supply the
batches and the loss."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from domaintune.errors import ResourceError
from domaintune.progress import Progress
from domaintune.train import distributed, fsdp
from domaintune.train.bf16_adamw import BF16AdamW
from domaintune.train.checkpoint import (TrainState, load_checkpoint, load_trainable_state, save_checkpoint,
                                         trainable_state)
from domaintune.train.trackers import open_tracker

# Test hook: with DOMAINTUNE_PAUSE_AFTER_STEP=N the process sleeps after step N (once that step's
# checkpoint, if due, is written), so that a test can kill -9 it mid-run (tests/test_resume.py).
PAUSE_AFTER_STEP_ENV = "DOMAINTUNE_PAUSE_AFTER_STEP"


@dataclass
class LoopConfig:
    epochs: float
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    seed: int
    scheduler: str = "linear"  # linear | cosine | constant, after the warm-up
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # replaces epochs when set
    max_minutes: float | None = None
    eval_every: int | None = None  # steps; needs an ``eval_loss`` callable
    early_stopping_patience: int | None = None  # evaluations without a lower eval loss
    checkpoint_every: int | None = None  # steps; None: at the end of each epoch; 0: never
    # Where train_log.jsonl and checkpoints/ go (None: nowhere). A checkpoint found there is
    # resumed from: a fresh run has a fresh directory, a resumed one the directory it left.
    run_dir: Path | None = None
    report_to: str | None = None  # mlflow | tensorboard
    run_name: str = "domaintune"  # for the tracker


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


def lr_factor(scheduler: str, step: int, warmup: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate at 0-based ``step``: a linear warm-up over
    ``warmup`` steps, then linear decay to 0, half a cosine down to 0, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if scheduler == "constant":
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def train_loop(
    model: torch.nn.Module,
    groups: list[dict],
    batches_for_epoch: Callable[[int], list[dict]],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    config: LoopConfig,
    console: Console,
    description: str = "training",
    eval_loss: Callable[[torch.nn.Module], float] | None = None,
) -> list[dict]:
    """Run the optimisation and return one record per step (loss, lr, grad norm, tokens/s, and
    eval_loss on the steps that evaluated).

    ``batches_for_epoch(epoch)`` returns that epoch's batches (shuffled by the caller with the
    seed and the epoch number, so reruns are identical, and a resumed run finds the same ones);
    ``loss_fn`` returns the mean loss and the number of tokens (or rows) it covered, for the
    throughput shown; ``eval_loss(model)`` returns the held-out loss (the model is in eval mode).
    One optimiser step takes ``gradient_accumulation_steps`` consecutive batches of an epoch.

    Under torchrun every process calls this with its share of each batch (see
    ``domaintune.train.distributed``); gradients are averaged before each step (by FSDP itself for
    a model sharded by ``domaintune.train.fsdp``), and rank 0 alone writes the log, the checkpoints
    and the progress bar.
    """
    first_epoch = batches_for_epoch(0)  # built once: it also tells the number of steps
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch, total_steps = count_steps(len(first_epoch), config)
    warmup = int(config.warmup_ratio * total_steps)
    groups = [g for g in groups if g["params"]]
    if any(p.dtype == torch.bfloat16 for g in groups for p in g["params"]):
        # full fine-tuning on a GPU: rounded to nearest, bfloat16 weights would lose most updates
        optimizer = BF16AdamW(groups, lr=config.learning_rate, seed=config.seed)
    else:
        # one fused kernel for the whole step instead of several per tensor, where the weights are on a GPU
        on_gpu = all(p.is_cuda for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, fused=True if on_gpu else None)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    checkpoint_every = steps_per_epoch if config.checkpoint_every is None else config.checkpoint_every
    main = distributed.is_main()
    sharded = fsdp.is_sharded(model)
    checkpoints = config.run_dir / "checkpoints" if config.run_dir is not None and checkpoint_every else None
    patience = config.early_stopping_patience if eval_loss is not None else None
    pause_after = int(os.environ.get(PAUSE_AFTER_STEP_ENV, "0"))

    # What a checkpoint must agree with to be resumed: the same schedule over the same weights.
    plan = {"total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "warmup": warmup,
            "learning_rate": config.learning_rate, "scheduler": config.scheduler, "seed": config.seed,
            "accumulation": accumulation, **({"sharded": True} if sharded else {}),
            "weights": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}}
    state, best_weights = TrainState(), None
    if checkpoints is not None:
        restored = load_checkpoint(checkpoints, model, optimizer, plan)
        if restored is not None:
            state, best_weights = restored
            console.print(f"resuming at step {state.step} of {total_steps}")
    if not sharded:  # a sharded model was copied from weights broadcast before it was cut
        distributed.broadcast_parameters(trainable)  # every process starts from rank 0's weights

    log_file = tracker = None
    if config.run_dir is not None and main:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(config.run_dir / "train_log.jsonl", "w", encoding="utf-8")
        # a resumed run starts from its checkpoint's log: steps logged after it are redone
        log_file.writelines(json.dumps(record) + "\n" for record in state.log)
    if main:
        tracker = open_tracker(config.report_to, config.run_dir or Path("."), config.run_name,
                               {k: v for k, v in asdict(config).items() if k != "run_dir"})

    model.train()
    started = time.perf_counter() - state.elapsed_s
    batches, batches_epoch = first_epoch, 0
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f} lr {task.fields[lr]:.1e} {task.fields[speed]}"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=console, transient=False, disable=not main) as progress:
            bar = progress.add_task(description, total=total_steps, completed=state.step, loss=float("nan"),
                                    lr=0.0, speed="")
            while state.step < total_steps and state.stopped is None:
                epoch, position = divmod(state.step, steps_per_epoch)
                if epoch != batches_epoch:
                    batches, batches_epoch = batches_for_epoch(epoch), epoch
                micro_batches = batches[position * accumulation:(position + 1) * accumulation]
                lr = config.learning_rate * lr_factor(config.scheduler, state.step, warmup, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum, step_tokens = 0.0, 0
                try:
                    for batch in micro_batches:
                        loss, n_tokens = loss_fn(model, batch)
                        (loss / len(micro_batches)).backward()
                        loss_sum += float(loss.detach())
                        step_tokens += n_tokens
                    if not sharded:  # FSDP averages the gradient shards in backward
                        distributed.average_gradients(trainable)
                    state.tokens_seen += int(distributed.all_sum(step_tokens))
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
                    optimizer.step()
                except torch.cuda.OutOfMemoryError as exc:
                    raise ResourceError(
                        f"out of GPU memory in step {state.step + 1} of {total_steps} ({_shape(micro_batches)})",
                        hint="lower training.batch_size (raising training.gradient_accumulation_steps keeps the "
                             "batch the optimiser sees) or training.max_seq_length, set "
                             "training.activation_checkpointing (e.g. 0.5), or use method: qlora") from exc
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.elapsed_s = time.perf_counter() - started
                record = {
                    "step": state.step,
                    "epoch": round(state.step / steps_per_epoch, 4),
                    "loss": distributed.all_sum(loss_sum / len(micro_batches)) / distributed.world_size(),
                    "lr": lr,
                    "grad_norm": fsdp.scalar(grad_norm),
                    "tokens_per_s": state.tokens_seen / state.elapsed_s if state.elapsed_s > 0 else 0.0,
                    "elapsed_s": round(state.elapsed_s, 3),
                }
                if eval_loss is not None and config.eval_every and state.step % config.eval_every == 0:
                    best_weights = _evaluate(model, eval_loss, record, state, patience, best_weights)
                # every process must stop at the same step: the first to run out of time decides
                out_of_time = config.max_minutes is not None and distributed.any_true(
                    state.elapsed_s >= 60 * config.max_minutes)
                if out_of_time and state.stopped is None:  # early stopping at the same step says why first
                    state.stopped = f"training.max_minutes={config.max_minutes} reached"
                    record["stopped"] = "max_minutes"  # the model card says why from this, not by guessing
                state.log.append(record)
                if log_file:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                if tracker:
                    tracker.log(record)
                progress.update(bar, advance=1, loss=record["loss"], lr=lr, speed=f"{record['tokens_per_s']:.0f} tok/s")

                finished = state.step >= total_steps or state.stopped is not None
                if finished and best_weights is not None:
                    load_trainable_state(model, best_weights)  # early stopping keeps the best evaluation's weights
                if checkpoints is not None and (finished or state.step % checkpoint_every == 0):
                    save_checkpoint(checkpoints, model, optimizer, state, plan, best_weights, write=main)
                if state.step == pause_after:
                    time.sleep(3600)
    finally:
        if log_file:
            log_file.close()
        if tracker:
            tracker.close()
    if state.stopped:
        console.print(f"stopped at step {state.step} of {total_steps}: {state.stopped}")
    model.eval()
    return state.log


def count_steps(batches_per_epoch: int, config: LoopConfig) -> tuple[int, int]:
    """Optimiser steps per epoch and in all, for ``batches_per_epoch`` batches (each step takes
    ``gradient_accumulation_steps`` of them; ``max_steps`` replaces the epochs)."""
    per_epoch = max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))
    return per_epoch, config.max_steps or max(1, math.ceil(config.epochs * per_epoch))


def _shape(micro_batches: list) -> str:
    """What the failing step held, for the error: each batch's rows x tokens where known."""
    shapes = [f"{b['input_ids'].shape[0]} rows x {b['input_ids'].shape[1]} tokens" for b in micro_batches
              if isinstance(b, dict) and hasattr(b.get("input_ids"), "shape")]
    return "; ".join(shapes) if shapes else f"{len(micro_batches)} batches"


def _evaluate(model: torch.nn.Module, eval_loss: Callable[[torch.nn.Module], float], record: dict, state: TrainState,
              patience: int | None, best_weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Add the held-out loss to ``record``; with early stopping, track the best weights and stop
    after ``patience`` evaluations without improvement. Returns the best weights so far."""
    model.eval()
    with torch.no_grad():
        record["eval_loss"] = float(eval_loss(model))
    model.train()
    if record["eval_loss"] < state.best_eval_loss:
        state.best_eval_loss = record["eval_loss"]
        state.evals_without_improvement = 0
        return trainable_state(model) if patience else None
    state.evals_without_improvement += 1
    if patience and state.evals_without_improvement >= patience:
        state.stopped = f"eval loss did not improve for {patience} evaluations (best {state.best_eval_loss:.4f})"
        record["stopped"] = "early_stopping"
    return best_weights

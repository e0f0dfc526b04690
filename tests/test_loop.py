"""The training loop on a toy regression: schedules, accumulation, step and time limits,
evaluation with early stopping, the per-step JSONL log, reproducibility."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from domaintune.train.loop import LoopConfig, lr_factor, param_groups, seed_everything, train_loop

QUIET = Console(quiet=True)


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))


def _batches(x, y, batch_size: int, seed: int):
    def batches_for_epoch(epoch: int) -> list[dict]:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        return [{"x": x[order[i:i + batch_size]], "y": y[order[i:i + batch_size]]}
                for i in range(0, len(x), batch_size)]
    return batches_for_epoch


def _mse(model, batch) -> tuple[torch.Tensor, int]:
    return torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"]), len(batch["y"])


def _train(model=None, batch_size: int = 8, eval_loss=None, **overrides) -> tuple[torch.nn.Module, list[dict]]:
    model = model or _model()
    config = LoopConfig(**{"epochs": 3, "learning_rate": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.1,
                           "max_grad_norm": 1.0, "seed": 0, **overrides})
    seed_everything(config.seed)
    x, y = _data()
    log = train_loop(model, param_groups(model.named_parameters(), 0.0), _batches(x, y, batch_size, 0), _mse,
                     config, QUIET, eval_loss=eval_loss)
    return model, log


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(scheduler):
    total, warmup = 100, 10
    factors = [lr_factor(scheduler, s, warmup, total) for s in range(total)]
    assert factors[:warmup] == sorted(factors[:warmup]) and factors[warmup - 1] < 1.0
    assert factors[warmup] == pytest.approx(1.0)
    after = factors[warmup:]
    if scheduler == "constant":
        assert after == [1.0] * len(after)
    else:
        assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] < 0.05
    if scheduler == "cosine":  # half-way through the decay, half the peak
        assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5, abs=0.02)


def test_default_schedule_is_linear_warmup_and_decay():
    _, log = _train()
    total = len(log)
    assert total == 3 * 8
    warmup = int(0.1 * total)
    expected = [1e-2 * ((s + 1) / (warmup + 1) if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    assert [r["lr"] for r in log] == pytest.approx(expected)


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size():
    big, _ = _train(batch_size=16, max_steps=1, warmup_ratio=0.0)
    accumulated, log = _train(batch_size=8, max_steps=1, warmup_ratio=0.0, gradient_accumulation_steps=2)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert len(log) == 1
    _, full = _train(batch_size=8, gradient_accumulation_steps=3)
    assert len(full) == 3 * math.ceil(8 / 3)  # the last step of an epoch takes the remaining batches


def test_max_steps_replaces_epochs():
    _, log = _train(max_steps=5)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]["lr"] < log[2]["lr"]  # the schedule spans the 5 steps


def test_time_budget_stops_training():
    _, log = _train(max_minutes=1e-9)
    assert len(log) == 1
    assert log[-1]["stopped"] == "max_minutes"  # recorded for the model card


def test_early_stopping_keeps_the_best_weights():
    snapshots = []

    def eval_loss(model) -> float:
        snapshots.append([p.detach().clone() for p in model.parameters()])
        return [3.0, 2.0, 2.5, 2.4, 2.6, 1.0][len(snapshots) - 1]  # best at the 2nd evaluation

    model, log = _train(eval_loss=eval_loss, eval_every=2, early_stopping_patience=3)
    evaluated = [r for r in log if "eval_loss" in r]
    assert [r["eval_loss"] for r in evaluated] == [3.0, 2.0, 2.5, 2.4, 2.6]
    assert len(log) == 10  # stopped after the 5th evaluation
    assert log[-1]["stopped"] == "early_stopping" and all("stopped" not in r for r in log[:-1])
    for p, best in zip(model.parameters(), snapshots[1]):
        assert torch.equal(p, best)


def test_evaluation_without_patience_only_logs():
    model, log = _train(eval_loss=lambda m: 1.0, eval_every=4)
    assert len(log) == 24 and [r["step"] for r in log if "eval_loss" in r] == [4, 8, 12, 16, 20, 24]
    assert model.training is False


def test_every_step_is_logged_to_jsonl(tmp_path):
    _, log = _train(run_dir=tmp_path, checkpoint_every=0)
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert lines == log
    assert set(log[0]) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert not (tmp_path / "checkpoints").exists()


def test_same_seed_same_trajectory():
    _, first = _train()
    _, second = _train()
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    _, other = _train(seed=1)
    assert [r["loss"] for r in other] != [r["loss"] for r in first]


def test_running_out_of_gpu_memory_names_the_step_the_batch_and_what_to_change(tmp_path):
    from domaintune.errors import ResourceError

    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == 3:  # as a CUDA allocation fails in the forward pass of the third step
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _mse(model, batch)

    x, y = _data()
    batches = lambda epoch: [{"input_ids": torch.zeros(8, 512, dtype=torch.long), "x": x[:8], "y": y[:8]}] * 8  # noqa: E731
    config = LoopConfig(epochs=1, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0, seed=0,
                        run_dir=tmp_path)
    model = _model()
    with pytest.raises(ResourceError) as info:
        train_loop(model, param_groups(model.named_parameters(), 0.0), batches, loss_fn, config, QUIET)
    message = str(info.value)
    assert "out of GPU memory in step 3 of 8 (8 rows x 512 tokens)" in message
    assert "training.batch_size" in message and "training.activation_checkpointing" in message
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    logged = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # the steps before it were trained and logged

"""Checkpoints and resume: a run killed with SIGKILL and resumed ends exactly where an
uninterrupted run with the same seed ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from domaintune.errors import RecipeError
from domaintune.train.checkpoint import CHECKPOINT_FILE
from domaintune.train.loop import PAUSE_AFTER_STEP_ENV, LoopConfig, param_groups, seed_everything, train_loop

TIMING = ("elapsed_s", "tokens_per_s")


class _Interrupted(Exception):
    pass


def _toy_run(run_dir: Path, fail_at_step: int | None = None, **overrides) -> tuple[torch.nn.Module, list[dict]]:
    """A small regression with dropout (so that the random state matters), optionally stopped
    by an exception in the middle of step ``fail_at_step``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    y = x.sum(1)
    calls = {"n": 0}

    def batches_for_epoch(epoch: int) -> list[dict]:
        order = torch.randperm(48, generator=torch.Generator().manual_seed(epoch))
        return [{"x": x[order[i:i + 8]], "y": y[order[i:i + 8]]} for i in range(0, 48, 8)]

    def loss_fn(m, batch):
        calls["n"] += 1
        if calls["n"] == fail_at_step:
            raise _Interrupted
        return torch.nn.functional.mse_loss(m(batch["x"]).squeeze(-1), batch["y"]), 8

    config = LoopConfig(**{"epochs": 3, "learning_rate": 1e-2, "weight_decay": 0.01, "warmup_ratio": 0.1,
                           "max_grad_norm": 1.0, "seed": 0, "run_dir": run_dir, **overrides})
    seed_everything(0)
    log = train_loop(model, param_groups(model.named_parameters(), 0.01), batches_for_epoch, loss_fn, config,
                     Console(quiet=True))
    return model, log


def _without_timing(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


@pytest.mark.parametrize("checkpoint_every", [None, 4])
def test_interrupted_loop_resumes_to_the_same_weights(tmp_path, checkpoint_every):
    reference, reference_log = _toy_run(tmp_path / "a", checkpoint_every=checkpoint_every)
    with pytest.raises(_Interrupted):
        _toy_run(tmp_path / "b", fail_at_step=11, checkpoint_every=checkpoint_every)
    # random state changed in between, as it would in a new process
    torch.manual_seed(123)
    resumed, resumed_log = _toy_run(tmp_path / "b", checkpoint_every=checkpoint_every)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert _without_timing(resumed_log) == _without_timing(reference_log)
    on_disk = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert _without_timing(on_disk) == _without_timing(reference_log)


def test_a_checkpoint_from_another_setup_is_refused(tmp_path):
    _toy_run(tmp_path, max_steps=3)
    with pytest.raises(RecipeError, match=r"set-up: learning_rate was 0\.01, is 0\.005\n"):  # what, then and now
        _toy_run(tmp_path, max_steps=3, learning_rate=5e-3)


def _domaintune(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "domaintune", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return json.loads(stdout)


def _read(run_dir: Path, name: str):
    text = (Path(run_dir) / name).read_text()
    return json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("recipe_fixture, extra", [
    ("classification_recipe", ["training.epochs=2", "evaluate.bias_probes=false"]),  # fewer steps, same checks
    ("sft_recipe", []),
])
def test_killed_run_resumes_to_the_same_metrics(request, tmp_path, recipe_fixture, extra):
    from domaintune.pipeline import run
    from domaintune.recipe import parse_override

    recipe = request.getfixturevalue(recipe_fixture)
    overrides = ["training.checkpoint_every=3", *extra]
    args = [str(recipe), "--json", "--no-register", *(item for o in overrides for item in ("--set", o))]
    killed = _domaintune("run", *args, "-o", str(tmp_path / "b"), env={PAUSE_AFTER_STEP_ENV: "4"})
    # meanwhile, the same run uninterrupted (runs are seeded: the same in this process as in any)
    expected = run(recipe, dict(map(parse_override, overrides)), output_dir=tmp_path / "a", register=False)

    deadline = time.monotonic() + 300
    while not list((tmp_path / "b").glob(f"*/.*.partial/checkpoints/{CHECKPOINT_FILE}")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr and killed.stderr.read()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    partial = next((tmp_path / "b").glob("*/.*.partial"))
    assert (partial / "checkpoints" / CHECKPOINT_FILE).is_file()

    resumed = _finish(_domaintune("run", *args, "--resume", str(partial)))
    assert Path(resumed["run_dir"]).name == partial.name[1:-len(".partial")]  # the same run id
    assert not partial.exists() and not (Path(resumed["run_dir"]) / "checkpoints").exists()
    got, want = _read(resumed["run_dir"], "metrics.json"), _read(expected.run_dir, "metrics.json")
    for which in ("base", "tuned"):
        for name, value in want[which].items():
            if isinstance(value, float):
                assert got[which][name] == pytest.approx(value, abs=1e-6), (which, name)
            else:
                assert got[which][name] == value, (which, name)
    assert (_without_timing(_read(resumed["run_dir"], "train_log.jsonl"))
            == _without_timing(_read(expected.run_dir, "train_log.jsonl")))


def test_resume_names_what_is_wrong(classification_recipe, tmp_path):
    from domaintune.pipeline import run

    with pytest.raises(RecipeError, match="no unfinished run"):
        run(classification_recipe, output_dir=tmp_path, register=False, resume=tmp_path / "tiny-intents" / "nope")
    done = tmp_path / "tiny-intents" / "20240101-000000-abcd"
    done.mkdir(parents=True)
    with pytest.raises(RecipeError, match="is finished"):
        run(classification_recipe, register=False, resume=done)
    other = tmp_path / "other-recipe" / ".20240101-000000-abcd.partial"
    other.mkdir(parents=True)
    with pytest.raises(RecipeError, match="not of this recipe"):
        run(classification_recipe, register=False, resume=other)
    assert other.is_dir()  # a refused resume deletes nothing

"""`domaintune run` under torchrun or accelerate launch: two CPU processes (gloo) train as one with the
same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from domaintune.pipeline import run

# No dropout: the two layouts of the same batch must see the same function.
OVERRIDES = {"lora.dropout": 0.0, "training.epochs": 2}


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# accelerate starts several processes through torchrun with --multi_gpu, also on a machine without
# GPUs (its --cpu starts one)
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_write_one_run_with_the_weights_of_one_process(sft_recipe, tmp_path, launcher):
    alone = run(sft_recipe, OVERRIDES, output_dir=tmp_path / "alone", register=False)

    sets = [arg for key, value in OVERRIDES.items() for arg in ("--set", f"{key}={value}")]
    command = [*LAUNCHERS[launcher], "-m", "domaintune", "run", str(sft_recipe), *sets,
               "--output-dir", str(tmp_path / "ddp"), "--no-register", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = list((tmp_path / "ddp" / "tiny-colours").iterdir())
    assert len(runs) == 1 and not runs[0].name.startswith("."), runs  # no second run, nothing half-written
    assert (runs[0] / "metrics.json").is_file()
    assert json.loads((runs[0] / "lineage.json").read_text())["training"]["processes"] == 2  # not one alone
    # rank 0 alone evaluated the base, as one process does
    assert json.loads((runs[0] / "metrics.json").read_text())["base"] == pytest.approx(
        {k: v for k, v in alone.base.items() if isinstance(v, float)} | {"model": alone.base["model"]})
    together, single = _adapter(runs[0]), _adapter(alone.run_dir)
    assert together.keys() == single.keys()
    for name, weight in single.items():
        assert torch.allclose(together[name], weight, atol=1e-5), name
    moved = sum(float((w - 0).abs().sum()) for n, w in single.items() if "lora_B" in n)
    assert moved > 0  # lora_B starts at zero: the comparison is of trained weights


def test_with_cuda_the_processes_use_nccl_for_gpu_tensors_and_gloo_for_cpu_values(monkeypatch):
    """The loss's token counts are summed over the processes as CPU tensors: NCCL alone would
    refuse them, so a CUDA machine gets both backends, each process on its own GPU."""
    from domaintune.train import distributed

    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed._backend() == "cpu:gloo,cuda:nccl" and chosen == [1]
    assert torch.distributed.Backend("cpu:gloo,cuda:nccl")  # a form this torch accepts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed._backend() == "gloo" and chosen == [1]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
def test_classification_under_torchrun_trains_as_one_process(classification_recipe, tmp_path):
    """Each process trains on whole batches (same seed, same dropout masks): the gradients they
    average are equal, and so is the result to a one-process run's."""
    overrides = {"training.epochs": 2}
    alone = run(classification_recipe, overrides, output_dir=tmp_path / "alone", register=False)
    command = [*LAUNCHERS["torchrun"], "-m", "domaintune", "run", str(classification_recipe), "--set",
               "training.epochs=2", "--output-dir", str(tmp_path / "ddp"), "--no-register", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "ddp" / "tiny-intents").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "lineage.json").read_text())["training"]["processes"] == 2
    for name in ("adapter/adapter_model.safetensors", "adapter/head.safetensors"):
        together, single = load_file(runs[0] / name), load_file(alone.run_dir / name)
        assert together.keys() == single.keys()
        for key, weight in single.items():
            assert torch.allclose(together[key], weight, atol=1e-5), (name, key)
    tuned = json.loads((runs[0] / "metrics.json").read_text())["tuned"]
    assert (tuned["accuracy"], tuned["macro_f1"]) == pytest.approx((alone.tuned["accuracy"], alone.tuned["macro_f1"]))

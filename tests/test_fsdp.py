"""`domaintune run` under torchrun with `training.distributed: fsdp`: two CPU processes (gloo) train
one sharded copy of the model and write the run of a one-process run with the same global batch;
killed with SIGKILL, a multi-process run (fsdp or ddp) resumes to the same weights."""

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
from safetensors.torch import load_file

from domaintune.errors import RecipeError
from domaintune.pipeline import run
from domaintune.recipe import load_recipe
from domaintune.train.checkpoint import CHECKPOINT_FILE
from domaintune.train.loop import PAUSE_AFTER_STEP_ENV

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")

# No dropout: the two layouts of the same batch must see the same function. Nine rows of train
# data in batches of 4 leave one process without rows in the last batch of each epoch.
OVERRIDES = {"lora.dropout": 0.0, "training.epochs": 2, "training.batch_size": 4}


def _weights(run_dir, method: str) -> dict[str, torch.Tensor]:
    name = "adapter/adapter_model.safetensors" if method != "full" else "adapter/model.safetensors"
    return load_file(run_dir / name)


def _torchrun(recipe, overrides: dict, output, *extra: str, env: dict | None = None,
              processes: int = 2) -> subprocess.Popen:
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "domaintune", "run", str(recipe), *sets, "--output-dir", str(output), "--no-register", "--quiet",
               *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a worker that aborts prints its Python stack (torchrun shows only the signal)
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def _finish(process: subprocess.Popen) -> None:
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill(process)  # no worker left waiting on the others for ever
        raise
    assert process.returncode == 0, stderr if len(stderr) < 8000 else f"{stderr[:4000]}\n...\n{stderr[-4000:]}"


def _kill(process: subprocess.Popen) -> None:
    for pid in _process_tree(process.pid):  # torchrun and its workers, which sit in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # ended meanwhile
            pass
    process.wait()


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, weight in want.items():
        assert torch.allclose(got[name], weight, atol=1e-5), name


def test_full_fine_tuning_sharded_over_two_processes_equals_one_process(sft_recipe, tmp_path):
    overrides = {**OVERRIDES, "method": "full", "training.learning_rate": 1e-3}
    alone = run(sft_recipe, overrides, output_dir=tmp_path / "alone", register=False)
    _finish(_torchrun(sft_recipe, {**overrides, "training.distributed": "fsdp"}, tmp_path / "fsdp"))
    runs = list((tmp_path / "fsdp" / "tiny-colours").iterdir())
    assert len(runs) == 1 and not runs[0].name.startswith("."), runs  # one run, nothing half-written
    assert (runs[0] / "metrics.json").is_file()
    _assert_same_weights(_weights(runs[0], "full"), _weights(alone.run_dir, "full"))
    # lineage records how each was trained
    sharded, single = (json.loads((r / "lineage.json").read_text())["training"] for r in (runs[0], alone.run_dir))
    assert (sharded["processes"], sharded["fsdp"], single["processes"], single["fsdp"]) == (2, True, 1, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_trains_on_a_gpu_over_nccl(sft_recipe, tmp_path):
    """One process per GPU (one here): float32 shards on the GPU, gathered in bfloat16, NCCL between
    the processes. Its weights are not a single GPU run's (that one keeps bfloat16 weights): it must
    train, and say how."""
    overrides = {**OVERRIDES, "method": "full", "training.learning_rate": 1e-3, "training.distributed": "fsdp"}
    _finish(_torchrun(sft_recipe, overrides, tmp_path / "fsdp", processes=1))
    (run_dir,) = (tmp_path / "fsdp" / "tiny-colours").iterdir()
    training = json.loads((run_dir / "lineage.json").read_text())["training"]
    assert (training["processes"], training["fsdp"], training["device"], training["bf16"]) == (1, True, "cuda", True)
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(w).all() for w in _weights(run_dir, "full").values())


@pytest.mark.parametrize("distributed", ["fsdp", "ddp"])
def test_a_multi_process_run_killed_mid_training_resumes_to_the_weights_of_one_process(sft_recipe, tmp_path,
                                                                                      distributed):
    overrides = {**OVERRIDES, "training.checkpoint_every": 3}
    sharded = {**overrides, "training.distributed": distributed}
    killed = _torchrun(sft_recipe, sharded, tmp_path / "fsdp", env={PAUSE_AFTER_STEP_ENV: "4"})
    alone = run(sft_recipe, overrides, output_dir=tmp_path / "alone", register=False)  # meanwhile

    deadline = time.monotonic() + 300
    while not list((tmp_path / "fsdp").glob(f"*/.*.partial/checkpoints/{CHECKPOINT_FILE}")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.stderr and killed.stderr.read()
        time.sleep(0.05)
    time.sleep(1)  # the file appears by rename, whole; let the workers reach their pause
    _kill(killed)
    partial = next((tmp_path / "fsdp").glob("*/.*.partial"))
    checkpoint = torch.load(partial / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["plan"].get("sharded", False) == (distributed == "fsdp") and checkpoint["state"]["step"] == 3
    # whole tensors in the file, not one process's shard
    lora_a = next(n for n in checkpoint["weights"] if "lora_A" in n)
    assert list(checkpoint["weights"][lora_a].shape) == checkpoint["plan"]["weights"][lora_a]
    _finish(_torchrun(sft_recipe, sharded, tmp_path / "fsdp", "--resume", str(partial)))
    runs = [r for r in (tmp_path / "fsdp" / "tiny-colours").iterdir()]
    assert [r.name for r in runs] == [partial.name[1:-len(".partial")]]
    _assert_same_weights(_weights(runs[0], "lora"), _weights(alone.run_dir, "lora"))


@pytest.mark.parametrize("recipe_fixture, overrides, message", [
    ("sft_recipe", {"method": "qlora"}, "fsdp does not shard 4-bit qlora"),
    ("classification_recipe", {}, "classification models are small enough for ddp"),
])
def test_fsdp_is_refused_where_it_cannot_shard(request, recipe_fixture, overrides, message):
    recipe = request.getfixturevalue(recipe_fixture)
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe, {**overrides, "training.distributed": "fsdp"})


def test_the_fsdp_memory_benchmark_runs_both_ways():
    """bench/fsdp_memory.py on a small model: both ways of sharding give the model's weights (it
    checks them) and it prints its table (the numbers themselves are in bench/README.md)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "fsdp_memory.py"
    done = subprocess.run([sys.executable, str(bench), "--hidden", "128", "--layers", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.split()[:1] in (["plain"], ["domaintune"])}
    assert set(rows) == {"plain", "domaintune"} and all(len(v) == 2 for v in rows.values()), done.stdout
    assert "sharding: domaintune/plain" in done.stdout, done.stdout

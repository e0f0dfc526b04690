"""bench/gpu_train.py's code paths on a 2-layer model on the CPU (the GPU numbers need a GPU):
the baseline and domaintune's loop see the same batches and reach the same losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """bench/gpu_train.py on a 2-layer model on the CPU: its output and the JSON it wrote."""
    out = tmp_path / "gpu_train.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--tiny", "--device", "cpu",
                           *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done, json.loads(out.read_text())


def test_the_gpu_benchmark_runs_both_sides_on_the_same_data(tmp_path):
    done, (plain, auto) = _bench(tmp_path, "--only", "lora-1b-plain", "lora-1b-auto")
    assert (plain["name"], auto["name"]) == ("lora-1b-plain", "lora-1b-auto")
    assert plain["tokens_per_s"] > 0 and auto["tokens_per_s"] > 0
    # on the CPU auto changes nothing but the loop: the same batches give the same losses
    assert len(plain["losses"]) == len(auto["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(plain["losses"], auto["losses"])) < 1e-4
    assert "| lora-1b-auto | 4 x 64 |" in done.stdout


def test_the_gpu_benchmark_says_where_a_steps_time_went(tmp_path):
    done, (auto,) = _bench(tmp_path, "--profile", "--only", "lora-1b-auto")
    # the matrix products of a 2-layer model's forward and backward lead the CPU's self time
    top = [line.split()[0] for line in auto["profile"].splitlines() if line.strip().startswith("aten::")][0]
    assert top in ("aten::mm", "aten::addmm", "aten::bmm"), auto["profile"]
    assert auto["profile"] in done.stdout

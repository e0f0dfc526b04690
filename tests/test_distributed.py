"""train/distributed.py under torchrun: how processes end once training is over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

# What each process runs: the calls a run makes around training, then what is left of the group.
SCRIPT = textwrap.dedent("""
    import torch.distributed as dist
    from domaintune.train import distributed

    assert distributed.world_size() == 2
    distributed.wait_for_main()
    distributed.wait_for_main()  # its group is made once and kept
    assert distributed.all_sum(1.0) == 2.0
    main = distributed.is_main()
    print(f"rank {distributed.rank()} trained", flush=True)
    distributed.end_training()
    assert main, "only rank 0 goes on"
    assert not dist.is_initialized()
    try:
        distributed.world_size()
    except RuntimeError as error:
        print("rank 0 alone:", error, flush=True)
""")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch built without gloo")
def test_after_training_every_process_ends_the_group_the_others_exit_and_rank_0_goes_on(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--tee", "1", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum("trained" in line for line in lines) == 2, done.stdout
    assert sum("rank 0 alone: the process group has ended" in line for line in lines) == 1, done.stdout

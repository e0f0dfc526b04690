"""Data-parallel training across processes started by ``torchrun`` or ``accelerate launch``.

Each process trains on its share of the rows of every batch; after the batches of an optimiser
step, the gradients are averaged by hand (one all-reduce of the trainable parameters, which
for adapters are small) so that every process takes the same step. Without ``WORLD_SIZE`` > 1
in the environment every function here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


_ended = False  # set by ``end_training``: the process group is gone for good
_patient = None  # wait_for_main's gloo group, kept until end_training


def world_size() -> int:
    """How many processes train together (1 when not launched by torchrun/accelerate)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    if _ended:  # joining again would wait forever for processes that have moved on
        raise RuntimeError("the process group has ended (distributed.end_training): ask before training ends")
    if not dist.is_initialized():
        dist.init_process_group(_backend())
    return dist.get_world_size()


def _backend() -> str:
    """gloo on a CPU machine. With CUDA, NCCL for the GPUs' tensors and gloo for the CPU's: the
    loss's token counts and the run's id travel as CPU values, which NCCL alone refuses."""
    if not torch.cuda.is_available():
        return "gloo"
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    return "cpu:gloo,cuda:nccl"


def rank() -> int:
    """This process's rank (0 when alone)."""
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process evaluates, logs and writes files (rank 0, or the only process)."""
    return rank() == 0


def shard(items: list) -> list:
    """This process's share of ``items`` (every ``world_size``-th one, from its rank)."""
    return items[rank()::world_size()]


def from_main(value):
    """Rank 0's ``value`` (any picklable object), in every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wait_for_main() -> None:
    """Every process waits here until rank 0 arrives, for up to a day: the process group's own
    timeout (10 minutes for NCCL) would end a wait on rank 0's evaluation of a large base model.
    Over a gloo group of its own, made on first use and ended with the others by ``end_training``
    (every process must call this at the same points)."""
    global _patient
    if world_size() == 1:
        return
    if _patient is None:
        _patient = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    dist.broadcast_object_list([None], src=0, group=_patient)


def all_sum(value: float) -> float:
    """``value`` summed over the processes."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is set in some process (keeps every process stopping at the same step)."""
    return all_sum(1.0 if flag else 0.0) > 0


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes (a missing one counts as zeros)."""
    if world_size() == 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # one message instead of one per tensor
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device, p.dtype)
        offset += n


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Give every process rank 0's values of ``params`` (the trainable weights before step 1)."""
    if world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def end_training() -> None:
    """Every process calls this once training is over (its last collective done). The process
    groups end in every process at the same point, as PyTorch asks of them; then the other
    processes exit and rank 0 goes on alone to evaluate and write the run.

    The others exit with ``os._exit``, skipping the interpreter's teardown: they have nothing left
    to write, and tearing down with gloo's threads and the sharded model about can abort a process
    (SIGABRT, "terminate called without an active exception"), which torchrun reports as the
    whole run failing."""
    global _ended, _patient
    if world_size() == 1:
        return
    main = is_main()
    dist.destroy_process_group()
    _ended, _patient = True, None
    if not main:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

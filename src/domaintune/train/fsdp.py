"""Fully sharded data parallel training (``training.distributed: fsdp``) with PyTorch's FSDP2.

Under torchrun each process holds a 1/N shard of every weight, gradient and optimiser state;
a decoder layer's weights are gathered just before it runs and freed after, and gradients are
reduce-scattered (averaged) in backward. Training runs on a sharded copy of the model (``shard``);
the caller's model stays whole, on its device, and gets the trained weights back at the end
(``gather_into``), so that rank 0 evaluates and saves a plain model. In the other processes the
caller's model may be shapes only (meta tensors, ``catalog.load_causal_lm(weights=False)``): every
shard is cut from rank 0's weights. Every process must make the
same calls in the same order: forward passes, the gathers here and the checkpoint writes are
collective.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module, layers: list[torch.nn.Module], device: str, bf16: bool = False) -> torch.nn.Module:
    """A copy of ``model`` sharded across the processes, one FSDP unit per decoder layer (the
    copy's counterparts of ``layers``) and one for the rest, its shards on ``device``. With
    ``bf16`` the shards stay float32 (what the optimiser updates) and are gathered in bfloat16 for
    the forward and backward passes; gradients are averaged in float32.

    The copy's weights are made on the meta device, sharded there, and only then is each
    process's shard allocated and filled: a process holds the model once plus its 1/N, where a
    plain copy before sharding would hold it twice for a moment (the peak that decides whether a
    large model fits the host's memory with a process per GPU)."""
    positions = {id(m): i for i, m in enumerate(model.modules())}
    # deepcopy takes what is in its memo as already copied: every parameter, tied ones once
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    sharded = copy.deepcopy(model, memo)
    modules = list(sharded.modules())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(modules[positions[id(layer)]], mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    buffers = {name: b for name, b in sharded.named_buffers()}  # real copies (rotary tables), not in any state dict
    sharded.to_empty(device=device)
    with torch.no_grad():
        for name, b in sharded.named_buffers():
            b.copy_(buffers[name])
        whole_params = dict(model.named_parameters())
        for name, param in sharded.named_parameters():  # one weight at a time
            param.copy_(_shard_of(param, whole_params[name]))
    return sharded


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(weights: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """CPU copies of ``weights``, each shard gathered into the whole tensor. Every process must
    call it (each gather is collective); one with ``keep`` false takes part without holding the
    result, so that only the process that writes a checkpoint holds it whole."""
    gathered = {}
    for name, value in weights.items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            gathered[name] = value.detach().to("cpu", copy=True)
    return gathered


@torch.no_grad()
def gather_into(model: torch.nn.Module, sharded: torch.nn.Module) -> None:
    """Copy the trained weights of ``sharded`` (from ``shard(model, ...)``) into the whole ``model``,
    gathering one weight at a time, which every process must call."""
    params = dict(model.named_parameters())
    for name, param in sharded.named_parameters():
        if param.requires_grad:
            params[name].copy_(param.full_tensor() if isinstance(param, DTensor) else param)


def shards_like(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole ``weights`` cut into this process's shards of ``model``'s parameters of the same names."""
    params = dict(model.named_parameters())
    return {name: _shard_of(params[name], value) for name, value in weights.items()}


def _shard_of(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This process's part of the whole ``value`` of ``param``, laid out as ``param`` is. The parts
    are cut from rank 0's value (distribute_tensor's source rank), so a process whose ``value`` is
    only a shape (a meta tensor: it never loaded the weights) passes a placeholder."""
    if value.is_meta:
        value = torch.empty(value.shape, dtype=param.dtype, device=param.device)
    value = value.to(param.device, param.dtype)
    return distribute_tensor(value, param.device_mesh, param.placements) if isinstance(param, DTensor) else value


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state with whole tensors, keyed by parameter name, in rank 0; the other
    processes take part and get an empty state."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give every process its shard of a state from ``full_optimizer_state`` (each passes the whole)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def scalar(value: torch.Tensor) -> float:
    """A number that may be a DTensor (a gradient norm over shards)."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)

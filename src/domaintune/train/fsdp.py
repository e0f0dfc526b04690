"""Fully sharded data parallel training (``training.distributed: fsdp``) with PyTorch's FSDP2.

Under torchrun each process holds a 1/N shard of every weight, gradient and optimiser state;
a decoder layer's weights are gathered just before it runs and freed after, and gradients are
reduce-scattered (averaged) in backward. Training runs on a sharded copy of the model (``shard``);
the caller's model stays whole, on its device, and gets the trained weights back at the end
(``whole``), so that rank 0 evaluates and saves a plain model. Every process must make the same calls in the same order: forward passes, the
gathers here and the checkpoint writes are collective.
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
    copy's counterparts of ``layers``) and one for the rest, its shards moved to ``device``. With
    ``bf16`` the shards stay float32 (what the optimiser updates) and are gathered in bfloat16 for
    the forward and backward passes; gradients are averaged in float32."""
    positions = {id(m): i for i, m in enumerate(model.modules())}
    sharded = copy.deepcopy(model)
    modules = list(sharded.modules())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(modules[positions[id(layer)]], mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    return sharded.to(device=device)


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def whole(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of ``weights``, each shard gathered into the whole tensor."""
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
            for name, value in weights.items()}


def shards_like(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole ``weights`` cut into this process's shards of ``model``'s parameters of the same names."""
    params = dict(model.named_parameters())
    shards = {}
    for name, value in weights.items():
        param = params[name]
        value = value.to(param.device, param.dtype)
        shards[name] = distribute_tensor(value, param.device_mesh, param.placements) if isinstance(param, DTensor) else value
    return shards


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's state with whole tensors, keyed by parameter name."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give every process its shard of a state from ``full_optimizer_state`` (each passes the whole)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def scalar(value: torch.Tensor) -> float:
    """A number that may be a DTensor (a gradient norm over shards)."""
    return float(value.full_tensor() if isinstance(value, DTensor) else value)

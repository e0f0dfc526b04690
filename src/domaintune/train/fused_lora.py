"""LoRA's forward pass with its scaling and its sum folded into one matrix product.

PEFT's LoRA layer computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. The scaling and
the sum each make a new tensor the size of the layer's output, and the scaling does again in
backward; on the CPU these passes over memory, with the page faults of their fresh allocations,
are a share of a step (the profiler put 1.2 s of a 9.8 s SmolLM2-135M step in multiplying
2312 x 1536 tensors by a scalar, LoRA's scaling of the gate and up outputs among them). The same
value comes from scaling the rank-r intermediate instead (r numbers per token, not the output's
width) and adding lora_B's product onto the base's output inside one ``addmm``: a SmolLM2-135M
step 1.02-1.03x, and 0.44 GB less peak memory over a run (bench/README.md).

On a GPU, training runs under bfloat16 autocast with float32 adapters beside a bfloat16 base.
There PEFT first casts each LoRA layer's input to float32 (the adapter's dtype) and autocast casts
it back to bfloat16 for lora_A's product, which then keeps that copy for backward: two passes over
the input and one more saved activation per adapted layer (seven per Llama block, the MLP's
down projection's input the widest). Under autocast the fused forward hands the input to lora_A
as it is and lets autocast cast the small adapter weights: the layer's backward keeps the input
itself, shared with the other layers that read it (measured by the bytes saved for backward:
tests/test_fused_lora.py, ``bench/lora_saved.py``).

Only plain LoRA on ``nn.Linear`` layers takes this path, one adapter active, unmerged; every
other case (DoRA, a bias on lora_B, several adapters, adapters switched off, a mixed batch of
adapters, mixed dtypes outside autocast) runs PEFT's own forward. On under ``training.speed:
auto`` (``SpeedPlan.fused_lora``): on an H100, a 1B LoRA step 1.04x as fast as with PEFT's forward
at 0.84x the peak memory, the same losses (bench/README.md).
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch


def _fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = None if args or kwargs else _plain_adapter(layer, x)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    low = layer.lora_A[name](layer.lora_dropout[name](x)) * layer.scaling[name]  # (..., r): cheap to scale
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]),
                      layer.lora_B[name].weight.t())
    return out.view(result.shape)


def _plain_adapter(layer, x: torch.Tensor) -> str | None:
    """The one active adapter, where the call is plain LoRA in one dtype or under autocast (which
    casts each product's operands itself); else None: PEFT's casts between dtypes are left to it."""
    adapters = layer.active_adapters
    if layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] not in layer.lora_A:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return adapters[0]
    a, b = layer.lora_A[adapters[0]], layer.lora_B[adapters[0]]
    return adapters[0] if x.dtype == a.weight.dtype == b.weight.dtype == layer.get_base_layer().weight.dtype else None


def _eligible(layer: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or not isinstance(layer.get_base_layer(), torch.nn.Linear):
        return False
    if getattr(layer, "fan_in_fan_out", False):
        return False
    variants = getattr(layer, "lora_variant", {})  # DoRA and the like compute more than B·A
    return not variants and all(b.bias is None for b in layer.lora_B.values())


@contextmanager
def fused_lora(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While inside, every plain LoRA layer of ``model`` runs the fused forward; on leaving, PEFT's
    own forward is back. Weights, their names and the state dict are untouched."""
    patched = [m for m in model.modules() if _eligible(m)]
    for layer in patched:
        # an instance attribute shadows the class's forward (what accelerate's hooks do too)
        layer.forward = types.MethodType(_fused_forward, layer)
    try:
        yield model
    finally:
        for layer in patched:
            del layer.forward

"""Padding-free batches: the rows of a batch laid end to end, each attending only to itself.

A packed batch carries ``position_ids`` that restart at 0 for every row and no 2D attention
mask. Transformers reads the restarts as row boundaries: with flash-attention it runs the
variable-length kernel, with SDPA and eager attention it builds a block-diagonal causal mask.
That mask costs attention over the whole packed length, most of it masked out; ``row_attention``
swaps SDPA for a path that runs causal attention on each row of a one-sequence batch instead:
PyTorch's variable-length flash-attention kernel on a GPU where this torch has one, else SDPA row
by row.
The rows of a packed batch are the rows a padded batch would hold, so packing changes the speed
of a step, never its loss (``tests/test_packing.py`` checks both against rows run alone).
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_ATTENTION = "domaintune_row_sdpa"

IGNORE = -100


def pack_rows(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
    """The rows as one packed sequence: ``input_ids``, ``labels`` and ``position_ids`` of shape
    (1, total length). The first token of each row loses its label: packed, it would be the
    target of the previous row's last token."""
    return {"input_ids": torch.tensor([[t for ids in input_ids for t in ids]], dtype=torch.long),
            "labels": torch.tensor([[lab for labs in labels for lab in [IGNORE, *labs[1:]]]], dtype=torch.long),
            "position_ids": torch.tensor([[p for ids in input_ids for p in range(len(ids))]], dtype=torch.long)}


@torch.no_grad()
def packing_honoured(model, input_ids: list[list[int]]) -> bool:
    """Whether ``model`` keeps packed rows apart: the last row's logits, packed behind the
    others, must equal its logits alone. Architectures whose attention ignores position-id
    restarts would let rows see each other; they are trained on padded batches instead."""
    if len(input_ids) < 2 or min(len(input_ids[0]), len(input_ids[1])) < 2:
        return True
    n = min(16, len(input_ids[0]), len(input_ids[1]))
    rows = [input_ids[0][:n], input_ids[1][:n]]
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    try:
        device = next(model.parameters()).device
        alone = model(input_ids=torch.tensor([rows[1]], device=device), use_cache=False).logits[0]
        packed = pack_rows(rows, rows)
        packed = {k: packed[k].to(device) for k in ("input_ids", "position_ids")}
        together = model(**packed, use_cache=False).logits[0, n:]
    finally:
        model.train(was_training)
    # a leak moves logits by a large fraction of their size; numerical noise, even in bf16, does not
    return bool((together.float() - alone.float()).abs().max() <= 1e-2 * alone.float().abs().max() + 1e-5)


def _row_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA, except on a packed single sequence (position ids restarting at 0, no cache), where
    each row attends causally to itself alone and nothing is spent on a mask."""
    positions = kwargs.get("position_ids")
    if positions is None or query.shape[0] != 1 or not query.shape[2] == key.shape[2] == positions.shape[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = _row_bounds(positions)
    if len(bounds) < 3 or bounds[0] != 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "position_ids"}
    if len({e - s for s, e in zip(bounds, bounds[1:])}) == 1:  # rows of one length: one batched call
        n = len(bounds) - 1
        rows = [t.reshape(t.shape[1], n, t.shape[2] // n, t.shape[3]).transpose(0, 1) for t in (query, key, value)]
        out = sdpa_attention_forward(module, *rows, None, **rest)[0]  # (rows, row length, heads, head_dim)
        return out.reshape(1, -1, *out.shape[2:]), None
    kernel = _varlen_kernel(query, rest)
    if kernel is not None:  # one call for all the rows, as flash-attention's variable-length kernel takes them
        groups = getattr(module, "num_key_value_groups", 1)
        cu = _row_bounds_on(positions, query.device)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (length, heads, head_dim)
        out = kernel(q, k, v, cu, max(e - s for s, e in zip(bounds, bounds[1:])), rest.get("scaling"), groups)
        return out.unsqueeze(0), None  # (batch, length, heads, head_dim)
    # Every row is a new shape: on a GPU keep to the kernels that take any length as it comes,
    # never cuDNN's, which plans per shape (the suspected cause of slow packed GPU steps, bench/README.md).
    # split, not slices: the backward of a split is one concatenation, while each slice's backward
    # fills a zero tensor of the whole sequence and adds it up (less memory traffic; on the CPU a
    # step takes the same wall time either way, timed)
    lengths = [e - s for s, e in zip(bounds, bounds[1:])]
    with sdpa_kernel(_ANY_LENGTH_BACKENDS) if query.is_cuda else nullcontext():
        outputs = [sdpa_attention_forward(module, q, k, v, None, **rest)[0]
                   for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outputs, dim=1), None  # (batch, length, heads, head_dim)


# Every layer of a forward pass gets the same position_ids tensor: its row boundaries are read
# from the device once, not once per layer (each read waits for the GPU to finish its queue).
_last_bounds: list = [None, None, None]  # position_ids, boundaries as a list, as an int32 tensor


def _row_bounds(positions: torch.Tensor) -> list[int]:
    """Where each packed row starts, and the sequence's length last."""
    if _last_bounds[0] is not positions:
        starts = (positions.reshape(-1) == 0).nonzero().flatten().tolist()
        _last_bounds[:] = [positions, starts + [positions.shape[-1]], None]
    return _last_bounds[1]


def _row_bounds_on(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    bounds = _row_bounds(positions)
    if _last_bounds[2] is None or _last_bounds[2].device != device:
        _last_bounds[2] = torch.tensor(bounds, dtype=torch.int32, device=device)
    return _last_bounds[2]


_ANY_LENGTH_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _varlen_kernel(query: torch.Tensor, options: dict) -> Callable | None:
    """Causal attention over rows laid end to end in one call, where there is a kernel for it:
    PyTorch's flash-attention ``varlen_attn`` (torch 2.10+) on a CUDA GPU in half precision, with
    no attention dropout and no sliding window. The callable takes (length, heads, head_dim)
    tensors, the rows' boundaries, the longest row, the scale and the key/value head groups."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return None
    if options.get("dropout") or options.get("sliding_window") is not None:
        return None
    return _torch_varlen()


@functools.lru_cache(maxsize=1)
def _torch_varlen() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    # how causality is asked for changed between releases: a flag, then a window reaching no future token
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    takes_scale, gqa = "scale" in params, "enable_gqa" in params  # neither in torch 2.10

    def run(q, k, v, cu, longest: int, scale: float | None, groups: int) -> torch.Tensor:
        extra = dict(causal)
        if groups > 1 and gqa:
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if scale is not None and takes_scale:
            extra["scale"] = scale
        elif scale is not None:  # the kernel scales by 1/sqrt(head_dim): fold the rest into the queries
            q = q * (scale * q.shape[-1] ** 0.5)
        return varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return run


def varlen_attention_available() -> bool:
    """Whether this torch has the variable-length flash-attention kernel that packed rows of mixed
    lengths need on a GPU to beat padded batches (used there in bfloat16 and float16)."""
    return _torch_varlen() is not None


AttentionInterface.register(ROW_ATTENTION, _row_sdpa)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)  # padded batches still get their usual mask


@contextmanager
def row_attention(model) -> Iterator[bool]:
    """While inside, a model on SDPA attention runs packed single sequences row by row; yields
    whether it does (other implementations, flash-attention's included, are left as they are)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        yield False
        return
    base.set_attn_implementation(ROW_ATTENTION)
    try:
        yield True
    finally:
        base.set_attn_implementation("sdpa")

"""Dropout on the CPU that draws only the positions it drops.

``nn.Dropout`` draws a random number for every element, and on the CPU drawing them is most of
its cost: LoRA's dropout on the input of each of SmolLM2-135M's 210 adapted layers took about a
third of a training step (torch profiler). The gaps between the dropped elements of an
independent Bernoulli(p) mask are geometric, so the same masks (in distribution) come from about
p·n random numbers instead of n; the dropped positions are zeroed with ``index_fill_``, and
backward keeps those positions rather than a mask the size of the input. Forward and backward
together took a third of ``nn.Dropout``'s time on SmolLM2's layer inputs (p = 0.05; bench/README.md).
On a GPU, dropout is one fused kernel already: this is for the CPU alone (``SpeedPlan.sparse_dropout``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch


def dropped_positions(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted positions in ``range(n)``, each in it independently with probability ``p`` (0 < p < 1),
    drawn from the torch generator (so seeds and checkpoints govern them like any dropout)."""
    expected = n * p
    draws = int(expected + 6 * math.sqrt(expected * (1 - p)) + 16)  # nearly always enough at once
    log_keep = math.log1p(-p)
    parts, last = [], -1
    while last < n:
        u = torch.rand(draws, dtype=torch.float64, device=device)
        gaps = torch.floor(torch.log1p(-u) / log_keep).to(torch.int64) + 1  # geometric on 1, 2, ...
        positions = last + torch.cumsum(gaps, 0)
        parts.append(positions)
        last = int(positions[-1])
    positions = torch.cat(parts) if len(parts) > 1 else parts[0]
    return positions[positions < n]


class _ZeroAt(torch.autograd.Function):
    """``x * scale`` with the elements at ``positions`` (of the flattened tensor) set to 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        out = x.contiguous() * scale
        out.view(-1).index_fill_(0, positions, 0.0)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad = grad.contiguous() * ctx.scale
        grad.view(-1).index_fill_(0, positions, 0.0)
        return grad, None, None


class SparseDropout(torch.nn.Module):
    """``nn.Dropout(p)`` with masks drawn by ``dropped_positions``: kept elements scaled by 1/(1-p)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability has to be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        return _ZeroAt.apply(x, dropped_positions(x.numel(), self.p, x.device), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def sparse_dropout(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While inside, every ``nn.Dropout`` of ``model`` (LoRA's on each adapted layer among them)
    is a ``SparseDropout`` of the same p; on leaving, the original modules are back."""
    swapped = []
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Dropout and child.p > 0:
                sparse = SparseDropout(child.p)
                sparse.train(child.training)
                setattr(parent, name, sparse)
                swapped.append((parent, name, child, sparse))
    try:
        yield model
    finally:
        for parent, name, original, sparse in swapped:
            original.train(sparse.training)
            setattr(parent, name, original)

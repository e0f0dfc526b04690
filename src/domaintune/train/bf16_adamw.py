"""AdamW for weights held in bfloat16, with stochastic rounding.

On a GPU, full fine-tuning keeps its weights in bfloat16 (half the memory of float32 weights,
gradients and AdamW state). Written back with round-to-nearest, most updates vanish: bfloat16 has
8 significant bits, so a weight of 0.02 moves only by steps of 1.2e-4, and an AdamW update of
about the learning rate (5e-5 by default) rounds back to the old weight; a norm weight of 1.0
never moves at all, and the second-moment estimate, which changes by 0.1% a step, stops changing
too. Measured on a 2-layer Llama (tests/test_bf16_adamw.py, 120 steps at 5e-5): float32 training
took the loss from 5.551 to 5.294, ``torch.optim.AdamW`` on bfloat16 weights only to 5.427, this
optimiser on bfloat16 weights to 5.294.

Each step computes in float32 and writes the weights and both moments back to bfloat16 rounding
up or down at random, with the probability that makes the expected value exact: 16 random bits
are added below bfloat16's and cut off. The bits come from a hash of the element's position, the
tensor, the step and the seed, so that a run, and a run resumed from a checkpoint, repeat exactly,
and so that the whole update is element-wise arithmetic: on a GPU it is compiled (``torch.compile``)
into one kernel per tensor, reading and writing each weight and moment once, as torch's fused AdamW
does, all of them launched by one compiled call: one compiled call per tensor took 2.45x torch's
fused AdamW on an H100 (bench/README.md), the host's cost of 146 calls outrunning the kernels. Where
compiling fails it runs uncompiled (slower, same values), with a warning.
Float32 weights get plain AdamW (torch's own arithmetic).
"""

from __future__ import annotations

import warnings

import torch

CHUNK = 1 << 24  # elements per pass uncompiled: float32 temporaries of 64 MB


def _hash_bits(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """16 well-mixed bits per element from (index, seed), int64 arithmetic kept to 32 bits (a
    multiply-xorshift integer hash)."""
    h = (index * 0x9E3779B1 + seed) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return (h ^ (h >> 16)) & 0xFFFF


def round_stochastically(x: torch.Tensor, index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) in bfloat16, each value rounded to one of its two bfloat16 neighbours with
    the probabilities that keep its expectation: random bits added below bfloat16's 16 high bits,
    which are then cut off (sign and magnitude: the same towards zero and away on both sides)."""
    bits = x.view(torch.int32).to(torch.int64) + _hash_bits(index, seed)
    return (bits & -65536).to(torch.int32).view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _update_bf16(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hyper: torch.Tensor,
                 seed: torch.Tensor, offset: torch.Tensor) -> None:
    """One AdamW step of the flat bfloat16 tensors ``w`` (weights), ``m`` and ``v`` (moments) in
    place, from the gradient ``g``. ``hyper`` holds lr, beta1, beta2, eps, weight decay and the
    two bias corrections; tensors, not numbers, so that a compiled version serves every step."""
    lr, beta1, beta2, eps, decay, correction1, correction2 = hyper.unbind()
    g32 = g.float()
    m32 = m.float() * beta1 + g32 * (1 - beta1)
    v32 = v.float() * beta2 + g32 * g32 * (1 - beta2)
    w32 = w.float() * (1 - lr * decay) - (lr / correction1) * m32 / (v32.sqrt() / correction2.sqrt() + eps)
    index = torch.arange(w.numel(), device=w.device) + offset
    w.copy_(round_stochastically(w32, index, seed))
    m.copy_(round_stochastically(m32, index, seed + 1))
    v.copy_(round_stochastically(v32, index, seed + 2))


def _update_all(ws: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor], vs: list[torch.Tensor],
                hyper: torch.Tensor, seeds: torch.Tensor) -> None:
    """``_update_bf16`` of every tensor (row i of ``hyper`` and ``seeds`` for tensor i), written
    as one function so that compiled it is one call for all of them."""
    offset = seeds.new_zeros(())
    for i in range(len(ws)):
        _update_bf16(ws[i], gs[i], ms[i], vs[i], hyper[i], seeds[i], offset)


_compiled = None  # the compiled _update_all, made on first use on a GPU; False once compiling failed


def _compiled_update(device: torch.device, compile: bool | None):
    """The compiled ``_update_all`` on a GPU (``compile=None``) or when asked, else None."""
    global _compiled
    if compile is False or (compile is None and device.type != "cuda") or _compiled is False:
        return None
    if _compiled is None:
        _compiled = torch.compile(_update_all, dynamic=True, fullgraph=True)
    return _compiled


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as ``torch.optim.AdamW``) whose
    bfloat16 weights are updated in float32 and rounded back stochastically; ``seed`` fixes the
    rounding. ``compile``: compile the update (default: on a GPU)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, compile: bool | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.compile = compile

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        halves = []  # (weight, state, settings, seed) of the bfloat16 weights, updated together below
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                position += 1  # the tensor's place in the optimiser: its own random bits
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if p.dtype != torch.bfloat16:
                    _update_float(p, state, group)
                    continue
                (beta1, beta2), t = group["betas"], state["step"]
                settings = [group["lr"], beta1, beta2, group["eps"], group["weight_decay"], 1 - beta1 ** t,
                            1 - beta2 ** t]
                halves.append((p, state, settings, ((self.seed * 1_000_003 + t) * 7_919 + position) * 3 & 0x7FFFFFFF))
        for device in {p.device for p, *_ in halves}:
            mine = [h for h in halves if h[0].device == device]
            # one copy to the device for all of them: a copy per tensor would wait for the GPU each time
            hyper = torch.tensor([h[2] for h in mine], dtype=torch.float32, device=device)
            seeds = torch.tensor([h[3] for h in mine], dtype=torch.int64, device=device)
            flats = [[x.view(-1) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])] for p, state, *_ in mine]
            self._bf16(flats, hyper, seeds, device)
        return loss

    def _bf16(self, flats: list[list[torch.Tensor]], hyper: torch.Tensor, seeds: torch.Tensor,
              device: torch.device) -> None:
        """Step each (weight, gradient, first moment, second moment) of ``flats``, flattened."""
        global _compiled
        update = _compiled_update(device, self.compile)
        if update is not None:
            try:
                update(*(list(column) for column in zip(*flats)), hyper, seeds)
                return
            except Exception as exc:  # a missing compiler or Triton costs speed, never the run
                warnings.warn(f"the bfloat16 AdamW update could not be compiled ({type(exc).__name__}: {exc}); "
                              "running it uncompiled")
                _compiled = False
        for i, flat in enumerate(flats):
            for start in range(0, flat[0].numel(), CHUNK):  # chunks keep the float32 temporaries small
                _update_bf16(*(x[start:start + CHUNK] for x in flat), hyper[i], seeds[i], seeds.new_tensor(start))


def _update_float(p: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's single-tensor arithmetic, for weights in float32."""
    (beta1, beta2), lr, t = group["betas"], group["lr"], state["step"]
    p.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(p.grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))

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
up or down at random, with the probability that makes the expected value exact (the bits below
bfloat16's are compared with uniform random bits). The rounding draws from a generator seeded
with the optimiser's seed and the step number, so that a run, and a run resumed from a
checkpoint, repeat exactly. Float32 weights get plain AdamW (torch's own arithmetic). Large
tensors go in chunks, so the float32 temporaries stay small.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 24  # elements per pass: float32 temporaries of 64 MB


def round_stochastically_(dst: torch.Tensor, src: torch.Tensor, generator: torch.Generator) -> None:
    """Write the float32 ``src`` into the bfloat16 ``dst``: each value rounds to one of its two
    bfloat16 neighbours with probabilities that keep its expectation (truncating after adding
    uniform random bits below bfloat16's 16 high bits)."""
    bits = src.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: the low 16 bits are zero


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments, as ``torch.optim.AdamW``) whose
    bfloat16 weights are updated in float32 and rounded back stochastically; ``seed`` fixes the
    rounding."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # the step about to be taken, from the state (so that a resumed optimiser knows it too)
        number = 1 + max((s["step"] for s in self.state.values()), default=0)
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                generator = None
                if p.dtype == torch.bfloat16:
                    if p.device not in generators:
                        generators[p.device] = torch.Generator(device=p.device)
                        generators[p.device].manual_seed(self.seed * 1_000_003 + number)
                    generator = generators[p.device]
                _update(p, state, group, generator)
        return loss


def _update(p: torch.Tensor, state: dict, group: dict, generator: torch.Generator | None) -> None:
    (beta1, beta2), lr, eps, decay, t = group["betas"], group["lr"], group["eps"], group["weight_decay"], state["step"]
    correction1, correction2 = 1 - beta1 ** t, 1 - beta2 ** t
    parts = [(p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
    if generator is not None and p.numel() > CHUNK and all(x.is_contiguous() for x in parts[0]):
        parts = list(zip(*(x.view(-1).split(CHUNK) for x in parts[0])))
    for weight, grad, exp_avg, exp_avg_sq in parts:
        w, g = weight.float(), grad.float()
        m, v = exp_avg.float(), exp_avg_sq.float()
        w.mul_(1 - lr * decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / correction2 ** 0.5).add_(eps)
        w.addcdiv_(m, denom, value=-lr / correction1)
        if generator is None:  # float32 weights: the float32 results are the new values
            weight.copy_(w), exp_avg.copy_(m), exp_avg_sq.copy_(v)
        else:
            for dst, src in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
                round_stochastically_(dst, src, generator)

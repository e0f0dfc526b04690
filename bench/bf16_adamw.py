"""AdamW on bfloat16 weights: torch's (rounding to nearest, which loses most fine-tuning updates)
against ``train.bf16_adamw`` (stochastic rounding), the time of one optimiser step.

The weights of a Llama-3.2-1B shape (16 blocks of hidden 2048 and MLP 8192, a 128256 x 2048
embedding: 1.24 billion) in bfloat16 with random gradients; on a GPU torch's fused AdamW; our
update compiled into one kernel per tensor; the two take turns in one process.

    python bench/bf16_adamw.py                      # on a CUDA GPU when one is visible
    python bench/bf16_adamw.py --device cpu --layers 2 --vocab 32000
    python bench/bf16_adamw.py --tiny               # a small set, uncompiled too (a test runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from domaintune.train.bf16_adamw import BF16AdamW  # noqa: E402


def weights(layers: int, hidden: int, mlp: int, vocab: int, kv: int, device: str) -> list[torch.Tensor]:
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
                   (hidden, mlp), (hidden,), (hidden,)]
    out = []
    for shape in shapes:
        w = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
        w.grad = (torch.randn(shape, device=device) * 1e-3).to(torch.bfloat16)
        out.append(w)
    return out


def timed(optimizer, repeats: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    hidden, mlp, kv = (64, 256, 16) if args.tiny else (2048, 8192, 512)
    if args.tiny:
        args.layers, args.vocab, args.repeats = 2, 512, 2
    params = weights(args.layers, hidden, mlp, args.vocab, kv, args.device)
    count = sum(p.numel() for p in params)
    sides = {"torch AdamW": torch.optim.AdamW(params, lr=5e-5, fused=True if cuda else None),
             "BF16AdamW": BF16AdamW(params, lr=5e-5, compile=True)}
    if args.tiny:
        sides["BF16AdamW, uncompiled"] = BF16AdamW(params, lr=5e-5, compile=False)
    for optimizer in sides.values():
        optimizer.step()  # state, and the compile
    results = {name: [] for name in sides}
    for _ in range(args.repeats):  # in turns, so that drift hits all
        for name, optimizer in sides.items():
            results[name] += timed(optimizer, 1, cuda)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{count / 1e9:.2f} billion bfloat16 weights, {device}, torch {torch.__version__}")
    print("| optimiser | step |")
    print("| --- | ---: |")
    for name, times in results.items():
        print(f"| {name} | {statistics.median(times) * 1000:.1f} ms |")
    base = statistics.median(results["torch AdamW"])
    print(f"BF16AdamW / torch AdamW: {statistics.median(results['BF16AdamW']) / base:.2f}x the time")


if __name__ == "__main__":
    main()

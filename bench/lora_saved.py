"""LoRA under bfloat16 autocast, as a GPU trains it: PEFT's forward against ``train.fused_lora``.

A Llama-3.2-1B-shaped model (hidden 2048, MLP 8192, 32 heads, 8 KV heads; two layers and a
small vocabulary: the layers are what differ) in bfloat16 with float32 LoRA adapters (r 16, all
seven linear layers of each block), one training step under autocast. Reported, the same on
every device: the bytes the step's operations write (each new tensor's size, views left out: the
memory traffic that casts, scalings and sums cost a GPU, which is bound by it there) and the bytes
its autograd graph keeps for backward (distinct storages); on a GPU also the peak memory and the
time of a step, the two forwards taking turns in one process.

    python bench/lora_saved.py                          # on a CUDA GPU when one is visible
    python bench/lora_saved.py --device cpu --tokens 512
    python bench/lora_saved.py --tiny                   # a small shape (a test runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from domaintune.train.fused_lora import fused_lora  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=1024),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@contextmanager
def saved_bytes() -> Iterator[dict]:
    """Counts the bytes of the distinct storages autograd keeps for backward while inside."""
    seen: dict[tuple, int] = {}
    count = {"bytes": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if key not in seen:
            seen[key] = storage.nbytes()
            count["bytes"] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield count


class written_bytes(TorchDispatchMode):
    """Counts the bytes of every tensor the operations run while inside produce (views of their
    inputs left out), forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.bytes += t.nbytes
        return out


def build(shape: str, device: str):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")).to(device=device,
                                                                                        dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero, which would make any product look right
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    return model


def step(model, ids: torch.Tensor, fused: bool, count: bool = False) -> tuple[float, int, int]:
    """One forward and backward under autocast: the loss, and with ``count`` the bytes kept for
    backward and the bytes written."""
    model.zero_grad(set_to_none=True)
    with fused_lora(model) if fused else nullcontext(), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        with saved_bytes() as kept, written_bytes() if count else nullcontext() as written:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    return float(loss.detach()), kept["bytes"], written.bytes if count else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side (GPU only)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.tokens, args.repeats = 2, 32, 2
    cuda = args.device.startswith("cuda")
    model = build("tiny" if args.tiny else "1b", args.device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    result = {}
    for fused in (False, True):
        loss, kept, written = step(model, ids, fused, count=True)
        result[fused] = {"loss": loss, "kept": kept, "written": written, "times": [], "peak": None}
    if cuda:
        for fused in (False, True):
            step(model, ids, fused)  # warm-up
        for fused in (False, True):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(model, ids, fused)
            torch.cuda.synchronize()
            result[fused]["peak"] = torch.cuda.max_memory_allocated()
        for _ in range(args.repeats):
            for fused in (False, True):  # in turns, so that drift hits both
                torch.cuda.synchronize()
                began = time.perf_counter()
                step(model, ids, fused)
                torch.cuda.synchronize()
                result[fused]["times"].append(time.perf_counter() - began)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{'tiny' if args.tiny else 'Llama-3.2-1B-shaped, 2 layers'}, {args.batch} x {args.tokens} tokens, "
          f"bfloat16 autocast, {device}, torch {torch.__version__}")
    print("| forward | loss | written | kept for backward | peak | step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for fused in (False, True):
        r = result[fused]
        peak = f"{r['peak'] / 2**20:,.0f} MiB" if r["peak"] else "-"
        timing = f"{statistics.median(r['times']) * 1000:.2f} ms" if r["times"] else "-"
        print(f"| {'fused' if fused else 'PEFT'} | {r['loss']:.4f} | {r['written'] / 2**20:,.1f} MiB "
              f"| {r['kept'] / 2**20:,.1f} MiB | {peak} | {timing} |")
    print(f"written, fused / PEFT: {result[True]['written'] / result[False]['written']:.3f}")
    print(f"kept, fused / PEFT: {result[True]['kept'] / result[False]['kept']:.3f}")
    if cuda:
        print(f"step time, PEFT / fused: {statistics.median(result[False]['times']) / statistics.median(result[True]['times']):.3f}x")


if __name__ == "__main__":
    main()

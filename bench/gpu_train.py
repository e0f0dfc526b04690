"""GPU training speed: plain Hugging Face + PEFT against domaintune's ``training.speed: auto``.

Randomly initialised models of real shapes (no weights are downloaded): Llama-3.2-1B and
Llama-3-8B. Each variant runs in its own process (so peak memory is its own) on the same
synthetic token data, a random Markov chain over 2,000 tokens that a model can learn, so the loss
curves mean something. Prints one table: real (non-padding) tokens/s after warm-up, peak GiB of
GPU memory (torch.cuda.max_memory_allocated, weights included), and the ratios to each group's
baseline; writes the rows and every step's loss as JSON.

    python bench/gpu_train.py                      # every variant (about 6 minutes on an H200)
    python bench/gpu_train.py --diagnostics        # packed rows of mixed lengths, with and without each part
    python bench/gpu_train.py --only lora-1b-plain lora-1b-auto
    python bench/gpu_train.py --tiny --device cpu  # the same code paths on a 2-layer model, for CI-like checks
    python bench/gpu_train.py --profile --only lora-1b-plain lora-1b-auto   # where a step's time goes

Baselines ("plain") are what a user writes with transformers + PEFT: bf16 weights, bf16 autocast,
SDPA attention, ``model(input_ids, labels=...)`` for the loss, fused AdamW, LoRA r=16 (alpha 32,
no dropout) on every linear layer of the blocks. The domaintune variants run the project's own
training code (``train_causal`` with a ``SpeedPlan``) over the same batches in the same order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True, rope_theta=10000.0),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Variant:
    name: str
    group: str  # ratios are taken against the group's first (baseline) variant
    shape: str
    method: str  # lora | full
    impl: str  # plain | auto | off (domaintune's loop without the speed features)
    batch: int
    seq: int  # tokens per row (fixed-length data) or the longest row (variable-length data)
    varlen: bool = False  # rows of 20..seq tokens: padded (plain) or packed (auto)
    compile_layers: bool = False
    checkpointing: float = 0.0
    liger: bool = True  # auto: leave Liger's kernels out when False
    fused_lora: bool | None = None  # auto: LoRA's scaling and sum in one addmm or not (None: as the plan says)
    packing: bool = True  # auto/off: packed batches (padded when False)
    pack_mixed: bool | None = None  # auto/off: pack rows of different lengths too (None: as the plan says)
    steps: int = 50
    warmup: int = 10  # steps left out of tokens/s
    notes: str = ""


VARIANTS = [
    Variant("lora-1b-plain", "lora-1b", "1b", "lora", "plain", 8, 1024),
    Variant("lora-1b-auto", "lora-1b", "1b", "lora", "auto", 8, 1024),
    Variant("lora-1b-auto-peftforward", "lora-1b", "1b", "lora", "auto", 8, 1024, fused_lora=False),
    Variant("full-1b-plain", "full-1b", "1b", "full", "plain", 8, 1024),
    Variant("full-1b-auto", "full-1b", "1b", "full", "auto", 8, 1024),
    Variant("varlen-1b-plain-padded", "varlen-1b", "1b", "lora", "plain", 8, 1024, varlen=True),
    Variant("varlen-1b-auto", "varlen-1b", "1b", "lora", "auto", 8, 1024, varlen=True),
    Variant("lora-8b-plain", "lora-8b", "8b", "lora", "plain", 4, 1024, steps=20, warmup=5),
    Variant("lora-8b-auto-2048-ckpt50", "lora-8b", "8b", "lora", "auto", 4, 2048, checkpointing=0.5, steps=20, warmup=5),
    Variant("lora-8b-auto-2048", "lora-8b", "8b", "lora", "auto", 4, 2048, steps=20, warmup=5),
    Variant("lora-8b-auto-2048-ckpt25", "lora-8b", "8b", "lora", "auto", 4, 2048, checkpointing=0.25, steps=20, warmup=5),
    Variant("lora-8b-auto-2048-ckpt40", "lora-8b", "8b", "lora", "auto", 4, 2048, checkpointing=0.4, steps=20, warmup=5),
    # torch.compile of each decoder layer instead of Liger's kernels: not (yet) part of auto
    Variant("lora-1b-auto-compile", "lora-1b", "1b", "lora", "auto", 8, 1024, compile_layers=True, warmup=15),
    Variant("full-1b-auto-compile", "full-1b", "1b", "full", "auto", 8, 1024, compile_layers=True, warmup=15),
]

# Second look (--diagnostics): packed rows of mixed lengths against padded ones, part by part.
DIAGNOSTICS = [
    Variant("varlen-1b-plain-padded", "varlen-1b", "1b", "lora", "plain", 8, 1024, varlen=True, steps=20, warmup=5),
    Variant("varlen-1b-auto-packed", "varlen-1b", "1b", "lora", "auto", 8, 1024, varlen=True, pack_mixed=True,
            steps=20, warmup=5),
    Variant("varlen-1b-auto-packed-noliger", "varlen-1b", "1b", "lora", "auto", 8, 1024, varlen=True, liger=False,
            pack_mixed=True, steps=20, warmup=5),
    Variant("varlen-1b-auto-padded", "varlen-1b", "1b", "lora", "auto", 8, 1024, varlen=True, packing=False,
            steps=20, warmup=5),
    Variant("varlen-1b-off-packed", "varlen-1b", "1b", "lora", "off", 8, 1024, varlen=True, pack_mixed=True,
            steps=20, warmup=5),
]


def markov_rows(n_rows: int, seq: int, varlen: bool, seed: int = 0, states: int = 2000) -> list[list[int]]:
    """Token rows from a fixed random Markov chain (each token has 4 likely successors), the same
    for every variant: learnable, so the loss falls and two implementations can be compared."""
    import torch

    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, states, (states, 4), generator=g).tolist()
    rows = []
    for _ in range(n_rows):
        length = int(torch.randint(20, seq + 1, (1,), generator=g)) if varlen else seq
        picks = torch.randint(0, 4, (length,), generator=g).tolist()
        row = [int(torch.randint(0, states, (1,), generator=g))]
        for pick in picks[1:]:
            row.append(successors[row[-1]][pick])
        rows.append(row)
    return rows


def build_model(shape: str, device: str):
    """The model in bf16 on the GPU (float32 on the CPU), made there directly; peak memory counts from here."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                                                 attn_implementation="sdpa")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def batches(v: Variant, rows: list[list[int]]) -> list[list[int]]:
    """Row indices per step, shuffled by a seed: the order both implementations see."""
    from domaintune.train.batching import length_grouped_batches

    return length_grouped_batches([len(r) for r in rows], v.batch, 7)[:v.steps]


def run_plain(v: Variant, device: str) -> dict:
    import torch

    rows = markov_rows(v.batch * v.steps, v.seq, v.varlen)
    model = build_model(v.shape, device)
    if v.method == "lora":
        model = lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4 if v.method == "lora" else 2e-5, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    losses, stamps, tokens = [], [], []
    # random order, not grouped by length: the per-batch padding of a default DataLoader
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(7)).tolist() if v.varlen else None
    plan = [order[i * v.batch:(i + 1) * v.batch] for i in range(v.steps)] if v.varlen else batches(v, rows)
    for idx in plan:
        chunk = [rows[i] for i in idx]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        labels = ids.masked_fill(mask == 0, -100)
        with autocast:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))  # a sync per step, as the domaintune loop's logging does
        stamps.append(time.perf_counter())
        tokens.append(int(mask.sum()))
    return {"losses": losses, "stamps": stamps, "tokens": tokens}


def run_auto(v: Variant, device: str) -> dict:
    from types import SimpleNamespace

    from rich.console import Console

    from domaintune.train import speed
    from domaintune.train.causal import Tokenized, train_causal
    from domaintune.train.loop import LoopConfig

    rows = markov_rows(v.batch * v.steps, v.seq, v.varlen)
    plan = speed.plan_speed("off" if v.impl == "off" else "auto", "llama", v.method,
                            compile_layers=v.compile_layers, checkpointing=v.checkpointing)
    if not v.liger:
        plan = dataclasses.replace(plan, liger=False)
    if v.fused_lora is not None:
        plan = dataclasses.replace(plan, fused_lora=v.fused_lora)
    if v.pack_mixed is not None:
        plan = dataclasses.replace(plan, pack_mixed_lengths=v.pack_mixed)
    model = build_model(v.shape, device)  # already bf16 on the GPU, as speed.place leaves a base
    model = speed.place(model, plan, v.method)
    if v.method == "lora":
        model = lora(model)
    loop = LoopConfig(epochs=1, learning_rate=2e-4 if v.method == "lora" else 2e-5, weight_decay=0.0,
                      warmup_ratio=0.0, max_grad_norm=1.0, seed=7, scheduler="constant", max_steps=v.steps,
                      checkpoint_every=0)
    # fixed-length rows: the loop's own length-grouped batches are the ones the baseline replays
    with speed.accelerated(model, plan):
        log = train_causal(model, SimpleNamespace(pad_token_id=0), [Tokenized(r, r) for r in rows], loop=loop,
                           batch_size=v.batch, console=Console(quiet=True), description=v.name,
                           packing=v.packing, speed=plan)
    start = time.perf_counter() - log[-1]["elapsed_s"]
    seen = [r["tokens_per_s"] * r["elapsed_s"] for r in log]
    return {"losses": [r["loss"] for r in log], "stamps": [start + r["elapsed_s"] for r in log],
            "tokens": [round(b - a) for a, b in zip([0.0] + seen, seen)], "plan": plan.describe()}


def one(v: Variant, device: str, profile: bool = False) -> dict:
    import torch

    began = time.perf_counter()
    run = run_plain if v.impl == "plain" else run_auto
    if profile:
        out, where = profiled(run, v, device)
        out["profile"] = where
    else:
        out = run(v, device)
    w = min(v.warmup, len(out["stamps"]) - 2)
    timed_tokens = sum(out["tokens"][w + 1:])
    seconds = out["stamps"][-1] - out["stamps"][w]
    return {"name": v.name, "group": v.group, "tokens_per_s": timed_tokens / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "wall_s": time.perf_counter() - began, "losses": out["losses"], "plan": out.get("plan"),
            "batch": f"{v.batch} x {v.seq}" + (" (20..)" if v.varlen else ""), "profile": out.get("profile")}


def profiled(run, v: Variant, device: str) -> tuple[dict, str]:
    """``run(v, device)`` under torch's profiler: the operators and kernels that took the most
    device time (self time, all steps), and how much of the wall time the device was busy. A step
    bound by the matrix products shows GEMM kernels on top and the device busy nearly all the time;
    element-wise kernels on top mean memory traffic, an idle device means launches or host work."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        out = run(v, device)
        if device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - began
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in events if e.device_type.name == "CUDA") / 1e6 if device == "cuda" else None
    text = events.table(sort_by=key, row_limit=30, max_name_column_width=70)
    share = f"device busy {busy:.2f} s of {wall:.2f} s wall ({busy / wall:.0%}), all steps\n" if busy else ""
    return out, share + text


def table(results: list[dict]) -> str:
    base = {}
    lines = ["| variant | batch | real tokens/s | peak GiB | speed vs plain | memory vs plain | loss gap (50 steps) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | failed: {r['error'][:80]} | | | | |")
            continue
        b = base.setdefault(r["group"], r)
        gap = ""
        if b is not r and len(b["losses"]) == len(r["losses"]) and b["batch"] == r["batch"] and "(20" not in r["batch"]:
            diffs = [abs(x - y) / max(abs(y), 1e-6) for x, y in zip(r["losses"], b["losses"])]
            gap = f"{sum(diffs) / len(diffs):.2%} mean, {max(diffs):.2%} max"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if r["peak_gib"] and b["peak_gib"] else "-"
        lines.append(f"| {r['name']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {peak} | "
                     f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x | {mem} | {gap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--diagnostics", action="store_true", help="the second-look variants instead")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and 4 steps: checks the code paths")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per variant")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds for all variants; later ones are skipped")
    parser.add_argument("--out", type=Path, default=Path("gpu_train.json"))
    parser.add_argument("--profile", action="store_true",
                        help="run each chosen variant for at most 12 steps under torch's profiler and print where the time went")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chosen = [v for v in (DIAGNOSTICS if args.diagnostics else VARIANTS) if not args.only or v.name in args.only]
    if args.tiny:
        for v in chosen:
            v.shape, v.seq, v.steps, v.warmup, v.batch = "tiny", min(v.seq, 64), 4, 1, min(v.batch, 4)
    if args.profile:
        for v in chosen:
            v.steps, v.warmup = min(v.steps, 12), min(v.warmup, 4)
    if args.one:
        v = next(v for v in chosen if v.name == args.one)
        print("RESULT " + json.dumps(one(v, args.device, args.profile)), flush=True)
        return

    results, began = [], time.perf_counter()
    for v in chosen:
        if time.perf_counter() - began > args.budget:
            results.append({"name": v.name, "group": v.group, "error": "skipped: out of --budget"})
            continue
        command = ([sys.executable, __file__, "--one", v.name, "--device", args.device] + (["--tiny"] if args.tiny else [])
                   + (["--diagnostics"] if args.diagnostics else []) + (["--profile"] if args.profile else []))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                results.append({"name": v.name, "group": v.group, "error": " / ".join(tail)})
            else:
                results.append(json.loads(line[len("RESULT "):]))
        except subprocess.TimeoutExpired:
            results.append({"name": v.name, "group": v.group, "error": f"over {args.timeout:.0f} s"})
        r = results[-1]
        print(f"{v.name}: " + (r["error"] if "error" in r else
                               f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_gib'] or 0:.1f} GiB, {r['wall_s']:.0f} s"),
              flush=True)
        if r.get("profile"):
            print(r["profile"], flush=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()

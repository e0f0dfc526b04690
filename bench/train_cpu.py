"""SFT training speed on CPU: domaintune's trainer against Hugging Face Trainer + PEFT, same run.

Both sides fine-tune smollm2-135m-instruct with the same LoRA (domaintune's default r, alpha,
dropout and targets), on the same variable-length chat rows (tokenised with the chat template,
loss on the answers only), for the same epochs, batch size, learning rate and schedule. The
baseline is what a practitioner writes first: ``Trainer`` with ``DataCollatorForSeq2Seq``,
which pads each random batch to its longest row. Each side runs in its own process (peak RSS is
that process's); both are scored by the same held-out loss (mean NLL of the answer tokens).

    python bench/train_cpu.py                  # 32 training rows, 16 held out, 1 epoch
    python bench/train_cpu.py --rows 64 --sides hf,domaintune,domaintune-padded,domaintune-off,domaintune-unfused

Throughput counts real tokens only: the rows' own tokens, not padding.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TICKETS = ROOT / "recipes" / "support-intents" / "data" / "tickets.csv"
NOTES = ROOT / "recipes" / "clinical-triage" / "data" / "notes.jsonl"
MODEL = "smollm2-135m-instruct"


def make_chats(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Chats of 20 to 400 tokens or so: label a few support tickets, or triage a few clinical notes
    (one to a dozen items a row, so that lengths spread the way real requests do)."""
    rng = random.Random(seed)
    with open(TICKETS, encoding="utf-8") as fh:
        tickets = [(r["text"], r["label"]) for r in csv.DictReader(fh)]
    notes = [(r["input"], r["output"]) for r in map(json.loads, NOTES.read_text(encoding="utf-8").splitlines())]
    chats = []
    for _ in range(n):
        if rng.random() < 0.5:
            items, ask = rng.sample(tickets, rng.randint(1, 12)), "Label each support ticket with its intent."
        else:
            items, ask = rng.sample(notes, rng.randint(1, 8)), "Triage each note as 'specialty: S; urgency: U'."
        prompt = ask + "\n" + "\n".join(f"{i + 1}. {text}" for i, (text, _) in enumerate(items))
        answer = "\n".join(f"{i + 1}. {label}" for i, (_, label) in enumerate(items))
        chats.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return chats


def _rows(tokenizer, chats, max_len: int):
    from domaintune.data.examples import ChatExample
    from domaintune.train.causal import tokenize_chat

    return [tokenize_chat(tokenizer, ChatExample(messages=c, where=f"row {i}"), max_len) for i, c in enumerate(chats)]


def _lora_model(base):
    """The model with domaintune's default LoRA for its architecture."""
    import peft

    from domaintune.recipe import LoraConfig
    from domaintune.train.loop import seed_everything
    from domaintune.train.methods import lora_targets

    config = LoraConfig()
    seed_everything(0)
    return peft.get_peft_model(base, peft.LoraConfig(r=config.r, lora_alpha=2 * config.r, lora_dropout=config.dropout,
                                                     target_modules=lora_targets(base, config), task_type="CAUSAL_LM"))


def run_side(side: str, args: argparse.Namespace) -> dict:
    """Train one side in this process and return its measurements."""
    import torch
    from rich.console import Console

    from domaintune import catalog
    from domaintune.pipeline import quiet_libraries
    from domaintune.train.causal import perplexity, train_causal
    from domaintune.train.loop import LoopConfig
    from domaintune.train.speed import accelerated, plan_speed

    quiet_libraries()
    torch.set_num_threads(args.threads)
    base = catalog.resolve(MODEL)
    tokenizer = catalog.load_tokenizer(base)
    model = _lora_model(catalog.load_causal_lm(base))
    chats = make_chats(args.rows + args.eval_rows, args.seed)
    train, held_out = _rows(tokenizer, chats[:args.rows], args.max_len), _rows(tokenizer, chats[args.rows:], args.max_len)
    real_tokens = args.epochs * sum(len(r.input_ids) for r in train)

    started = time.perf_counter()
    if side.startswith("domaintune"):
        loop = LoopConfig(epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01, warmup_ratio=0.1,
                          max_grad_norm=1.0, seed=args.seed, checkpoint_every=0)
        # what a run on this machine gets with training.speed auto (or off)
        plan = plan_speed("off" if side == "domaintune-off" else "auto", model.config.model_type, "lora")
        if side == "domaintune-unfused":  # auto, but PEFT's own LoRA forward
            plan = dataclasses.replace(plan, fused_lora=False)
        with accelerated(model, plan):
            train_causal(model, tokenizer, train, loop=loop, batch_size=args.batch_size, console=Console(quiet=True),
                         description="train", packing=side != "domaintune-padded", speed=plan)
    else:
        _train_hf(model, tokenizer, train, args)
    wall = time.perf_counter() - started
    eval_loss = math.log(perplexity(model, tokenizer, held_out, args.batch_size)[0])
    return {"side": side, "wall_s": wall, "real_tokens": real_tokens, "tokens_per_s": real_tokens / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "eval_loss": eval_loss,
            "lengths": sorted(len(r.input_ids) for r in train)}


def _train_hf(model, tokenizer, rows, args: argparse.Namespace) -> None:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = [{"input_ids": r.input_ids, "attention_mask": [1] * len(r.input_ids), "labels": r.labels} for r in rows]
    training = TrainingArguments(output_dir=str(args.scratch), per_device_train_batch_size=args.batch_size,
                                 num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01,
                                 warmup_steps=int(0.1 * args.epochs * math.ceil(len(rows) / args.batch_size)),
                                 lr_scheduler_type="linear", max_grad_norm=1.0, seed=args.seed,
                                 save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
                                 disable_tqdm=True)
    Trainer(model=model, args=training, train_dataset=data,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="training rows")
    parser.add_argument("--eval-rows", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="domaintune's sft LoRA default")
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="hf,domaintune", help="hf, domaintune (packed), domaintune-padded, domaintune-off (training.speed: off: "
                        "nn.Dropout, PEFT's LoRA forward), domaintune-unfused (auto with PEFT's LoRA forward)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # the child process's side
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/domaintune-bench"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return

    results = []
    for side in args.sides.split(","):
        child = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{side}: {results[-1]['wall_s']:.0f} s", file=sys.stderr)

    lengths = results[0]["lengths"]
    print(f"{args.rows} rows of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"{args.epochs} epoch(s), batch {args.batch_size}, {args.threads} threads\n")
    print("| side | wall (s) | real tokens/s | peak RSS (MB) | eval loss |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['side']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['eval_loss']:.4f} |")
    by_side = {r["side"]: r for r in results}
    if "hf" in by_side:
        for side, r in by_side.items():
            if side != "hf":
                print(f"\n{side} / hf: {r['tokens_per_s'] / by_side['hf']['tokens_per_s']:.2f}x real tokens/s, "
                      f"eval loss {r['eval_loss'] - by_side['hf']['eval_loss']:+.4f}")


if __name__ == "__main__":
    main()

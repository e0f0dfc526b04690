"""LoRA's forward on the CPU: PEFT's own against ``train.fused_lora`` (what ``training.speed:
auto`` uses), on one packed training step, measured in one process with the two taking turns.

The step is what a run trains: smollm2-135m-instruct with the sft default LoRA (every linear
layer of the blocks, r 16, dropout 0.05 drawn sparsely), 8 chat rows packed into one sequence,
loss on the answers. (Peak memory needs a process per side: ``bench/train_cpu.py`` reports it.)

    python bench/lora_cpu.py                 # needs the packaged smollm2 (make setup)
    python bench/lora_cpu.py --tiny          # a 2-layer random Llama instead (a test runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_cpu import MODEL, _lora_model, _rows, make_chats  # noqa: E402  (the same rows and LoRA)

from domaintune.train.causal import _pack, _token_losses  # noqa: E402
from domaintune.train.dropout import sparse_dropout  # noqa: E402
from domaintune.train.fused_lora import fused_lora  # noqa: E402
from domaintune.train.packing import row_attention  # noqa: E402


def _model_and_batch(tiny: bool):
    from domaintune import catalog
    from domaintune.pipeline import quiet_libraries

    quiet_libraries()
    tokenizer = catalog.load_tokenizer(catalog.resolve(MODEL))
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        base = catalog.load_causal_lm(catalog.resolve(MODEL))
    rows = _rows(tokenizer, make_chats(8, 0), 512)
    return _lora_model(base).train(), _pack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama")
    parser.add_argument("--repeats", type=int, default=5, help="steps per side, taken in turns")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = _model_and_batch(args.tiny)

    def step():
        nll, mask = _token_losses(model, batch)
        (nll.sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    sides = {"PEFT": nullcontext, "fused": lambda: fused_lora(model)}
    times = {side: [] for side in sides}
    with sparse_dropout(model), row_attention(model):
        for context in sides.values():
            with context():
                step()  # warm-up
        for _ in range(args.repeats):
            for side, context in sides.items():
                with context():
                    started = time.perf_counter()
                    step()
                    times[side].append(time.perf_counter() - started)
    tokens = int(batch["real_tokens"])
    print(f"{'random 2-layer Llama' if args.tiny else MODEL}, LoRA r=16 on every linear layer, one packed step of "
          f"{tokens} tokens, torch {torch.__version__}, {args.threads} threads, median of {args.repeats}\n")
    print("| LoRA forward | step (s) |")
    print("|---|---:|")
    for side in sides:
        print(f"| {side} | {statistics.median(times[side]):.3f} |")
    print(f"\nfused / PEFT: {statistics.median(times['PEFT']) / statistics.median(times['fused']):.2f}x steps per second")


if __name__ == "__main__":
    main()

"""Serving throughput: N concurrent chat requests over two LoRA adapters of one base, batched
dynamically (adapters mixed in a batch), against the same N requests handled one at a time.

Both go through the whole HTTP app in process (httpx's ASGI transport, no network); the
baseline server takes one request per generate (--max-batch 1, no wait). The model is a random
Llama of a small realistic shape, or SmolLM2-135M with --smollm when it is installed.

    python bench/serve_load.py [--requests 32] [--max-tokens 32] [--threads 1] [--smollm]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import tempfile
import time
from pathlib import Path

import httpx
import torch
import yaml


def build_base(folder: Path, smollm: bool) -> Path:
    """A base model folder: SmolLM2-135M from the catalog, or a random 4-layer Llama."""
    from domaintune import catalog

    if smollm:
        return catalog.resolve("smollm2-135m-instruct").path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    words = [f"w{i}" for i in range(8000)] + ["user", "assistant", "system"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_run(folder: Path, base: Path, seed: int) -> Path:
    """A run directory holding a LoRA adapter with random (non-zero) weights."""
    from peft import LoraConfig, get_peft_model

    from domaintune import catalog
    from domaintune.train.causal import ensure_chat_template

    base_model = catalog.resolve(str(base))
    torch.manual_seed(seed)
    model = get_peft_model(catalog.load_causal_lm(base_model),
                           LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    tokenizer = catalog.load_tokenizer(base_model)
    ensure_chat_template(tokenizer)
    model.save_pretrained(folder / "adapter")
    tokenizer.save_pretrained(folder / "adapter")
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"name": folder.name, "task": "sft", "base_model": str(base),
                                                        "method": "lora"}))
    return folder


async def measure(app, bodies: list[dict], concurrent: bool) -> tuple[float, int]:
    """Seconds to answer all ``bodies``, and the tokens generated."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=None) as client:
        await client.post("/v1/chat/completions", json=bodies[0])  # warm-up
        start = time.perf_counter()
        if concurrent:
            replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=b) for b in bodies])
        else:
            replies = [await client.post("/v1/chat/completions", json=b) for b in bodies]
        elapsed = time.perf_counter() - start
    for reply in replies:
        reply.raise_for_status()
    return elapsed, sum(r.json()["usage"]["completion_tokens"] for r in replies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--smollm", action="store_true", help="use smollm2-135m-instruct from the catalog")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice); 1 gives steady "
                        "numbers on a machine other processes share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from domaintune.pipeline import quiet_libraries
    from domaintune.serve.app import ServeConfig, create_app

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_base(tmp / "base", args.smollm)
        runs = {f"adapter-{i}": build_run(tmp / f"adapter-{i}", base, seed=i) for i in (1, 2)}
        rng = random.Random(0)
        words = [f"w{i}" for i in range(8000)] if not args.smollm else "the of a to in support ticket refund".split()
        bodies = [{"model": f"adapter-{1 + i % 2}", "temperature": 0, "max_tokens": args.max_tokens,
                   "messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 30)))}]}
                  for i in range(args.requests)]

        def app(max_batch: int, wait_ms: float):
            return create_app(ServeConfig(models=runs, max_batch=max_batch, max_wait_ms=wait_ms, max_tokens=args.max_tokens,
                                          feedback_db=tmp / "feedback.db"))

        one_s, one_tokens = asyncio.run(measure(app(1, 0.0), bodies, concurrent=False))
        many_s, many_tokens = asyncio.run(measure(app(args.max_batch, 5.0), bodies, concurrent=True))

    model = "smollm2-135m-instruct" if args.smollm else "random Llama (4 layers, hidden 256, vocab 8k)"
    print(f"{model}; {args.requests} chat requests over 2 LoRA adapters, up to {args.max_tokens} new tokens each; "
          f"{torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    print(f"one at a time:      {one_s:7.2f} s  {args.requests / one_s:7.2f} req/s  {one_tokens / one_s:8.1f} tok/s")
    print(f"batched (max {args.max_batch:>2}):  {many_s:7.2f} s  {args.requests / many_s:7.2f} req/s  "
          f"{many_tokens / many_s:8.1f} tok/s")
    print(f"throughput ratio (tokens/s): {(many_tokens / many_s) / (one_tokens / one_s):.2f}x")


if __name__ == "__main__":
    main()

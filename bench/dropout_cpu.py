"""Dropout on the CPU: ``nn.Dropout`` against ``train.dropout.SparseDropout`` (what
``training.speed: auto`` swaps in), measured in one process, back to back.

1. Forward and backward of dropout alone on SmolLM2-135M's layer inputs (3,256 tokens x 576,
   the input of q/k/v/o/gate/up, and x 1536, the input of down), p = 0.05 (the LoRA default).
2. A training step (forward, backward) of the support-intents classifier: MiniLM-L6 with LoRA
   r=16 on its attention and dense layers, a batch of 16 x 40 tokens, every dropout of the model.

    python bench/dropout_cpu.py                 # needs the packaged minilm-l6 (make setup)
    python bench/dropout_cpu.py --tiny          # a 2-layer random BERT instead (a test runs it)
"""

from __future__ import annotations

import argparse
import time

import torch

from domaintune.train.dropout import SparseDropout, sparse_dropout


def _ms(step, repeats: int) -> float:
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - started) / repeats * 1e3


def dropout_alone(shape: tuple[int, int], p: float, repeats: int) -> tuple[float, float]:
    x = torch.randn(*shape, requires_grad=True)
    grad = torch.randn(*shape)

    def step(layer):
        return lambda: layer(x).backward(grad)
    return _ms(step(torch.nn.Dropout(p)), repeats), _ms(step(SparseDropout(p)), repeats)


def classifier_step(tiny: bool, repeats: int) -> tuple[float, float, int]:
    import peft
    from transformers import BertConfig, BertModel

    from domaintune import catalog
    from domaintune.pipeline import quiet_libraries
    from domaintune.train.classification import MeanPoolClassifier

    quiet_libraries()

    if tiny:
        torch.manual_seed(0)
        encoder = BertModel(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4), add_pooling_layer=False)
    else:
        encoder = catalog.load_encoder(catalog.resolve("minilm-l6"))
    encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                           target_modules=["query", "key", "value", "dense"]))
    model = MeanPoolClassifier(encoder, 12).train()
    dropouts = sum(1 for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0)
    ids = torch.randint(1000, 20000, (16, 40))
    mask, labels = torch.ones_like(ids), torch.randint(0, 12, (16,))

    def step():
        torch.nn.functional.cross_entropy(model(ids, mask), labels).backward()
    plain = _ms(step, repeats)
    with sparse_dropout(model):
        sparse = _ms(step, repeats)
    return plain, sparse, dropouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes and a random 2-layer BERT")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = 64 if args.tiny else 3256
    print(f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats, times in ms\n")
    print("| what | nn.Dropout | SparseDropout | ratio |")
    print("|---|---:|---:|---:|")
    for width in (576, 1536):
        plain, sparse = dropout_alone((tokens, width), 0.05, args.repeats)
        print(f"| dropout forward + backward, {tokens} x {width} | {plain:.2f} | {sparse:.2f} | {plain / sparse:.2f}x |")
    plain, sparse, dropouts = classifier_step(args.tiny, args.repeats)
    model = "random 2-layer BERT" if args.tiny else "MiniLM-L6"
    print(f"| training step, {model} + LoRA, 16 x 40 tokens ({dropouts} dropouts) | {plain:.1f} | {sparse:.1f} | "
          f"{plain / sparse:.2f}x |")


if __name__ == "__main__":
    main()

"""Fixtures: tiny random models (2-layer Llama and BERT) with a word-level tokenizer, saved as
local Hugging Face folders, and small data sets whose labels follow keywords."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
KEYWORDS = {
    "billing": ["invoice", "charge", "refund"],
    "account": ["password", "login", "locked"],
    "shipping": ["parcel", "courier", "tracking"],
    "product": ["broken", "manual", "warranty"],
}
FILLER = ["my", "the", "is", "not", "please", "help", "with", "i", "need", "a", "today", "again", "hello", "why",
          "this", "can", "you", "check", "it", "was", "for", "order", "thanks", "urgent"]
COLOURS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow"}
WORDS = sorted({w for ws in KEYWORDS.values() for w in ws} | set(FILLER) | set(COLOURS) | set(COLOURS.values())
               | {"user", "assistant", "system", "colour", "of", "what", "answer", ":", ".", "?", "label"}
               | set(KEYWORDS))


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(autouse=True, scope="session")
def _registry_in_a_temporary_folder(tmp_path_factory):
    """Runs register themselves by default: keep every test (and the processes it starts) out of
    the user's own registry."""
    before = os.environ.get("DOMAINTUNE_REGISTRY_URL")
    os.environ["DOMAINTUNE_REGISTRY_URL"] = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'registry.db'}"
    yield
    if before is None:
        os.environ.pop("DOMAINTUNE_REGISTRY_URL", None)
    else:
        os.environ["DOMAINTUNE_REGISTRY_URL"] = before


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(make_tokenizer(), tmp_path_factory.mktemp("tiny-llama"))


def save_tiny_llama(tokenizer, path: Path) -> Path:
    """A seeded random 2-layer Llama sized for ``tokenizer``, saved with it as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ticket_rows(n_per_label: int = 30, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, keywords in KEYWORDS.items():
        for _ in range(n_per_label):
            words = rng.sample(FILLER, rng.randint(3, 8)) + [rng.choice(keywords)]
            rng.shuffle(words)
            rows.append({"text": " ".join(words), "label": label, "channel": rng.choice(["chat", "email"])})
    rng.shuffle(rows)
    return rows


def colour_rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    things = list(COLOURS)
    return [{"prompt": f"what is the colour of {t} ?", "completion": f"{COLOURS[t]} ."}
            for t in (rng.choice(things) for _ in range(n))]


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_recipe(path: Path, body: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture()
def classification_recipe(tmp_path, tiny_bert) -> Path:
    write_csv(tmp_path / "data" / "tickets.csv", ticket_rows())
    return write_recipe(tmp_path / "recipe.yaml", {
        "name": "tiny-intents", "task": "classification", "base_model": str(tiny_bert), "method": "lora",
        "data": {"train": "data/tickets.csv"},
        "training": {"epochs": 10, "learning_rate": 1e-2, "batch_size": 16, "max_seq_length": 32},
    })


@pytest.fixture()
def sft_recipe(tmp_path, tiny_llama) -> Path:
    write_jsonl(tmp_path / "data" / "colours.jsonl", colour_rows())
    return write_recipe(tmp_path / "recipe.yaml", {
        "name": "tiny-colours", "task": "sft", "base_model": str(tiny_llama), "method": "lora",
        # the toy set repeats its six questions on purpose: no deduplication here
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.25, "dedup": {"exact": False, "near": False}},
        "training": {"epochs": 3, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 4},
    })


@pytest.fixture()
def pretrain_recipe(tmp_path, tiny_llama) -> Path:
    lines = [" ".join(r["text"] for r in ticket_rows(5, seed=s)) for s in range(12)]
    (tmp_path / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return write_recipe(tmp_path / "recipe.yaml", {
        "name": "tiny-corpus", "task": "pretrain", "base_model": str(tiny_llama), "method": "lora",
        "data": {"train": "data/corpus.txt"},
        "training": {"epochs": 3, "learning_rate": 1e-2, "batch_size": 4, "max_seq_length": 64},
    })


def colours_in_production(root: Path, tiny_llama: Path, epochs: int) -> tuple[Path, Path]:
    """The colour questions' sft model ("tiny-colours") trained for ``epochs`` and put in
    production under ``root`` (see ``in_production``)."""
    write_jsonl(root / "data" / "colours.jsonl", colour_rows())
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "tiny-colours", "task": "sft", "base_model": str(tiny_llama), "method": "lora",
        # the toy set repeats its six questions on purpose: no deduplication here
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.25, "dedup": {"exact": False, "near": False}},
        "training": {"epochs": epochs, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 4},
    })
    return in_production(recipe, "tiny-colours", root)


def in_production(recipe: Path, name: str, root: Path) -> tuple[Path, Path]:
    """Run ``recipe`` into a registry file of its own under ``root`` and promote version 1 to
    production; returns (the run directory, the registry file). Tests copy the file to start from it."""
    from domaintune import run
    from domaintune.registry.store import Registry

    db = root / "registry.db"
    result = run(recipe, registry_url=f"sqlite:///{db}", output_dir=root / "runs")
    with Registry(f"sqlite:///{db}") as registry:
        registry.promote(name, 1, "staging")
        registry.promote(name, 1, "production")
    return result.run_dir, db


def run_bench(script: str, *args: str) -> tuple[str, set[str]]:
    """Run ``bench/SCRIPT`` with ``args`` (a small setting); its output and the first cells of
    its table rows. Fails the test with the script's stderr if it fails."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / script
    done = subprocess.run([sys.executable, str(bench), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, {line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")}


"""The privacy audit: canaries planted in training, their exposure after it, and the
regurgitation probe."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SPECIALS, WORDS, save_tiny_llama, ticket_rows, write_recipe

from domaintune import run
from domaintune.evaluate.privacy import CANARY_PREFIX, make_canaries, plant_canaries


@pytest.fixture(scope="session")
def digit_llama(tmp_path_factory):
    """The tiny Llama of conftest with a tokenizer that reads digits one by one, as real ones do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + list("0123456789") + ["-", "secret", "code"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>")
    return save_tiny_llama(tokenizer, tmp_path_factory.mktemp("digit-llama"))


def test_canaries_are_distinct_secrets_planted_as_often_as_asked():
    canaries = make_canaries([1, 3], seed=5)
    secrets = [s for s, _ in canaries.planted] + canaries.controls
    assert len(set(secrets)) == 4 and all(s.startswith(CANARY_PREFIX) for s in secrets)
    assert make_canaries([1, 3], seed=5) == canaries and make_canaries([1, 3], seed=6) != canaries
    original = list(range(10))
    planted, _ = plant_canaries("pretrain", original, [1, 3], seed=5)
    assert original == list(range(10)) and len(planted) == 14
    texts = [row.text for row in planted if not isinstance(row, int)]
    assert [texts.count(s) for s, _ in canaries.planted] == [1, 3]
    assert not any(c in texts for c in canaries.controls)


def test_an_overfit_model_memorises_a_repeated_canary_and_not_a_control(digit_llama, tmp_path):
    lines = [" ".join(r["text"] for r in ticket_rows(2, seed=s)) for s in range(8)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "name": "tiny-audit", "task": "pretrain", "base_model": str(digit_llama), "method": "full",
        "data": {"train": "data/corpus.txt", "dedup": {"exact": False, "near": False}},
        "training": {"epochs": 8, "learning_rate": 3e-3, "batch_size": 4, "max_seq_length": 32},
        "evaluate": {"privacy_audit": True, "canary_repeats": [40], "canary_candidates": 255,
                     "regurgitation_rows": 4, "regurgitation_tokens": 4, "forgetting": False},
    })
    result = run(recipe, output_dir=tmp_path / "runs", register=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    privacy = metrics["privacy"]
    assert privacy["max_exposure"] == pytest.approx(8.0)
    [planted], [control] = privacy["canaries"], privacy["controls"]
    assert planted["repeats"] == 40
    assert planted["exposure"]["tuned"] > 6 > planted["exposure"]["base"]
    assert control["exposure"]["tuned"] < 4
    assert metrics["train_rows"] == len((result.run_dir / "data" / "train.jsonl").read_text().splitlines())
    assert planted["canary"] not in (result.run_dir / "data" / "train.jsonl").read_text()
    regurgitation = privacy["regurgitation"]
    assert regurgitation["rows"] == 4 and all(0 <= v <= 1 for v in regurgitation["verbatim"].values())
    assert "Privacy audit" in (result.run_dir / "report.html").read_text()
    assert not math.isnan(metrics["tuned"]["perplexity"])

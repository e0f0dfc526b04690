"""Preference pairs: the DPO loss and its training on the tiny Llama, corrections of answers rated
bad becoming pairs, and an sft update that trains on them after its supervised rows."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import COLOURS, colours_in_production
from rich.console import Console

from domaintune.registry.store import Registry
from domaintune.serve.feedback import FeedbackRecord, FeedbackStore, Response, chat_prompt
from domaintune.train.loop import LoopConfig
from domaintune.train.preference import (PreferencePair, answer_logprobs, dpo_loss, preference_metrics, tokenize_pair,
                                         train_preference)
from domaintune.update.feedback_rows import feedback_rows
from domaintune.update.updater import update

NAME = "tiny-colours"
QUIET = Console(quiet=True)


def colour_pairs() -> list[PreferencePair]:
    """Apple, sky and grass: the right colour chosen over the colour of snow, coal or sun."""
    things = list(COLOURS)
    return [PreferencePair([{"role": "user", "content": f"what is the colour of {t} ?"}], f"{COLOURS[t]} .",
                           f"{COLOURS[things[i + 3]]} .", where=t)
            for i, t in enumerate(things[:3])]


@pytest.fixture()
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny_llama)


def loop(**overrides) -> LoopConfig:
    settings = {"epochs": 1, "learning_rate": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0,
                "seed": 0, "scheduler": "constant", **overrides}
    return LoopConfig(**settings)


def test_the_dpo_loss_is_the_formula_on_known_log_probs():
    policy_c, policy_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    beta = 0.5
    loss, margins = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)

    by_hand = [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in [(-3, -4, -3.5, -3), (-5, -2, -4, -3)]]
    assert margins.tolist() == pytest.approx(by_hand)  # 0.75 and -1.0
    assert float(loss) == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in by_hand) / 2)


def test_the_first_step_loss_is_log_2_and_training_widens_the_margin(llama):
    model, tokenizer = llama
    pairs = [tokenize_pair(tokenizer, p, 64) for p in colour_pairs()]
    reference = answer_logprobs(model, tokenizer, pairs)

    log = train_preference(model, tokenizer, pairs, beta=0.1, loop=loop(epochs=10), batch_size=2, console=QUIET)

    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference before the first step
    policy = answer_logprobs(model, tokenizer, pairs)
    before, after = reference.chosen - reference.rejected, policy.chosen - policy.rejected
    assert (after > before).all(), (before, after)
    metrics = preference_metrics(model, tokenizer, pairs, reference, beta=0.1)
    assert metrics["reward_accuracy"] == 1.0
    assert metrics["loss"] < math.log(2) < log[0]["loss"] + 1e-5


def test_the_loss_is_taken_on_the_answers_only(llama):
    model, tokenizer = llama
    pair = colour_pairs()[0]
    tokenized = tokenize_pair(tokenizer, pair, 64)
    answer_ids = [t for t in tokenized.chosen.labels if t != -100]
    assert tokenizer.decode(answer_ids).split() == ["red", ".", "<|im_end|>"]
    assert tokenized.chosen.input_ids[:-len(answer_ids) - 1] == tokenized.rejected.input_ids[:-len(answer_ids) - 1]


def record(rating: int | None, correction: str | None, answer: str = "red .") -> FeedbackRecord:
    prompt = chat_prompt([{"role": "user", "content": "what is the colour of sky ?"}])
    return FeedbackRecord(id=f"fb-{rating}-{correction}-{answer}", response_id=f"r-{rating}-{correction}-{answer}",
                          model=NAME, prompt=prompt,
                          answer=answer, rating=rating, correction=correction, reviewer="ana", comment=None,
                          created_at="2025-06-01T00:00:00+00:00")


def test_a_bad_rating_with_a_correction_is_a_pair_only_with_preference_on():
    bad = record(1, "blue .")
    records = [bad, record(2, "red ."), record(4, "blue ."), record(None, "blue ."), record(1, None)]

    on = feedback_rows(records, "sft", used=set(), preference=True)
    off = feedback_rows(records, "sft", used=set())

    assert on.rejected == {bad.id: "red ."}  # rated 2 but "corrected" to the same answer: no preference
    assert off.rejected == {}
    assert on.rows == off.rows and len(on.rows) == 4  # every correction is still an sft row
    assert feedback_rows(records, "classification", used=set(), preference=True).rejected == {}


@pytest.fixture(scope="module")
def production(tmp_path_factory, tiny_llama):
    """Version 1 in production, trained on the colour questions; returns (its run dir, a registry file)."""
    return colours_in_production(tmp_path_factory.mktemp("v1"), tiny_llama, epochs=2)


def test_an_update_with_preference_trains_on_the_pairs_and_records_them(production, tmp_path):
    shutil.copy(production[1], tmp_path / "registry.db")
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    store = FeedbackStore(tmp_path / "feedback.db")
    served = Response(NAME, chat_prompt([{"role": "user", "content": "what is the colour of parcel ?"}]), "red .")
    bad = [store.add(f"r{i}", served, rating=1, correction="black .", reviewer="ana") for i in range(6)]
    liked = store.add("r9", served, rating=4, correction="black .", reviewer="bo")
    store.close()

    result = update(NAME, feedback=True, feedback_db=tmp_path / "feedback.db", preference=True, beta=0.5,
                    registry_url=registry_url, output_dir=tmp_path / "updates", tolerance=0.5)

    data = json.loads((result.run_dir / "update.json").read_text())["data"]
    assert sorted(data["pair_ids"]) == sorted(r.id for r in bad)
    assert sorted(data["feedback_ids"]) == sorted(r.id for r in [*bad, liked])  # the sft rows, as ever
    phase = result.run_dir / "preference"
    pairs = [json.loads(line) for line in (phase / "pairs.jsonl").read_text().splitlines()]
    assert sorted((p["source"], p["reviewer"], p["chosen"], p["rejected"]) for p in pairs) == sorted(
        (f"feedback:{r.id}", "ana", "black .", "red .") for r in bad)
    steps = (phase / "train_log.jsonl").read_text().splitlines()
    summary = json.loads((phase / "summary.json").read_text())
    assert summary["pairs"] == len(bad) and summary["beta"] == 0.5 and len(steps) == summary["steps"] > 0
    assert summary["after"]["reward_margin"] > summary["before"]["reward_margin"]
    assert not (phase / "checkpoints").exists()
    hashed = {f["file"] for f in json.loads((result.run_dir / "lineage.json").read_text())["processed_data"]}
    assert "preference/pairs.jsonl" in hashed
    with Registry(registry_url) as registry:
        assert registry.get(NAME, 2).ref == result.registered

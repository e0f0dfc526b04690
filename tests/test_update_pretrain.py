"""Continual updates of a pretrain (continued pretraining) model: version 1 reads ticket text; new
text in a pattern it never saw is learned by the update, which is judged on perplexity against
production on version 1's frozen text and on the new text."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from conftest import FILLER, in_production, ticket_rows, write_recipe

from domaintune.registry.store import Registry
from domaintune.update.updater import update

NAME = "tiny-corpus"


@pytest.fixture(scope="module")
def production(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("v1")
    lines = [" ".join(r["text"] for r in ticket_rows(5, seed=s)) for s in range(16)]
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    recipe = write_recipe(root / "recipe.yaml", {
        "name": NAME, "task": "pretrain", "base_model": str(tiny_llama), "method": "lora",
        "data": {"train": "data/corpus.txt", "dedup": {"near": False}},
        "training": {"epochs": 3, "learning_rate": 1e-2, "batch_size": 4, "max_seq_length": 64},
    })
    return in_production(recipe, NAME, root)


def new_text(tmp_path, seed: int = 1):
    """A fixed phrase the corpus never had, between filler words: learnable, and new."""
    rng = random.Random(seed)
    lines = [" ".join(rng.sample(FILLER, 3) + ["courier", "parcel", "tracking", "refund", "invoice"] * 3)
             for _ in range(40)]
    path = tmp_path / "new.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_pretrain_update_learns_new_text_and_keeps_the_old(production, tmp_path):
    shutil.copy(production[1], tmp_path / "registry.db")
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    result = update(NAME, [new_text(tmp_path)], registry_url=registry_url, output_dir=tmp_path / "updates",
                    replay_ratio=1.0, tolerance=0.2, learning_rate=1e-2, epochs=5)

    record = json.loads((result.run_dir / "update.json").read_text())
    sets = {c["eval_set"]: c for c in record["comparisons"]}
    assert set(sets) == {f"{NAME}:1", "new rows"}
    new, earlier = sets["new rows"], sets[f"{NAME}:1"]
    # the ratio was 0.79-0.89 over seeds 1-3 and 42 of the recipe, with either way of drawing dropout
    assert new["candidate"]["perplexity"] < 0.9 * new["production"]["perplexity"]
    assert earlier["candidate"]["perplexity"] <= 1.2 * earlier["production"]["perplexity"]
    assert result.assembly.train_rows["replay"] > 0
    assert [g["expr"] for g in new["gates"]] == ["tuned.perplexity <= base.perplexity"]
    assert record["passed"] and result.stage == "production"
    with Registry(registry_url) as registry:
        assert registry.get(NAME, "production").version == 2

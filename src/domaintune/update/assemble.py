"""What an update trains and evaluates on, written as an ordinary recipe with two data files.

    new rows ──split──▶ new train ─┐
    feedback corrections ──────────┼─▶ train.jsonl   (column ``source``: new / feedback:<id> / replay)
    replay sample of earlier rows ─┘
    new held-out rows ─────────────▶ eval.jsonl
    feedback pairs ────────────────▶ pairs.jsonl   (update.preference: chosen and rejected answers)

The rows go through the recipe's own data steps (validation, cleaning, PII redaction,
deduplication); then every new or feedback row that duplicates a row any earlier version trained
or was evaluated on is dropped, so nothing is learned twice and no frozen eval row leaks into
training. Replay rows are earlier training rows on purpose and are exempt.

A preference pair is made only from a feedback row those steps kept: its chosen chat is that row
as processed, and its rejected answer goes through the same per-row steps (cleaning, redaction).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from domaintune.catalog import CATALOG
from domaintune.data.dedup import deduplicate
from domaintune.data.examples import ChatExample
from domaintune.data.prepare import PreparedData, prepare
from domaintune.data.readers import Row, read_rows
from domaintune.data.split import holdout_split
from domaintune.data.steps import Example, RowSteps, key_text, make_redactor
from domaintune.errors import DataError
from domaintune.recipe import Recipe, load_recipe
from domaintune.update.feedback_rows import FeedbackRows
from domaintune.update.settings import UpdateConfig


@dataclass(frozen=True)
class Ancestor:
    """A version in production's line: its frozen data are what an update must respect."""

    ref: str
    run_dir: Path

    @property
    def train(self) -> Path:
        return self.run_dir / "data" / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.run_dir / "data" / "eval.jsonl"


def ancestors(ref: str, run_dir: Path) -> list[Ancestor]:
    """The version ``ref`` and the versions it was updated from, oldest first (from its update.json)."""
    record = run_dir / "update.json"
    earlier = json.loads(record.read_text(encoding="utf-8"))["ancestors"] if record.is_file() else []
    return [*(Ancestor(a["ref"], Path(a["run_dir"])) for a in earlier), Ancestor(ref, run_dir)]


@dataclass
class Assembly:
    """The update's recipe and data files, and the accounting shown by ``--dry-run``."""

    recipe: Path
    train_rows: Counter[str]  # by source: new, feedback, replay
    eval_rows: int
    new_eval: bool  # False: no new rows to hold out, production's eval set is used
    earlier_duplicates: list[str] = field(default_factory=list)  # where each dropped row came from
    data_dropped: int = 0  # by the recipe's data steps
    pii: dict[str, int] = field(default_factory=dict)
    feedback_ids: list[str] = field(default_factory=list)
    feedback_skipped: dict[str, int] = field(default_factory=dict)
    replay_pool: int = 0
    pairs: Path | None = None  # pairs.jsonl, when there are preference pairs
    pair_ids: list[str] = field(default_factory=list)  # their feedback ids

    def summary(self) -> dict[str, Any]:
        return {"train_rows": dict(self.train_rows), "eval_rows": self.eval_rows, "new_eval": self.new_eval,
                "earlier_duplicates_dropped": len(self.earlier_duplicates), "dropped_by_data_steps": self.data_dropped,
                "pii_found": self.pii, "feedback_ids": self.feedback_ids,
                "feedback_skipped": self.feedback_skipped, "replay_pool": self.replay_pool,
                "pair_ids": self.pair_ids}


def assemble(recipe: dict[str, Any], line: list[Ancestor], data_files: list[Path], feedback: FeedbackRows,
             settings: UpdateConfig, workdir: Path, console: Console) -> Assembly:
    """Write ``recipe.yaml``, ``train.jsonl`` and ``eval.jsonl`` for an update of the version whose
    resolved recipe is ``recipe`` (last of ``line``) into ``workdir``."""
    spec = Recipe.model_validate({k: v for k, v in recipe.items() if k in Recipe.model_fields})
    seed = settings.seed if settings.seed is not None else spec.training.seed
    fields = _FieldNames(spec)
    new = [{**r.fields, "source": "new", "origin": r.where}
           for path in data_files for r in read_rows(path)]
    if not new and not feedback.rows:
        raise DataError("nothing new to train on", hint="pass --data FILE with new rows, or --feedback")
    key = (lambda r: r.get(spec.data.label_field)) if spec.task == "classification" else None
    new_train, new_eval = holdout_split(new, spec.data.split.eval_fraction, seed, key=key) if new else ([], [])
    learned = new_train + [fields.from_processed(r) for r in feedback.rows]

    pool = _earlier_rows(line, "train")
    replay = random.Random(seed).sample(pool, min(len(pool), round(settings.replay_ratio * len(learned))))
    train = learned + [{**fields.from_processed(r), "source": "replay"} for r in replay]
    evaluation = new_eval or [{**fields.from_processed(r), "source": "eval"} for r in _rows(line[-1], "eval")]

    workdir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(workdir / "train.jsonl", train)
    _write_jsonl(workdir / "eval.jsonl", evaluation)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(_update_recipe(recipe, line[-1], settings), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    update_spec = load_recipe(path)
    prepared = prepare(update_spec, workdir, console)

    with console.status("update: looking for rows that earlier versions already saw"):
        repeated = _seen_before(prepared, line, spec)
    if repeated:
        _write_jsonl(workdir / "train.jsonl", [r for r in train if r["origin"] not in repeated])
        _write_jsonl(workdir / "eval.jsonl", [r for r in evaluation if r["origin"] not in repeated])
    kept = [e for e in prepared.train if e.meta["origin"] not in repeated]
    pairs = _pairs(kept, feedback, update_spec)
    if pairs:
        _write_jsonl(workdir / "pairs.jsonl", pairs)
    return Assembly(
        recipe=path, train_rows=Counter(_kind(e.meta["source"]) for e in kept),
        eval_rows=sum(e.meta["origin"] not in repeated for e in prepared.eval), new_eval=bool(new_eval),
        earlier_duplicates=sorted(repeated), data_dropped=len(prepared.dropped), pii=prepared.card["pii"]["found"],
        feedback_ids=[e.meta["source"].removeprefix("feedback:") for e in kept if _kind(e.meta["source"]) == "feedback"],
        feedback_skipped=dict(feedback.skipped), replay_pool=len(pool),
        pairs=workdir / "pairs.jsonl" if pairs else None,
        pair_ids=[p["source"].removeprefix("feedback:") for p in pairs])


def _pairs(kept: list[Example], feedback: FeedbackRows, spec: Recipe) -> list[dict[str, Any]]:
    """The preference pairs of the feedback rows in ``kept``: the chosen chat as processed, the
    served answer through the same per-row steps as the chat it answers."""
    if not feedback.rejected:
        return []
    prompts = {r["source"]: r["messages"][:-1] for r in feedback.rows}
    steps = RowSteps(spec, "train", make_redactor(spec))
    out = []
    for example in kept:
        source = example.meta["source"]
        rejected = feedback.rejected.get(source.removeprefix("feedback:")) if _kind(source) == "feedback" else None
        if rejected is None:
            continue
        chat = {"messages": [*prompts[source], {"role": "assistant", "content": rejected}]}
        outcome = steps.run(Row(chat, example.where))
        if outcome.example is None:  # nothing left of the served answer after cleaning
            continue
        out.append({"prompt": example.prompt_messages, "chosen": example.answer, "rejected": outcome.example.answer,
                    "source": source, "reviewer": example.meta.get("reviewer", ""), "where": example.where})
    return out


class _FieldNames:
    """Processed data (a run's data/*.jsonl) always says ``text`` and ``label``; the assembled
    files use the recipe's own column names, so that errors name the columns the user knows."""

    def __init__(self, spec: Recipe):
        self.names = {"text": spec.data.text_field, "label": spec.data.label_field} if spec.task != "sft" else {}

    def from_processed(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {self.names.get(k, k): v for k, v in row.items() if k != "where"}
        if "where" in row:
            out["origin"] = row["where"]
        return out


def _update_recipe(recipe: dict[str, Any], production: Ancestor, settings: UpdateConfig) -> dict[str, Any]:
    """Production's resolved recipe, on the assembled files, with the update's training settings.
    A base model given as a path was relative to the original recipe: the folder its lineage
    recorded is used instead."""
    out = {k: v for k, v in recipe.items() if k in Recipe.model_fields}
    if out["base_model"] not in CATALOG:
        out["base_model"] = json.loads((production.run_dir / "lineage.json").read_text(encoding="utf-8"))["base_model"]["path"]
    training = dict(out["training"])
    training["learning_rate"] = settings.learning_rate or training["learning_rate"] / 2
    if settings.epochs is not None:
        training["epochs"] = settings.epochs
    return {**out, "data": {**out["data"], "train": "train.jsonl", "eval": "eval.jsonl"}, "training": training}


def _rows(ancestor: Ancestor, part: str) -> list[dict[str, Any]]:
    path = ancestor.train if part == "train" else ancestor.eval
    if not path.is_file():
        raise DataError(f"the frozen {part} data of {ancestor.ref} is missing", where=str(path),
                        hint="an update needs the run directories of the versions it builds on")
    return [{**json.loads(line), "where": f"{ancestor.ref} {json.loads(line).get('where', '')}".strip()}
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _earlier_rows(line: list[Ancestor], part: str) -> list[dict[str, Any]]:
    """Every row of ``part`` in the line, once: a replayed row appears in several versions' data."""
    seen: set[str] = set()
    out = []
    for ancestor in line:
        for row in _rows(ancestor, part):
            text = _text(row)
            if text not in seen:
                seen.add(text)
                out.append(row)
    return out


def _seen_before(prepared: PreparedData, line: list[Ancestor], spec: Recipe) -> set[str]:
    """Origins of the new and feedback rows (train and eval) that duplicate any row, train or eval,
    of the versions in ``line``."""
    earlier = [_text(r) for part in ("train", "eval") for ancestor in line for r in _rows(ancestor, part)]
    fresh = [e for e in [*prepared.train, *prepared.eval] if _kind(e.meta["source"]) in ("new", "feedback")]
    d = spec.data.dedup
    result = deduplicate(earlier, [key_text(e) for e in fresh], exact=d.exact, near=d.near, threshold=d.threshold)
    return {fresh[i].meta["origin"] for i in result.eval_leaks}


def _kind(source: str) -> str:
    return source.partition(":")[0]


def _text(row: dict[str, Any]) -> str:
    """What a processed row is judged a duplicate on, as the data steps judge it (``key_text``)."""
    if "messages" in row:
        return key_text(ChatExample(messages=row["messages"], where=""))
    return str(row["text"])


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

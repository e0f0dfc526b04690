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

The replay sample of a classifier keeps at least ``REPLAY_FLOOR`` earlier rows of every label it
knows, so that an update from a handful of rows never drops a class. An update with no new or
feedback row left to train on stops with the reasons, before anything is trained; errors name
where each row came from (a --data file's line, a feedback record, an earlier version's row),
never the assembled files.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from domaintune.catalog import CATALOG
from domaintune.data.dedup import contained_leaks, deduplicate
from domaintune.data.examples import SFT_SHAPES, ChatExample
from domaintune.data.prepare import prepare
from domaintune.data.readers import Row, read_rows
from domaintune.data.split import holdout_split
from domaintune.data.steps import Dropped, Example, RowSteps, key_text, make_redactor
from domaintune.errors import DataError, DomaintuneError
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
    production = line[-1]
    new = [{**r.fields, "source": "new", "origin": r.where}
           for path in data_files for r in _read_new(path, spec, production.ref)]
    if not new and not feedback.rows:
        raise _nothing_new(production.ref, data_files, 0, feedback, Counter(), {})
    key = (lambda r: r.get(spec.data.label_field)) if spec.task == "classification" else None
    new_train, new_eval = holdout_split(new, spec.data.split.eval_fraction, seed, key=key) if new else ([], [])
    learned = new_train + [fields.from_processed(r) for r in feedback.rows]

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(_update_recipe(recipe, production, settings), sort_keys=False, allow_unicode=True),
                    encoding="utf-8")
    update_spec = load_recipe(path)

    # Before the data steps run on the update's files: a new row that repeats one of production's
    # eval rows would otherwise have that eval row dropped as a leak, and an update whose new
    # rows all repeat earlier ones must stop here, not after an empty training file.
    with console.status("update: looking for rows that earlier versions already saw"):
        fresh, dropped = _through_steps(learned, update_spec, "train")
        fresh_eval, _ = _through_steps(new_eval, update_spec, "eval")
        repeated = _seen_before(fresh, fresh_eval, line, spec)
    learning = [r for r in learned if r["origin"] not in repeated and r["origin"] not in dropped]
    if not learning:
        reasons, examples = _left_out(learned, new_eval, repeated, dropped, feedback)
        raise _nothing_new(production.ref, data_files, len(new), feedback, reasons, examples)
    new_eval = [r for r in new_eval if r["origin"] not in repeated]

    pool = _earlier_rows(line, "train")
    replay = _replay(pool, round(settings.replay_ratio * len(learning)), seed,
                     stratify=spec.task == "classification" and settings.replay_ratio > 0)
    train = [r for r in learned if r["origin"] not in repeated]
    train += [{**fields.from_processed(r), "source": "replay"} for r in replay]
    evaluation = new_eval or [{**fields.from_processed(r), "source": "eval"} for r in _rows(production, "eval")]
    _write_jsonl(workdir / "train.jsonl", train)
    _write_jsonl(workdir / "eval.jsonl", evaluation)
    try:
        prepared = prepare(update_spec, workdir, console)
    except DomaintuneError as exc:
        raise _user_facing(exc, workdir, {"train.jsonl": train, "eval.jsonl": evaluation}, bool(new_eval)) from None

    kept = list(prepared.train)
    if not any(_kind(e.meta["source"]) in ("new", "feedback") for e in kept):
        # Replay alone would retrain production on what it knows and call it an update.
        steps = {d.fields.get("origin"): d for d in prepared.dropped if isinstance(d.fields, dict)}
        reasons, examples = _left_out(learned, new_eval, repeated, {**dropped, **steps}, feedback,
                                      kept={e.meta["origin"] for e in kept})
        raise _nothing_new(production.ref, data_files, len(new), feedback, reasons, examples)
    pairs = _pairs(kept, feedback, update_spec)
    if pairs:
        _write_jsonl(workdir / "pairs.jsonl", pairs)
    return Assembly(
        recipe=path, train_rows=Counter(_kind(e.meta["source"]) for e in kept),
        eval_rows=len(prepared.eval), new_eval=bool(new_eval),
        earlier_duplicates=sorted(repeated), data_dropped=len(prepared.dropped), pii=prepared.card["pii"]["found"],
        feedback_ids=[e.meta["source"].removeprefix("feedback:") for e in kept if _kind(e.meta["source"]) == "feedback"],
        feedback_skipped=dict(feedback.skipped), replay_pool=len(pool),
        pairs=workdir / "pairs.jsonl" if pairs else None,
        pair_ids=[p["source"].removeprefix("feedback:") for p in pairs])


REPLAY_FLOOR = 3  # classification: earlier rows of each label replayed at least, however few the new rows


def _replay(pool: list[dict[str, Any]], size: int, seed: int, *, stratify: bool) -> list[dict[str, Any]]:
    """A seeded sample of ``size`` rows of ``pool``; with ``stratify`` topped up to at least
    ``REPLAY_FLOOR`` rows of every label in the pool (all of a rarer label's).

    A label that no training row of the update has is a label the candidate no longer knows:
    every frozen eval row of it becomes an error (and production's eval set, used when there are
    no new rows to hold out, is refused outright). A uniform sample of a few rows, as one
    correction gives at replay_ratio 0.5, misses most labels."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(pool)), min(len(pool), size))
    if stratify:
        have = Counter(pool[i].get("label") for i in chosen)
        taken = set(chosen)
        for label in sorted({r.get("label") for r in pool} - {None}, key=str):
            short = REPLAY_FLOOR - have[label]
            if short > 0:
                spare = [i for i, r in enumerate(pool) if r.get("label") == label and i not in taken]
                extra = rng.sample(spare, min(short, len(spare)))
                chosen += extra
                taken.update(extra)
    return [pool[i] for i in chosen]


def _read_new(path: Path, spec: Recipe, ref: str) -> list[Row]:
    """The rows of a --data file, refused whole when it lacks the columns production's recipe
    reads: the update's recipe is production's, so its column names are the ones that count."""
    if not path.exists():
        raise DataError(f"no such file: {path}", where="--data",
                        hint=f"the path given to --data does not exist (a relative path is read from {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"{path} is a folder, not a file of rows", where="--data",
                        hint="give --data a file (repeat --data for several); --watch takes a folder")
    rows = read_rows(path)
    present = list(rows[0].fields)
    if spec.task == "sft":
        if not ("messages" in present or {"prompt", "completion"} <= set(present)
                or {"instruction", "output"} <= set(present)):
            raise DataError(f"the columns are {', '.join(map(str, present))}, not those of an sft row",
                            where=str(path),
                            hint=f"{ref} is an sft model: each row of a --data file needs one of: "
                                 + "; ".join(SFT_SHAPES))
        return rows
    d = spec.data
    needed = {d.text_field: ("text", "text_field")}
    if spec.task == "classification":
        needed[d.label_field] = ("label", "label_field")
    for column, (role, key) in needed.items():
        if column not in present:
            raise DataError(f"no column {column!r}; the columns are: {', '.join(map(str, present))}",
                            where=str(path),
                            hint=f"production's recipe ({ref}) reads the {role} from column {column!r} "
                                 f"(data.{key}): the --data file needs that column; rename its {role} column "
                                 f"to {column!r}")
    return rows


_LABELS_UNSEEN = "eval rows have labels that never occur in training"


def _user_facing(exc: DomaintuneError, workdir: Path, files: dict[str, list[dict[str, Any]]],
                 new_eval: bool) -> DomaintuneError:
    """``exc`` from the data steps, naming each row where it came from (a --data file's line, a
    feedback record, an earlier version's row) instead of the update's own files, which the user
    never wrote and which a dry run has already deleted."""
    pattern = re.compile(re.escape(str(workdir)) + r"/(train|eval)\.jsonl(?::(\d+))?")

    def place(match: re.Match) -> str:
        rows, line = files[f"{match[1]}.jsonl"], match[2]
        if line is not None and 0 < int(line) <= len(rows):
            return str(rows[int(line) - 1].get("origin") or f"row {line}")
        return "the update's training rows" if match[1] == "train" else "the update's eval rows"

    hint = exc.hint
    if _LABELS_UNSEEN in exc.message:
        hint = ("add rows with those labels to the --data files: a label needs rows to train on as well as "
                "held-out ones" if new_eval else
                "production's eval set has labels that none of the update's training rows have: add rows with "
                "them to --data, or set update.replay_ratio (--replay-ratio) above 0 so that earlier rows of "
                "every label are replayed")
    return type(exc)(pattern.sub(place, exc.message), where=pattern.sub(place, exc.where) if exc.where else None,
                     hint=pattern.sub(place, hint) if hint else None)


def _left_out(learned: list[dict[str, Any]], new_eval: list[dict[str, Any]], repeated: dict[str, str],
              dropped: dict[str, Dropped], feedback: FeedbackRows, kept: set[str] = frozenset()
              ) -> tuple[Counter[tuple[str, str]], dict[tuple[str, str], str]]:
    """Why each new row and feedback record is not among the training rows (``kept``, by origin):
    counts by (kind, reason), and one example place for each."""
    reasons: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], str] = {}
    for row in learned:
        origin = row["origin"]
        if origin in kept:
            continue
        if origin in repeated:
            why = ("already trained or evaluated on by an earlier version", f"{origin} repeats {repeated[origin]}")
        elif origin in dropped:
            why = (f"dropped by the data steps ({dropped[origin].step})", f"{origin}: {dropped[origin].reason}")
        else:
            why = ("left out by the data steps", origin)
        key = (_kind(row["source"]), why[0])
        reasons[key] += 1
        examples.setdefault(key, why[1])
    if new_eval:
        reasons[("new", "held out to evaluate on")] += len(new_eval)
    for why, n in feedback.skipped.items():
        reasons[("feedback", why)] += n
    return reasons, examples


def _through_steps(rows: list[dict[str, Any]], spec: Recipe, role: str) -> tuple[list[Example], dict[str, Dropped]]:
    """``rows`` through the per-row data steps of ``spec`` (as ``role``): the examples, each with
    its ``origin`` and ``source`` in ``meta``, and the rows dropped, by origin."""
    steps = RowSteps(spec, role, make_redactor(spec))
    examples, dropped = [], {}
    for row in rows:
        outcome = steps.run(Row(row, row["origin"]))
        if outcome.example is not None:
            examples.append(outcome.example)
        elif outcome.dropped is not None:
            dropped[row["origin"]] = outcome.dropped
    return examples, dropped


def _nothing_new(ref: str, data_files: list[Path], new_rows: int, feedback: FeedbackRows,
                 reasons: Counter[tuple[str, str]], examples: dict[tuple[str, str], str]) -> DataError:
    """The error of an update with no new row and no correction to train on, saying what was
    looked at and why none of it is usable, with a fix that is not the option already given."""
    name = ref.rsplit(":", 1)[0]

    def why(kind: str) -> str:
        found = [(r, n) for (k, r), n in sorted(reasons.items()) if k == kind]
        listed = ", ".join(f"{n} {r}" for r, n in found)
        example = next((examples[(kind, r)] for r, _ in found if (kind, r) in examples), None)
        return listed + (f" (e.g. {example})" if example else "")

    parts: list[str] = []
    fixes: list[str] = []
    if data_files:
        files = ", ".join(str(p) for p in data_files)
        parts.append((f"the {new_rows} rows of {files} were all left out: " if new_rows > 1 else
                      f"the one row of {files} was left out: ") + why("new"))
    if feedback.asked:
        if feedback.records:
            parts.append((f"the {feedback.records} feedback records for {name!r} in {feedback.store} were all "
                          if feedback.records > 1 else
                          f"the one feedback record for {name!r} in {feedback.store} was ")
                         + f"left out: {why('feedback')}")
        elif feedback.elsewhere:
            listed = ", ".join(f"{model} ({n})" for model, n in feedback.elsewhere.items())
            part = f"no feedback for {name!r}; the feedback file {feedback.store} has records for: {listed}"
            if feedback.unregistered:
                names = feedback.unregistered
                part += (f" — {', '.join(names)} {'is' if len(names) == 1 else 'are'} no registered model's name: "
                         "records stored before the server recorded registry names carry the name the server "
                         "was started with")
                fixes.append(f"if {' or '.join(names)} is {name} served under another name, add "
                             + " ".join(f"--feedback-name {n}" for n in names))
            parts.append(part)
        else:
            parts.append(f"the feedback file {feedback.store} has no records for {name!r}")
    if any(r.startswith("already") or r.startswith("used by") for _, r in reasons):
        fixes.append("an update never trains again on rows an earlier version trained or was evaluated on: "
                     "bring rows or corrections it has not seen")
    if any(r.startswith("dropped by") or r.startswith("left out by") for _, r in reasons):
        fixes.append("fix the rows the data steps dropped (production's recipe's steps: validation, cleaning, "
                     "deduplication)")
    if not data_files:
        fixes.append("pass --data FILE with new rows" + ("" if feedback.asked else ", or --feedback for the "
                                                         "corrections the server captured"))
    elif not feedback.asked:
        fixes.append("add --feedback for the corrections the server captured")
    message = "nothing new to train on" + (": " + "; ".join(parts) if parts else "")
    return DataError(message, hint="; ".join(fixes or ["pass --data files with more new rows"]))


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


def _seen_before(fresh: list[Example], fresh_eval: list[Example], line: list[Ancestor],
                 spec: Recipe) -> dict[str, str]:
    """Origins of the ``fresh`` rows (new and feedback, processed) and the ``fresh_eval`` rows (new
    held-out) that duplicate any row, train or eval, of the versions in ``line``, or overlap one
    where either is an eval row (containment: a leak, not a row learned twice), each with the
    place of the earlier row it repeats."""
    earlier = [(r, part) for part in ("train", "eval") for ancestor in line for r in _rows(ancestor, part)]
    texts = [key_text(e) for e in [*fresh, *fresh_eval]]
    d = spec.data.dedup
    result = deduplicate([_text(r) for r, _ in earlier], texts, exact=d.exact, near=d.near, threshold=d.threshold)
    repeats = {i: first for i, (first, _) in result.eval_leaks.items()}
    if d.containment is not None:
        for part, rows in (("eval", range(len(texts))), ("train", range(len(fresh), len(texts)))):
            places = [i for i, (_, p) in enumerate(earlier) if p == part]
            overlaps = contained_leaks([_text(earlier[i][0]) for i in places], [texts[i] for i in rows],
                                       threshold=d.containment)
            for i, (first, _, _) in overlaps.items():
                repeats.setdefault(rows[i], places[first])
    found = [*fresh, *fresh_eval]
    return {found[i].meta["origin"]: f"{earlier[first][0]['where']}, a{'n' * (earlier[first][1] == 'eval')} "
                                     f"{earlier[first][1]} row"
            for i, first in repeats.items()}


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

"""The data stage of a run: files → checked, cleaned, PII-redacted, deduplicated, split examples,
and a data card that accounts for every row.

    read → validate → clean → redact PII → deduplicate (and remove eval rows leaked from train)
         → split (when there is no eval file) → remove eval rows overlapping training rows
         → check eval labels

Overlap is containment (``data.dedup.containment``): an eval row that is a training row plus a
sentence, or the other way round, is below the near-duplicate threshold yet was seen in training.
It is checked after the split, so that a split of one file is checked as an eval file is: the two
rows of such a pair are both kept by deduplication and may land on either side.

Each step that drops rows records them with the file:line, the step and the reason, so that
rows in = rows kept + rows dropped by each step, always. ``prepare`` is what ``domaintune run``
calls; ``write_prepared`` writes the result to a directory; ``prepare_recipe`` is
``domaintune data prepare``.

Two paths, one set of steps. ``prepare`` holds everything in memory: training needs the examples
in memory anyway, and its datasketch dedup and Python-random splits are the reference results.
Inputs too large for that (``prepare_recipe`` switches at ``STREAM_FROM_BYTES``) go through
``data.stream``, which runs the same per-row steps (``data.steps.RowSteps``) in worker processes
and keeps only numbers per row in memory: its dedup (``data.dedup_index``) makes the same
keep-first decisions from MinHash band hashes in numpy arrays, and its splits follow the same
rules with numpy's generator (so which rows are held out differs from ``prepare``'s, not how
many). Keeping ``prepare`` in memory rather than making it stream and reload keeps small runs
exactly as they were, and keeps a second implementation to test the streaming one against.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from domaintune.catalog import sha256_file
from domaintune.data.card import build_card, write_card
from domaintune.data.dedup import contained_leaks, containment_reason, deduplicate
from domaintune.data.readers import iter_rows
from domaintune.data.split import group_split, holdout_split, time_split
from domaintune.data.steps import STEPS, Dropped, Example, RowSteps, as_fields, check_split, duplicate_dropped, \
    key_text, make_redactor, overlap_hint, raise_bad_rows, split_field, time_cutoff, time_value
from domaintune.errors import DataError, RecipeError
from domaintune.recipe import Recipe

__all__ = ["Dropped", "Example", "PreparedData", "STREAM_FROM_BYTES", "prepare", "prepare_recipe", "write_prepared"]

STREAM_FROM_BYTES = 64 * 2**20  # inputs this large are prepared by data.stream: in memory, 1 GB of
# short JSONL rows takes some 5 GB as Python objects

@dataclass
class PreparedData:
    """What training and evaluation use, plus the accounting of how it was made."""

    train: Sequence[Example]  # lists; the streaming path gives read-only views of the written files
    eval: Sequence[Example]
    labels: list[str]
    dropped: Sequence[Dropped]
    card: dict[str, Any]
    sources: list[Path]


def prepare(spec: Recipe, root: Path, console: Console | None = None, *, require_rows: bool = True) -> PreparedData:
    """Run the data steps of ``spec`` (paths relative to ``root``) and return the examples.
    ``require_rows=False`` (inspecting) returns what is left even when training could not start
    on it: no rows, or a single label."""
    console = console or Console(stderr=True, quiet=True)
    d = spec.data
    sources = {"train": root / d.train, **({"eval": root / d.eval} if d.eval else {})}
    redactor = make_redactor(spec)
    dropped: list[Dropped] = []
    rows_in: dict[str, int] = {}
    examples: dict[str, list[Example]] = {}
    pii_counts: Counter[str] = Counter()
    rows_with_pii = cleaned_rows = 0

    for role, path in sources.items():
        with console.status(f"data: reading and checking {path.name}"):
            rows = list(iter_rows(path))
        if not rows:
            raise DataError("the file has no data rows", where=str(path))
        rows_in[role] = len(rows)
        steps = RowSteps(spec, role, redactor)
        steps.require_columns(rows)
        with console.status(f"data: cleaning and redacting {len(rows)} rows of {path.name}"):
            outcomes = [steps.run(row) for row in rows]
        dropped += sorted((o.dropped for o in outcomes if o.dropped), key=lambda x: STEPS.index(x.step))
        examples[role] = [o.example for o in outcomes if o.example is not None]
        pii_counts.update(kind for o in outcomes for kind in o.pii)
        rows_with_pii += sum(bool(o.pii) for o in outcomes)
        cleaned_rows += sum(o.changed for o in outcomes)

    if d.on_bad_rows == "error" and dropped:
        raise_bad_rows(dropped)

    train, evaluation = examples["train"], examples.get("eval", [])
    with console.status("data: looking for duplicates and near-duplicates"):
        result = deduplicate([key_text(e) for e in train], [key_text(e) for e in evaluation],
                             exact=d.dedup.exact, near=d.dedup.near, threshold=d.dedup.threshold)
    for index, (first, kind) in sorted(result.train_duplicate_of.items()):
        dropped.append(duplicate_dropped("train", train[index].where, kind, train[first].where,
                                         _labels(train[first], train[index]), as_fields(train[index])))
    for index, (first, kind) in sorted(result.eval_leaks.items()):
        dropped.append(Dropped("eval", "leakage", evaluation[index].where,
                               f"{kind} duplicate of training row {train[first].where}", as_fields(evaluation[index])))
    for index, (first, kind) in sorted(result.eval_duplicate_of.items()):
        dropped.append(duplicate_dropped("eval", evaluation[index].where, kind, evaluation[first].where,
                                         _labels(evaluation[first], evaluation[index]), as_fields(evaluation[index])))
    train = [e for e, keep in zip(train, result.train_keep) if keep]
    evaluation = [e for e, keep in zip(evaluation, result.eval_keep) if keep]

    split_note = "eval file"
    if "eval" not in sources:
        train, evaluation = _split(train, spec)
        split_note = spec.data.split.by
        # rows that moved from the train file to eval keep "train" as their source in the accounting
    eval_source = "eval" if "eval" in sources else "train"
    leaks = {}
    if d.dedup.containment is not None:
        with console.status("data: looking for eval rows that overlap training rows"):
            leaks = contained_leaks([key_text(e) for e in train], [key_text(e) for e in evaluation],
                                    threshold=d.dedup.containment)
        for index, (first, kind, value) in sorted(leaks.items()):
            dropped.append(Dropped(eval_source, "leakage", evaluation[index].where,
                                   containment_reason(kind, train[first].where, value), as_fields(evaluation[index])))
        evaluation = [e for index, e in enumerate(evaluation) if index not in leaks]

    if spec.task == "classification":
        seen = {e.label for e in train}
        unseen = [e for e in evaluation if e.label not in seen]
        if unseen and d.on_bad_rows == "error":
            places = ", ".join(f"{e.where} ({e.label!r})" for e in unseen[:3])
            raise DataError(f"{len(unseen)} eval rows have labels that never occur in training: {places}",
                            hint="add training rows for those labels, remove them from the eval file, "
                                 "or set data.on_bad_rows: skip")
        for e in unseen:
            dropped.append(Dropped(eval_source, "labels", e.where,
                                   f"label {e.label!r} never occurs in training", as_fields(e)))
        evaluation = [e for e in evaluation if e.label in seen]
        if len(seen) < 2 and require_rows:
            raise DataError(f"classification needs at least two labels; training has {sorted(seen)}",
                            where=str(sources["train"]))
    if (not train or not evaluation) and require_rows:
        raise DataError(f"after the data steps {len(train)} training and {len(evaluation)} eval rows are left",
                        where=str(sources["train"]),
                        hint="add rows, give an eval file (data.eval), or look at `domaintune data inspect` "
                             "for what was dropped" + overlap_hint(bool(leaks) and not evaluation))

    labels = sorted({e.label for e in train}) if spec.task == "classification" else []
    card = build_card(
        spec=spec, sources={role: (path, rows_in[role]) for role, path in sources.items()}, train=train,
        evaluation=evaluation, dropped=dropped, pii_counts=dict(pii_counts), rows_with_pii=rows_with_pii,
        cleaned_rows=cleaned_rows, split=split_note, cutoff=_cutoff(spec, train, evaluation),
    )
    return PreparedData(train, evaluation, labels, dropped, card, list(sources.values()))


def _labels(kept: Example, dropped: Example) -> tuple[str | None, str | None]:
    return getattr(kept, "label", None), getattr(dropped, "label", None)


def write_prepared(prepared: PreparedData, directory: Path, quarantine: bool) -> list[Path]:
    """Write ``data/train.jsonl``, ``data/eval.jsonl`` (and ``data/quarantine.jsonl`` with each
    dropped row and its reason when ``quarantine``), ``data_card.json`` and ``data_card.md``.
    Returns the processed data files (what lineage hashes)."""
    data_dir = directory / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, items in (("train", prepared.train), ("eval", prepared.eval)):
        path = data_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for example in items:
                fh.write(json.dumps({**as_fields(example), "where": example.where}, ensure_ascii=False) + "\n")
        files.append(path)
    if quarantine:
        path = data_dir / "quarantine.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for d in prepared.dropped:
                fh.write(json.dumps({"where": d.where, "source": d.source, "step": d.step, "reason": d.reason,
                                     "row": d.fields}, ensure_ascii=False, default=str) + "\n")
        files.append(path)
    prepared.card["processed"] = [{"file": str(p.relative_to(directory)), "sha256": sha256_file(p)} for p in files]
    write_card(prepared.card, directory)
    return files


def _split(pool: list[Example], spec: Recipe) -> tuple[list[Example], list[Example]]:
    s = spec.data.split
    seed = s.seed if s.seed is not None else spec.training.seed
    if s.by == "group":
        return group_split(pool, s.eval_fraction, seed, group=lambda e: str(e.meta[s.group_field]))
    if s.by == "time":
        return time_split(pool, s.eval_fraction, time=lambda e: _time(e, s.time_field))
    key = (lambda e: e.label) if spec.task == "classification" else None
    return holdout_split(pool, s.eval_fraction, seed, key=key)


def _time(example: Example, name: str) -> float:
    return time_value(example.meta[name], example.where, name)


def _cutoff(spec: Recipe, train: list[Example], evaluation: list[Example]) -> dict[str, Any]:
    """The card's cut-off of a time split (nothing for another split)."""
    name = split_field(spec)
    if spec.data.split.by != "time" or name is None:
        return {}
    latest = max(train, key=lambda e: _time(e, name), default=None)
    return time_cutoff(name, latest, min(evaluation, key=lambda e: _time(e, name), default=None))


def large_inputs(spec: Recipe, root: Path) -> bool:
    """Whether the recipe's data files together hold ``STREAM_FROM_BYTES`` or more: the default
    for preparing them in bounded memory."""
    paths = [root / p for p in (spec.data.train, spec.data.eval) if p]
    return sum(p.stat().st_size for p in paths if p.is_file()) >= STREAM_FROM_BYTES


def prepare_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | Path | None = None,
                   console: Console | None = None, *, streaming: bool | None = None,
                   workers: int | None = None) -> tuple[Path, PreparedData]:
    """``domaintune data prepare``: prepare a recipe's data and write it, with the data card, to
    ``output_dir`` (default ``<recipe output_dir>/<name>/data-<UTC time>``).

    ``streaming`` (default: when the input files together hold ``STREAM_FROM_BYTES`` or more)
    prepares in bounded memory with ``workers`` processes (default: the CPUs available); the
    result's train and eval then read the written files when iterated, and its ``dropped`` holds
    the rows only when they are quarantined (the card counts them all)."""
    from domaintune.recipe import load_recipe

    recipe_path = Path(recipe).resolve()
    spec = load_recipe(recipe_path, overrides)
    check_split(spec)
    root = recipe_path.parent
    if output_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        output_dir = root / spec.output_dir / spec.name / f"data-{stamp}"
    directory = Path(output_dir)
    if directory.exists() and not directory.is_dir():
        raise RecipeError(f"the output directory {directory} is a file", hint="give --output-dir a folder, new or existing")
    quarantine = spec.data.on_bad_rows == "quarantine"
    if streaming is None:
        streaming = large_inputs(spec, root)
    if not streaming:
        prepared = prepare(spec, root, console)
        write_prepared(prepared, directory, quarantine=quarantine)
        return directory, prepared

    from domaintune.data.stream import as_sequences, prepare_streaming

    card, _ = prepare_streaming(spec, root, directory, console, workers)
    train, evaluation, dropped = as_sequences(directory, card, spec.task, quarantine)
    labels = sorted(card["labels"]["train"]) if spec.task == "classification" else []
    sources = [root / spec.data.train, *([root / spec.data.eval] if spec.data.eval else [])]
    return directory, PreparedData(train, evaluation, labels, dropped, card, sources)

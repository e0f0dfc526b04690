"""The data stage of a run: files → checked, cleaned, PII-redacted, deduplicated, split examples,
and a data card that accounts for every row.

    read → validate → clean → redact PII → deduplicate (and remove eval rows leaked from train)
         → split (when there is no eval file) → check eval labels

Each step that drops rows records them with the file:line, the step and the reason, so that
rows in = rows kept + rows dropped by each step, always. ``prepare`` is what ``domaintune run``
and ``domaintune data prepare`` call; ``write_prepared`` writes the result to a directory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from domaintune.catalog import sha256_file
from domaintune.data.card import build_card, write_card
from domaintune.data.clean import CleanConfig as CleanSettings
from domaintune.data.clean import clean_text
from domaintune.data.dedup import deduplicate
from domaintune.data.examples import ChatExample, TextExample, chat_example, classification_example, require_columns, \
    text_example
from domaintune.data.pii import PiiRedactor
from domaintune.data.readers import Row, iter_rows
from domaintune.data.split import group_split, holdout_split, time_split
from domaintune.errors import DataError, RecipeError
from domaintune.recipe import Recipe

Example = TextExample | ChatExample
STEPS = ("validate", "clean", "dedup", "leakage", "labels")
MAX_LISTED = 5  # problems shown when on_bad_rows: error stops the run


@dataclass
class Dropped:
    """A row left out, and why."""

    source: str  # "train" or "eval": the file it came from
    step: str  # one of STEPS
    where: str
    reason: str
    fields: dict[str, Any] = field(default_factory=dict)  # the row as read (quarantine writes it)


@dataclass
class PreparedData:
    """What training and evaluation use, plus the accounting of how it was made."""

    train: list[Example]
    eval: list[Example]
    labels: list[str]
    dropped: list[Dropped]
    card: dict[str, Any]
    sources: list[Path]


def prepare(spec: Recipe, root: Path, console: Console | None = None) -> PreparedData:
    """Run the data steps of ``spec`` (paths relative to ``root``) and return the examples."""
    console = console or Console(stderr=True, quiet=True)
    d = spec.data
    sources = {"train": root / d.train, **({"eval": root / d.eval} if d.eval else {})}
    redactor = _redactor(spec)
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
        good, bad = _validate(rows, spec, role)
        dropped += bad
        kept = []
        with console.status(f"data: cleaning and redacting {len(good)} rows of {path.name}"):
            for example, row in good:
                cleaned = _map_text(example, lambda t: clean_text(t, _clean_settings(spec)))
                if not all(_texts(cleaned)):
                    dropped.append(Dropped(role, "clean", example.where, "text is empty after cleaning", row.fields))
                    continue
                cleaned_rows += cleaned != example
                if redactor is not None:
                    found: list = []
                    cleaned = _map_text(cleaned, lambda t: _redact(redactor, t, found))
                    pii_counts.update(f.type for f in found)
                    rows_with_pii += bool(found)
                kept.append(cleaned)
        examples[role] = kept

    if d.on_bad_rows == "error" and dropped:
        _raise_bad_rows(dropped)
    if redactor is not None:  # rows dropped before redaction may hold personal data too: quarantine keeps none
        for item in dropped:
            item.fields = _scrub(item.fields, redactor)

    train, evaluation = examples["train"], examples.get("eval", [])
    with console.status("data: looking for duplicates and near-duplicates"):
        result = deduplicate([_key_text(e) for e in train], [_key_text(e) for e in evaluation],
                             exact=d.dedup.exact, near=d.dedup.near, threshold=d.dedup.threshold)
    conflicts = 0
    for index, (first, kind) in sorted(result.train_duplicate_of.items()):
        dropped.append(Dropped("train", "dedup", train[index].where,
                               f"{kind} duplicate of {train[first].where}", _as_fields(train[index])))
        conflicts += getattr(train[index], "label", None) != getattr(train[first], "label", None)
    for index, (first, kind) in sorted(result.eval_leaks.items()):
        dropped.append(Dropped("eval", "leakage", evaluation[index].where,
                               f"{kind} duplicate of training row {train[first].where}", _as_fields(evaluation[index])))
    for index, (first, kind) in sorted(result.eval_duplicate_of.items()):
        dropped.append(Dropped("eval", "dedup", evaluation[index].where,
                               f"{kind} duplicate of {evaluation[first].where}", _as_fields(evaluation[index])))
    train = [e for e, keep in zip(train, result.train_keep) if keep]
    evaluation = [e for e, keep in zip(evaluation, result.eval_keep) if keep]

    split_note = "eval file"
    if "eval" not in sources:
        train, evaluation = _split(train, spec)
        split_note = spec.data.split.by
        # rows that moved from the train file to eval keep "train" as their source in the accounting

    if spec.task == "classification":
        seen = {e.label for e in train}
        unseen = [e for e in evaluation if e.label not in seen]
        if unseen and d.on_bad_rows == "error":
            places = ", ".join(f"{e.where} ({e.label!r})" for e in unseen[:3])
            raise DataError(f"{len(unseen)} eval rows have labels that never occur in training: {places}",
                            hint="add training rows for those labels, remove them from the eval file, "
                                 "or set data.on_bad_rows: skip")
        for e in unseen:
            dropped.append(Dropped("eval" if "eval" in sources else "train", "labels", e.where,
                                   f"label {e.label!r} never occurs in training", _as_fields(e)))
        evaluation = [e for e in evaluation if e.label in seen]
        if len(seen) < 2:
            raise DataError(f"classification needs at least two labels; training has {sorted(seen)}",
                            where=str(sources["train"]))
    if not train or not evaluation:
        raise DataError(f"after the data steps {len(train)} training and {len(evaluation)} eval rows are left",
                        where=str(sources["train"]),
                        hint="add rows, give an eval file (data.eval), or look at `domaintune data inspect` "
                             "for what was dropped")

    labels = sorted({e.label for e in train}) if spec.task == "classification" else []
    card = build_card(
        spec=spec, sources={role: (path, rows_in[role]) for role, path in sources.items()}, train=train,
        evaluation=evaluation, dropped=dropped, pii_counts=dict(pii_counts), rows_with_pii=rows_with_pii,
        cleaned_rows=cleaned_rows, label_conflicts=conflicts, split=split_note,
    )
    return PreparedData(train, evaluation, labels, dropped, card, list(sources.values()))


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
                fh.write(json.dumps({**_as_fields(example), "where": example.where}, ensure_ascii=False) + "\n")
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


def _redactor(spec: Recipe) -> PiiRedactor | None:
    pii = spec.data.pii
    if not pii.redact:
        return None
    secret = os.environ.get(pii.secret_env) if pii.mode == "pseudonym" else None
    if pii.mode == "pseudonym" and not secret:
        raise RecipeError(f"data.pii.mode: pseudonym needs a secret key in the environment variable {pii.secret_env}",
                          hint=f"export {pii.secret_env}=<a long random string, kept out of the recipe>, "
                               "or use data.pii.mode: placeholder")
    return PiiRedactor(types=pii.types, mode=pii.mode, secret=secret)


def _redact(redactor: PiiRedactor, text: str, found: list) -> str:
    redacted, findings = redactor.redact(text)
    found += findings
    return redacted


def _scrub(value: Any, redactor: PiiRedactor) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)[0]
    if isinstance(value, dict):
        return {k: _scrub(v, redactor) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, redactor) for v in value]
    return value


def _clean_settings(spec: Recipe) -> CleanSettings:
    return CleanSettings(**spec.data.clean.model_dump())


def _validate(rows: list[Row], spec: Recipe, role: str) -> tuple[list[tuple[Example, Row]], list[Dropped]]:
    """Turn rows into examples; a row that cannot be one is dropped with its reason."""
    d = spec.data
    if spec.task == "classification":
        require_columns(rows, [d.text_field, d.label_field], {d.text_field: "text_field", d.label_field: "label_field"})
        convert: Callable[[Row], Example] = lambda row: classification_example(row, d.text_field, d.label_field)
    elif spec.task == "sft":
        convert = lambda row: chat_example(row, d.system_prompt)
    else:
        require_columns(rows, [d.text_field], {d.text_field: "text_field"})
        convert = lambda row: text_example(row, d.text_field)
    split_field = {"group": d.split.group_field, "time": d.split.time_field}.get(d.split.by) if not d.eval else None
    if split_field:
        require_columns(rows, [split_field], {split_field: f"split.{d.split.by}_field"})
    good, bad = [], []
    for row in rows:
        try:
            example = convert(row)
            if split_field:
                value = example.meta.get(split_field)
                if value is None or str(value).strip() == "":
                    raise DataError(f"field {split_field!r} (split.{d.split.by}_field) is empty", where=row.where)
                if d.split.by == "time":
                    example.meta[split_field] = _time_value(value, row.where, split_field)
        except DataError as exc:
            bad.append(Dropped(role, "validate", exc.where or row.where, exc.message, row.fields))
            continue
        good.append((example, row))
    return good, bad


def _time_value(value: Any, where: str, name: str) -> float:
    """A sortable number for a time column: numbers as they are, ISO dates and times as seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).timestamp()
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise DataError(f"field {name!r} is {text!r}, not a date, time or number", where=where,
                        hint="write dates as ISO 8601 (2024-05-31 or 2024-05-31T14:00:00)") from None
    return moment.replace(tzinfo=moment.tzinfo or timezone.utc).timestamp()


def _raise_bad_rows(dropped: list[Dropped]) -> None:
    first = dropped[0]
    if len(dropped) == 1:
        raise DataError(first.reason, where=first.where, hint=_BAD_ROWS_HINT)
    listed = "\n  ".join(f"{d.where}: {d.reason}" for d in dropped[1:MAX_LISTED])
    more = f"\n  ... and {len(dropped) - MAX_LISTED} more" if len(dropped) > MAX_LISTED else ""
    raise DataError(f"{first.reason} (and {len(dropped) - 1} more bad rows)\n  {listed}{more}",
                    where=first.where, hint=_BAD_ROWS_HINT)


_BAD_ROWS_HINT = ("fix the rows, or set data.on_bad_rows: skip (drop them) or quarantine "
                  "(drop them and write them with the reasons to data/quarantine.jsonl in the run)")


def _split(pool: list[Example], spec: Recipe) -> tuple[list[Example], list[Example]]:
    s = spec.data.split
    seed = s.seed if s.seed is not None else spec.training.seed
    if s.by == "group":
        return group_split(pool, s.eval_fraction, seed, group=lambda e: str(e.meta[s.group_field]))
    if s.by == "time":
        return time_split(pool, s.eval_fraction, time=lambda e: e.meta[s.time_field])
    key = (lambda e: e.label) if spec.task == "classification" else None
    return holdout_split(pool, s.eval_fraction, seed, key=key)


def _texts(example: Example) -> list[str]:
    if isinstance(example, ChatExample):
        return [m["content"] for m in example.messages]
    return [example.text]


def _map_text(example: Example, fn: Callable[[str], str]) -> Example:
    """The example with ``fn`` applied to every text it holds (not to labels or roles)."""
    if isinstance(example, ChatExample):
        return replace(example, messages=[{**m, "content": fn(m["content"])} for m in example.messages])
    return replace(example, text=fn(example.text))


def _key_text(example: Example) -> str:
    """What duplicates are judged on: the whole conversation for sft, the text otherwise."""
    return "\n".join(_texts(example))


def _as_fields(example: Example) -> dict[str, Any]:
    if isinstance(example, ChatExample):
        return {"messages": example.messages, **example.meta}
    fields: dict[str, Any] = {"text": example.text}
    if example.label is not None:
        fields["label"] = example.label
    return {**fields, **example.meta}


def prepare_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | Path | None = None,
                   console: Console | None = None) -> tuple[Path, PreparedData]:
    """``domaintune data prepare``: prepare a recipe's data and write it, with the data card, to
    ``output_dir`` (default ``<recipe output_dir>/<name>/data-<UTC time>``)."""
    from domaintune.recipe import load_recipe

    recipe_path = Path(recipe).resolve()
    spec = load_recipe(recipe_path, overrides)
    prepared = prepare(spec, recipe_path.parent, console)
    if output_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        output_dir = recipe_path.parent / spec.output_dir / spec.name / f"data-{stamp}"
    directory = Path(output_dir)
    write_prepared(prepared, directory, quarantine=spec.data.on_bad_rows == "quarantine")
    return directory, prepared

"""The per-row data steps, shared by the in-memory and the streaming preparation:

    row → validate (into an example) → clean → redact PII

``RowSteps`` holds what a recipe configures for these steps and turns one row into either a
kept example or a ``Dropped`` record; it is plain data, so worker processes can build their own.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

from domaintune.data.clean import CleanConfig, clean_text
from domaintune.data.examples import ChatExample, TextExample, chat_example, classification_example, require_columns, \
    text_example
from domaintune.data.pii import PiiRedactor
from domaintune.data.readers import Row
from domaintune.errors import DataError, RecipeError
from domaintune.recipe import Recipe

Example = TextExample | ChatExample
# The columns an update writes on each row it assembles: where the row came from (a file:line, a
# feedback id). They are the update's bookkeeping, matched as written between its steps, not data:
# a path that happens to look like a phone number must not be redacted out of them.
PROVENANCE = ("source", "origin")
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
    conflict: dict[str, str] | None = None  # a duplicate with another label: the kept row and both labels


def duplicate_dropped(source: str, where: str, kind: str, first: str, labels: tuple[Any, Any],
                      fields: dict[str, Any]) -> Dropped:
    """The row at ``where`` dropped as a ``kind`` duplicate of the row at ``first``; ``labels``:
    the kept row's and this row's. When they differ the reason says so: which label was kept
    follows from the file's order alone, so the user has to check it."""
    kept, own = labels
    if kept == own:
        return Dropped(source, "dedup", where, f"{kind} duplicate of {first}", fields)
    return Dropped(source, "dedup", where,
                   f"{kind} duplicate of {first}, whose label {kept!r} was kept over this row's {own!r}", fields,
                   conflict={"where": where, "label": own, "kept_where": first, "kept_label": kept})


@dataclass
class RowOutcome:
    """What the per-row steps made of one row: an example, or the reason it was dropped."""

    example: Example | None
    dropped: Dropped | None = None
    changed: bool = False  # cleaning changed a text
    pii: list[str] = field(default_factory=list)  # the types of personal data redacted


def make_redactor(spec: Recipe) -> PiiRedactor | None:
    """The recipe's PII redactor, or None when redaction is off."""
    pii = spec.data.pii
    if not pii.redact:
        return None
    secret = os.environ.get(pii.secret_env) if pii.mode == "pseudonym" else None
    if pii.mode == "pseudonym" and not secret:
        raise RecipeError(f"data.pii.mode: pseudonym needs a secret key in the environment variable {pii.secret_env}",
                          hint=f"export {pii.secret_env}=<a long random string, kept out of the recipe>, "
                               "or use data.pii.mode: placeholder")
    return PiiRedactor(types=pii.types, mode=pii.mode, secret=secret)


def split_field(spec: Recipe) -> str | None:
    """The column a group or time split needs on every row (None without one, or with an eval file)."""
    d = spec.data
    return {"group": d.split.group_field, "time": d.split.time_field}.get(d.split.by) if not d.eval else None


def check_split(spec: Recipe) -> None:
    """Refuse a user's recipe whose split would be ignored: an eval file is the split. (An update
    keeps its production's split settings with eval files of its own, so this is not a schema rule.)"""
    d = spec.data
    if d.eval and d.split.by != "random":
        raise RecipeError(f"data.split.by: {d.split.by} has no effect when data.eval gives the eval file",
                          hint="leave data.eval out to hold out rows by "
                               f"{d.split.by}, or remove data.split.by (the eval file is the split)")


class RowSteps:
    """Validate, clean and redact rows of one file (``role``: "train" or "eval") as ``spec`` says."""

    def __init__(self, spec: Recipe, role: str, redactor: PiiRedactor | None):
        self.spec = spec
        self.role = role
        self.redactor = redactor
        self._clean = CleanConfig(**spec.data.clean.model_dump())
        self._split_field = split_field(spec)

    def require_columns(self, rows: list[Row]) -> None:
        """Raise when the first readable row lacks a column the recipe names (the file's problem)."""
        d = self.spec.data
        if self.spec.task == "classification":
            require_columns(rows, [d.text_field, d.label_field],
                            {d.text_field: "text_field", d.label_field: "label_field"})
        elif self.spec.task != "sft":
            require_columns(rows, [d.text_field], {d.text_field: "text_field"})
        if self._split_field:
            require_columns(rows, [self._split_field], {self._split_field: f"split.{d.split.by}_field"})

    def validate(self, row: Row) -> Example:
        """The row as an example; a row that cannot be one raises ``DataError``."""
        d = self.spec.data
        if self.spec.task == "classification":
            example: Example = classification_example(row, d.text_field, d.label_field)
        elif self.spec.task == "sft":
            example = chat_example(row, d.system_prompt)
        else:
            example = text_example(row, d.text_field)
        if name := self._split_field:
            value = example.meta.get(name)
            if value is None or str(value).strip() == "":
                raise DataError(f"field {name!r} (split.{d.split.by}_field) is empty", where=row.where)
            if d.split.by == "time":  # checked here, so a bad value drops its row; the split parses it again
                time_value(value, row.where, name)
        return example

    def run(self, row: Row) -> RowOutcome:
        """Validate, clean and redact one row. A dropped row's fields are redacted too: the
        quarantine file must hold no more personal data than the training data."""
        try:
            example = self.validate(row)
        except DataError as exc:
            return RowOutcome(None, self._dropped("validate", exc.where or row.where, exc.message, row))
        cleaned = map_text(example, lambda t: clean_text(t, self._clean))
        if not all(texts(cleaned)):
            return RowOutcome(None, self._dropped("clean", example.where, "text is empty after cleaning", row))
        changed = cleaned != example
        found: list = []
        cleaned = replace(cleaned, meta={k: json_value(v) for k, v in cleaned.meta.items()})
        if self.redactor is not None:
            cleaned = map_text(cleaned, lambda t: self._redact(t, found))
            cleaned = replace(cleaned, meta=self._redact_meta(cleaned.meta, found))
        return RowOutcome(cleaned, changed=changed, pii=[f.type for f in found])

    def _redact_meta(self, meta: dict[str, Any], found: list) -> dict[str, Any]:
        """The row's other columns redacted too: they are written to the run directory with it
        (processed data, predictions) and a customer's e-mail in a side column is still personal data.
        A group column whose values are personal data becomes a digest of them, so the split still
        keeps each group on one side."""
        out = {}
        for name, value in meta.items():
            # A time split's column holds checked dates, times and numbers, which the split parses
            # after this step: a bare number of seconds must not become a redacted "phone number".
            if name in PROVENANCE or (name == self._split_field and self.spec.data.split.by == "time"):
                out[name] = value
                continue
            redacted = scrub(value, self.redactor, found)
            if name == self._split_field and self.spec.data.split.by == "group" and redacted != value:
                redacted = "group-" + hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:16]
            out[name] = redacted
        return out

    def _redact(self, text: str, found: list) -> str:
        redacted, findings = self.redactor.redact(text)
        found += findings
        return redacted

    def _dropped(self, step: str, where: str, reason: str, row: Row) -> Dropped:
        fields = scrub(row.fields, self.redactor) if self.redactor is not None else row.fields
        return Dropped(self.role, step, where, reason, fields)


def scrub(value: Any, redactor: PiiRedactor, found: list | None = None) -> Any:
    """``value`` (a row's fields) with personal data in every string redacted (what was found
    is added to ``found``)."""
    if isinstance(value, str):
        redacted, findings = redactor.redact(value)
        if found is not None:
            found += findings
        return redacted
    if isinstance(value, dict):
        return {k: scrub(v, redactor, found) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, redactor, found) for v in value]
    return value


def json_value(value: Any) -> Any:
    """A column's value as JSON can hold it: Parquet gives dates, decimals and bytes, and the
    row is written to data/*.jsonl and predictions.jsonl."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def time_value(value: Any, where: str, name: str) -> float:
    """A sortable number for a time column: numbers as they are, ISO dates and times as seconds.
    Only the split uses it: the rows keep the value as written."""
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


def time_cutoff(name: str, latest_train: Example | None, earliest_eval: Example | None) -> dict[str, Any]:
    """What the card says of a time split: the latest training time and the earliest eval time,
    as written in the data (nothing when a side is empty)."""
    if latest_train is None or earliest_eval is None:
        return {}
    return {"time_field": name, "train_until": latest_train.meta[name], "eval_from": earliest_eval.meta[name]}


def texts(example: Example) -> list[str]:
    """The texts an example holds (message contents for chat, the text otherwise)."""
    if isinstance(example, ChatExample):
        return [m["content"] for m in example.messages]
    return [example.text]


def map_text(example: Example, fn: Callable[[str], str]) -> Example:
    """The example with ``fn`` applied to every text it holds (not to labels or roles)."""
    if isinstance(example, ChatExample):
        return replace(example, messages=[{**m, "content": fn(m["content"])} for m in example.messages])
    return replace(example, text=fn(example.text))


def key_text(example: Example) -> str:
    """What duplicates are judged on: the conversation without its system messages for sft (a
    long system prompt shared by every row would make them all near-duplicates), the text otherwise."""
    if isinstance(example, ChatExample):
        return "\n".join(m["content"] for m in example.messages if m["role"] != "system")
    return example.text


def as_fields(example: Example) -> dict[str, Any]:
    """The example as the row written to ``data/train.jsonl`` (without its ``where``)."""
    if isinstance(example, ChatExample):
        return {"messages": example.messages, **example.meta}
    fields: dict[str, Any] = {"text": example.text}
    if example.label is not None:
        fields["label"] = example.label
    return {**fields, **example.meta}


def from_fields(fields: dict[str, Any], task: str) -> Example:
    """The example a row of ``data/train.jsonl`` holds (the inverse of ``as_fields`` plus ``where``)."""
    fields = dict(fields)
    where = fields.pop("where", "")
    if task == "sft":
        return ChatExample(messages=fields.pop("messages"), where=where, meta=fields)
    return TextExample(text=fields.pop("text"), label=fields.pop("label", None), where=where, meta=fields)


def raise_bad_rows(dropped: list[Dropped], total: int | None = None) -> None:
    """Stop the run on bad rows (``on_bad_rows: error``), listing the first few of ``dropped``
    (``total``: how many there are, when ``dropped`` holds only the first)."""
    total = len(dropped) if total is None else total
    first = dropped[0]
    if total == 1:
        raise DataError(first.reason, where=first.where, hint=_BAD_ROWS_HINT)
    listed = "\n  ".join(f"{d.where}: {d.reason}" for d in dropped[1:MAX_LISTED])
    more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
    raise DataError(f"{first.reason} (and {total - 1} more bad rows)\n  {listed}{more}",
                    where=first.where, hint=_BAD_ROWS_HINT)


_BAD_ROWS_HINT = ("fix the rows, or set data.on_bad_rows: skip (drop them) or quarantine "
                  "(drop them and write them with the reasons to data/quarantine.jsonl in the run)")


def overlap_hint(overlaps_emptied_eval: bool) -> str:
    """More of the hint for an empty eval set, when dropping eval rows that overlap training rows
    emptied it: a text every row shares (a long instruction) makes every pair overlap."""
    if not overlaps_emptied_eval:
        return ""
    return ("; eval rows were dropped as overlapping training rows: if every row shares a long text, such as an "
            "instruction, raise data.dedup.containment or set it to null")

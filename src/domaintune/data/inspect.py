"""What is in a data file or a recipe's data, before any training: the data card computed without
stopping at bad rows (they are counted instead), plus the schema and token lengths."""

from __future__ import annotations

import tempfile
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from domaintune.data.examples import SFT_SHAPES
from domaintune.data.prepare import large_inputs, prepare
from domaintune.data.readers import iter_rows
from domaintune.data.steps import check_split
from domaintune.errors import DataError, RecipeError
from domaintune.recipe import TASKS, Recipe, apply_overrides, load_recipe, validate_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")
TOKEN_SAMPLE = 100_000  # rows of each side whose tokens are counted


def guess_task(path: Path, label_field: str) -> str:
    """sft when the rows have one of the chat shapes, classification when they have a label
    column, pretrain otherwise."""
    first = next((row for row in islice(iter_rows(path), 50) if row.problem is None), None)
    if first is None:
        raise DataError("no readable row in the first 50", where=str(path))
    fields = set(first.fields)
    if "messages" in fields or {"prompt", "completion"} <= fields or {"instruction", "output"} <= fields:
        return "sft"
    return "classification" if label_field in fields else "pretrain"


def inspect_data(target: str | Path, *, task: str | None = None, text_field: str = "text", label_field: str = "label",
                 overrides: dict[str, Any] | None = None, tokenizer=None, console: Console | None = None,
                 streaming: bool | None = None, workers: int | None = None) -> dict[str, Any]:
    """Inspect a recipe (its train and eval files, as a run would prepare them) or one data file.

    Bad rows are counted and listed, never raised: ``on_bad_rows`` is taken as ``skip``.
    ``tokenizer`` (optional) adds token length statistics. ``streaming`` (default: inputs of
    ``STREAM_FROM_BYTES`` or more, as ``data prepare``) runs the steps in bounded memory through
    ``workers`` processes, in a temporary directory. Token lengths are taken on the first
    ``TOKEN_SAMPLE`` rows of each side.
    """
    target = Path(target).resolve()
    if target.suffix.lower() in RECIPE_SUFFIXES:
        spec = load_recipe(target, {**(overrides or {}), "data.on_bad_rows": "skip"})
        check_split(spec)
    else:
        task = task or guess_task(target, label_field)
        if task not in TASKS:
            raise RecipeError(f"--task {task!r} is not a task", hint=f"use one of: {', '.join(TASKS)}")
        raw = {"name": "inspect", "task": task, "base_model": "none",
               "data": {"train": str(target), "text_field": text_field, "label_field": label_field,
                        "on_bad_rows": "skip"}}
        spec = validate_recipe(apply_overrides(raw, dict(overrides or {})), overrides)
    root = target.parent
    if streaming is None:
        streaming = large_inputs(spec, root)
    try:
        return _inspect(spec, target, root, streaming, workers, tokenizer, console)
    except DataError as exc:
        if target.suffix.lower() in RECIPE_SUFFIXES or not (exc.hint or "").startswith("set data."):
            raise
        # one file has no recipe to set keys in: the command's options name the columns
        option = "--" + exc.hint.split()[1].removeprefix("data.").replace("_", "-")
        raise DataError(exc.message, where=exc.where, hint=f"name the column with {option}") from None


def _inspect(spec: Recipe, target: Path, root: Path, streaming: bool, workers: int | None, tokenizer,
             console: Console | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="domaintune-inspect-") as scratch:
        if streaming:  # bad rows quarantined in the scratch folder, to list the first of them
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"on_bad_rows": "quarantine"})})
            from domaintune.data.stream import as_sequences, prepare_streaming

            card, _ = prepare_streaming(spec, root, Path(scratch), console, workers, require_rows=False)
            card.pop("processed", None)  # files of the scratch folder
            train, evaluation, dropped = as_sequences(Path(scratch), card, spec.task, quarantine=True)
            sources = [root / spec.data.train, *([root / spec.data.eval] if spec.data.eval else [])]
        else:
            prepared = prepare(spec, root, console, require_rows=False)
            card, train, evaluation, dropped = dict(prepared.card), prepared.train, prepared.eval, prepared.dropped
            sources = prepared.sources
        card["recipe" if target.suffix.lower() in RECIPE_SUFFIXES else "file"] = str(target)
        card["schema"] = _schema(sources)
        card["problems"] = [{"where": d.where, "step": d.step, "reason": d.reason} for d in islice(dropped, 50)]
        if tokenizer is not None:
            card["tokens"] = {side: _token_lengths(tokenizer, list(islice(examples, TOKEN_SAMPLE)))
                              for side, examples in (("train", train), ("eval", evaluation))}
    if spec.task == "sft":
        card["sft_shapes"] = list(SFT_SHAPES)
    return card


def _schema(sources: list[Path]) -> dict[str, dict[str, str]]:
    """Column → the Python types seen in the first 1,000 readable rows, per file."""
    out = {}
    for path in sources:
        types: dict[str, Counter] = {}
        for row in islice((r for r in iter_rows(path) if r.problem is None), 1000):
            for key, value in row.fields.items():
                types.setdefault(key, Counter())[type(value).__name__] += 1
        out[path.name] = {key: "/".join(t for t, _ in counter.most_common()) for key, counter in types.items()}
    return out


def _token_lengths(tokenizer, examples: list) -> dict[str, float]:
    if not examples:
        return {}
    texts = ["\n".join(m["content"] for m in e.messages) if hasattr(e, "messages") else e.text for e in examples]
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    return {"rows": len(lengths), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1), "median": float(np.median(lengths)),
            "p95": round(float(np.percentile(lengths, 95)), 1), "max": int(lengths.max())}

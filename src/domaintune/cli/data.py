"""`domaintune data inspect` and `domaintune data prepare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domaintune.cli.common import err, fail, out
from domaintune.errors import DomaintuneError

data_app = typer.Typer(rich_markup_mode="markdown", help="Look at data before training, and prepare it (validate, clean, redact PII, deduplicate, split).",
                       no_args_is_help=True)

SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe key, e.g. --set data.dedup.threshold=0.9 (repeatable).")]


def _overrides(items: list[str] | None) -> dict:
    from domaintune.recipe import parse_override

    return dict(parse_override(item) for item in (items or []))


@data_app.command("inspect")
def inspect(
    target: Annotated[Path, typer.Argument(help="A recipe (.yaml) or a data file (.csv .tsv .jsonl .json .parquet .txt).")],
    task: Annotated[Optional[str], typer.Option(help="For a data file: classification, sft or pretrain (default: guessed from the columns).")] = None,
    text_field: Annotated[str, typer.Option(help="For a data file: the text column.")] = "text",
    label_field: Annotated[str, typer.Option(help="For a data file: the label column.")] = "label",
    tokenizer: Annotated[Optional[str], typer.Option(help="Base model whose tokenizer counts tokens (default: the recipe's base_model; none for a file).")] = None,
    set_: SetOption = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Run the data steps in bounded memory, streaming the files through worker processes, or all in memory (default: stream inputs of 64 MiB or more).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Worker processes when streaming (default: the CPUs available).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else.")] = False,
) -> None:
    """What a run would do to the data, without training.

    Schema, row counts, bad rows, label distribution, lengths, duplicates, PII found by type and
    train/eval leakage. Bad rows are counted, not fatal.
    """
    from domaintune.data.inspect import RECIPE_SUFFIXES, inspect_data

    try:
        model = tokenizer
        if model is None and target.suffix.lower() in RECIPE_SUFFIXES:
            from domaintune.recipe import load_recipe

            model = load_recipe(target).base_model
        card = inspect_data(target, task=task, text_field=text_field, label_field=label_field,
                            overrides=_overrides(set_), tokenizer=_tokenizer(model, target.parent) if model else None,
                            console=Console(stderr=True, quiet=as_json), streaming=stream, workers=workers)
    except DomaintuneError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(card, ensure_ascii=False, default=str))
        return
    _print_card(card)


def _tokenizer(model: str, base_dir: Path):
    """The tokenizer of ``model`` when it is on this machine; token counts are optional."""
    from domaintune import catalog
    from domaintune.pipeline import quiet_libraries

    quiet_libraries()
    try:
        return catalog.load_tokenizer(catalog.resolve(model, base_dir=base_dir))
    except DomaintuneError as exc:
        err.print(f"[yellow]no token counts: {escape(exc.message)}[/]")
        return None


def _print_card(card: dict) -> None:
    out.print(f"[bold]{escape(str(card.get('recipe') or card.get('file')))}[/] ({card['task']})")
    sources = Table(title="sources")
    for column in ("role", "file", "rows", "sha256"):
        sources.add_column(column)
    for s in card["sources"]:
        sources.add_row(s["role"], escape(Path(s["file"]).name), str(s["rows_in"]), s["sha256"][:16])
    out.print(sources)
    for name, columns in card["schema"].items():
        out.print(f"columns of {name}: " + ", ".join(f"{k} ({v})" for k, v in columns.items()), markup=False)

    from domaintune.data.card import STEP_TITLES

    steps = Table(title=f"{card['rows_in']} rows in → {card['kept']['train']} train + {card['kept']['eval']} eval")
    steps.add_column("dropped by")
    steps.add_column("train file", justify="right")
    steps.add_column("eval file", justify="right")
    for step, counts in card["dropped"].items():
        steps.add_row(STEP_TITLES[step], str(counts["train"]), str(counts["eval"]))
    out.print(steps)
    for problem in card["problems"][:10]:
        out.print(f"  {problem['where']}: {problem['reason']}", highlight=False, markup=False)

    pii = Table(title=f"personal data found ({card['pii']['rows_with_pii']} rows)")
    pii.add_column("type")
    pii.add_column("found", justify="right")
    for kind, n in card["pii"]["found"].items():
        pii.add_row(kind, str(n))
    out.print(pii if card["pii"]["found"] else "personal data found: none")

    lengths = Table(title="lengths")
    for column in ("side", "unit", "min", "median", "mean", "p95", "max"):
        lengths.add_column(column)
    units = {side: dict(u, **({"tokens": card["tokens"][side]} if card.get("tokens", {}).get(side) else {}))
             for side, u in card["lengths"].items()}
    for side, by_unit in units.items():
        for unit, s in by_unit.items():
            lengths.add_row(side, unit, *(str(s[k]) for k in ("min", "median", "mean", "p95", "max")))
    out.print(lengths)
    if "labels" in card:
        labels = Table(title="labels")
        for column in ("label", "train", "eval"):
            labels.add_column(column)
        for label in sorted(set(card["labels"]["train"]) | set(card["labels"]["eval"])):
            labels.add_row(escape(label), str(card["labels"]["train"].get(label, 0)), str(card["labels"]["eval"].get(label, 0)))
        out.print(labels)
    dd = card["dedup"]
    kinds = ", ".join(f"{kind}: {n}" for kind, n in card["reasons"].get("leakage", {}).items())
    out.print(f"duplicates dropped: {sum(card['dropped']['dedup'].values())} "
              f"(of them with different labels: {dd['label_conflicts']}); "
              f"eval rows leaked from train: {sum(card['dropped']['leakage'].values())}" + (f" ({kinds})" if kinds else ""))
    for x in dd["label_conflicts_listed"][:10]:
        out.print(f"  {x['where']} ({x['label']!r}) duplicates {x['kept_where']} ({x['kept_label']!r}), which was kept",
                  highlight=False, markup=False)
    _warn_label_variants(card)


def _warn_label_variants(card: dict) -> None:
    from domaintune.data.card import label_variants_warning

    if warning := label_variants_warning(card):
        out.print(f"[yellow]warning: {escape(warning)}[/]")


@data_app.command("prepare")
def prepare(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Directory to write (default: \\<output_dir>/\\<name>/data-\\<time> next to the recipe).")] = None,
    set_: SetOption = None,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Prepare in bounded memory, streaming the files through worker processes, or all in memory (default: stream inputs of 64 MiB or more).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Worker processes when streaming (default: the CPUs available).", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the data card as JSON and nothing else.")] = False,
) -> None:
    """Write the processed train/eval data and the data card, as `domaintune run` would.

    Writes data/train.jsonl, data/eval.jsonl (and data/quarantine.jsonl with on_bad_rows:
    quarantine), data_card.md and data_card.json, with the same code `domaintune run` uses.
    """
    from domaintune.data.prepare import prepare_recipe

    try:
        directory, prepared = prepare_recipe(recipe, _overrides(set_), output_dir,
                                             console=Console(stderr=True, quiet=as_json), streaming=stream,
                                             workers=workers)
    except DomaintuneError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"directory": str(directory), **prepared.card}, ensure_ascii=False, default=str))
        return
    card = prepared.card
    out.print(f"{card['rows_in']} rows in → {card['kept']['train']} train + {card['kept']['eval']} eval, "
              f"{card['dropped_total']} dropped; personal data redacted: {sum(card['pii']['found'].values())}")
    _warn_label_variants(card)
    out.print(f"data card: {directory / 'data_card.md'}")
    out.print(str(directory))

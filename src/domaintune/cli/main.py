"""The top-level commands: run, quickstart, models, --version."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from domaintune import __version__, catalog
from domaintune.cli.common import err, fail, out
from domaintune.cli.data import data_app
from domaintune.cli.evaluate import compare, eval_
from domaintune.cli.export import export
from domaintune.cli.serve import serve
from domaintune.cli.update import update
from domaintune.cli.registry import registry_app
from domaintune.errors import DomaintuneError

app = typer.Typer(
    rich_markup_mode="markdown",  # joins the lines of a docstring paragraph, as a paragraph
    help="Turn a general foundation model into a domain specialist: fine-tune on your data and prove it beats the base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(rich_markup_mode="markdown", help="The catalog of packaged base models.", invoke_without_command=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")

QUICKSTART_RECIPES = ("support-intents", "clinical-triage")


def _version(value: bool) -> None:
    if value:
        out.print(f"domaintune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """domaintune: fine-tune, evaluate against the base, record how it was made."""


def _result_table(result) -> Table:
    from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline

    table = Table(title=f"{result.task}: base vs tuned on {result.eval_rows} held-out rows")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("tuned", justify="right")
    table.add_column("change", justify="right")
    for name, b, t in headline(result.task, result.base, result.tuned):
        better = (t < b) if name in LOWER_IS_BETTER else (t > b)
        colour = "green" if better else "red"
        table.add_row(name, f"{b:.4f}", f"{t:.4f}", f"[{colour}]{t - b:+.4f}[/]")
    return table


def _run_and_print(recipe: Path, overrides: dict, output_dir: Optional[Path], as_json: bool, quiet: bool,
                   gates: list[str] | None = None, register: bool = True, registry_url: str | None = None,
                   resume: Optional[Path] = None):
    from domaintune.pipeline import run as run_recipe

    progress = Console(stderr=True, quiet=quiet or as_json)
    try:
        result = run_recipe(recipe, overrides=overrides, output_dir=output_dir, console=progress, gates=gates,
                            register=register, registry_url=registry_url, resume=resume)
    except DomaintuneError as exc:
        fail(exc)
    if not as_json:
        out.print(_result_table(result))
        print_gates(result.gates)
        if result.registered:
            out.print(f"registered: {result.registered} (candidate)")
        out.print(f"report: {result.run_dir / 'report.html'}")
        out.print(str(result.run_dir))
    return result


SPEED_LABELS = {"liger": "Liger kernels", "fused_loss": "logit-free loss", "compile_layers": "compiled layers",
                "sparse_dropout": "sparse dropout", "fused_lora": "fused LoRA forward"}


def _dry_run(recipe: Path, overrides: dict, gates: list[str] | None, as_json: bool, quiet: bool) -> None:
    import yaml

    from domaintune.pipeline import dry_run

    try:
        plan = dry_run(recipe, overrides, gates, console=Console(stderr=True, quiet=quiet or as_json))
    except DomaintuneError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(plan))
        return
    speed, t = plan["speed"], plan["recipe"]["training"]
    kernels = [label for name, label in SPEED_LABELS.items() if speed.get(name) is True]
    kernels += [f"activation checkpointing {speed['checkpointing']}"] if speed["checkpointing"] else []
    if plan["task"] == "sft" and t["packing"]:
        kernels.append("rows of mixed lengths packed" if speed["pack_mixed_lengths"] else "rows of similar length padded")
    out.print(f"[bold]{plan['name']}[/]: {plan['task']} on {plan['base_model']} ({plan['method']}), base at "
              f"{plan['base_path']}", highlight=False)
    too_long = f" ({plan['rows_too_long']} more have no answer within max_seq_length)" if plan.get("rows_too_long") else ""
    out.print(f"data: {plan['train_rows']} training rows{too_long}, {plan['eval_rows']} held out; {plan['data']}",
              highlight=False)
    out.print(f"training: {plan['steps']} optimiser steps ({plan['steps_per_epoch']} per epoch), learning rate "
              f"{t['learning_rate']}, batch size {t['batch_size']}, max sequence length {t['max_seq_length']}",
              highlight=False)
    out.print(f"this machine: {speed['device']}, {'bfloat16' if speed['bf16'] else 'float32'}"
              f"{', FSDP' if speed['fsdp'] else ''}; training.speed {t['speed']}: {', '.join(kernels) or 'nothing more'}",
              highlight=False)
    out.print("resolved recipe:")
    out.print(yaml.safe_dump(plan["recipe"], sort_keys=False, allow_unicode=True).rstrip(), highlight=False, markup=False)
    out.print("nothing was trained or written (--dry-run)")


def print_gates(gates: list[dict]) -> None:
    for gate in gates:
        if gate["passed"]:
            out.print(f"[green]gate passed:[/] {gate['expr']}", highlight=False)
        else:
            err.print(f"[bold red]gate failed:[/] {'; '.join(gate['failing'])}", highlight=False, soft_wrap=True)


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a recipe key, e.g. --set training.epochs=1 (repeatable).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where run directories go (default: the recipe's output_dir).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (run_dir, base, tuned, ...) and nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help="A condition the run must meet, e.g. \"tuned.accuracy >= base.accuracy + 0.05\" (repeatable; adds to evaluate.gates). Exit code 3 when one fails.")] = None,
    register: Annotated[bool, typer.Option("--register/--no-register", help="Register the result in the model registry as a new candidate version.")] = True,
    registry_url: Annotated[Optional[str], typer.Option("--registry-url", help="Registry database URL (default: $DOMAINTUNE_REGISTRY_URL or sqlite in $DOMAINTUNE_HOME).")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue a killed run from its last checkpoint: its .partial folder (or the run directory it was to become). Use the same recipe and --set overrides.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe and data, and print the resolved recipe, the number of optimiser steps and what training.speed does on this machine; train and write nothing.")] = False,
) -> None:
    """Run a recipe end to end: data, base evaluation, fine-tuning, tuned evaluation, run directory.

    Ends by printing the run directory (or, with --json, a JSON object with run_dir, base and tuned).
    Exit codes: 0 done, 2 a problem with the recipe or data, 3 a gate failed (the run directory is
    still written).
    """
    from domaintune.recipe import parse_override

    try:
        overrides = dict(parse_override(item) for item in (set_ or []))
    except DomaintuneError as exc:
        fail(exc)
    if dry_run:
        _dry_run(recipe, overrides, gate, as_json, quiet)
        return
    result = _run_and_print(recipe, overrides, output_dir, as_json, quiet, gate, register, registry_url, resume)
    if as_json:
        print(json.dumps(result.summary()))
    if not result.passed:
        raise typer.Exit(3)


def example_recipe(name: str) -> Path:
    """An example recipe shipped with domaintune (in the wheel, or in a source checkout)."""
    here = Path(__file__).resolve().parents[1]  # the domaintune package folder
    for root in (here / "examples", here.parents[1] / "recipes"):
        candidate = root / name / "recipe.yaml"
        if candidate.is_file():
            return candidate
    raise DomaintuneError(f"example recipe {name!r} not found in this installation")


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where run directories go.")] = Path("runs"),
    only: Annotated[Optional[str], typer.Option(help=f"Run one example only: {' or '.join(QUICKSTART_RECIPES)}.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of run summaries.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Fine-tune the packaged models on the shipped example data and compare with the base.

    Support-ticket intents on minilm-l6, then clinical-note triage on smollm2-135m-instruct.
    """
    names = QUICKSTART_RECIPES if only is None else (only,)
    if only is not None and only not in QUICKSTART_RECIPES:
        fail(DomaintuneError(f"unknown example {only!r}", hint=f"use one of {', '.join(QUICKSTART_RECIPES)}"))
    summaries = []
    for name in names:
        try:
            recipe = example_recipe(name)
        except DomaintuneError as exc:
            fail(exc)
        if not as_json:
            out.rule(f"{name}  ({recipe})")
        summaries.append(_run_and_print(recipe, {}, output_dir, as_json, quiet).summary())
    if as_json:
        print(json.dumps(summaries))


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the catalog (also: `domaintune models pull NAME`)."""
    if ctx.invoked_subcommand is not None:
        return
    table = Table(title="base models")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("here")
    table.add_column("package")
    table.add_column("description", overflow="fold")
    for entry in catalog.CATALOG.values():
        here = "[green]yes[/]" if catalog.is_available(entry.name) else "[yellow]no: domaintune models pull[/]"
        table.add_row(entry.name, entry.kind, here, f"{entry.package}=={entry.version}", entry.description)
    out.print(table)
    out.print("A recipe's base_model may also be a local Hugging Face model folder or a .gguf file.")


@models_app.command("pull")
def models_pull(
    names: Annotated[Optional[list[str]], typer.Argument(help="Catalog names.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Pull every catalog model.")] = False,
) -> None:
    """Fetch catalog models and prepare them for fast offline loading.

    Installs the package's weights only (none of its dependencies) and prepares them in the cache
    ($DOMAINTUNE_HOME, default ~/.cache/domaintune).
    """
    chosen = list(catalog.CATALOG) if all_ else list(names or [])
    if not chosen:
        fail(DomaintuneError("name a model to pull", hint=f"e.g. `domaintune models pull {next(iter(catalog.CATALOG))}` or --all"))
    from domaintune.pipeline import quiet_libraries

    quiet_libraries()
    for name in chosen:
        try:
            with err.status(f"pulling {name}"):
                model = catalog.pull(name)
        except DomaintuneError as exc:
            fail(exc)
        out.print(f"{name}: ready at {model.path}")


# listed after run, quickstart and models
app.command("eval")(eval_)
app.command("compare")(compare)
app.command("export")(export)
app.command("serve")(serve)
app.command("update")(update)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""`domaintune eval` and `domaintune compare`: evaluate finished runs again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from domaintune.cli.common import err, fail, out
from domaintune.errors import DomaintuneError

GATE_HELP = ("A condition each evaluated run must meet, e.g. \"tuned.accuracy >= base.accuracy + 0.05\" "
             "(repeatable). Exit code 3 when one fails.")


def _table(title: str, task: str, runs: dict[str, dict]) -> Table:
    """One row per metric; base and tuned columns for each run."""
    from domaintune.evaluate.metrics import HEADLINE

    table = Table(title=title)
    table.add_column("metric")
    for name, metrics in runs.items():
        if "base" in metrics:
            table.add_column(f"{name}\nbase", justify="right")
        table.add_column(f"{name}\ntuned", justify="right")
    for metric in HEADLINE[task]:
        cells = []
        for metrics in runs.values():
            ci = metrics.get("intervals", {}).get(metric, {})
            for model in ("base", "tuned") if "base" in metrics else ("tuned",):
                low_high = ci.get(model)
                cells.append(f"{metrics[model][metric]:.4f}"
                             + (f" [{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""))
        table.add_row(metric, *cells)
    return table


def _versus_table(compared: dict) -> Table:
    """Each later run's tuned model against the first run's, paired on the same rows."""
    reference = Path(next(iter(compared["runs"]))).name
    table = Table(title=f"tuned against {reference}'s tuned, row by row on the same rows")
    for column in ("run", "metric", "change", "95% interval", "p"):
        table.add_column(column, justify="left" if column in ("run", "metric") else "right")
    for name, metrics in compared["versus_first"].items():
        for metric, d in metrics.items():
            table.add_row(Path(name).name, metric, f"{d['change']:+.4f}",
                          f"{d['difference'][0]:+.4f} to {d['difference'][1]:+.4f}", f"{d['p_value']:.2g}")
    return table


def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (what `domaintune run` printed).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluate on this file (same schema as the run's data) instead of the run's held-out rows; it goes through the run's data steps.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object shaped like metrics.json and nothing else.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help=GATE_HELP)] = None,
) -> None:
    """Evaluate a finished run, base and tuned, on its held-out rows or on another file.

    Exit codes: 0 done, 2 a problem with the run or the data, 3 a gate failed.
    """
    from domaintune.cli.main import print_gates
    from domaintune.evaluate.run_eval import evaluate_run
    from domaintune.pipeline import quiet_libraries

    quiet_libraries()
    try:
        metrics = evaluate_run(run_dir, data, console=Console(stderr=True, quiet=quiet or as_json), gates=gate)
    except DomaintuneError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(metrics))
    else:
        dropped = metrics["data"].get("dropped")
        if dropped:
            err.print("rows dropped by the run's data steps: "
                      + ", ".join(f"{n} by {step}" for step, n in dropped.items()), highlight=False)
            for row in metrics["data"].get("dropped_rows", []):
                err.print(f"  {row['where']}: {row['reason']} ({row['step']})", highlight=False, markup=False)
        out.print(_table(f"{metrics['task']}: {metrics['eval_rows']} rows of {metrics['data']['file']}",
                         metrics["task"], {Path(metrics["run_dir"]).name: metrics}))
        print_gates(metrics["gates"])
    if not all(g["passed"] for g in metrics["gates"]):
        raise typer.Exit(3)


def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run directories of one task.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Evaluate on this file (processed by the first run's data steps) instead of the first run's held-out rows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object {task, eval_rows, data, runs: {run_dir: metrics}, versus_first: {run_dir: {metric: {change, difference, p_value}}}}.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    gate: Annotated[Optional[list[str]], typer.Option("--gate", help=GATE_HELP)] = None,
) -> None:
    """The same evaluation rows through several runs, each against its own base, side by side, and
    each later run against the first on the same rows (the change, its paired 95% interval, p).

    Exit codes: 0 done, 2 a problem with a run or the data, 3 a gate failed for some run.
    """
    from domaintune.cli.main import print_gates
    from domaintune.evaluate.run_eval import compare_runs
    from domaintune.pipeline import quiet_libraries

    quiet_libraries()
    try:
        compared = compare_runs(run_dirs, data, console=Console(stderr=True, quiet=quiet or as_json), gates=gate)
    except DomaintuneError as exc:
        fail(exc)
    passed = all(g["passed"] for m in compared["runs"].values() for g in m["gates"])
    if as_json:
        print(json.dumps(compared))
    else:
        out.print(_table(f"{compared['task']}: {compared['eval_rows']} rows of {compared['data']['file']}",
                         compared["task"], {Path(name).name: m for name, m in compared["runs"].items()}))
        if any(compared["versus_first"].values()):
            out.print(_versus_table(compared))
        for name, metrics in compared["runs"].items():
            if metrics["leaked_rows"]:
                err.print(f"[yellow]{Path(name).name}: {metrics['leaked_rows']} of these rows duplicate or overlap its training rows[/]")
            if metrics["gates"]:
                out.print(f"{Path(name).name}:", highlight=False)
                print_gates(metrics["gates"])
    if not passed:
        raise typer.Exit(3)

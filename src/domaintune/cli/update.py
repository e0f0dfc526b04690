"""``domaintune update``: a new version of a registered model, gated against production."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domaintune.cli.common import err, fail, out
from domaintune.errors import DomaintuneError


def update(
    name: Annotated[str, typer.Argument(help="The registered model to update (its production version is the start).")],
    data: Annotated[Optional[list[Path]], typer.Option("--data", "-d", help="A file of new rows in the recipe's format (repeatable).")] = None,
    feedback: Annotated[bool, typer.Option("--feedback", help="Add the corrections captured by the server for this model.")] = False,
    feedback_db: Annotated[Optional[Path], typer.Option("--feedback-db", help="The server's feedback store (default: feedback.db in $DOMAINTUNE_HOME).")] = None,
    feedback_name: Annotated[Optional[list[str]], typer.Option("--feedback-name", help="With --feedback, also the feedback stored under this name: the name the server served the model as, where the feedback file was written before the server recorded registry names (repeatable).")] = None,
    since: Annotated[Optional[str], typer.Option("--since", help="Only feedback given on or after this date (ISO, e.g. 2025-06-01); with --watch, where its first batch starts.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be trained on (by source, duplicates, personal data) and stop.")] = False,
    gate: Annotated[Optional[str], typer.Option("--gate", help="Condition on every earlier eval set; base. is production, tuned. the candidate (default: difference.\\<metric>.low >= -tolerance).")] = None,
    gate_new: Annotated[Optional[str], typer.Option("--gate-new", help="Condition on the new eval rows (default: difference.\\<metric> >= 0, no worse than production).")] = None,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Largest drop the default gate accepts on an earlier eval set (update.tolerance).")] = None,
    replay_ratio: Annotated[Optional[float], typer.Option("--replay-ratio", help="Earlier training rows mixed in, per new training row (update.replay_ratio).")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", help="update.learning_rate (default: half of production's).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="update.epochs (default: production's).")] = None,
    preference: Annotated[Optional[bool], typer.Option("--preference/--no-preference", help="sft: also train corrections of answers rated bad as preference pairs, with DPO (update.preference).")] = None,
    beta: Annotated[Optional[float], typer.Option("--beta", help="DPO's beta for --preference (update.beta, default 0.1).")] = None,
    promote: Annotated[bool, typer.Option("--promote/--no-promote", help="Promote a candidate that passes to production, or leave it in staging.")] = True,
    watch: Annotated[Optional[Path], typer.Option("--watch", help="Keep watching this folder: update whenever --min-rows new rows have arrived in files dropped into it (and as feedback, with --feedback).")] = None,
    min_rows: Annotated[Optional[int], typer.Option("--min-rows", min=1, help="--watch: the new rows that start an update (default 100).")] = None,
    interval: Annotated[Optional[float], typer.Option("--interval", min=1, help="--watch: seconds between two looks at the folder (default 30).")] = None,
    once: Annotated[bool, typer.Option("--once", help="--watch: look once, update if enough rows have arrived, and exit (for cron).")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Where the run directory goes (default: next to production's).")] = None,
    registry_url: Annotated[Optional[str], typer.Option("--registry-url", help="Registry database URL (default: $DOMAINTUNE_REGISTRY_URL or sqlite in $DOMAINTUNE_HOME).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object and nothing else (with --watch: one a poll, a line each).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Train a new version of NAME from production on new rows and feedback, gated against production.

    The new rows come with a replay of earlier ones; the candidate is compared with production on
    every earlier eval set and on the new rows.

    Exit codes: 0 promoted (or staged, or a dry run), 2 a problem with the input, 3 the gate
    rejected the candidate (it is registered as archived; production is unchanged).

    With --watch DIR it runs until Ctrl-C, updating whenever --min-rows new rows have arrived
    (state in DIR/.domaintune-watch.json; a rejected or failed batch is recorded and not retried).
    With --once it looks once and exits: 0 nothing to do, promoted or staged; 2 the update failed
    on its input; 3 the gate rejected it.
    """
    from domaintune.update.updater import update as run_update

    progress = Console(stderr=True, quiet=quiet or as_json)
    options = dict(gate=gate, gate_new=gate_new, promote=promote, replay_ratio=replay_ratio, learning_rate=learning_rate,
                   epochs=epochs, tolerance=tolerance, preference=preference, beta=beta, output_dir=output_dir,
                   feedback_names=feedback_name or [])
    try:
        _check_watch_flags(watch, data, dry_run, min_rows, interval, once)
        if feedback_name and not feedback:
            raise DomaintuneError("--feedback-name only makes sense with --feedback", where="--feedback-name",
                                  hint="add --feedback")
        if watch is not None:
            return _watch(name, watch, min_rows=100 if min_rows is None else min_rows,
                          interval=30 if interval is None else interval, once=once, as_json=as_json, progress=progress, feedback=feedback, feedback_db=feedback_db,
                          since=since, registry_url=registry_url, **options)
        result = run_update(name, data or [], feedback=feedback, feedback_db=feedback_db, since=since, dry_run=dry_run,
                            registry_url=registry_url, console=progress, **options)
    except DomaintuneError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(result.summary(), default=str))
    elif dry_run:
        _print_data(result)
    else:
        _print_result(result)
    if not dry_run and not result.passed:
        raise typer.Exit(3)


def _check_watch_flags(watch: Path | None, data: list[Path] | None, dry_run: bool, min_rows: int | None,
                       interval: float | None, once: bool) -> None:
    if watch is None:
        given = [flag for flag, value in (("--min-rows", min_rows), ("--interval", interval), ("--once", once or None))
                 if value is not None]
        if given:
            raise DomaintuneError(f"{' and '.join(given)} only make sense with --watch", where=given[0],
                                  hint="add --watch DIR (the folder new data files are dropped into)")
    elif data:
        raise DomaintuneError("--watch takes its data from the folder, not from --data", where="--data",
                              hint=f"drop the files into {watch} instead, or run the update without --watch")
    elif dry_run:
        raise DomaintuneError("--watch cannot be combined with --dry-run", where="--dry-run",
                              hint="to see what files would train, run `domaintune update NAME --data FILE --dry-run`")


def _watch(name: str, directory: Path, *, min_rows: int, interval: float, once: bool, as_json: bool,
           progress: Console, **options) -> None:
    """Look at ``directory`` every ``interval`` seconds (once with ``once``), updating whenever
    ``min_rows`` new rows are waiting; each update's result is printed as a plain update's is."""
    from domaintune.update.watch import Watcher

    with Watcher(name, directory, min_rows=min_rows, console=progress, **options) as watcher:
        try:
            while True:
                poll = watcher.poll()
                if as_json:
                    print(json.dumps(poll.summary(), default=str), flush=True)
                elif poll.result is not None:
                    _print_result(poll.result)
                elif poll.update is not None:
                    err.print(f"[bold red]update failed:[/] {escape(str(poll.update['error']))}", highlight=False, soft_wrap=True)
                if once:
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            # Between polls nothing is lost; during an update its files were not marked taken
            # and are taken again at the next poll.
            progress.print(f"{name}: stopped watching {directory}")
            return
    outcome = poll.update["outcome"] if poll.update else None
    if outcome in ("rejected", "error"):
        raise typer.Exit(3 if outcome == "rejected" else 2)


def _print_data(result) -> None:
    summary = result.assembly.summary()
    out.print(f"update of {result.parent} would train on:")
    for source, count in sorted(summary["train_rows"].items()):
        out.print(f"  {source:<9} {count} rows")
    out.print(f"  held out  {summary['eval_rows']} new rows" + ("" if summary["new_eval"] else " (production's eval set)"))
    out.print(f"duplicates of earlier data dropped: {summary['earlier_duplicates_dropped']}; "
              f"dropped by the data steps: {summary['dropped_by_data_steps']}")
    pii = summary["pii_found"]
    out.print(f"personal data found: {sum(pii.values())}" + (f" ({', '.join(f'{n} {k}' for k, n in sorted(pii.items()))})" if pii else ""))
    if summary["feedback_skipped"]:
        out.print("feedback not used: " + ", ".join(f"{n} {k}" for k, n in sorted(summary["feedback_skipped"].items())))


def _print_result(result) -> None:
    table = Table(title=f"{result.name}: candidate vs production {result.parent}")
    for column in ("eval set", "rows", "production", "candidate", "change (95% interval)", "gate"):
        table.add_column(column, justify="left" if column == "eval set" else "right")
    for c in result.comparisons:
        metric = next(iter(c["intervals"]), None) or next(k for k in c["candidate"] if k != "model")
        interval = c["intervals"].get(metric, {}).get("difference")
        change = c["candidate"][metric] - c["production"][metric]
        held = all(g["passed"] for g in c["gates"])
        table.add_row(c["eval_set"], str(c["eval_rows"]), f"{c['production'][metric]:.4f} {metric}",
                      f"{c['candidate'][metric]:.4f}",
                      f"{change:+.4f}" + (f" ({interval[0]:+.4f} to {interval[1]:+.4f})" if interval else ""),
                      "[green]held[/]" if held else "[red]failed[/]")
    out.print(table)
    for clause in result.failing:
        err.print(f"[bold red]gate failed:[/] {escape(clause)}", highlight=False, soft_wrap=True)
    verdict = {"production": "promoted to production", "staging": "left in staging",
               "archived": "rejected (archived; production unchanged)"}[result.stage]
    out.print(f"{result.registered}: {verdict}")
    out.print(f"report: {result.run_dir / 'update_report.md'}")
    out.print(str(result.run_dir))

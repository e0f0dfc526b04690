"""``domaintune registry``: versions, stages, lineage checks and the audit log of fine-tuned models.

Exit codes: 0 done; 2 a user's error (unknown name, bad stage, incomplete run directory);
3 a promotion the policy refused; 4 ``verify`` found a mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from domaintune.cli.common import fail, out
from domaintune.errors import DomaintuneError

if TYPE_CHECKING:
    from domaintune.registry.audit import AuditEntry
    from domaintune.registry.store import ModelVersion, Registry

registry_app = typer.Typer(
    rich_markup_mode="markdown",  # joins the lines of a docstring paragraph, as a paragraph
    help="Registered model versions: stages (candidate → staging → production → archived), promotion policy, "
         "lineage checks and the audit log.",
    no_args_is_help=True,
)

EXIT_REFUSED = 3
EXIT_MISMATCH = 4

RegistryUrl = Annotated[Optional[str], typer.Option(
    "--registry-url", help="Database URL (default: $DOMAINTUNE_REGISTRY_URL, else sqlite:///$DOMAINTUNE_HOME/registry.db); "
                           "postgresql://user@host/db for PostgreSQL.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@contextmanager
def _open(url: str | None) -> Iterator[Registry]:
    """The registry, with its errors printed the CLI's way (exit 2; a refused promotion exits 3)."""
    from domaintune.registry.errors import PromotionRefused
    from domaintune.registry.store import Registry

    try:
        with Registry(url) as registry:
            yield registry
    except PromotionRefused as exc:
        fail(exc, EXIT_REFUSED)
    except DomaintuneError as exc:
        fail(exc)


def _ref(text: str, *, needs_version: bool = False) -> tuple[str, int | str | None]:
    from domaintune.registry.store import parse_ref

    name, version = parse_ref(text)
    if needs_version and version is None:
        raise DomaintuneError(f"name a version: {text}:VERSION", hint="`domaintune registry list` shows the versions")
    return name, version


def _as_json(version: ModelVersion) -> dict[str, Any]:
    return {**asdict(version), "ref": version.ref, "run_dir": str(version.run_dir)}


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _headline(version: ModelVersion) -> str:
    """The headline metric with the rows it was measured on; for an update, also what it scored on
    the earlier versions' frozen eval sets, beside production there: its own new eval rows may be
    a handful, and a number on 4 rows next to one on 144 misleads."""
    metric, value = version.headline
    text = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else f"{metric} ?"
    rows = version.metrics.get("eval_rows")
    text += f" on {rows} rows" if rows is not None else ""
    for c in version.metrics.get("update", {}).get("comparisons", []):
        if c["eval_set"] != "new rows" and isinstance(c.get("candidate"), (int, float)):
            text += (f"; {c['candidate']:.4f} on {c['eval_set']}'s {c['eval_rows']} rows (production then "
                     f"{c['production']:.4f}{'' if c['passed'] else ', gate failed'})")
    return text


@registry_app.command("list")
def list_(
    name: Annotated[Optional[str], typer.Argument(help="Only this model's versions.")] = None,
    stage: Annotated[Optional[str], typer.Option(help="Only versions in this stage.")] = None,
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """List registered versions with their stage and headline metric."""
    with _open(registry_url) as registry:
        versions = registry.list(name, stage)
        if name is not None and not versions:
            registry.require(name)
    if as_json:
        _print_json([_as_json(v) for v in versions])
        return
    table = Table(title=f"registry: {len(versions)} versions")
    for column in ("model", "version", "stage", "tuned", "registered (UTC)", "by"):
        table.add_column(column, no_wrap=column in ("model", "version", "stage"), overflow="fold")
    colours = {"production": "green", "staging": "cyan", "archived": "dim"}
    for v in versions:
        stage_text = f"[{colours[v.stage]}]{v.stage}[/]" if v.stage in colours else v.stage
        table.add_row(v.name, str(v.version), stage_text, _headline(v), v.registered_at[:16].replace("T", " "),
                      v.registered_by)
    out.print(table)


@registry_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME:VERSION or NAME:STAGE (default: the newest version).")],
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Show one version: stage, metrics against the base, gates, lineage and the model's audit history."""
    from domaintune.registry.policy import gate_name

    with _open(registry_url) as registry:
        version = registry.get(*_ref(ref))
        history = registry.audit(version.name)
    if as_json:
        _print_json({**_as_json(version), "history": [asdict(e) for e in history]})
        return
    lineage = version.lineage
    out.print(f"[bold]{version.ref}[/]  {version.stage}  ({version.task})")
    out.print(f"run: {version.run_dir}  (id {version.run_id})")
    out.print(f"registered {version.registered_at} by {version.registered_by}")
    metrics = Table(title=f"on {version.metrics.get('eval_rows', '?')} held-out rows")
    for column in ("metric", "base", "tuned", "tuned 95% interval"):
        metrics.add_column(column)
    intervals = version.metrics.get("intervals", {})
    for key, tuned in version.metrics["tuned"].items():
        if isinstance(tuned, (int, float)):
            base = version.metrics.get("base", {}).get(key)
            interval = intervals.get(key, {}).get("tuned")
            metrics.add_row(key, f"{base:.4f}" if isinstance(base, (int, float)) else "", f"{tuned:.4f}",
                            f"{interval[0]:.4f}-{interval[1]:.4f}" if interval else "")
    out.print(metrics)
    _print_update(version.metrics.get("update"))
    for gate in version.metrics.get("gates", []):
        out.print(f"gate {'[green]passed[/]' if gate.get('passed') else '[red]failed[/]'}: {escape(gate_name(gate))}")
    base_model = lineage.get("base_model", {})
    out.print(f"base model: {base_model.get('name', '?')} ({len(base_model.get('files', []))} weight files hashed)")
    for data in lineage.get("data", []):
        out.print(f"data: {data['file']}  sha256 {data['sha256'][:16]}…")
    out.print(f"artifacts recorded: {len(version.artifacts)} files; code: domaintune {lineage.get('domaintune_version', '?')}")
    for entry in history:
        out.print(f"  #{entry.seq} {entry.time[:19]} {escape(entry.actor)} {_action(entry)} {escape(entry.target)}"
                  + (f" — {escape(entry.reason)}" if entry.reason else ""), highlight=False)


def _print_update(update: dict[str, Any] | None) -> None:
    """An update's candidate against the production it started from, on the same rows of each eval set."""
    if not update:
        return
    table = Table(title=f"update of {update['parent']}: candidate vs production on the same rows ({update['metric']})")
    for column in ("eval set", "rows", "production", "candidate", "change 95% interval", "gate"):
        table.add_column(column)
    for c in update["comparisons"]:
        interval = c.get("difference")
        table.add_row(c["eval_set"], str(c["eval_rows"]), _short(c["production"]), _short(c["candidate"]),
                      f"{interval[0]:+.4f} to {interval[1]:+.4f}" if interval else "",
                      "[green]held[/]" if c["passed"] else "[red]failed[/]")
    out.print(table)


def _action(entry: AuditEntry) -> str:
    """The action with the stage change it made, e.g. ``promote staging→production``, and the
    policy refusals it overrode, if any (rich markup)."""
    action = entry.action
    if entry.action in ("promote", "promote-refused", "rollback") and "to" in entry.details:
        action += f" {entry.details['from']}→{entry.details['to']}"
    # A forced promotion must stand out wherever the log is read, not only in --json.
    if forced_over := entry.details.get("forced_over"):
        action += " [bold red]FORCED[/] over: " + escape("; ".join(forced_over))
    if entry.action == "promote-refused" and entry.details.get("refusals"):  # why, not only in --json
        action += ": " + escape("; ".join(entry.details["refusals"]))
    return action


@registry_app.command()
def register(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `domaintune run`.")],
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Register a run directory as the next candidate version of its recipe's name."""
    with _open(registry_url) as registry:
        version = registry.register(run_dir)
    if as_json:
        _print_json(_as_json(version))
    else:
        out.print(f"registered {version.ref} (candidate): {_headline(version)}, {len(version.artifacts)} files hashed")


@registry_app.command()
def promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME:STAGE).")],
    to: Annotated[str, typer.Option("--to", help="staging, production or archived.")],
    force: Annotated[bool, typer.Option("--force", help="Override a policy refusal; needs --reason.")] = False,
    reason: Annotated[Optional[str], typer.Option("--reason", help="Why; written to the audit log.")] = None,
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Move a version to another stage, if the promotion policy allows it.

    Production takes versions from staging; every gate recorded in metrics.json must have passed;
    the tuned model must not be worse than its base (refused when the paired 95% interval of tuned −
    base on the headline metric lies entirely on the worse side of 0); the headline metric must not
    regress against the current production version (refused when even the favourable end of the
    candidate's 95% interval is worse than production's value; the line says when the two were
    scored on different eval rows). A refusal exits with code 3 and says why; --force --reason '...'
    overrides it and records the justification.
    """
    with _open(registry_url) as registry:
        name, version = _ref(ref, needs_version=True)
        promotion = registry.promote(name, version, to, force=force, reason=reason)
    if as_json:
        _print_json({"version": _as_json(promotion.version), "forced": promotion.forced,
                     "refusals": promotion.decision.refusals, "checks": promotion.decision.passed,
                     "replaced": promotion.replaced.ref if promotion.replaced else None})
        return
    for check in promotion.decision.passed:
        out.print(f"[green]✓[/] {check}", highlight=False)
    for refusal in promotion.decision.refusals:
        out.print(f"[yellow]forced over:[/] {refusal}", highlight=False)
    replaced = f" (archived {promotion.replaced.ref})" if promotion.replaced else ""
    out.print(f"{promotion.version.ref} → {promotion.version.stage}{replaced}")


@registry_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; written to the audit log.")],
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Archive the production version and restore the production version it replaced."""
    with _open(registry_url) as registry:
        restored = registry.rollback(name, reason=reason)
    if as_json:
        _print_json(_as_json(restored))
    else:
        out.print(f"{restored.ref} is production again")


@registry_app.command()
def diff(
    a: Annotated[str, typer.Argument(help="NAME:VERSION")],
    b: Annotated[str, typer.Argument(help="NAME:VERSION")],
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """What differs between two versions: stage, metrics, recipe and lineage (hashes, libraries, timings)."""
    with _open(registry_url) as registry:
        first, second = registry.get(*_ref(a, needs_version=True)), registry.get(*_ref(b, needs_version=True))
        changes = registry.diff(first, second)
    if as_json:
        _print_json([asdict(c) for c in changes])
        return
    table = Table(title=f"{first.ref} → {second.ref}: {len(changes)} differences")
    for column in ("section", "key", first.ref, second.ref):
        table.add_column(column, overflow="fold")
    for change in changes:
        table.add_row(change.section, change.key, _short(change.a), _short(change.b))
    out.print(table)


def _short(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        value = "[" + ", ".join(f"{v:.4f}" for v in value) + "]"
    text = "—" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
    return text if len(text) <= 40 else text[:37] + "…"


@registry_app.command()
def verify(
    ref: Annotated[Optional[str], typer.Argument(help="NAME or NAME:VERSION (default: every version).")] = None,
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """Check the recorded files' hashes, the registry's tables and the audit chain (exit 4 on any mismatch).

    Recomputes the sha256 of every file recorded at registration (recipe.yaml, metrics.json,
    lineage.json, processed data, adapter/**) and compares it with the hash in the version's
    register entry of the hash-chained audit log; checks the artifacts table, the stored recipe,
    metrics and lineage against that entry, and each version's stage against the one the log's
    promote and rollback entries leave it in; rehashes the inputs lineage.json names (source data,
    base weights) where they are on this machine; and walks the audit chain. Exits 0 when
    everything matches, 4 when anything does not.
    """
    with _open(registry_url) as registry:
        report = registry.verify(*(_ref(ref) if ref else (None, None)))
    if as_json:
        _print_json({"ok": report.ok, "versions": [asdict(c) for c in report.versions], "audit": asdict(report.audit)})
    else:
        for check in report.versions:
            mark = "[green]ok[/]" if not check.problems else f"[red]{len(check.problems)} problem{'s' if len(check.problems) != 1 else ''}[/]"
            out.print(f"{check.ref}: {mark}  ({check.run_dir})", highlight=False)
            for problem in check.problems:
                out.print(f"  {problem}", highlight=False, markup=False)
            if check.inputs_absent:
                out.print(f"  not on this machine, not rehashed: {', '.join(check.inputs_absent)}", highlight=False)
        audit = report.audit
        out.print(f"audit log: {audit.entries} entries, " + ("[green]chain intact[/]" if audit.ok
                  else f"[red]broken at entry {audit.broken_seq}: {audit.problem}[/]"), highlight=False)
    if not report.ok:
        raise typer.Exit(EXIT_MISMATCH)


@registry_app.command()
def audit(
    name: Annotated[Optional[str], typer.Argument(help="Only entries about this model.")] = None,
    as_json: Json = False,
    registry_url: RegistryUrl = None,
) -> None:
    """The audit log: who did what, when and why, oldest first.

    Ends with the hash of the newest entry: keep a copy of it elsewhere to detect a log that was
    rewritten later.
    """
    with _open(registry_url) as registry:
        entries = registry.audit(name)
        chain = registry.verify_audit()
    if as_json:
        _print_json({"entries": [asdict(e) for e in entries], "head_hash": chain.head_hash, "chain_ok": chain.ok})
        return
    table = Table(title=f"audit log: {len(entries)} entries")
    for column in ("seq", "time (UTC)", "actor", "action", "target", "reason"):
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(str(e.seq), e.time[:19].replace("T", " "), escape(e.actor), _action(e), escape(e.target),
                      escape(e.reason or ""))
    out.print(table)
    out.print(f"head: {chain.head_hash}", highlight=False)
    if not chain.ok:
        out.print(f"[red]chain broken at entry {chain.broken_seq}: {chain.problem}[/] (see `domaintune registry verify`)",
                  highlight=False)


@registry_app.command()
def delete(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION")],
    reason: Annotated[str, typer.Option("--reason", help="Why; written to the audit log.")],
    registry_url: RegistryUrl = None,
) -> None:
    """Remove a version that is not in production from the registry.

    Its files stay on disk and the audit log keeps its record.
    """
    with _open(registry_url) as registry:
        deleted = registry.delete(*_ref(ref, needs_version=True), reason=reason)
    out.print(f"deleted {deleted.ref} from the registry (files kept in {deleted.run_dir})")

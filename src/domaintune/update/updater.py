"""``domaintune update``: a new version of a model from new rows and feedback, starting from the
production version, judged against it on every earlier version's frozen eval set.

    production (adapter + resolved recipe) ──▶ assemble data ──▶ train from its adapter (a run)
        ──▶ candidate vs production on each frozen eval set and the new rows ──▶ gate
        ──▶ pass: register and promote (or stage)   fail: register and reject (archived)

The update is an ordinary run directory with two more files: ``update.json`` (what it was made
from and the whole comparison) and ``update_report.md``. "Rejected" is the ``archived`` stage
with an audit entry whose reason lists the failing clauses: the registry's stages stay as they
are, and a rejected version is never a rollback target (it was never in production).

Preference pairs (``update.preference``): a correction of an answer rated bad is an sft row as
any correction, and also a pair, the correction chosen over the served answer. The run trains
on the sft rows (new, feedback, replay) as always, then runs DPO on the pairs
(``train.preference``), its reference production's model as the update starts (the log-probs
are taken before the sft phase). The sft row makes the model say the correction; the pair, in
addition, makes it less likely to give the answer that was rated bad. Keeping the row keeps the
data steps and the check against earlier eval sets in charge of what a pair may contain (a pair
exists only for a row they kept), and an update never has zero sft rows to train on. The phase
leaves ``preference/`` in the run directory (its log, the pairs with their feedback ids and
reviewers, reward accuracy before and after), and ``update.json`` lists ``pair_ids``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from domaintune.errors import DataError
from domaintune.evaluate.gates import check_gate, validate_gate
from domaintune.registry.errors import PromotionRefused, RegistryError
from domaintune.registry.policy import headline_metric
from domaintune.registry.store import ModelVersion, Registry
from domaintune.update.assemble import Ancestor, Assembly, ancestors, assemble
from domaintune.update.feedback_rows import FeedbackRows, feedback_rows, parse_since
from domaintune.update.settings import UpdateConfig, default_gates, update_config

if TYPE_CHECKING:
    from domaintune.serve.feedback import FeedbackRecord, FeedbackStore
    from domaintune.train.preference import PreferencePhase


@dataclass
class UpdateResult:
    """What an update did; ``run_dir`` is None after a dry run."""

    name: str
    task: str
    parent: str  # the production version it started from
    assembly: Assembly
    settings: UpdateConfig
    run_dir: Path | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    registered: str | None = None
    stage: str | None = None  # production, staging, or archived (rejected)
    refused: list[str] = field(default_factory=list)  # the registry policy's reasons, when it refused staging

    @property
    def failing(self) -> list[str]:
        """Every failing gate clause, prefixed with the eval set it failed on, and the registry
        policy's refusals."""
        return [f"{c['eval_set']}: {clause}" for c in self.comparisons for g in c["gates"] for clause in g["failing"]] \
            + [f"registry policy: {reason}" for reason in self.refused]

    @property
    def passed(self) -> bool:
        return not self.failing

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "data": self.assembly.summary(),
                "settings": self.settings.model_dump(), "run_dir": str(self.run_dir) if self.run_dir else None,
                "comparisons": self.comparisons, "passed": self.passed if self.run_dir else None,  # a dry run judged nothing
                "failing": self.failing,
                "registered": self.registered, "stage": self.stage}


def update(name: str, data: list[str | Path] = (), *, feedback: bool = False, feedback_db: str | Path | None = None,
           feedback_names: Sequence[str] = (), since: str | None = None, dry_run: bool = False,
           gate: str | None = None, gate_new: str | None = None, promote: bool = True,
           replay_ratio: float | None = None, learning_rate: float | None = None, epochs: float | None = None,
           tolerance: float | None = None, preference: bool | None = None, beta: float | None = None, registry_url: str | None = None, output_dir: str | Path | None = None,
           console: Console | None = None) -> UpdateResult:
    """Update model ``name`` from its production version with the rows of ``data`` files and
    (``feedback``) the corrections in the feedback store (``feedback_db``, newer than ``since``),
    those stored under ``name`` and under each of ``feedback_names`` (names the server served it as).

    The keyword settings override the production recipe's ``update:`` section for this update.
    ``dry_run`` assembles the data, reports it and stops. Otherwise the candidate is trained,
    compared, registered and, if every gate holds, promoted to production (to staging only
    without ``promote``); if not, it is archived with the failing clauses in the audit log.
    Run directories go under ``output_dir`` (default: next to production's)."""
    console = console or Console(stderr=True, quiet=True)
    with Registry(registry_url) as registry:
        production = _production(registry, name)
        registry.require_unchanged(production)  # the update trains from its files
        settings = update_config(production.recipe, {"replay_ratio": replay_ratio, "learning_rate": learning_rate,
                                                     "epochs": epochs, "tolerance": tolerance, "gate": gate,
                                                     "gate_new": gate_new, "preference": preference, "beta": beta})
        gates = _gates(production.task, settings)
        line = ancestors(production.ref, production.run_dir)
        registered = {v.name for v in registry.list()}
        rows = (_feedback(name, production.task, line, feedback_db, feedback_names, since, settings.preference,
                          registered, console, warn=bool(data)) if feedback else FeedbackRows())
        out_root = Path(output_dir) if output_dir is not None else production.run_dir.parent.parent
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        workdir = Path(tempfile.mkdtemp()) if dry_run else out_root / name / "updates" / stamp
        made = _missing_folders(workdir)
        try:
            assembly = assemble(production.recipe, line, [Path(p) for p in data], rows, settings, workdir, console)
        except BaseException:
            _remove(workdir, made)
            raise
        result = UpdateResult(name, production.task, production.ref, assembly, settings)
        if dry_run:
            shutil.rmtree(workdir, ignore_errors=True)
            return result

        from domaintune.pipeline import run

        console.print(f"[bold]{name}[/]: updating {production.ref} with {dict(assembly.train_rows)} training rows")
        try:
            run_result = run(assembly.recipe, output_dir=out_root, console=console, register=False,
                             init_from=production.run_dir,
                             preference=_preference_phase(assembly, settings, production))
        except BaseException:
            _remove(workdir, made)  # the run cleans up after itself; the update's inputs go with it
            raise
        result.run_dir = run_result.run_dir
        result.comparisons = _compare(result.run_dir, production, line, assembly, gates, console)
        _record_in_metrics(result)
        version = registry.register(result.run_dir)
        result.registered = version.ref
        _write_record(result, line)  # before the decision too: a refused promotion still leaves the record
        result.stage = _decide(registry, version, result, promote)
        _write_record(result, line)
    return result


def _production(registry: Registry, name: str) -> ModelVersion:
    try:
        return registry.get(name, "production")
    except RegistryError:
        pass
    everything = registry.list()
    versions = [v for v in everything if v.name == name]
    if not versions:
        names = sorted({v.name for v in everything})
        raise RegistryError(f"no model named {name!r} is registered",
                            hint=f"the registered models: {', '.join(names)}" if names else
                            "the registry has none yet: `domaintune run RECIPE` registers the model it trains")
    staged = [v for v in versions if v.stage == "staging"]
    pick = (staged or versions)[-1]
    steps = ([] if pick.stage == "staging" else [f"`domaintune registry promote {pick.ref} --to staging`"])
    steps.append(f"`domaintune registry promote {pick.ref} --to production`")
    raise RegistryError(f"{name} has no production version to update from; its versions: "
                        + ", ".join(f"{v.version} ({v.stage})" for v in versions),
                        hint="an update starts from production: put a version there first, e.g. "
                             + ", then ".join(steps))


def _gates(task: str, settings: UpdateConfig) -> dict[str, str]:
    earlier, new = default_gates(task, settings.tolerance)
    chosen = {"earlier": settings.gate or earlier, "new": settings.gate_new or new}
    for expr in chosen.values():
        validate_gate(expr, task)  # a typo should fail before training, not after
    return chosen


def _feedback(name: str, task: str, line: list[Ancestor], feedback_db, names: Sequence[str], since: str | None,
              preference: bool, registered: set[str], console: Console, warn: bool) -> FeedbackRows:
    from domaintune.serve.feedback import FeedbackStore

    if feedback_db is not None and not Path(feedback_db).is_file():
        # Opening it would create an empty store and report no feedback, hiding the typo.
        raise DataError(f"no feedback file at {feedback_db}", where="--feedback-db",
                        hint="give the file the server writes (`domaintune serve --feedback-db`; by default "
                             "feedback.db in $DOMAINTUNE_HOME)")
    store = FeedbackStore(feedback_db)
    try:
        records = feedback_records(store, name, names)
        rows = feedback_rows(records, task, used=feedback_used(line),
                             since=parse_since(since) if since else None, preference=preference)
        rows.asked, rows.store, rows.records = True, str(store.path), len(records)
        if not records:
            # Servers used to store feedback under the name they served a model as, not its
            # registry name; such records are this model's, but nothing here can tell for sure.
            rows.elsewhere = dict(sorted(Counter(r.model for r in store.records()).items()))
            rows.unregistered = [m for m in rows.elsewhere if m not in registered]
    finally:
        store.close()
    if rows.unregistered:
        lost = sum(rows.elsewhere[m] for m in rows.unregistered)
        rows.skipped[f"under another model name ({', '.join(rows.unregistered)}; see --feedback-name)"] += lost
        if warn:  # without other rows the update stops, and its error says this
            console.print(f"[yellow]warning:[/] no feedback for {name}; {lost} records are under "
                          f"{', '.join(rows.unregistered)}, which no registered model is called: if that is the "
                          f"name the server served {name} as, add --feedback-name", highlight=False, soft_wrap=True)
    return rows


def feedback_records(store: FeedbackStore, name: str, names: Sequence[str] = ()) -> list[FeedbackRecord]:
    """The records about model ``name`` in ``store``: under its name and under each of ``names``,
    oldest first."""
    found = {r.id: r for model in dict.fromkeys([name, *names]) for r in store.records(model=model)}
    return sorted(found.values(), key=lambda r: r.created_at)


def feedback_used(line: list[Ancestor]) -> set[str]:
    """The feedback ids the versions of ``line`` were trained on: not new to a later update."""
    used: set[str] = set()
    for ancestor in line:
        record = ancestor.run_dir / "update.json"
        if record.is_file():
            used.update(json.loads(record.read_text(encoding="utf-8"))["data"]["feedback_ids"])
    return used


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove(workdir: Path, made: list[Path]) -> None:
    """Remove ``workdir`` and the parents the update made for it, those still empty (another
    update may have started in one)."""
    shutil.rmtree(workdir, ignore_errors=True)
    for folder in made[1:]:
        try:
            folder.rmdir()
        except OSError:
            break


def _preference_phase(assembly: Assembly, settings: UpdateConfig, production: ModelVersion) -> PreferencePhase | None:
    """DPO on the assembled pairs, batched and cut as production's recipe says; None without pairs."""
    if assembly.pairs is None:
        return None
    from domaintune.train.preference import PreferencePair, PreferencePhase

    rows = [json.loads(line) for line in assembly.pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r["where"],
                            {"source": r["source"], "reviewer": r["reviewer"]}) for r in rows]
    training = production.recipe["training"]
    return PreferencePhase(pairs, beta=settings.beta, batch_size=int(training["batch_size"]),
                           max_length=int(training["max_seq_length"]))


def _compare(run_dir: Path, production: ModelVersion, line: list[Ancestor], assembly: Assembly,
             gates: dict[str, str], console: Console) -> list[dict[str, Any]]:
    """Candidate vs production on each earlier frozen eval set, then on the new eval rows."""
    from domaintune.evaluate.run_eval import load_run_model
    from domaintune.update.compare import compare_runs_on

    with console.status("update: loading the candidate and production"):
        candidate, current = load_run_model(run_dir), load_run_model(production.run_dir)
    sets = [(a.ref, a.eval, a.run_dir / "metrics.json", gates["earlier"]) for a in line]
    if assembly.new_eval:
        sets.append(("new rows", run_dir / "data" / "eval.jsonl", run_dir / "metrics.json", gates["new"]))
    comparisons = []
    for label, eval_file, metrics_file, expr in sets:
        with console.status(f"update: candidate vs production on {label}"):
            compared = compare_runs_on(candidate, current, eval_file, console)
        recorded = json.loads(metrics_file.read_text(encoding="utf-8"))
        comparisons.append({"eval_set": label, "file": str(eval_file), "eval_rows": compared["eval_rows"],
                            "base": recorded["base"], "production": compared["base"], "candidate": compared["tuned"],
                            "intervals": compared["intervals"], "gates": [update_gate(expr, compared)]})
    return comparisons


def update_gate(expr: str, compared: dict[str, Any]) -> dict[str, Any]:
    """``check_gate`` of ``expr`` on a comparison (``base`` = production, ``tuned`` = candidate),
    as a dict, each failing clause that only a wide interval failed saying so."""
    gate = asdict(check_gate(expr, compared))
    gate["failing"] = [clause + _too_few_rows(clause, compared) for clause in gate["failing"]]
    return gate


def _too_few_rows(clause: str, compared: dict[str, Any]) -> str:
    """A note for a failing clause on the low end of an interval whose point estimate is no drop:
    the interval is too wide to show the candidate within bounds, which says the rows are too few,
    not that the candidate is worse; the audit log and the report would otherwise read as a
    regression."""
    expression = clause.split(" (", 1)[0]
    for metric in dict.fromkeys(re.findall(r"\bdifference\.(\w+)\.low\b", expression)):
        if metric not in compared["tuned"] or metric not in compared["intervals"]:
            continue
        change = compared["tuned"][metric] - compared["base"][metric]
        if change >= 0:
            low = compared["intervals"][metric]["difference"][0]
            tolerance = " (or a larger update.tolerance)" if re.search(r">=?\s*-", expression) else ""
            return (f" — insufficient evidence, not a regression: {metric} changed by {change:+.4f}, but on "
                    f"{compared['eval_rows']} rows the 95% interval reaches {low:+.4f}; more eval rows{tolerance} "
                    "would settle it")
    return ""


def _record_in_metrics(result: UpdateResult) -> None:
    """Put the update's verdict where the registry reads a version's record, metrics.json, before
    it is registered (and hashed): its gates, each naming the eval set it held or failed on, and the
    headline metric of candidate and production on each set. Without them the registry saw only the
    candidate's own new eval rows (a handful, often), and a version the gate rejected could be
    promoted later with no gate recorded against it."""
    path = result.run_dir / "metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    metric = headline_metric(result.task)
    metrics["gates"] = [*metrics.get("gates", []),
                        *({**g, "eval_set": c["eval_set"]} for c in result.comparisons for g in c["gates"])]
    metrics["update"] = {"parent": result.parent, "metric": metric, "comparisons": [
        {"eval_set": c["eval_set"], "eval_rows": c["eval_rows"], "production": c["production"].get(metric),
         "candidate": c["candidate"].get(metric), "difference": c["intervals"].get(metric, {}).get("difference"),
         "passed": all(g["passed"] for g in c["gates"])} for c in result.comparisons]}
    path.write_text(json.dumps(metrics, indent=2), encoding="utf-8")


def _write_record(result: UpdateResult, line: list[Ancestor]) -> None:
    from domaintune.update.report import write_update_report

    record = {**result.summary(), "ancestors": [{"ref": a.ref, "run_dir": str(a.run_dir)} for a in line]}
    (result.run_dir / "update.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    write_update_report(result.run_dir / "update_report.md", result)


def _decide(registry: Registry, version: ModelVersion, result: UpdateResult, promote: bool) -> str:
    """Promote a candidate that passed (staging, then production unless ``promote`` is off);
    archive one that failed, the failing clauses as the audit entry's reason."""
    if not result.passed:
        registry.promote(version.name, version.version, "archived",
                         reason="rejected by the update gate: " + "; ".join(result.failing))
        return "archived"
    try:
        registry.promote(version.name, version.version, "staging", reason=f"update of {result.parent}: every gate held")
    except PromotionRefused as exc:
        # The gates compared candidate and production; the policy also holds the candidate to its
        # own base (and its recipe's gates). A refusal there rejects the update like a failed gate.
        result.refused = list(exc.reasons)
        registry.promote(version.name, version.version, "archived",
                         reason="rejected by the registry policy: " + "; ".join(exc.reasons))
        return "archived"
    if not promote:
        return "staging"
    try:
        registry.promote(version.name, version.version, "production", reason=f"update of {result.parent}")
    except PromotionRefused as exc:
        # The policy compares each version's metrics on its own eval rows; the update gate has
        # just compared both versions on the same rows, which is the comparison that counts.
        if not all(reason.startswith("regression:") for reason in exc.reasons):
            raise
        registry.promote(version.name, version.version, "production", force=True,
                         reason=f"update of {result.parent}: the update gate compared both versions on the same "
                                f"eval sets and held (the policy compared different rows: {'; '.join(exc.reasons)})")
    return "production"

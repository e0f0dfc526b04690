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
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from domaintune.evaluate.gates import check_gate, validate_gate
from domaintune.registry.errors import PromotionRefused, RegistryError
from domaintune.registry.store import ModelVersion, Registry
from domaintune.update.assemble import Ancestor, Assembly, ancestors, assemble
from domaintune.update.feedback_rows import FeedbackRows, feedback_rows, parse_since
from domaintune.update.settings import UpdateConfig, default_gates, update_config

if TYPE_CHECKING:
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

    @property
    def failing(self) -> list[str]:
        """Every failing gate clause, prefixed with the eval set it failed on."""
        return [f"{c['eval_set']}: {clause}" for c in self.comparisons for g in c["gates"] for clause in g["failing"]]

    @property
    def passed(self) -> bool:
        return not self.failing

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "parent": self.parent, "data": self.assembly.summary(),
                "settings": self.settings.model_dump(), "run_dir": str(self.run_dir) if self.run_dir else None,
                "comparisons": self.comparisons, "passed": self.passed, "failing": self.failing,
                "registered": self.registered, "stage": self.stage}


def update(name: str, data: list[str | Path] = (), *, feedback: bool = False, feedback_db: str | Path | None = None,
           since: str | None = None, dry_run: bool = False, gate: str | None = None, gate_new: str | None = None,
           promote: bool = True, replay_ratio: float | None = None, learning_rate: float | None = None,
           epochs: float | None = None, tolerance: float | None = None, preference: bool | None = None,
           beta: float | None = None, registry_url: str | None = None, output_dir: str | Path | None = None,
           console: Console | None = None) -> UpdateResult:
    """Update model ``name`` from its production version with the rows of ``data`` files and
    (``feedback``) the corrections in the feedback store (``feedback_db``, newer than ``since``).

    The keyword settings override the production recipe's ``update:`` section for this update.
    ``dry_run`` assembles the data, reports it and stops. Otherwise the candidate is trained,
    compared, registered and, if every gate holds, promoted to production (to staging only
    without ``promote``); if not, it is archived with the failing clauses in the audit log.
    Run directories go under ``output_dir`` (default: next to production's)."""
    console = console or Console(stderr=True, quiet=True)
    with Registry(registry_url) as registry:
        production = _production(registry, name)
        settings = update_config(production.recipe, {"replay_ratio": replay_ratio, "learning_rate": learning_rate,
                                                     "epochs": epochs, "tolerance": tolerance, "gate": gate,
                                                     "gate_new": gate_new, "preference": preference, "beta": beta})
        gates = _gates(production.task, settings)
        line = ancestors(production.ref, production.run_dir)
        rows = (_feedback(name, production.task, line, feedback_db, since, settings.preference) if feedback
                else FeedbackRows())
        out_root = Path(output_dir) if output_dir is not None else production.run_dir.parent.parent
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        workdir = Path(tempfile.mkdtemp()) if dry_run else out_root / name / "updates" / stamp
        try:
            assembly = assemble(production.recipe, line, [Path(p) for p in data], rows, settings, workdir, console)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        result = UpdateResult(name, production.task, production.ref, assembly, settings)
        if dry_run:
            shutil.rmtree(workdir, ignore_errors=True)
            return result

        from domaintune.pipeline import run

        console.print(f"[bold]{name}[/]: updating {production.ref} with {dict(assembly.train_rows)} training rows")
        run_result = run(assembly.recipe, output_dir=out_root, console=console, register=False,
                         init_from=production.run_dir, preference=_preference_phase(assembly, settings, production))
        result.run_dir = run_result.run_dir
        result.comparisons = _compare(result.run_dir, production, line, assembly, gates, console)
        version = registry.register(result.run_dir)
        result.registered = version.ref
        _write_record(result, line)  # before the decision too: a refused promotion still leaves the record
        result.stage = _decide(registry, version, result, promote)
        _write_record(result, line)
    return result


def _production(registry: Registry, name: str) -> ModelVersion:
    try:
        return registry.get(name, "production")
    except RegistryError as exc:
        raise RegistryError(f"{name} has no production version to update: {exc.message}",
                            hint=f"promote a version first: `domaintune registry promote {name}:N production`") from None


def _gates(task: str, settings: UpdateConfig) -> dict[str, str]:
    earlier, new = default_gates(task, settings.tolerance)
    chosen = {"earlier": settings.gate or earlier, "new": settings.gate_new or new}
    for expr in chosen.values():
        validate_gate(expr, task)  # a typo should fail before training, not after
    return chosen


def _feedback(name: str, task: str, line: list[Ancestor], feedback_db, since: str | None,
              preference: bool) -> FeedbackRows:
    from domaintune.serve.feedback import FeedbackStore

    store = FeedbackStore(feedback_db)
    try:
        return feedback_rows(store.records(model=name), task, used=feedback_used(line),
                             since=parse_since(since) if since else None, preference=preference)
    finally:
        store.close()


def feedback_used(line: list[Ancestor]) -> set[str]:
    """The feedback ids the versions of ``line`` were trained on: not new to a later update."""
    used: set[str] = set()
    for ancestor in line:
        record = ancestor.run_dir / "update.json"
        if record.is_file():
            used.update(json.loads(record.read_text(encoding="utf-8"))["data"]["feedback_ids"])
    return used


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
                            "intervals": compared["intervals"], "gates": [asdict(check_gate(expr, compared))]})
    return comparisons


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
    registry.promote(version.name, version.version, "staging", reason=f"update of {result.parent}: every gate held")
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

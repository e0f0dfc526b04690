"""A run directory as the registry sees it: its recipe, metrics and lineage, and the sha256 of
every file that ``verify`` later checks: recipe.yaml, metrics.json, lineage.json, adapter/** and
the processed data that lineage.json lists (``processed_data``, e.g. data/train.jsonl).
model_card.md is left out on purpose: it is regenerated when a version is promoted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from domaintune.catalog import sha256_file
from domaintune.recipe import TASKS
from domaintune.registry.errors import RegistryError

RECORDS = ("recipe.yaml", "metrics.json", "lineage.json")
ADAPTER = "adapter"


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the run directory, with "/" separators
    sha256: str
    bytes: int


@dataclass(frozen=True)
class RunDirectory:
    """What registration reads from a run directory."""

    path: Path
    name: str
    run_id: str
    task: str
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    artifacts: list[Artifact]


def adapter_files(run_dir: Path) -> list[str]:
    """The weights and their configuration, as paths relative to the run directory."""
    adapter = run_dir / ADAPTER
    return sorted(p.relative_to(run_dir).as_posix() for p in adapter.rglob("*") if p.is_file()) if adapter.is_dir() else []


def read_run_dir(run_dir: str | Path) -> RunDirectory:
    """Read and hash a run directory; refuse one that is incomplete or disagrees with its lineage.json."""
    path = Path(run_dir).resolve()
    if not path.is_dir():
        raise RegistryError("no such run directory", where=str(run_dir),
                            hint="give a run directory written by `domaintune run` (it ends the run's output)")
    missing = [name for name in RECORDS if not (path / name).is_file()]
    if not adapter_files(path):
        missing.append(f"{ADAPTER}/")
    lineage = _load(path / "lineage.json", json.loads) if (path / "lineage.json").is_file() else {}
    processed = [entry["file"] for entry in lineage.get("processed_data", [])]
    missing += [rel for rel in processed if not (path / rel).is_file()]
    if missing:
        raise RegistryError(f"not a complete run directory: {', '.join(missing)} missing", where=str(path),
                            hint="register the directory `domaintune run` printed, after the run finished")
    recipe = _load(path / "recipe.yaml", yaml.safe_load)
    metrics = _load(path / "metrics.json", json.loads)
    name = recipe.get("name")
    if not isinstance(name, str) or not name:
        raise RegistryError("the recipe has no name", where=str(path / "recipe.yaml"), hint="add `name: <model name>`")
    task = metrics.get("task")
    if task not in TASKS or not isinstance(metrics.get("tuned"), dict):
        raise RegistryError(f"metrics.json needs a task ({', '.join(TASKS)}) and the tuned model's metrics",
                            where=str(path / "metrics.json"), hint="register a directory written by `domaintune run`")
    artifacts = [Artifact(rel, sha256_file(path / rel), (path / rel).stat().st_size)
                 for rel in [*RECORDS, *processed, *adapter_files(path)]]
    _check_against_lineage(path, lineage, {a.path: a.sha256 for a in artifacts})
    return RunDirectory(path, name, str(lineage.get("run_id") or path.name), task, recipe, metrics, lineage, artifacts)


def check_artifacts(run_dir: Path, recorded: dict[str, str]) -> list[str]:
    """Recompute the hashes of a registered run directory; one line per file that differs from
    what was recorded (changed, missing, or added since)."""
    problems = []
    for rel, sha in sorted(recorded.items()):
        file = run_dir / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif (now := sha256_file(file)) != sha:
            problems.append(f"{rel}: sha256 {now[:12]}… differs from {sha[:12]}… recorded at registration")
    problems += [f"{rel}: added after registration" for rel in adapter_files(run_dir) if rel not in recorded]
    return problems


def check_inputs(lineage: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Rehash the inputs lineage.json names outside the run directory (source data files, base
    model weights). Returns (mismatches, files not on this machine): inputs often live elsewhere,
    so an absent one is reported, not failed; a present one that changed is a mismatch."""
    problems, absent = [], []
    entries = [*lineage.get("data", []), *lineage.get("base_model", {}).get("files", [])]
    for entry in entries:
        file = Path(entry["file"])
        if not file.is_absolute() or not file.is_file():
            absent.append(str(file))
        elif (now := sha256_file(file)) != entry["sha256"]:
            problems.append(f"input {file}: sha256 {now[:12]}… differs from {entry['sha256'][:12]}… in lineage.json")
    return problems, absent


def load_record(file: Path) -> dict[str, Any]:
    """recipe.yaml, metrics.json or lineage.json parsed as registration parses it."""
    return _load(file, yaml.safe_load if file.suffix == ".yaml" else json.loads)


def _load(file: Path, parse) -> dict[str, Any]:
    try:
        value = parse(file.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot be parsed: {exc}", where=str(file)) from exc
    if not isinstance(value, dict):
        raise RegistryError("expected a mapping at the top level", where=str(file))
    return value


def _check_against_lineage(path: Path, lineage: dict[str, Any], hashes: dict[str, str]) -> None:
    """The weights, data and recipe must be the ones lineage.json describes, or the lineage is a lie."""
    listed = [*lineage.get("adapter", []), *lineage.get("processed_data", [])]
    expected = {entry["file"]: entry["sha256"] for entry in listed}
    resolved = lineage.get("recipe", {}).get("resolved_sha256")
    if resolved:
        expected["recipe.yaml"] = resolved
    wrong = sorted(rel for rel, sha in expected.items() if hashes.get(rel) != sha)
    if wrong:
        raise RegistryError(f"the run directory does not match its lineage.json: {', '.join(wrong)}", where=str(path),
                            hint="the files were changed after the run; re-run the recipe to get a consistent directory")

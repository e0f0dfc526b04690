"""The recipe: one YAML file that says what to train, on what, and how.

``load_recipe`` reads the file, applies ``--set key=value`` overrides, validates it with
pydantic and fills the task- and method-specific defaults, so that the ``recipe.yaml`` written
into a run directory says exactly what was done.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from domaintune.errors import RecipeError

Task = Literal["classification", "sft", "pretrain"]
Method = Literal["lora", "full"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    train: str = Field(description="Training data file, relative to the recipe file.")
    eval: str | None = Field(None, description="Held-out data; without it a split of train is held out.")
    text_field: str = "text"
    label_field: str = "label"
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of train held out when there is no eval file.")
    system_prompt: str | None = Field(
        None, description="sft: system message put before rows that have none (base and tuned alike)."
    )


class TrainingConfig(_Section):
    # None means "the default for this task and method", filled in by ``resolve_defaults``.
    epochs: int | float | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    max_seq_length: int | None = Field(None, ge=8)
    seed: int = 42
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int | None = Field(None, ge=1, description="Scaling numerator; defaults to 2 * r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Defaults to a preset per architecture.")


class EvaluateConfig(_Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int | None = Field(
        None, ge=1, description="sft: generation length; defaults to the longest training answer plus a margin."
    )
    max_rows: int | None = Field(None, ge=1, description="Evaluate on at most this many held-out rows.")


class Recipe(_Section):
    name: str
    task: Task
    base_model: str
    method: Method = "lora"
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    lora: LoraConfig = LoraConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    output_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
        return v


# Measured on the example recipes and tuned so that a run with only data keys set beats its base:
# see the README's "Defaults" table for what they give.
TASK_DEFAULTS: dict[tuple[str, str], dict[str, float | int]] = {
    ("classification", "lora"): {"learning_rate": 1e-3, "batch_size": 32, "max_seq_length": 128},
    ("classification", "full"): {"learning_rate": 1e-4, "batch_size": 32, "max_seq_length": 128},
    ("sft", "lora"): {"learning_rate": 1e-3, "batch_size": 8, "max_seq_length": 512, "epochs": 2},
    ("sft", "full"): {"learning_rate": 5e-5, "batch_size": 8, "max_seq_length": 512, "epochs": 2},
    ("pretrain", "lora"): {"learning_rate": 5e-4, "batch_size": 8, "max_seq_length": 256, "epochs": 1},
    ("pretrain", "full"): {"learning_rate": 5e-5, "batch_size": 8, "max_seq_length": 256, "epochs": 1},
}


def classification_epochs(train_rows: int, batch_size: int) -> int:
    """Epochs for classification when the recipe sets none: about 150 optimiser steps, at least
    2 passes over the data and at most 10 (small sets need passes, large ones need time)."""
    steps_per_epoch = max(1, -(-train_rows // batch_size))
    return int(min(10, max(2, -(-150 // steps_per_epoch))))


def resolve_defaults(recipe: Recipe, train_rows: int) -> Recipe:
    """Return a copy of ``recipe`` with every ``None`` training value replaced by its default."""
    defaults = dict(TASK_DEFAULTS[(recipe.task, recipe.method)])
    training = recipe.training.model_copy()
    for key, value in defaults.items():
        if getattr(training, key) is None:
            setattr(training, key, value)
    if training.epochs is None:
        training.epochs = classification_epochs(train_rows, int(training.batch_size))
    lora = recipe.lora.model_copy()
    if lora.alpha is None:
        lora.alpha = 2 * lora.r
    return recipe.model_copy(update={"training": training, "lora": lora})


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML so numbers and lists get their type."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not KEY=VALUE", hint="write e.g. --set training.epochs=1")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise RecipeError(f"override key {key!r} is not a dotted recipe key", hint="e.g. training.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections as needed)."""
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"cannot set {dotted!r}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return raw


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file. Errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", hint="pass the path of a .yaml recipe")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"not valid YAML ({getattr(exc, 'problem', exc)})", where=where) from None
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a mapping of keys (name, task, base_model, data, ...)", where=str(path))
    raw = apply_overrides(raw, dict(overrides or {}))
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = []
        for err in exc.errors()[:5]:
            key = ".".join(str(p) for p in err["loc"])
            line = _nearest_line(lines, err["loc"])
            where = f"{path}:{line}" if line else str(path)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(err["loc"][:-1])
                msg = f"unknown key; allowed here: {', '.join(allowed)}"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{where}: {key}: {msg}")
        raise RecipeError("invalid recipe\n  " + "\n  ".join(problems)) from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return list(model.model_fields)


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    out: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = prefix + (str(key.value),)
                out[path] = key.start_mark.line + 1
                walk(value, path)

    walk(root, ())
    return out


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple) -> int | None:
    parts = tuple(str(p) for p in loc)
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in the schema's key order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

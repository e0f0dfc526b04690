"""The recipe: one YAML file that says what to train, on what, and how.

``load_recipe`` reads the file, applies ``--set key=value`` overrides, validates it with
pydantic and fills the task- and method-specific defaults, so that the ``recipe.yaml`` written
into a run directory says exactly what was done.
"""

from __future__ import annotations

import difflib
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from domaintune.errors import RecipeError

Task = Literal["classification", "sft", "pretrain"]
TASKS: tuple[str, ...] = get_args(Task)
Method = Literal["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"]

# Which methods each task supports. Prompt and prefix tuning prepend virtual tokens, which the
# mean-pooled classifier cannot pool over; qlora quantises causal LMs only.
METHODS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("lora", "dora", "ia3", "full"),
    "sft": ("lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"),
    "pretrain": ("lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CleanConfig(_Section):
    unicode_nfc: bool = Field(True, description="Normalise text to Unicode NFC.")
    strip_control: bool = Field(True, description="Drop control and zero-width characters (not newlines or tabs).")
    normalize_whitespace: bool = Field(True, description="Collapse runs of spaces inside lines, drop trailing spaces, at most one blank line (indentation is kept).")
    strip_html: bool = Field(False, description="Remove HTML tags and decode entities.")


class DedupConfig(_Section):
    exact: bool = Field(True, description="Drop rows whose normalised text repeats an earlier row.")
    near: bool = Field(True, description="Drop near-duplicates (MinHash LSH over shingles).")
    threshold: float = Field(0.85, gt=0, le=1, description="Jaccard similarity of character 5-gram sets from which rows are near-duplicates.")
    containment: float | None = Field(
        0.9, gt=0, le=1, description="Leakage: share of the shorter row's character 5-grams found in the other from which "
                                     "an eval row overlapping a training row is removed (rows of 30 5-grams or more); null: off.")


class PiiConfig(_Section):
    redact: bool = Field(True, description="Redact personal data in every text before training and evaluation.")
    types: list[str] | None = Field(None, description="PII types to redact; default: all (domaintune data inspect lists them).")
    mode: Literal["placeholder", "pseudonym"] = Field(
        "placeholder", description="placeholder: [EMAIL]; pseudonym: a consistent fake value keyed by a secret.")
    secret_env: str = Field("DOMAINTUNE_PII_SECRET", description="pseudonym: environment variable holding the secret key.")


class SplitConfig(_Section):
    by: Literal["random", "group", "time"] = Field(
        "random", description="random (stratified by label), group (no group on both sides) or time (evaluate on the newest).")
    group_field: str | None = Field(None, description="by: group: the column whose values must not straddle the split.")
    time_field: str | None = Field(None, description="by: time: a date/time or number column; the newest rows are held out.")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share held out when there is no eval file.")
    seed: int | None = Field(None, description="Defaults to training.seed.")


class DataConfig(_Section):
    train: str = Field(description="Training data file, relative to the recipe file.")
    eval: str | None = Field(None, description="Held-out data; without it a split of train is held out.")
    text_field: str = "text"
    label_field: str = "label"
    system_prompt: str | None = Field(
        None, description="sft: system message put before rows that have none (base and tuned alike)."
    )
    on_bad_rows: Literal["error", "skip", "quarantine"] = Field(
        "error", description="error: stop before training; skip: drop and count; quarantine: drop and write them with reasons.")
    clean: CleanConfig = CleanConfig()
    dedup: DedupConfig = DedupConfig()
    pii: PiiConfig = PiiConfig()
    split: SplitConfig = SplitConfig()

    @model_validator(mode="before")
    @classmethod
    def _eval_fraction_moved_to_split(cls, raw: Any) -> Any:
        # Recipes written before `split:` existed set data.eval_fraction; it means split.eval_fraction.
        if isinstance(raw, dict) and "eval_fraction" in raw:
            raw = dict(raw)
            split = dict(raw.get("split") or {})
            split.setdefault("eval_fraction", raw.pop("eval_fraction"))
            raw["split"] = split
        return raw

    @model_validator(mode="after")
    def _split_fields_given(self) -> "DataConfig":
        if self.split.by == "group" and not self.split.group_field:
            raise ValueError("split.by: group needs split.group_field (the column that must not straddle the split)")
        if self.split.by == "time" and not self.split.time_field:
            raise ValueError("split.by: time needs split.time_field (a date or number column)")
        return self


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
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after the warm-up.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Batches per optimiser step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (replaces epochs).")
    max_minutes: float | None = Field(None, gt=0, description="Stop training after this much wall-clock time.")
    eval_every: int | None = Field(None, ge=1, description="Compute the loss on held-out rows every N steps.")
    eval_rows: int = Field(64, ge=1, description="eval_every: how many held-out rows that loss is taken on.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="eval_every: stop after this many evaluations without a lower loss, keeping the best weights.")
    checkpoint_every: int | None = Field(
        None, ge=0, description="Save a resumable checkpoint every N steps (default: each epoch; 0: never).")
    report_to: Literal["mlflow", "tensorboard"] | None = Field(
        None, description="Also log every step to MLflow or TensorBoard (the package must be installed).")
    packing: bool = Field(
        True, description="sft/pretrain: lay the rows of each batch end to end instead of padding them, each row "
                          "attending only to itself (same loss, less work; off for prompt and prefix tuning).")
    speed: Literal["auto", "off"] = Field(
        "auto", description="sft/pretrain on a CUDA GPU: auto trains in bfloat16 with Liger's kernels (when "
                            "installed) and a loss that never materialises the logits; off keeps the plain path. "
                            "On a CPU (every task) auto only draws dropout masks more cheaply (the same masks in "
                            "distribution).")
    activation_checkpointing: float = Field(
        0.0, ge=0, le=1, description="The fraction of decoder layers whose activations are recomputed in the "
                                     "backward pass instead of kept: less memory for longer sequences, more time.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="sft/pretrain under torchrun: ddp keeps the whole model in every process; fsdp shards "
                           "weights, gradients and optimiser state across them (FSDP2), for models too large for one device.")


class LoraConfig(_Section):
    """lora, dora and qlora."""

    r: int = Field(16, ge=1)
    alpha: int | None = Field(None, ge=1, description="Scaling numerator; defaults to 2 * r.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="Defaults to a preset per architecture.")


class Ia3Config(_Section):
    target_modules: list[str] | None = Field(None, description="Defaults to a preset per architecture (keys, values, MLP output).")
    feedforward_modules: list[str] | None = Field(
        None, description="The targets that scale their input (MLP layers); defaults to the preset's.")


class PromptConfig(_Section):
    """prompt_tuning and prefix_tuning."""

    num_virtual_tokens: int = Field(20, ge=1, description="Learned tokens put before every input.")
    init_text: str | None = Field(
        None, description="prompt_tuning: start the virtual tokens from this text's embeddings instead of random ones.")


class EvaluateConfig(_Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int | None = Field(
        None, ge=1, description="sft: generation length; defaults to the longest training answer plus a margin."
    )
    max_rows: int | None = Field(None, ge=1, description="Evaluate on at most this many held-out rows.")
    slices: list[str] = Field(default_factory=list, description="Metadata columns to break the metrics down by (e.g. [region, channel]).")
    bias_probes: bool = Field(True, description="How often a prediction (classification) or a normalised answer (sft) changes when only gendered terms, names or age words are swapped.")
    bias_rows: int = Field(32, ge=1, description="sft: held-out rows whose prompts the bias probes swap terms in (each probed row is generated again).")
    bias_terms: dict[str, list[list[str]]] | None = Field(
        None, description="Extra swap pairs by group, added to the shipped ones, e.g. {job: [[nurse, surgeon]]}.")
    gates: list[str] = Field(default_factory=list, description="Conditions the run must meet, e.g. 'tuned.accuracy >= base.accuracy + 0.05'.")
    forgetting: bool = Field(
        True, description="sft/pretrain: base vs tuned on the shipped general-ability set (general-text perplexity, general questions).")
    forgetting_items: int = Field(
        12, ge=1, le=40, description="forgetting: general paragraphs and general questions used (of the 40 of each shipped; "
                                     "each adds about 0.3 s per model for a 135M model on 2 CPU cores).")
    privacy_audit: bool = Field(
        False, description="sft/pretrain: plant canaries in the training rows and measure their exposure, and probe for verbatim "
                           "regurgitation of training rows. Recommended for regulated data.")
    canary_repeats: list[int] = Field(
        [1, 4, 16], min_length=1, description="privacy_audit: one canary per entry, planted that many times in the training rows.")
    canary_candidates: int = Field(
        255, ge=10, description="privacy_audit: random secrets of the canary's format a canary is ranked among "
                                "(the highest exposure measurable is log2 of this plus one: 8 bits for 255).")
    regurgitation_rows: int = Field(32, ge=1, description="privacy_audit: training rows the regurgitation probe prompts with.")
    regurgitation_tokens: int = Field(
        32, ge=1, description="privacy_audit: tokens of prefix given and of continuation compared verbatim.")
    explain_rows: int = Field(
        20, ge=0, description="Held-out rows explained (classification: word occlusion; generation: where tuned and base "
                              "token probabilities differ most); 0: none.")

    @field_validator("canary_repeats")
    @classmethod
    def _repeats_positive(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError("every canary is planted at least once")
        return v


class UpdateConfig(_Section):
    """How `domaintune update` trains and judges a new version of this model."""

    replay_ratio: float = Field(
        0.5, ge=0, description="Earlier training rows mixed in, as a share of the new training rows (0: no replay).")
    learning_rate: float | None = Field(
        None, gt=0, description="Defaults to half the production run's: the weights are already close.")
    epochs: int | float | None = Field(None, gt=0, description="Defaults to the production run's.")
    tolerance: float = Field(
        0.02, ge=0, description="Largest drop of the headline metric on an earlier eval set that the default gate accepts.")
    gate: str | None = Field(
        None, description="Condition on every earlier eval set (base. = production, tuned. = candidate); "
                          "default: the 95% interval of the paired difference stays above -tolerance.")
    gate_new: str | None = Field(
        None, description="Condition on the new eval rows; default: the candidate is no worse than production.")
    seed: int | None = Field(None, description="Seeds the replay sample and the split of new rows; defaults to training.seed.")
    preference: bool = Field(
        False, description="sft: corrections of answers rated bad (1 or 2) also train as preference pairs "
                           "(chosen: the correction, rejected: the served answer), with DPO after the supervised rows.")
    beta: float = Field(
        0.1, gt=0, description="DPO's beta: how strongly the preference phase may move away from production.")


class Recipe(_Section):
    name: str
    task: Task
    base_model: str
    method: Method = "lora"
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    lora: LoraConfig = LoraConfig()
    ia3: Ia3Config = Ia3Config()
    prompt: PromptConfig = PromptConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    update: UpdateConfig = UpdateConfig()
    output_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it becomes a folder name)")
        return v

    @field_validator("method")
    @classmethod
    def _method_fits_task(cls, v: str, info: ValidationInfo) -> str:
        task = info.data.get("task")  # absent when the task itself was invalid
        if task and v not in METHODS_BY_TASK[task]:
            raise ValueError(f"{v} does not support task {task}; with {task} use one of: "
                             f"{', '.join(METHODS_BY_TASK[task])}")
        return v

    @model_validator(mode="after")
    def _sharding_fits(self) -> "Recipe":
        if self.training.distributed == "fsdp" and self.task == "classification":
            raise ValueError("training.distributed: fsdp shards causal LMs (task sft or pretrain); classification "
                             "models are small enough for ddp, the default")
        if self.training.distributed == "fsdp" and self.method == "qlora":
            raise ValueError("training.distributed: fsdp does not shard 4-bit qlora weights; use method: lora "
                             "with fsdp, or qlora with ddp")
        return self


# Measured on the example recipes and tuned so that a run with only data keys set beats its base:
# see the README's "Defaults" table for what they give.
# DoRA and QLoRA train like LoRA; IA3 learns a few scaling vectors and prompt/prefix tuning a few
# embeddings, which need learning rates one to two orders of magnitude higher (the values their
# papers and PEFT's examples use).
_CLS = {"batch_size": 32, "max_seq_length": 128}
_SFT = {"batch_size": 8, "max_seq_length": 512, "epochs": 2}
_PRETRAIN = {"batch_size": 8, "max_seq_length": 256, "epochs": 1}
TASK_DEFAULTS: dict[tuple[str, str], dict[str, float | int]] = {
    ("classification", "lora"): {"learning_rate": 1e-3, **_CLS},
    ("classification", "dora"): {"learning_rate": 1e-3, **_CLS},
    ("classification", "ia3"): {"learning_rate": 3e-3, **_CLS},
    ("classification", "full"): {"learning_rate": 1e-4, **_CLS},
    ("sft", "lora"): {"learning_rate": 1e-3, **_SFT},
    ("sft", "dora"): {"learning_rate": 1e-3, **_SFT},
    ("sft", "qlora"): {"learning_rate": 1e-3, **_SFT},
    ("sft", "ia3"): {"learning_rate": 3e-3, **_SFT},
    ("sft", "prompt_tuning"): {"learning_rate": 3e-2, **_SFT},
    ("sft", "prefix_tuning"): {"learning_rate": 1e-2, **_SFT},
    ("sft", "full"): {"learning_rate": 5e-5, **_SFT},
    ("pretrain", "lora"): {"learning_rate": 5e-4, **_PRETRAIN},
    ("pretrain", "dora"): {"learning_rate": 5e-4, **_PRETRAIN},
    ("pretrain", "qlora"): {"learning_rate": 5e-4, **_PRETRAIN},
    ("pretrain", "ia3"): {"learning_rate": 3e-3, **_PRETRAIN},
    ("pretrain", "prompt_tuning"): {"learning_rate": 3e-2, **_PRETRAIN},
    ("pretrain", "prefix_tuning"): {"learning_rate": 1e-2, **_PRETRAIN},
    ("pretrain", "full"): {"learning_rate": 5e-5, **_PRETRAIN},
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
    # YAML reads `yes`/`no`/`on` as booleans, "Answer: yes" as a mapping and 2024-05-01 as a
    # date; on a command line these are text unless written as YAML's own spelling of the type.
    spelled = raw.strip()
    if (isinstance(value, bool) and spelled.lower() not in ("true", "false")) \
            or (isinstance(value, dict) and not spelled.startswith("{")) or isinstance(value, (date, datetime)):
        value = spelled
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
    return validate_recipe(apply_overrides(raw, dict(overrides or {})), overrides, path=path, text=text)


def validate_recipe(raw: dict[str, Any], overrides: dict[str, Any] | None = None, *, path: Path | None = None,
                    text: str = "") -> Recipe:
    """``raw`` as a ``Recipe``; each problem names where it was written: the line of the recipe
    file ``path`` (whose ``text`` was read), or the ``--set`` that gave the key its value."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = _key_lines(text)
        problems = []
        for err in exc.errors()[:5]:
            loc = _key_loc(err["loc"])
            key = ".".join(str(p) for p in loc)
            given = next((k for k in overrides or {} if key == k or key.startswith(k + ".")), None)
            line = _nearest_line(lines, loc)
            where = f"{path}:{line}" if path and line else str(path or "recipe")
            if given:  # the key's value came from the command line, not from the file
                where, key = (f"--set {given}", key) if key != given else ("--set", key)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                allowed = _allowed_keys(loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                msg = (f"unknown key; did you mean {close[0]!r}? " if close else "unknown key; ") + \
                    f"allowed here: {', '.join(allowed)}"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{where}: {key}: {msg}")
        raise RecipeError("invalid recipe\n  " + "\n  ".join(problems)) from None


def _key_loc(loc: tuple) -> tuple:
    """An error's location without pydantic's names for the members of a union (``int``,
    ``function-after[...]``), which are not recipe keys."""
    return tuple(p for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p)))


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict", "literal"}


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


# Keys that moved: an error about the new place points at the line where an old recipe wrote it.
_MOVED_KEYS = {("data", "split", "eval_fraction"): ("data", "eval_fraction")}


def _nearest_line(lines: dict[tuple[str, ...], int], loc: tuple) -> int | None:
    parts = tuple(str(p) for p in loc)
    if parts not in lines and _MOVED_KEYS.get(parts) in lines:
        return lines[_MOVED_KEYS[parts]]
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, in the schema's key order."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

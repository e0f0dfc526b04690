"""Tests for domaintune.recipe: loading, validation errors with lines, defaults, overrides, dump."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from domaintune.errors import RecipeError
from domaintune.recipe import (
    TASK_DEFAULTS,
    Recipe,
    TrainingConfig,
    apply_overrides,
    classification_epochs,
    dump_recipe,
    load_recipe,
    parse_override,
    resolve_defaults,
)

BASE = """\
name: demo
task: classification
base_model: minilm-l6
data:
  train: data/train.csv
"""

FULL = """\
# a comment line
name: support-intents.v2
task: sft
base_model: smollm2-135m-instruct
method: full
data:
  train: data/notes.jsonl
  eval: data/eval.jsonl
  text_field: body
  label_field: intent
  eval_fraction: 0.1
  system_prompt: "Answer as: specialty; urgency"
training:
  epochs: 3
  learning_rate: 2.0e-5
  batch_size: 4
  max_seq_length: 256
  seed: 7
  warmup_ratio: 0.05
lora:
  r: 8
  target_modules: [q_proj, v_proj]
evaluate:
  batch_size: 4
  max_new_tokens: 32
  max_rows: 100
output_dir: out/runs
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def make(text: str = BASE) -> Recipe:
    return Recipe.model_validate(yaml.safe_load(text))


def error_text(tmp_path: Path, text: str, overrides=None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- loading


def test_load_minimal_recipe_has_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.name == "demo"
    assert recipe.task == "classification"
    assert recipe.base_model == "minilm-l6"
    assert recipe.method == "lora"
    assert recipe.data.train == "data/train.csv"
    assert recipe.data.eval is None
    assert recipe.data.text_field == "text" and recipe.data.label_field == "label"
    assert recipe.data.split.eval_fraction == 0.2
    assert recipe.training.epochs is None
    assert recipe.training.learning_rate is None
    assert recipe.training.batch_size is None
    assert recipe.training.max_seq_length is None
    assert recipe.training.seed == 42
    assert recipe.lora.r == 16 and recipe.lora.alpha is None
    assert recipe.evaluate.batch_size == 16
    assert recipe.output_dir == "runs"


def test_load_full_recipe(tmp_path):
    recipe = load_recipe(str(write(tmp_path, FULL)))
    assert recipe.name == "support-intents.v2"
    assert recipe.task == "sft" and recipe.method == "full"
    assert recipe.data.eval == "data/eval.jsonl"
    assert recipe.data.text_field == "body" and recipe.data.label_field == "intent"
    assert recipe.data.split.eval_fraction == 0.1
    assert recipe.data.system_prompt == "Answer as: specialty; urgency"
    assert recipe.training.epochs == 3
    assert recipe.training.learning_rate == pytest.approx(2e-5)
    assert recipe.training.batch_size == 4
    assert recipe.training.max_seq_length == 256
    assert recipe.training.seed == 7
    assert recipe.training.warmup_ratio == 0.05
    assert recipe.lora.r == 8
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.evaluate.max_new_tokens == 32 and recipe.evaluate.max_rows == 100
    assert recipe.output_dir == "out/runs"


def test_packaged_example_recipes_load():
    root = Path(__file__).resolve().parents[1] / "recipes"
    paths = sorted(root.glob("*/recipe.yaml"))
    if not paths:
        pytest.skip("no example recipes in this checkout")
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.name == path.parent.name


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("task, method", sorted(TASK_DEFAULTS))
def test_resolve_defaults_fills_task_method_defaults(task, method):
    recipe = make(BASE.replace("classification", task) + f"method: {method}\n")
    resolved = resolve_defaults(recipe, train_rows=1000)
    defaults = TASK_DEFAULTS[(task, method)]
    for key, value in defaults.items():
        assert getattr(resolved.training, key) == value, key
    if "epochs" not in defaults:
        assert task == "classification"
        assert resolved.training.epochs == classification_epochs(1000, defaults["batch_size"])
    for key in ("epochs", "learning_rate", "batch_size", "max_seq_length"):
        assert getattr(resolved.training, key) is not None
    # the input recipe is left unchanged
    assert recipe.training.epochs is None and recipe.training.learning_rate is None
    assert recipe.lora.alpha is None


def test_task_defaults_cover_every_task_and_method():
    from domaintune.recipe import METHODS_BY_TASK

    assert set(TASK_DEFAULTS) == {(t, m) for t, methods in METHODS_BY_TASK.items() for m in methods}
    assert {m for methods in METHODS_BY_TASK.values() for m in methods} == {
        "lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning", "full"}
    assert TASK_DEFAULTS[("sft", "lora")]["epochs"] == 2
    assert TASK_DEFAULTS[("pretrain", "full")]["epochs"] == 1


def test_resolve_defaults_keeps_explicit_values():
    recipe = make(BASE + "training:\n  epochs: 5\n  learning_rate: 0.01\n  batch_size: 2\n  max_seq_length: 64\n"
                  "lora:\n  r: 4\n  alpha: 7\n")
    resolved = resolve_defaults(recipe, train_rows=10)
    assert resolved.training.epochs == 5
    assert resolved.training.learning_rate == 0.01
    assert resolved.training.batch_size == 2
    assert resolved.training.max_seq_length == 64
    assert resolved.lora.alpha == 7
    assert resolved.lora.r == 4


def test_resolve_defaults_partial_explicit_values():
    recipe = make(BASE.replace("classification", "sft") + "training:\n  learning_rate: 0.5\n")
    resolved = resolve_defaults(recipe, train_rows=10)
    assert resolved.training.learning_rate == 0.5
    assert resolved.training.batch_size == 8
    assert resolved.training.epochs == 2
    assert resolved.training.max_seq_length == 512


@pytest.mark.parametrize("r, alpha", [(16, 32), (8, 16), (1, 2), (64, 128)])
def test_lora_alpha_defaults_to_twice_r(r, alpha):
    recipe = make(BASE + f"lora:\n  r: {r}\n")
    assert resolve_defaults(recipe, 100).lora.alpha == alpha


def _formula(rows: int, batch: int) -> int:
    steps = max(1, math.ceil(rows / batch))
    return min(10, max(2, math.ceil(150 / steps)))


@pytest.mark.parametrize("rows, batch, expected", [
    (100, 32, 10),     # 4 steps/epoch -> 38 epochs wanted, capped at 10
    (432, 32, 10),     # 14 steps -> 11, capped
    (1000, 32, 5),     # 32 steps -> ceil(150/32) = 5
    (2000, 32, 3),     # 63 steps -> 3
    (4000, 32, 2),     # 125 steps -> 2
    (10_000, 32, 2),   # 313 steps -> 1, at least 2
    (1_000_000, 32, 2),
    (0, 32, 10),       # no rows: one step per epoch
    (1, 1, 10),
    (800, 8, 2),       # 100 steps -> 2
])
def test_classification_epochs(rows, batch, expected):
    assert classification_epochs(rows, batch) == expected
    assert classification_epochs(rows, batch) == _formula(rows, batch)
    assert isinstance(classification_epochs(rows, batch), int)


def test_classification_epochs_used_by_resolve_defaults_with_the_batch_size_in_effect():
    small = resolve_defaults(make(), train_rows=100)
    large = resolve_defaults(make(), train_rows=10_000)
    assert small.training.epochs == _formula(100, 32) == 10
    assert large.training.epochs == _formula(10_000, 32) == 2
    explicit_batch = resolve_defaults(make(BASE + "training:\n  batch_size: 8\n"), train_rows=800)
    assert explicit_batch.training.epochs == _formula(800, 8) == 2


def test_sft_epochs_do_not_depend_on_rows():
    sft = make(BASE.replace("classification", "sft"))
    assert resolve_defaults(sft, 10).training.epochs == resolve_defaults(sft, 100_000).training.epochs == 2


# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize("text, expected", [
    ("training.epochs=1", ("training.epochs", 1)),
    ("training.learning_rate=0.0002", ("training.learning_rate", 0.0002)),
    ("lora.target_modules=[q_proj,v_proj]", ("lora.target_modules", ["q_proj", "v_proj"])),
    ("lora.target_modules=[q_proj, v_proj]", ("lora.target_modules", ["q_proj", "v_proj"])),
    ("name=other", ("name", "other")),
    ("method=full", ("method", "full")),
    ("data.eval=", ("data.eval", None)),
    ("data.eval=null", ("data.eval", None)),
    ("data.system_prompt=a=b", ("data.system_prompt", "a=b")),
    (" training.seed = 3", ("training.seed", 3)),
    ("evaluate.max_rows=[1", ("evaluate.max_rows", "[1")),  # not YAML: kept as text
    ("flag=true", ("flag", True)),
    ("flag=False", ("flag", False)),
    # YAML 1.1 would read these as a boolean, a mapping and a date: on a command line they are text
    ("data.text_field=yes", ("data.text_field", "yes")),
    ("data.system_prompt=Answer: yes or no", ("data.system_prompt", "Answer: yes or no")),
    ("data.split.time_field=2024-05-01", ("data.split.time_field", "2024-05-01")),
    ("evaluate.bias_terms={job: [[nurse, surgeon]]}", ("evaluate.bias_terms", {"job": [["nurse", "surgeon"]]})),
])
def test_parse_override_types_values(text, expected):
    key, value = parse_override(text)
    assert (key, value) == expected
    assert type(value) is type(expected[1])


@pytest.mark.parametrize("text", [
    "training.epochs",
    "=1",
    "training..epochs=1",
    "1training=1",
    "training.epochs.=1",
    "training-epochs=1",
    "training epochs=1",
])
def test_parse_override_bad_forms(text):
    with pytest.raises(RecipeError) as info:
        parse_override(text)
    assert info.value.hint


def test_load_recipe_applies_overrides(tmp_path):
    path = write(tmp_path, BASE + "training:\n  epochs: 9\n")
    overrides = dict(parse_override(s) for s in [
        "training.epochs=1",
        "lora.target_modules=[q_proj,v_proj]",
        "method=full",
        "data.eval=data/eval.csv",
        "evaluate.max_rows=5",
        "training.learning_rate=1e-4",
    ])
    recipe = load_recipe(path, overrides)
    assert recipe.training.epochs == 1
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.method == "full"
    assert recipe.data.eval == "data/eval.csv"
    assert recipe.data.train == "data/train.csv"
    assert recipe.evaluate.max_rows == 5
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    # the file itself is not changed
    assert load_recipe(path).training.epochs == 9


def test_apply_overrides_creates_sections_and_rejects_non_sections():
    raw = {"name": "x", "training": None}
    out = apply_overrides(raw, {"training.epochs": 2, "lora.r": 4, "a.b.c": 1})
    assert out == {"name": "x", "training": {"epochs": 2}, "lora": {"r": 4}, "a": {"b": {"c": 1}}}
    with pytest.raises(RecipeError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, {"name.first": "y"})


def test_override_with_invalid_value_is_a_recipe_error(tmp_path):
    text = error_text(tmp_path, BASE, {"training.epochs": -1})
    assert "training.epochs" in text
    assert "greater than 0" in text


def test_override_with_unknown_key_is_a_recipe_error(tmp_path):
    text = error_text(tmp_path, BASE, {"training.epoch": 1})
    assert "--set: training.epoch: unknown key; did you mean 'epochs'?" in text


def test_an_override_error_names_the_override_not_a_line_of_the_file(tmp_path):
    text = error_text(tmp_path, BASE + "training:\n  epochs: 3\n", {"training.epochs": "three"})
    assert "--set: training.epochs: Input should be" in text  # not "training.epochs.int" (a union's member)
    assert ".yaml:" not in text
    text = error_text(tmp_path, BASE, {"data": {"dedup": {"treshold": 0.5}}})
    assert "--set data: data.dedup.treshold: unknown key; did you mean 'threshold'?" in text


# ---------------------------------------------------------------- errors


def test_unknown_key_in_training_names_file_line_and_allowed_keys(tmp_path):
    path = write(tmp_path, BASE + "training:\n  epochs: 3\n  lr: 0.1\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}:8: training.lr: unknown key" in text
    for allowed in TrainingConfig.model_fields:
        assert allowed in text
    assert "allowed here: epochs, learning_rate, batch_size, max_seq_length, seed" in text


def test_unknown_key_in_data_and_at_top_level(tmp_path):
    text = error_text(tmp_path, BASE + "  labels: intent\n")
    assert ":6: data.labels: unknown key" in text
    assert "text_field" in text and "label_field" in text and "system_prompt" in text

    text = error_text(tmp_path, "epochs: 3\n" + BASE)
    assert ":1: epochs: unknown key" in text
    assert "allowed here: name, task, base_model, method, data" in text


def test_several_problems_are_all_reported(tmp_path):
    text = error_text(tmp_path, BASE.replace("classification", "translate") + "lora:\n  rank: 4\n")
    assert ":2: task:" in text
    assert ":7: lora.rank: unknown key" in text


@pytest.mark.parametrize("key", ["name", "task", "base_model", "data"])
def test_missing_required_key(tmp_path, key):
    lines = BASE.splitlines(keepends=True)
    if key == "data":
        lines = lines[:3]
    else:
        lines = [line for line in lines if not line.startswith(f"{key}:")]
    path = write(tmp_path, "".join(lines))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}: {key}: required key is missing" in text


def test_missing_data_train_points_at_data_section(tmp_path):
    path = write(tmp_path, BASE.replace("  train: data/train.csv\n", "  eval: e.csv\n"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:4: data.train: required key is missing" in str(info.value)


def test_invalid_task_value(tmp_path):
    path = write(tmp_path, BASE.replace("task: classification", "task: translate"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}:2: task:" in text
    assert "classification" in text and "sft" in text and "pretrain" in text


@pytest.mark.parametrize("snippet, key, line", [
    ("method: qlora\n", "method", 6),
    ("training:\n  epochs: 0\n", "training.epochs", 7),
    ("training:\n  batch_size: many\n", "training.batch_size", 7),
    ("lora:\n  dropout: 1.5\n", "lora.dropout", 7),
    ("evaluate:\n  max_rows: 0\n", "evaluate.max_rows", 7),
])
def test_invalid_values_point_at_their_line(tmp_path, snippet, key, line):
    path = write(tmp_path, BASE + snippet)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:{line}: {key}:" in str(info.value)


def test_invalid_eval_fraction(tmp_path):
    text = error_text(tmp_path, BASE + "  eval_fraction: 1.5\n")
    assert ":6: data.split.eval_fraction:" in text


def test_invalid_yaml_reports_line(tmp_path):
    path = write(tmp_path, "name: demo\ntask: sft\nbase_model: a: b\ndata:\n  train: x\n")
    with pytest.raises(RecipeError, match="not valid YAML") as info:
        load_recipe(path)
    assert info.value.where == f"{path}:3"
    assert str(info.value).startswith(f"{path}:3: not valid YAML")


def test_invalid_yaml_bad_indentation(tmp_path):
    path = write(tmp_path, BASE + "training:\n  epochs: 3\n    seed: 1\n")
    with pytest.raises(RecipeError, match="not valid YAML") as info:
        load_recipe(path)
    assert info.value.where == f"{path}:8"


@pytest.mark.parametrize("name", ["a/b", "../escape", "with space", "-leading-dash", "", "x" * 101])
def test_bad_name(tmp_path, name):
    text = error_text(tmp_path, BASE.replace("name: demo", f"name: {name!r}"))
    assert ":1: name:" in text
    assert "folder name" in text


@pytest.mark.parametrize("name", ["demo", "A.b_c-1", "x" * 100, "9lives"])
def test_good_names(tmp_path, name):
    assert load_recipe(write(tmp_path, BASE.replace("name: demo", f"name: {name!r}"))).name == name


@pytest.mark.parametrize("text", ["", "- name: demo\n", "just a string\n"])
def test_recipe_that_is_not_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError, match="must be a mapping") as info:
        load_recipe(path)
    assert info.value.where == str(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- dump


@pytest.mark.parametrize("text", [BASE, FULL, BASE.replace("classification", "pretrain")])
@pytest.mark.parametrize("resolve", [False, True])
def test_dump_recipe_round_trips_through_load(tmp_path, text, resolve):
    recipe = load_recipe(write(tmp_path, text))
    if resolve:
        recipe = resolve_defaults(recipe, train_rows=500)
    dumped = dump_recipe(recipe)
    path = write(tmp_path, dumped, name="dumped.yaml")
    again = load_recipe(path)
    assert again.model_dump() == recipe.model_dump()
    assert dump_recipe(again) == dumped


def test_dump_recipe_is_in_schema_order_and_complete():
    recipe = resolve_defaults(make(), train_rows=100)
    dumped = dump_recipe(recipe)
    data = yaml.safe_load(dumped)
    assert list(data) == list(Recipe.model_fields)
    assert list(data["training"]) == list(TrainingConfig.model_fields)
    assert data["training"]["epochs"] == 10
    assert data["training"]["learning_rate"] == 1e-3
    assert data["lora"]["alpha"] == 32
    assert data["data"]["eval"] is None

"""Gate expressions: evaluated on metrics.json, values in the failures, a strict whitelist."""

from __future__ import annotations

import pytest

from domaintune.errors import RecipeError
from domaintune.evaluate.gates import check_gate, validate_gate


@pytest.fixture
def metrics() -> dict:
    return {
        "task": "classification",
        "eval_rows": 200,
        "base": {"accuracy": 0.812, "macro_f1": 0.75, "model": "minilm-l6 frozen",
                 "per_label": {"refund": {"f1": 0.6, "support": 40}, "billing": {"f1": 0.8, "support": 60}}},
        "tuned": {"accuracy": 0.912, "macro_f1": 0.88, "model": "minilm-l6 fine-tuned",
                  "per_label": {"refund": {"f1": 0.9, "support": 40}, "billing": {"f1": 0.85, "support": 60}}},
        "intervals": {"accuracy": {"base": [0.76, 0.86], "tuned": [0.87, 0.95], "difference": [0.04, 0.16]}},
    }


@pytest.mark.parametrize("expr", [
    "tuned.accuracy >= base.accuracy + 0.05",
    "tuned.macro_f1 >= 0.85",
    "tuned.accuracy > base.accuracy and tuned.macro_f1 > base.macro_f1",
    "difference.accuracy.low > 0",
    "tuned.accuracy.low > base.accuracy.high",
    "tuned.per_label.refund.f1 >= 0.9",
    "difference.per_label.refund.f1 > 0.25",
    "0.8 < tuned.accuracy <= 1",
    "not tuned.accuracy < 0.5",
    "tuned.accuracy < 0.5 or tuned.macro_f1 > 0.8",
    "(tuned.accuracy - base.accuracy) / base.accuracy > 0.1",
    "-difference.accuracy < 0",
])
def test_passing_gates(metrics, expr):
    result = check_gate(expr, metrics)
    assert result.passed, result.failing
    assert result.failing == []
    assert result.expr == expr


@pytest.mark.parametrize("expr", [
    "tuned.accuracy >= base.accuracy + 0.15",
    "tuned.macro_f1 >= 0.9",
    "difference.accuracy.high < 0.1",
    "tuned.per_label.billing.f1 > tuned.per_label.refund.f1",
    "0.95 < tuned.accuracy <= 1",
    "not tuned.accuracy > 0.5",
    "tuned.accuracy < 0.5 or tuned.macro_f1 < 0.8",
])
def test_failing_gates(metrics, expr):
    result = check_gate(expr, metrics)
    assert not result.passed
    assert len(result.failing) == 1


def test_failure_shows_the_values(metrics):
    result = check_gate("tuned.accuracy >= base.accuracy + 0.15", metrics)
    assert result.failing == ["tuned.accuracy >= base.accuracy + 0.15 (0.912 >= 0.812 + 0.15)"]


def test_only_the_false_clauses_of_a_conjunction_are_reported(metrics):
    result = check_gate("tuned.macro_f1 >= 0.85 and difference.accuracy.low > 0.05 and tuned.accuracy > 0.95",
                        metrics)
    assert not result.passed
    assert result.failing == ["difference.accuracy.low > 0.05 (0.04 > 0.05)", "tuned.accuracy > 0.95 (0.912 > 0.95)"]


def test_difference_is_tuned_minus_base(metrics):
    assert check_gate("difference.accuracy > 0.0999", metrics).passed
    result = check_gate("difference.accuracy > 0.1001", metrics)
    assert result.failing == ["difference.accuracy > 0.1001 (0.1 > 0.1001)"]
    metrics["tuned"]["accuracy"] = 0.7
    assert check_gate("difference.accuracy < 0", metrics).passed


def test_interval_ends_are_read_per_model(metrics):
    assert check_gate("base.accuracy.low == 0.76 and base.accuracy.high == 0.86", metrics).passed
    assert check_gate("tuned.accuracy.low == 0.87 and tuned.accuracy.high == 0.95", metrics).passed
    assert check_gate("difference.accuracy.low == 0.04 and difference.accuracy.high == 0.16", metrics).passed


@pytest.mark.parametrize("expr, offending", [
    ("__import__('os')", "__import__('os')"),
    ("tuned.accuracy.__class__ > 0", "__class__"),
    ("tuned.accuracy > len('a')", "len('a')"),
    ("tuned.per_label['refund'] > 0", "tuned.per_label['refund']"),
    ("(lambda: 1)() > 0", "lambda"),
    ("tuned.accuracy ** 2 > 0.5", "**"),
    ("tuned.accuracy in [0.9]", "in"),
    ("tuned.accuracy > 'high'", "'high'"),
    ("accuracy > 0.9", "'accuracy'"),
    ("tuned.accuracy if True else 1 > 0", "if"),
    ("tuned.accuracy", "tuned.accuracy"),
    ("(tuned.accuracy > 1) + 1 > 0", "tuned.accuracy > 1"),
])
def test_forbidden_constructs_name_the_offending_part(metrics, expr, offending):
    with pytest.raises(RecipeError) as caught:
        check_gate(expr, metrics)
    assert offending in caught.value.message
    assert caught.value.where == "--gate"
    assert "tuned.accuracy >=" in caught.value.hint


def test_bad_syntax(metrics):
    with pytest.raises(RecipeError, match="cannot parse gate"):
        check_gate("tuned.accuracy >=", metrics)
    with pytest.raises(RecipeError, match="cannot parse gate"):
        check_gate("tuned.accuracy >= 0.9; import os", metrics)


@pytest.mark.parametrize("expr, listed", [
    ("tuned.acuracy > 0.9", ["accuracy", "macro_f1", "per_label."]),
    ("tuned.per_label.refnd.f1 > 0.5", ["refund", "billing"]),
    ("difference.f1 > 0", ["accuracy"]),
    ("tuned.macro_f1.low > 0", ["accuracy"]),
])
def test_unknown_names_list_the_available_ones(metrics, expr, listed):
    with pytest.raises(RecipeError) as caught:
        check_gate(expr, metrics)
    for name in listed:
        assert name in caught.value.message


def test_unknown_name_in_a_skipped_branch_is_still_an_error(metrics):
    with pytest.raises(RecipeError, match="acuracy"):
        check_gate("tuned.accuracy > 0.5 or tuned.acuracy > 0.5", metrics)


def test_non_numbers_and_groups_are_rejected(metrics):
    with pytest.raises(RecipeError, match="not a number"):
        check_gate("tuned.model > 0", metrics)
    with pytest.raises(RecipeError, match="group"):
        check_gate("tuned.per_label > 0", metrics)


def test_intervals_missing_from_old_metrics(metrics):
    del metrics["intervals"]
    with pytest.raises(RecipeError, match="no intervals"):
        check_gate("difference.accuracy.low > 0", metrics)
    assert check_gate("difference.accuracy > 0", metrics).passed


def test_division_by_zero_is_reported(metrics):
    with pytest.raises(RecipeError, match="division by zero"):
        check_gate("tuned.accuracy / (base.accuracy - base.accuracy) > 1", metrics)


@pytest.mark.parametrize("task, expr, wrong", [
    ("classification", "tuned.acuracy >= base.accuracy", "acuracy"),
    ("sft", "difference.accuracy.low > 0", "accuracy"),  # an sft run has no accuracy
    ("pretrain", "tuned.perplexity < base.perplexity and tuned.rouge_l > 0", "rouge_l"),
])
def test_a_gate_naming_a_metric_the_task_lacks_is_refused_before_a_run(task, expr, wrong):
    with pytest.raises(RecipeError, match=f"no metric '{wrong}' in {task} runs") as caught:
        validate_gate(expr, task)
    assert "available: " in caught.value.message


@pytest.mark.parametrize("task, expr", [
    ("classification", "tuned.per_label.refund.f1 >= 0.9 and difference.macro_f1.low > 0 and tuned.ece < 0.1"),
    ("sft", "tuned.exact_match >= base.exact_match and tuned.perplexity < base.perplexity"),
    ("pretrain", "tuned.perplexity < base.perplexity"),
])
def test_gates_on_the_metrics_of_the_task_pass_the_check(task, expr):
    validate_gate(expr, task)

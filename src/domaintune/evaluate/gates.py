"""Release gates: conditions on metrics.json that a run must meet, e.g. in CI.

A gate is a small expression over the run's metrics::

    tuned.accuracy >= base.accuracy + 0.05
    tuned.macro_f1 >= 0.85 and tuned.per_label.refund.f1 > 0.7
    difference.accuracy.low > 0          # the paired 95% interval of tuned − base excludes zero

``base.X`` and ``tuned.X`` read the numbers in metrics.json (nested keys with more dots),
``difference.X`` is ``tuned.X − base.X``, and ``.low`` / ``.high`` after a top-level metric read its
95% interval. The expression is parsed with :mod:`ast` and only a whitelist is evaluated: numbers,
``+ - * /``, comparisons (chained too), ``and`` / ``or`` / ``not`` and parentheses. Nothing is ever
passed to ``eval``.
"""

from __future__ import annotations

import ast
import copy
import math
import operator
from dataclasses import dataclass, field

from domaintune.errors import RecipeError

ROOTS = ("base", "tuned", "difference")
EXAMPLE = "tuned.accuracy >= base.accuracy + 0.02 and difference.accuracy.low > 0"
WHERE = "--gate"

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FORBIDDEN = {ast.Call: "function calls", ast.Subscript: "subscripts", ast.Lambda: "lambda",
              ast.Pow: "the ** operator", ast.FloorDiv: "the // operator", ast.Mod: "the % operator",
              ast.In: "'in'", ast.NotIn: "'not in'", ast.Is: "'is'", ast.IsNot: "'is not'",
              ast.IfExp: "'if ... else'", ast.NamedExpr: "':='", ast.Starred: "'*'"}


@dataclass
class GateResult:
    """Whether a gate held; ``failing`` has each false top-level ``and`` clause with its values."""

    expr: str
    passed: bool
    failing: list[str] = field(default_factory=list)


def check_gate(expr: str, metrics: dict) -> GateResult:
    """Evaluate ``expr`` against a metrics.json dict.

    Raises :class:`RecipeError` for anything outside the whitelist and for names that are not in
    ``metrics`` (with the names that are). Every name is resolved before evaluation, so a typo in
    a branch that ``or`` would skip is still reported.
    """
    expr = expr.strip()
    body = _parse(expr)
    values = {path: _resolve(path, metrics) for path in _names(body)}
    clauses = body.values if isinstance(body, ast.BoolOp) and isinstance(body.op, ast.And) else [body]
    failing = [f"{ast.get_source_segment(expr, clause)} ({_with_values(clause, values)})"
               for clause in clauses if not _evaluate(clause, values, expr)]
    return GateResult(expr, not failing, failing)


def _fail(message: str) -> RecipeError:
    return RecipeError(message, where=WHERE, hint=f"write e.g. --gate '{EXAMPLE}'")


def _parse(expr: str) -> ast.expr:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise _fail(f"cannot parse gate {expr!r}: {exc.msg}") from None
    _check(tree.body, expr, want_bool=True)
    return tree.body


def _check(node: ast.expr, expr: str, *, want_bool: bool) -> None:
    """Reject everything outside the whitelist, and numbers where a condition belongs (and back)."""
    part = ast.get_source_segment(expr, node)
    if isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        is_bool = True
        for operand in node.values if isinstance(node, ast.BoolOp) else [node.operand]:
            _check(operand, expr, want_bool=True)
    elif isinstance(node, ast.Compare):
        is_bool = True
        for op in node.ops:
            if type(op) not in _COMPARE:
                raise _fail(f"not allowed in a gate: {_FORBIDDEN.get(type(op), type(op).__name__)} ({part!r})")
        for operand in [node.left, *node.comparators]:
            _check(operand, expr, want_bool=False)
    elif isinstance(node, ast.BinOp):
        is_bool = False
        if type(node.op) not in _BINARY:
            raise _fail(f"not allowed in a gate: {_FORBIDDEN.get(type(node.op), type(node.op).__name__)} ({part!r})")
        _check(node.left, expr, want_bool=False)
        _check(node.right, expr, want_bool=False)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        is_bool = False
        _check(node.operand, expr, want_bool=False)
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        is_bool = False
    elif isinstance(node, (ast.Name, ast.Attribute)):
        is_bool = False
        _dotted(node, expr)
    else:
        what = _FORBIDDEN.get(type(node), f"{type(node).__name__} expressions")
        if isinstance(node, ast.Constant):
            what = f"the constant {node.value!r} (only numbers are allowed)"
        raise _fail(f"not allowed in a gate: {what} ({part!r})")
    if want_bool and not is_bool:
        raise _fail(f"{part!r} is a number where a condition belongs (compare it, e.g. '{part} >= 0.9')")
    if not want_bool and is_bool:
        raise _fail(f"{part!r} is a condition where a number belongs")


def _dotted(node: ast.expr, expr: str) -> str:
    """``tuned.per_label.refund.f1`` as a string, after checking the root and each part."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        what = _FORBIDDEN.get(type(node), f"{type(node).__name__} expressions")
        raise _fail(f"not allowed in a gate: {what} ({ast.get_source_segment(expr, node)!r})")
    parts.append(node.id)
    parts.reverse()
    if parts[0] not in ROOTS:
        raise _fail(f"unknown name {parts[0]!r}: names start with base., tuned. or difference.")
    if len(parts) == 1:
        raise _fail(f"{parts[0]!r} needs a metric name, e.g. {parts[0]}.accuracy")
    private = [p for p in parts if p.startswith("__")]
    if private:
        raise _fail(f"not allowed in a gate: the attribute {private[0]!r} ({'.'.join(parts)!r})")
    return ".".join(parts)


def _names(node: ast.expr) -> list[str]:
    """Whole dotted names only: not the ``tuned.per_label`` inside ``tuned.per_label.refund``."""
    if isinstance(node, (ast.Name, ast.Attribute)):
        return [_dotted(node, "")]
    return [name for child in ast.iter_child_nodes(node) for name in _names(child)]


def _resolve(path: str, metrics: dict) -> float:
    root, *keys = path.split(".")
    if len(keys) == 2 and keys[1] in ("low", "high"):
        return _interval(root, keys[0], keys[1], metrics)
    if root == "difference":
        return _lookup("tuned", keys, metrics) - _lookup("base", keys, metrics)
    return _lookup(root, keys, metrics)


def _lookup(root: str, keys: list[str], metrics: dict) -> float:
    node = metrics.get(root)
    if not isinstance(node, dict):
        raise _fail(f"metrics have no {root!r} section")
    walked = root
    for key in keys:
        if not isinstance(node, dict):
            raise _fail(f"{walked} is a number and has no {key!r} (a top-level metric takes .low or .high)")
        if key not in node:
            raise _fail(f"no metric {key!r} in {walked}; available: {_available(node)}")
        node, walked = node[key], f"{walked}.{key}"
    if isinstance(node, dict):
        raise _fail(f"{walked} is a group, not a number; inside it: {_available(node)}")
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise _fail(f"{walked} is not a number ({node!r}); available: {_available(metrics[root])}")
    return float(node)


def _interval(root: str, metric: str, end: str, metrics: dict) -> float:
    intervals = metrics.get("intervals") or {}
    if metric not in intervals:
        having = ", ".join(sorted(intervals)) or "none (this metrics.json has no intervals)"
        raise _fail(f"no interval for {metric!r}; metrics with intervals: {having}")
    low, high = intervals[metric][root]
    return float(low if end == "low" else high)


def _available(node: dict) -> str:
    """Numbers by name, groups with a trailing '.', e.g. 'accuracy, macro_f1, per_label.'."""
    names = [k if not isinstance(v, dict) else f"{k}." for k, v in node.items()
             if isinstance(v, dict) or (isinstance(v, (int, float)) and not isinstance(v, bool))]
    return ", ".join(names) or "(none)"


def _evaluate(node: ast.expr, values: dict[str, float], expr: str):
    if isinstance(node, ast.BoolOp):
        results = (_evaluate(v, values, expr) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.UnaryOp):
        operand = _evaluate(node.operand, values, expr)
        return not operand if isinstance(node.op, ast.Not) else -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, values, expr)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, values, expr)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BinOp):
        try:
            return _BINARY[type(node.op)](_evaluate(node.left, values, expr), _evaluate(node.right, values, expr))
        except ZeroDivisionError:
            raise _fail(f"division by zero in {ast.get_source_segment(expr, node)!r}") from None
    if isinstance(node, ast.Constant):
        return node.value
    return values[_dotted(node, expr)]


def _with_values(clause: ast.expr, values: dict[str, float]) -> str:
    """The clause with each name replaced by its value, e.g. '0.912 >= 0.917 + 0.05'."""

    class Substitute(ast.NodeTransformer):
        def visit_Attribute(self, node: ast.Attribute) -> ast.expr:
            return ast.Name(id=_number(values[_dotted(node, "")]))

    return ast.unparse(Substitute().visit(copy.deepcopy(clause)))


def _number(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


# The metrics every run of a task has under base and tuned (tests/test_pipeline.py holds runs to
# this); deeper names (per_label.<label>.f1) depend on the data and are checked by ``check_gate``.
METRICS = {"classification": ("accuracy", "macro_f1", "ece", "per_label"),
           "sft": ("exact_match", "rouge_l", "perplexity"),
           "pretrain": ("perplexity",)}


def validate_gate(expr: str, task: str | None = None, where: str = WHERE) -> None:
    """Check a gate before a run spends time training: its syntax, and with ``task`` the metric
    each name reads; ``check_gate`` checks the rest against the metrics. ``where`` names where the
    gate was written (``--gate``, or a recipe key such as ``evaluate.gates``)."""
    try:
        _validate(expr, task)
    except RecipeError as exc:
        if where == WHERE:
            raise
        raise RecipeError(exc.message, where=where, hint=f"write e.g. {where}: ['{EXAMPLE}']") from None


def _validate(expr: str, task: str | None) -> None:
    expr = expr.strip()
    body = _parse(expr)
    if task is None:
        return
    known = METRICS[task]
    for path in _names(body):
        metric = path.split(".")[1]
        if metric not in known:
            raise _fail(f"no metric {metric!r} in {task} runs ({path!r}); available: {', '.join(known)}")

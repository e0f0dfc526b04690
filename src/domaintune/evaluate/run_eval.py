"""Evaluate finished runs again: base and tuned of one run on its own held-out rows or on another
file (``domaintune eval``), or several runs on the same rows side by side (``domaintune compare``).

A run directory holds everything needed: ``recipe.yaml`` (the resolved recipe), ``adapter/`` and
the processed ``data/train.jsonl`` and ``data/eval.jsonl``. Another file goes through the run's
own data steps (validation, cleaning, PII redaction, and the leakage check against its training
rows) before any model sees it, so its numbers mean what the run's own metrics.json means.
"""

from __future__ import annotations

import json
import math
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.console import Console

from domaintune import catalog
from domaintune.data.examples import ChatExample, TextExample
from domaintune.data.steps import key_text
from domaintune.errors import DataError, DomaintuneError, ResourceError
from domaintune.evaluate import metrics as M
from domaintune.evaluate.comparison import compare_classification, compare_generation
from domaintune.evaluate.gates import check_gate, validate_gate
from domaintune.evaluate.intervals import mean_interval, paired_intervals
from domaintune.recipe import Recipe, load_recipe

Example = TextExample | ChatExample


@dataclass
class LoadedRun:
    """A finished run, loaded: its recipe, base model, tokenizer and tuned model."""

    run_dir: Path
    spec: Recipe
    base: catalog.BaseModel
    tokenizer: Any
    model: Any  # classification: MeanPoolClassifier; otherwise a causal LM (PEFT-wrapped or full)
    labels: list[str]  # classification only

    def load_base(self):
        """A fresh copy of the untuned base (the encoder, for classification); a causal LM placed
        as the run's recipe trains it on this machine (``speed.place``), where the run evaluated."""
        if self.spec.task == "classification":
            return catalog.load_encoder(self.base)
        if self.spec.method == "qlora":
            from domaintune.train.methods import load_quantized_causal_lm

            return load_quantized_causal_lm(self.base.path)
        from domaintune.train.speed import place

        return place(catalog.load_causal_lm(self.base), self.placement_plan(), self.spec.method)

    def placement_plan(self):
        """The speed plan the run's recipe gets on this machine: what ``place`` needs."""
        from domaintune.train.speed import plan_speed

        return plan_speed(self.spec.training.speed, None, self.spec.method,
                          fsdp=self.spec.training.distributed == "fsdp")


def run_base(run_dir: Path, spec: Recipe) -> catalog.BaseModel:
    """The base a run was trained on: the folder its lineage recorded (a recipe's relative path
    was relative to the recipe, not to the run), else the recipe's name through the catalog."""
    lineage = run_dir / "lineage.json"
    if lineage.is_file():
        recorded = Path(json.loads(lineage.read_text(encoding="utf-8"))["base_model"]["path"])
        if (recorded / "config.json").is_file():
            return catalog.BaseModel(name=spec.base_model, path=recorded)
    return catalog.resolve(spec.base_model, base_dir=run_dir)


def load_run_model(run_dir: str | Path) -> LoadedRun:
    """Load a finished run's tuned model (the adapter on its base, or the full model)."""
    run_dir = Path(run_dir).resolve()
    adapter = run_dir / "adapter"
    spec = _run_recipe(run_dir)
    base = run_base(run_dir, spec)
    tokenizer = catalog.load_tokenizer(catalog.BaseModel(name=spec.base_model, path=adapter))
    partial = LoadedRun(run_dir, spec, base, tokenizer, None, [])
    if spec.task == "classification":
        from domaintune.train.classification import load_classifier

        partial.model, partial.labels = load_classifier(adapter, partial.load_base)
    else:
        from domaintune.train.causal import load_causal
        from domaintune.train.speed import place

        # a saved full model loads on the CPU in float32
        partial.model = place(load_causal(adapter, partial.load_base), partial.placement_plan(), spec.method)
    return partial


@contextmanager
def base_model_of(model, load_base: Callable[[], Any]) -> Iterator[Any]:
    """The untuned base of ``model``: the same weights with the adapter switched off where PEFT
    can do that (no second copy in memory), else a fresh copy from ``load_base``. Prompt and
    prefix tuning are loaded afresh: their virtual tokens shift positions even when disabled."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and not model.active_peft_config.is_prompt_learning:
        with model.disable_adapter():
            yield model
    else:
        yield load_base().eval()


def read_processed(path: Path, task: str) -> list[Example]:
    """The examples of a run's ``data/train.jsonl`` or ``data/eval.jsonl`` (already processed)."""
    examples: list[Example] = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            row = json.loads(line)
            where = row.pop("where", f"{path}:{number}")
            if task == "sft":
                examples.append(ChatExample(messages=row.pop("messages"), where=where, meta=row))
            else:
                examples.append(TextExample(text=row.pop("text"), label=row.pop("label", None), where=where, meta=row))
    return examples


MAX_DROPPED_LISTED = 10


def prepare_eval_file(spec: Recipe, data: Path, train: list[Example], console: Console) -> tuple[list[Example], dict]:
    """``data`` through the run's data steps, with the run's training rows as the training side so
    that rows it trained on are dropped as leaks. Returns the examples and what was dropped.
    Errors name ``data`` and what the run expects of it, not the recipe keys a run would set."""
    from domaintune.data.prepare import prepare

    d = spec.data
    if not Path(data).is_file():
        raise DataError("the --data file does not exist", where=str(data), hint="check the path (relative to where you are)")
    names = {"text": d.text_field, "label": d.label_field}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        with open(train_file, "w", encoding="utf-8") as fh:
            for e in train:
                fields = ({"messages": e.messages} if isinstance(e, ChatExample)
                          else {names["text"]: e.text, **({names["label"]: e.label} if e.label is not None else {})})
                fh.write(json.dumps({**e.meta, **fields}, ensure_ascii=False) + "\n")
        steps = spec.model_copy(update={"data": d.model_copy(update={"train": str(train_file),
                                                                     "eval": str(Path(data).resolve())})})
        try:
            prepared = prepare(steps, Path(tmp), console, require_rows=False)
        except DataError as exc:
            if exc.message.startswith("no column"):
                columns = [d.text_field, d.label_field] if spec.task == "classification" else \
                    [d.text_field] if spec.task == "pretrain" else ["messages (or prompt/completion, or instruction/output)"]
                raise DataError(exc.message, where=exc.where,
                                hint=f"this run was trained on the columns {', '.join(columns)}: give --data a file "
                                     "with them") from None
            if "data.on_bad_rows" in (exc.hint or ""):  # a recipe key: eval has no --set to change it
                raise DataError(exc.message, where=exc.where,
                                hint="fix those rows of the --data file or leave them out: eval applies the run's own "
                                     f"data steps, and its recipe says data.on_bad_rows: {d.on_bad_rows}") from None
            raise
    dropped: dict[str, int] = {}
    listed = []  # the first few, so that a user can find them in the file
    for item in prepared.dropped:
        if item.source == "eval":
            dropped[item.step] = dropped.get(item.step, 0) + 1
            if len(listed) < MAX_DROPPED_LISTED:
                listed.append({"where": item.where, "step": item.step, "reason": item.reason})
    if not prepared.eval:
        why = ", ".join(f"{n} by {step}" for step, n in dropped.items()) or "none was read"
        raise DataError(f"no row of the file is left to evaluate on after the run's data steps ({why})",
                        where=str(data),
                        hint="rows dropped by leakage duplicate this run's training rows: evaluate on rows it "
                             "never saw; `domaintune data inspect` shows why rows are dropped")
    return prepared.eval, {"file": str(data), "dropped": dropped, "dropped_rows": listed}


def _limit(examples: list, spec: Recipe) -> list:
    return examples[:spec.evaluate.max_rows] if spec.evaluate.max_rows else examples


def _evaluate(run: LoadedRun, evaluation: list[Example], train: list[Example], include_base: bool,
              console: Console) -> tuple[dict, dict[str, list[float]]]:
    """The run's metrics on ``evaluation``, and the tuned model's per-row scores (``{"accuracy":
    [1.0, 0.0, ...]}``; exact match and ROUGE-L for sft; none for pretrain, whose perplexity is
    pooled), which pair it with another run on the same rows."""
    spec = run.spec
    if spec.task == "classification":
        result = _evaluate_classification(run, evaluation, train, include_base, console)
    else:
        result = _evaluate_causal(run, evaluation, train, include_base, console)
    rows = result.pop("_rows", None) or []
    if spec.evaluate.slices and include_base and rows:
        from domaintune.evaluate.slices import classification_score, mean_scores, missing_slice_fields, slice_metrics

        # Another file may lack a column the run sliced by: it is evaluated without that slice.
        missing = missing_slice_fields(spec.evaluate.slices, rows)
        if missing:
            console.print(f"[yellow]no evaluation row has the slice field{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(map(repr, missing))} of the run's evaluate.slices: not sliced by "
                          f"{'them' if len(missing) > 1 else 'it'}[/]")
        score = classification_score if spec.task == "classification" else mean_scores
        result["slices"] = [slice_metrics(rows, name, score) for name in spec.evaluate.slices if name not in missing]
    if spec.task == "classification":
        scores = {"accuracy": [float(r["tuned"] == r["label"]) for r in rows]}
    else:
        scores = {name: [r["tuned"][name] for r in rows] for name in (rows[0]["tuned"] if rows else {})}
    return result, scores


def _evaluate_classification(run: LoadedRun, evaluation: list[TextExample], train: list[TextExample],
                             include_base: bool, console: Console) -> dict:
    from domaintune.train.classification import MeanPoolClassifier, embed_texts, fit_probe, predict_proba

    spec, labels = run.spec, run.labels
    unknown = sorted({e.label for e in evaluation} - set(labels))
    if unknown:
        raise DataError(f"the eval rows have labels this run never learned: {', '.join(unknown[:5])}",
                        hint=f"its labels are: {', '.join(labels)}")
    max_len = int(spec.training.max_seq_length)
    texts, truth = [e.text for e in evaluation], [e.label for e in evaluation]
    with console.status(f"{run.run_dir.name}: tuned model on {len(texts)} rows"):
        tuned_proba = predict_proba(run.model, run.tokenizer, texts, max_len)
    if not include_base:
        pred = [labels[i] for i in tuned_proba.argmax(1)]
        tuned = M.classification_metrics(truth, pred, labels)
        correct = [p == y for p, y in zip(pred, truth)]
        return {"tuned": tuned, "intervals": {"accuracy": {"tuned": list(mean_interval(correct))}}}
    index = {label: i for i, label in enumerate(labels)}
    with console.status(f"{run.run_dir.name}: refitting the base probe on {len(train)} training rows"), \
            base_model_of(run.model.encoder, run.load_base) as encoder:
        frozen = MeanPoolClassifier(encoder, len(labels))
        probe = fit_probe(embed_texts(frozen, run.tokenizer, [e.text for e in train], max_len),
                          np.array([index[e.label] for e in train]), len(labels), spec.training.seed)
        logits = probe.logits(embed_texts(frozen, run.tokenizer, texts, max_len))
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    base_proba = shifted / shifted.sum(axis=1, keepdims=True)
    compared = compare_classification(truth, labels, base_proba, tuned_proba)
    compared.base["model"] = f"{spec.base_model} frozen + logistic-regression probe"
    compared.tuned["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    rows = [{"label": y, "base": b, "tuned": t, "meta": e.meta}
            for e, y, b, t in zip(evaluation, truth, compared.base_pred, compared.tuned_pred)]
    return {"base": compared.base, "tuned": compared.tuned, "intervals": compared.intervals, **compared.extra,
            "_rows": rows}


def score_causal(model, tokenizer, spec: Recipe, evaluation: list[Example], max_new_tokens: int,
                 console: Console, name: str) -> tuple[dict, dict, list[str]]:
    """sft: exact match, ROUGE-L and perplexity on the answers; pretrain: perplexity. Returns the
    metrics, the per-row scores they average and the generated answers (both empty for pretrain).
    A run scores its base and tuned model here, and so do ``eval`` and ``update``."""
    import torch

    from domaintune.train.causal import generate, pack_text, perplexity, prompt_ids, tokenize_chat

    ev, max_len = spec.evaluate, int(spec.training.max_seq_length)
    try:
        if spec.task == "pretrain":
            ppl, _ = perplexity(model, tokenizer, pack_text(tokenizer, [e.text for e in evaluation], max_len),
                                ev.batch_size)
            return {"perplexity": float(ppl)}, {}, []
        prompts = [prompt_ids(tokenizer, e) for e in evaluation]
        outputs = generate(model, tokenizer, prompts, max_new_tokens, ev.batch_size, console, f"{name}: generating")
        ppl, _ = perplexity(model, tokenizer, [tokenize_chat(tokenizer, e, max_len) for e in evaluation], ev.batch_size)
    except torch.cuda.OutOfMemoryError as exc:
        raise ResourceError(f"out of GPU memory while evaluating the {name} model, {ev.batch_size} rows at a time",
                            hint="lower evaluate.batch_size") from exc
    metrics, per_row = M.generation_metrics(outputs, [e.answer for e in evaluation], ppl)
    return metrics, per_row, outputs


def sft_max_new_tokens(spec: Recipe, tokenizer, train: list[ChatExample]) -> int:
    """The generation length a run used: the recipe's, else the longest training answer plus a margin."""
    from domaintune.train.causal import answer_token_count

    if spec.evaluate.max_new_tokens:
        return spec.evaluate.max_new_tokens
    return min(256, math.ceil(max(answer_token_count(tokenizer, e.answer) for e in train) * 1.25) + 8)


def _evaluate_causal(run: LoadedRun, evaluation: list[Example], train: list[Example], include_base: bool,
                     console: Console) -> dict:
    spec, name = run.spec, run.run_dir.name
    max_new = sft_max_new_tokens(spec, run.tokenizer, train) if spec.task == "sft" else 0
    tuned, tuned_scores, _ = score_causal(run.model, run.tokenizer, spec, evaluation, max_new, console, f"{name} tuned")
    tuned["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    if not include_base:
        return {"tuned": tuned, "intervals": {k: {"tuned": list(mean_interval(v))} for k, v in tuned_scores.items()}}
    with base_model_of(run.model, run.load_base) as base_model:
        base, base_scores, _ = score_causal(base_model, run.tokenizer, spec, evaluation, max_new, console, f"{name} base")
    base["model"] = f"{spec.base_model} (no fine-tuning)"
    compared = compare_generation(base_scores, tuned_scores)
    rows = [{"base": {k: base_scores[k][i] for k in base_scores}, "tuned": {k: tuned_scores[k][i] for k in tuned_scores},
             "meta": e.meta} for i, e in enumerate(evaluation)] if base_scores else []
    return {"base": base, "tuned": tuned, "intervals": compared.intervals, **compared.extra, "_rows": rows}


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, *, console: Console | None = None,
                 include_base: bool = True, gates: list[str] | None = None) -> dict:
    """Base and tuned of a finished run on ``data`` (default: the run's own ``data/eval.jsonl``),
    run through the run's own data steps (validation, cleaning, PII as in its recipe.yaml, and
    rows it trained on dropped as leaks); returns a dict shaped like metrics.json:
    ``{"task", "eval_rows", "base", "tuned", "intervals", "significance", ..., "gates"}``. Without
    ``include_base`` only the tuned model is evaluated (no ``base``, no significance). ``gates``
    are checked against the run's task before anything is loaded, and on the result after."""
    console = console or Console(stderr=True, quiet=True)
    _check_gates(_run_recipe(Path(run_dir)), gates)
    with console.status(f"loading {Path(run_dir).name}"):
        run = load_run_model(run_dir)
    train = read_processed(run.run_dir / "data" / "train.jsonl", run.spec.task)
    if data is None:
        evaluation, source = read_processed(run.run_dir / "data" / "eval.jsonl", run.spec.task), {"file": "data/eval.jsonl"}
    else:
        evaluation, source = prepare_eval_file(run.spec, Path(data), train, console)
    evaluation = _limit(evaluation, run.spec)
    if not evaluation:
        raise DataError("no evaluation rows are left after the run's data steps", where=str(data),
                        hint="see the dropped counts with `domaintune data inspect`")
    result, _ = _evaluate(run, evaluation, train, include_base, console)
    metrics = {"run_dir": str(run.run_dir), "task": run.spec.task, "eval_rows": len(evaluation),
               "train_rows": len(train), "data": source, **result}
    return {**metrics, "gates": [asdict(check_gate(expr, metrics)) for expr in gates or []]}


def _run_recipe(run_dir: Path) -> Recipe:
    """A finished run's recipe, or the error that names what to pass instead."""
    run_dir = run_dir.resolve()
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise DomaintuneError(f"{run_dir} is not a finished run directory (no recipe.yaml or adapter/)",
                              hint="pass the directory `domaintune run` printed at its end")
    return load_recipe(run_dir / "recipe.yaml")


def _check_gates(spec: Recipe, gates: list[str] | None) -> None:
    for expr in gates or []:  # a typo should fail now, not after minutes of evaluation
        validate_gate(expr, spec.task)


def compare_runs(run_dirs: list, data: str | Path | None = None, *, console: Console | None = None,
                 gates: list[str] | None = None) -> dict:
    """The same evaluation rows through several runs of one task, each against its own base.

    The rows are ``data`` as processed by the first run's data steps, or (default) the first run's
    own held-out rows. ``leaked_rows`` counts, per run, rows that duplicate or overlap its training rows
    (they stay in, so that every run is scored on the same rows). Every directory and ``gates``
    are checked before any model is loaded. Returns ``{"task", "eval_rows", "data",
    "runs": {run_dir: metrics}}``, each run's metrics with its ``gates``."""
    from domaintune.data.dedup import contained_leaks, deduplicate

    if not run_dirs:
        raise DomaintuneError("name at least one run directory to compare")
    console = console or Console(stderr=True, quiet=True)
    first_dir = Path(run_dirs[0]).resolve()
    first = _run_recipe(first_dir)
    for run_dir in run_dirs[1:]:
        task = _run_recipe(Path(run_dir)).task
        if task != first.task:
            raise DomaintuneError(f"{Path(run_dir).resolve()} is a {task} run and {first_dir} a {first.task} run",
                                  hint="compare runs of one task")
    _check_gates(first, gates)
    first_train = read_processed(first_dir / "data" / "train.jsonl", first.task)
    if data is None:
        evaluation, source = read_processed(first_dir / "data" / "eval.jsonl", first.task), {"file": str(first_dir / "data" / "eval.jsonl")}
    else:
        evaluation, source = prepare_eval_file(first, Path(data), first_train, console)
    evaluation = _limit(evaluation, first)
    runs, scores = {}, {}
    for run_dir in run_dirs:
        with console.status(f"loading {Path(run_dir).name}"):
            run = load_run_model(run_dir)
        train = read_processed(run.run_dir / "data" / "train.jsonl", run.spec.task)
        d = run.spec.data.dedup
        train_texts, eval_texts = [key_text(e) for e in train], [key_text(e) for e in evaluation]
        leaks = set(deduplicate(train_texts, eval_texts, exact=True, near=d.near, threshold=d.threshold).eval_leaks)
        if d.containment is not None:
            leaks |= set(contained_leaks(train_texts, eval_texts, threshold=d.containment))
        result, scores[str(run.run_dir)] = _evaluate(run, evaluation, train, True, console)
        metrics = {"task": run.spec.task, "eval_rows": len(evaluation), "train_rows": len(train),
                   "leaked_rows": len(leaks), **result}
        runs[str(run.run_dir)] = {**metrics, "gates": [asdict(check_gate(expr, metrics)) for expr in gates or []]}
        del run  # one run's weights in memory at a time
    return {"task": first.task, "eval_rows": len(evaluation), "data": source, "runs": runs,
            "versus_first": _versus_first(scores)}


def _versus_first(scores: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """Each later run against the first, row by row on the same rows: per metric, the change in
    its mean, the paired 95% bootstrap interval of that change and a paired test's p-value. Two
    runs' own intervals against their own bases cannot say which of the two is better; this can.
    Empty for pretraining (perplexity is pooled over the rows, there is nothing to pair)."""
    from domaintune.evaluate.significance import mcnemar, paired_bootstrap_p

    first, *later = scores.values()
    out = {}
    for name, theirs in zip(list(scores)[1:], later):
        out[name] = {}
        for metric, values in theirs.items():
            mine, reference = np.asarray(values, dtype=float), np.asarray(first[metric], dtype=float)
            binary = metric in ("accuracy", "exact_match")
            p = mcnemar(reference > 0, mine > 0)["p_value"] if binary else paired_bootstrap_p(reference, mine)
            out[name][metric] = {"change": float(mine.mean() - reference.mean()),
                                 "difference": paired_intervals(reference, mine)["difference"], "p_value": float(p)}
    return out



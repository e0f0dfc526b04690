"""One run, top to bottom: recipe → data → base model → evaluate base → train → evaluate tuned
→ write the run directory. ``domaintune run`` and ``domaintune.run`` both come here."""

from __future__ import annotations

import json
import math
import secrets
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from domaintune import catalog
from domaintune.data.examples import TextExample, chat_examples, classification_examples, text_examples
from domaintune.data.readers import read_rows
from domaintune.data.split import holdout_split
from domaintune.errors import DataError, ModelError
from domaintune.evaluate import metrics as M
from domaintune.evaluate.intervals import paired_intervals
from domaintune.evaluate.report import write_report
from domaintune.recipe import Recipe, dump_recipe, load_recipe, resolve_defaults
from domaintune.registry.lineage import build_lineage
from domaintune.registry.model_card import write_model_card
from domaintune.train.loop import LoopConfig
from domaintune.train.methods import apply_lora, count_parameters


@dataclass
class RunResult:
    """What a run produced; ``run_dir`` holds everything on disk."""

    run_dir: Path
    task: str
    eval_rows: int
    train_rows: int
    base: dict[str, Any]
    tuned: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "task": self.task, "eval_rows": self.eval_rows,
                "train_rows": self.train_rows, "base": self.base, "tuned": self.tuned}


@dataclass
class TaskData:
    train: list
    eval: list
    labels: list[str] = field(default_factory=list)


def run(recipe: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | Path | None = None,
        console: Console | None = None) -> RunResult:
    """Run a recipe end to end and return its result. ``overrides`` maps dotted recipe keys to
    values (``{"training.epochs": 1}``); ``output_dir`` replaces the recipe's ``output_dir``."""
    console = console or Console(stderr=True, quiet=True)
    quiet_libraries()
    recipe_path = Path(recipe).resolve()
    root = recipe_path.parent
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    spec = load_recipe(recipe_path, overrides)
    data_files = [root / spec.data.train] + ([root / spec.data.eval] if spec.data.eval else [])
    data = _load_data(spec, root)
    spec = resolve_defaults(spec, len(data.train))
    base = catalog.resolve(spec.base_model, base_dir=root)
    _check_model_fits_task(spec)
    timings["data_s"] = time.perf_counter() - clock
    console.print(f"[bold]{spec.name}[/]: {spec.task} on [cyan]{spec.base_model}[/] ({spec.method}); "
                  f"{len(data.train)} training rows, {len(data.eval)} held out")

    out_root = Path(output_dir) if output_dir is not None else root / spec.output_dir
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    run_dir = out_root / spec.name / run_id
    staging = out_root / spec.name / f".{run_id}.partial"
    staging.mkdir(parents=True)
    try:
        runner = _run_classification if spec.task == "classification" else _run_causal
        result, train_log = runner(spec, base, data, staging, console, timings)
        result.run_dir = run_dir
        (staging / "recipe.yaml").write_text(dump_recipe(spec), encoding="utf-8")
        metrics = {"task": spec.task, "eval_rows": result.eval_rows, "train_rows": result.train_rows,
                   "base": result.base, "tuned": result.tuned, "intervals": result.intervals}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        with open(staging / "train_log.jsonl", "w", encoding="utf-8") as fh:
            for record in train_log:
                fh.write(json.dumps(record) + "\n")
        with open(staging / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for sample in result.samples:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
        timings["total_s"] = time.perf_counter() - clock
        lineage = build_lineage(spec, recipe_path, data_files, base, staging / "adapter", run_id, timings)
        (staging / "lineage.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
        write_model_card(staging / "model_card.md", spec, metrics, lineage)
        write_report(staging / "report.html", spec, metrics, result.samples, train_log)
        staging.rename(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left behind
        raise
    return result


def quiet_libraries() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\..*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _check_model_fits_task(spec: Recipe) -> None:
    entry = catalog.CATALOG.get(spec.base_model)
    if entry is None:
        return
    if spec.task == "classification" and entry.kind != "encoder":
        raise ModelError(f"{entry.name} is a generative model; classification here uses an encoder",
                         hint="set base_model: minilm-l6 (or any encoder folder)")
    if spec.task != "classification" and entry.kind != "causal-lm":
        raise ModelError(f"{entry.name} is an encoder and cannot generate text for task {spec.task}",
                         hint="set base_model: smollm2-135m-instruct (or any causal LM folder or .gguf)")


def _load_data(spec: Recipe, root: Path) -> TaskData:
    d = spec.data
    train_rows = read_rows(root / d.train)
    eval_rows = read_rows(root / d.eval) if d.eval else None
    if spec.task == "classification":
        train = classification_examples(train_rows, d.text_field, d.label_field)
        if eval_rows is None:
            train, evaluation = holdout_split(train, d.eval_fraction, spec.training.seed, key=lambda e: e.label)
        else:
            evaluation = classification_examples(eval_rows, d.text_field, d.label_field)
        seen = {e.label for e in train}
        unseen = [e for e in evaluation if e.label not in seen]
        if unseen:
            places = ", ".join(f"{e.where} ({e.label!r})" for e in unseen[:3])
            raise DataError(f"{len(unseen)} eval rows have labels that never occur in training: {places}",
                            hint="add training rows for those labels or remove them from the eval file")
        if len(seen) < 2:
            raise DataError(f"classification needs at least two labels; training has {sorted(seen)}",
                            where=str(root / d.train))
        return TaskData(train, evaluation, labels=sorted(seen))
    if spec.task == "sft":
        train = chat_examples(train_rows, d.system_prompt)
        evaluation = chat_examples(eval_rows, d.system_prompt) if eval_rows is not None else None
    else:
        train = text_examples(train_rows, d.text_field)
        evaluation = text_examples(eval_rows, d.text_field) if eval_rows is not None else None
    if evaluation is None:
        train, evaluation = holdout_split(train, d.eval_fraction, spec.training.seed)
    if not train or not evaluation:
        raise DataError("too few rows to hold some out for evaluation", where=str(root / d.train),
                        hint="add rows or give an eval file (data.eval)")
    return TaskData(train, evaluation)


def _loop_config(spec: Recipe) -> LoopConfig:
    t = spec.training
    return LoopConfig(epochs=float(t.epochs), learning_rate=float(t.learning_rate), weight_decay=t.weight_decay,
                      warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm, seed=t.seed)


def _limit(items: list, max_rows: int | None) -> list:
    return items[:max_rows] if max_rows else items


def _run_classification(spec: Recipe, base, data: TaskData, run_dir: Path, console: Console,
                        timings: dict[str, float]) -> tuple[RunResult, list[dict]]:
    from domaintune.train.classification import (MeanPoolClassifier, embed_texts, fit_probe, init_head_from_probe,
                                                 predict_proba, save_classifier, train_classifier)

    labels = data.labels
    index = {label: i for i, label in enumerate(labels)}
    train_texts = [e.text for e in data.train]
    train_y = np.array([index[e.label] for e in data.train])
    evaluation: list[TextExample] = _limit(data.eval, spec.evaluate.max_rows)
    eval_texts = [e.text for e in evaluation]
    max_len = int(spec.training.max_seq_length)

    clock = time.perf_counter()
    tokenizer = catalog.load_tokenizer(base)
    model = MeanPoolClassifier(catalog.load_encoder(base), len(labels))
    with console.status("base: fitting a logistic-regression probe on the frozen embeddings"):
        probe = fit_probe(embed_texts(model, tokenizer, train_texts, max_len), train_y, len(labels), spec.training.seed)
        base_logits = probe.logits(embed_texts(model, tokenizer, eval_texts, max_len))
    base_pred = [labels[i] for i in base_logits.argmax(1)]
    timings["base_eval_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    init_head_from_probe(model, probe)
    if spec.method == "lora":
        model.encoder = apply_lora(model.encoder, spec.lora, task_type=None)
    trainable, total = count_parameters(model)
    console.print(f"training {trainable:,} of {total:,} parameters")
    log = train_classifier(model, tokenizer, train_texts, train_y.tolist(), loop=_loop_config(spec),
                           batch_size=int(spec.training.batch_size), max_length=max_len, console=console)
    timings["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    proba = predict_proba(model, tokenizer, eval_texts, max_len)
    tuned_pred = [labels[i] for i in proba.argmax(1)]
    truth = [e.label for e in evaluation]
    base_metrics = M.classification_metrics(truth, base_pred, labels)
    tuned_metrics = M.classification_metrics(truth, tuned_pred, labels)
    base_metrics["model"] = f"{spec.base_model} frozen + logistic-regression probe"
    tuned_metrics["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    save_classifier(model, tokenizer, labels, spec.method, run_dir / "adapter")
    timings["tuned_eval_s"] = time.perf_counter() - clock
    samples = [{"where": e.where, "text": e.text, "label": e.label, "base": b, "tuned": t,
                "tuned_confidence": float(p.max())}
               for e, b, t, p in zip(evaluation, base_pred, tuned_pred, proba)]
    result = RunResult(run_dir, spec.task, len(evaluation), len(data.train), base_metrics, tuned_metrics, samples)
    result.intervals = {"accuracy": paired_intervals([b == y for b, y in zip(base_pred, truth)],
                                                     [t == y for t, y in zip(tuned_pred, truth)])}
    return result, log


def _run_causal(spec: Recipe, base, data: TaskData, run_dir: Path, console: Console,
                timings: dict[str, float]) -> tuple[RunResult, list[dict]]:
    from domaintune.train.causal import (ensure_chat_template, generate, pack_text, perplexity, prompt_ids,
                                         save_causal, tokenize_chat, answer_token_count, train_causal)

    clock = time.perf_counter()
    tokenizer = catalog.load_tokenizer(base)
    model = catalog.load_causal_lm(base)
    max_len = int(spec.training.max_seq_length)
    evaluation = _limit(data.eval, spec.evaluate.max_rows)
    ev = spec.evaluate

    if spec.task == "sft":
        ensure_chat_template(tokenizer)
        train_rows = [tokenize_chat(tokenizer, e, max_len) for e in data.train]
        dropped = sum(1 for r in train_rows if all(label == -100 for label in r.labels))
        train_rows = [r for r in train_rows if any(label != -100 for label in r.labels)]
        if dropped:
            console.print(f"[yellow]{dropped} training rows dropped: their answer starts after "
                          f"training.max_seq_length={max_len} tokens[/]")
        if not train_rows:
            raise DataError("no training row has an answer within training.max_seq_length tokens",
                            hint="raise training.max_seq_length")
        eval_rows = [tokenize_chat(tokenizer, e, max_len) for e in evaluation]
        prompts = [prompt_ids(tokenizer, e) for e in evaluation]
        references = [e.answer for e in evaluation]
        longest = max(answer_token_count(tokenizer, e.answer) for e in data.train)
        max_new = ev.max_new_tokens or min(256, math.ceil(longest * 1.25) + 8)

        def evaluate(name: str) -> tuple[dict, list[str]]:
            outputs = generate(model, tokenizer, prompts, max_new, ev.batch_size, console, f"{name}: generating")
            ppl, _ = perplexity(model, tokenizer, eval_rows, ev.batch_size)
            return M.generation_metrics(outputs, references, ppl), outputs
    else:
        train_rows = pack_text(tokenizer, [e.text for e in data.train], max_len)
        eval_rows = pack_text(tokenizer, [e.text for e in evaluation], max_len)

        def evaluate(name: str) -> tuple[dict, list[str]]:
            ppl, _ = perplexity(model, tokenizer, eval_rows, ev.batch_size)
            return {"perplexity": float(ppl)}, []

    base_metrics, base_out = evaluate("base")
    base_metrics["model"] = f"{spec.base_model} (no fine-tuning)"
    timings["base_eval_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if spec.method == "lora":
        model = apply_lora(model, spec.lora, task_type="CAUSAL_LM")
    trainable, total = count_parameters(model)
    console.print(f"training {trainable:,} of {total:,} parameters on {len(train_rows)} sequences")
    log = train_causal(model, tokenizer, train_rows, loop=_loop_config(spec), batch_size=int(spec.training.batch_size),
                       console=console, description="train")
    timings["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    tuned_metrics, tuned_out = evaluate("tuned")
    tuned_metrics["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    save_causal(model, tokenizer, run_dir / "adapter")
    timings["tuned_eval_s"] = time.perf_counter() - clock

    samples: list[dict] = []
    if spec.task == "sft":
        em_base = M.exact_match(base_out, references)
        em_tuned = M.exact_match(tuned_out, references)
        samples = [{"where": e.where, "prompt": e.prompt_messages[-1]["content"], "reference": r, "base": b,
                    "tuned": t, "base_exact": eb, "tuned_exact": et}
                   for e, r, b, t, eb, et in zip(evaluation, references, base_out, tuned_out, em_base, em_tuned)]
    result = RunResult(run_dir, spec.task, len(evaluation), len(data.train), base_metrics, tuned_metrics, samples)
    if spec.task == "sft":
        result.intervals = {"exact_match": paired_intervals(em_base, em_tuned),
                            "rouge_l": paired_intervals(M.rouge_l(base_out, references), M.rouge_l(tuned_out, references))}
    return result, log

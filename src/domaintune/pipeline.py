"""One run, top to bottom: recipe → data → base model → evaluate base → train → evaluate tuned
→ write the run directory. ``domaintune run`` and ``domaintune.run`` both come here."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from domaintune import catalog
from domaintune.data.card import label_variants_warning
from domaintune.data.examples import TextExample
from domaintune.data.prepare import PreparedData, prepare, write_prepared
from domaintune.data.steps import check_split
from domaintune.errors import DataError, DomaintuneError, ModelError, RecipeError
from domaintune.evaluate.bias import flip_rate, load_term_groups
from domaintune.evaluate.comparison import compare_classification, compare_generation
from domaintune.evaluate.explain import explain_classification
from domaintune.evaluate.extras import causal_extras
from domaintune.evaluate.privacy import with_canaries
from domaintune.evaluate.gates import check_gate, validate_gate
from domaintune.evaluate.report import write_report
from domaintune.recipe import Recipe, dump_recipe, load_recipe, resolve_defaults
from domaintune.registry.lineage import build_lineage
from domaintune.registry.model_card import write_model_card
from domaintune.train import distributed
from domaintune.train.loop import LoopConfig, seed_everything
from domaintune.train.methods import apply_method, check_runs_here, count_parameters, load_quantized_causal_lm

if TYPE_CHECKING:
    from domaintune.train.preference import PreferencePhase


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
    extra: dict[str, Any] = field(default_factory=dict)  # significance, calibration, slices, bias
    gates: list[dict[str, Any]] = field(default_factory=list)
    registered: str | None = None  # "name:version" in the registry
    training: dict[str, Any] = field(default_factory=dict)  # device, processes, speed plan: into lineage.json

    @property
    def passed(self) -> bool:
        """Whether every gate held (True when there are none)."""
        return all(g["passed"] for g in self.gates)

    def metrics(self) -> dict[str, Any]:
        """The content of metrics.json."""
        return {"task": self.task, "eval_rows": self.eval_rows, "train_rows": self.train_rows,
                "base": self.base, "tuned": self.tuned, "intervals": self.intervals, **self.extra,
                "gates": self.gates}

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "task": self.task, "eval_rows": self.eval_rows,
                "train_rows": self.train_rows, "base": self.base, "tuned": self.tuned,
                "gates": self.gates, "passed": self.passed, "registered": self.registered}


def run(recipe: str | Path, overrides: dict[str, Any] | None = None, output_dir: str | Path | None = None,
        console: Console | None = None, gates: list[str] | None = None, register: bool = True,
        registry_url: str | None = None, resume: str | Path | None = None,
        init_from: str | Path | None = None, preference: PreferencePhase | None = None) -> RunResult:
    """Run a recipe end to end and return its result. ``overrides`` maps dotted recipe keys to
    values (``{"training.epochs": 1}``); ``output_dir`` replaces the recipe's ``output_dir``;
    ``gates`` are added to the recipe's ``evaluate.gates`` (``result.passed`` tells whether all held;
    the run directory is written either way). With ``register`` the finished run becomes a new
    candidate version in the registry (``registry_url``, default: see ``domaintune.registry``).
    ``resume`` continues a run that was killed (its ``.partial`` folder, or the run directory it
    was to become) from its last checkpoint, with the same run id. ``init_from`` (a run directory)
    starts training from that run's trained weights instead of a fresh adapter (``domaintune update``).
    ``preference`` (sft) adds a DPO phase on its pairs after training, its reference the
    model as training starts; it writes into ``preference/`` of the run (``domaintune update``)."""
    console = console or Console(stderr=True, quiet=True)
    quiet_libraries()
    recipe_path = Path(recipe).resolve()
    root = recipe_path.parent
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    spec = _checked_recipe(recipe_path, overrides, gates)
    resumed = _resume_dirs(Path(resume), spec.name) if resume is not None else None
    out_root = Path(output_dir) if output_dir is not None else root / spec.output_dir
    if out_root.exists() and not out_root.is_dir():
        raise RecipeError(f"the output directory {out_root} is a file",
                          hint="give --output-dir (or the recipe's output_dir) a folder, new or existing")
    spec, data, base = _data_and_base(spec, root, console)
    timings["data_s"] = time.perf_counter() - clock
    console.print(f"[bold]{spec.name}[/]: {spec.task} on [cyan]{spec.base_model}[/] ({spec.method}); "
                  f"{len(data.train)} training rows, {len(data.eval)} held out; {_data_note(data.card)}")
    if warning := label_variants_warning(data.card):
        console.print(f"[yellow]warning: {escape(warning)}[/]")

    if resumed:
        run_dir, staging = resumed
        run_id = run_dir.name
        console.print(f"resuming {staging}")
    else:
        # under torchrun every process names rank 0's run: one folder, which rank 0 alone writes
        run_id = distributed.from_main(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2))
        run_dir = out_root / spec.name / run_id
        staging = out_root / spec.name / f".{run_id}.partial"
        staging.mkdir(parents=True, exist_ok=distributed.world_size() > 1)
    main = distributed.is_main()  # asked now: the other processes leave the process group after training
    try:
        processed = write_prepared(data, staging, quarantine=spec.data.on_bad_rows == "quarantine") if main else []
        runner = _run_classification if spec.task == "classification" else partial(_run_causal, preference=preference)
        result, train_log = runner(spec, base, data, staging, console, timings,
                                   Path(init_from) if init_from is not None else None)
        result.run_dir = run_dir
        (staging / "recipe.yaml").write_text(dump_recipe(spec), encoding="utf-8")
        if spec.evaluate.slices:
            result.extra["slices"] = _slices(spec, result)
        result.gates = [asdict(check_gate(expr, result.metrics())) for expr in spec.evaluate.gates]
        metrics = result.metrics()
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        with open(staging / "predictions.jsonl", "w", encoding="utf-8") as fh:
            for sample in result.samples:
                fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
        timings["total_s"] = time.perf_counter() - clock
        pairs = staging / "preference" / "pairs.jsonl"  # trained on too, when an update brings preference pairs
        processed = [*processed, pairs] if pairs.is_file() else processed
        lineage = build_lineage(spec, recipe_path, data.sources, processed, base, staging / "adapter", run_id, timings,
                                result.training)
        (staging / "lineage.json").write_text(json.dumps(lineage, indent=2), encoding="utf-8")
        write_model_card(staging)
        write_report(staging / "report.html", spec, metrics, result.samples, train_log)
        shutil.rmtree(staging / "checkpoints", ignore_errors=True)  # they serve a resume only
        staging.rename(run_dir)
    except BaseException:
        # a failed resume keeps the checkpoints it came for; the other processes leave rank 0's folder
        if not resumed and main:
            shutil.rmtree(staging, ignore_errors=True)  # nothing half-written is left behind
            with contextlib.suppress(OSError):  # nor the recipe's folder, when this run made it
                staging.parent.rmdir()
        raise
    if register:
        from domaintune.registry.store import register_run

        try:
            version = register_run(run_dir, registry_url)
            result.registered = f"{version.name}:{version.version}"
        except DomaintuneError as exc:  # the run is complete and kept: say how to register it later
            console.print(f"[yellow]not registered: {exc}\n  register it with `domaintune registry register {run_dir}`[/]")
    return result


def _checked_recipe(recipe_path: Path, overrides: dict[str, Any] | None, gates: list[str] | None) -> Recipe:
    """The recipe with its overrides and extra ``gates``, checked before anything slow runs."""
    spec = load_recipe(recipe_path, overrides)
    for expr in spec.evaluate.gates:  # a typo in a gate should fail now, not after training
        validate_gate(expr, spec.task, where="evaluate.gates")
    for expr in gates or []:
        validate_gate(expr, spec.task)
    if gates:
        spec = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"gates": [*spec.evaluate.gates, *gates]})})
    check_runs_here(spec)
    check_split(spec)
    return spec


def _data_and_base(spec: Recipe, root: Path, console: Console) -> tuple[Recipe, PreparedData, catalog.BaseModel]:
    """The data through its steps, the recipe with its defaults resolved for it, and the base."""
    data = prepare(spec, root, console)
    if spec.evaluate.slices:  # computed after training: a missing column must fail now
        from domaintune.evaluate.slices import check_slice_fields

        check_slice_fields(spec.evaluate.slices, [e.meta for e in data.eval])
    spec = resolve_defaults(spec, len(data.train))
    _check_model_fits_task(spec)  # a catalog name: before resolving it, which converts a GGUF file
    base = catalog.resolve(spec.base_model, base_dir=root)
    _check_folder_fits_task(spec, base.path)
    return spec, data, base


def dry_run(recipe: str | Path, overrides: dict[str, Any] | None = None, gates: list[str] | None = None,
            console: Console | None = None) -> dict[str, Any]:
    """What ``run`` would do, without training or writing anything: the recipe checked and resolved
    (defaults filled in), the data read through its steps, the base model found, the number of
    optimiser steps, and the speed plan on this machine. Raises what ``run`` would raise first."""
    import math

    from domaintune.train.loop import count_steps
    from domaintune.train.speed import cpu_plan, plan_speed

    console = console or Console(stderr=True, quiet=True)
    quiet_libraries()
    recipe_path = Path(recipe).resolve()
    spec, data, base = _data_and_base(_checked_recipe(recipe_path, overrides, gates), recipe_path.parent, console)
    t = spec.training
    too_long = 0
    if spec.task == "classification":
        plan = cpu_plan(t.speed)
        rows = len(data.train)
    else:
        config = base.path / "config.json"
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
        plan = plan_speed(t.speed, model_type, spec.method, checkpointing=t.activation_checkpointing,
                          fsdp=t.distributed == "fsdp" and distributed.world_size() > 1)
        if spec.task == "pretrain":  # rows are blocks of max_seq_length tokens
            from domaintune.train.causal import pack_text

            rows = len(pack_text(catalog.load_tokenizer(base), [e.text for e in data.train], int(t.max_seq_length)))
        else:
            train_rows, too_long = _sft_train_rows(catalog.load_tokenizer(base), data.train, int(t.max_seq_length), console)
            rows = len(train_rows)
    per_epoch, steps = count_steps(math.ceil(rows / int(t.batch_size)), _loop_config(spec, None))
    return {"name": spec.name, "task": spec.task, "method": spec.method, "base_model": spec.base_model,
            "base_path": str(base.path), "train_rows": len(data.train) - too_long, "rows_too_long": too_long,
            "eval_rows": len(data.eval),
            "data": _data_note(data.card), "steps": steps, "steps_per_epoch": per_epoch,
            "speed": plan.describe(), "recipe": spec.model_dump(mode="json")}


def _sft_train_rows(tokenizer, examples: list, max_len: int, console: Console) -> tuple[list, int]:
    """The tokenised training rows that have answer tokens within ``max_len``, and how many do not
    (their answer starts after it: nothing to learn from)."""
    from domaintune.train.causal import ensure_chat_template, tokenize_chat

    ensure_chat_template(tokenizer)
    rows = [tokenize_chat(tokenizer, e, max_len) for e in examples]
    kept = [r for r in rows if any(label != -100 for label in r.labels)]
    if not kept:
        raise DataError("no training row has an answer within training.max_seq_length tokens",
                        hint="raise training.max_seq_length")
    if len(kept) < len(rows):
        console.print(f"[yellow]{len(rows) - len(kept)} training rows dropped: their answer starts after "
                      f"training.max_seq_length={max_len} tokens[/]")
    return kept, len(rows) - len(kept)


def quiet_libraries() -> None:
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\..*")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# Architectures that only encode: their folders cannot generate (sft, pretrain) here.
_ENCODER_TYPES = {"bert", "roberta", "distilbert", "xlm-roberta", "deberta", "deberta-v2", "electra", "mpnet",
                  "albert", "camembert", "modernbert", "nomic_bert"}


def _check_folder_fits_task(spec: Recipe, folder: Path) -> None:
    """A model folder (not a catalog name) must suit the task as a catalog entry would: its
    config.json's model_type says whether it only encodes, its architectures whether it generates;
    a folder neither says is left to loading."""
    if spec.base_model in catalog.CATALOG:
        return
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading the model will say what is wrong with the folder
    architectures, model_type = config.get("architectures") or [], config.get("model_type")
    encoder = model_type in _ENCODER_TYPES
    generates = not encoder and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    described = ", ".join(architectures) or model_type
    if spec.task != "classification" and encoder:
        raise ModelError(f"{spec.base_model} is an encoder ({described}) and cannot generate text for task {spec.task}",
                         where="base_model", hint="give a causal LM folder (its config.json's architectures end in "
                                                  "ForCausalLM) or .gguf file, or set base_model: smollm2-135m-instruct")
    if spec.task == "classification" and generates:
        raise ModelError(f"{spec.base_model} is a generative model ({described}); classification here uses an encoder",
                         where="base_model", hint="give an encoder folder (BERT-like) or set base_model: minilm-l6")


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


def _slices(spec: Recipe, result: RunResult) -> list[dict]:
    """Metrics per value of each ``evaluate.slices`` column, from the per-row results."""
    from domaintune.evaluate.slices import classification_score, mean_scores, slice_metrics

    if spec.task == "classification":
        return [slice_metrics(result.samples, name, classification_score) for name in spec.evaluate.slices]
    if spec.task != "sft":
        return []
    rows = [{"base": {"exact_match": s["base_exact"], "rouge_l": s["base_rouge_l"]},
             "tuned": {"exact_match": s["tuned_exact"], "rouge_l": s["tuned_rouge_l"]}, "meta": s["meta"]}
            for s in result.samples]
    return [slice_metrics(rows, name, mean_scores) for name in spec.evaluate.slices]


def _data_note(card: dict) -> str:
    pii = sum(card["pii"]["found"].values())
    return (f"{card['dropped_total']} rows dropped by the data steps, "
            f"{pii} personal-data items {'redacted' if card['pii']['redact'] else 'left in'}")


def _loop_config(spec: Recipe, run_dir: Path | None) -> LoopConfig:
    """The loop's settings; it logs and checkpoints into ``run_dir`` (and resumes from there)."""
    t = spec.training
    return LoopConfig(epochs=float(t.epochs), learning_rate=float(t.learning_rate), weight_decay=t.weight_decay,
                      warmup_ratio=t.warmup_ratio, max_grad_norm=t.max_grad_norm, seed=t.seed,
                      scheduler=t.scheduler, gradient_accumulation_steps=t.gradient_accumulation_steps,
                      max_steps=t.max_steps, max_minutes=t.max_minutes, eval_every=t.eval_every,
                      early_stopping_patience=t.early_stopping_patience, checkpoint_every=t.checkpoint_every,
                      run_dir=run_dir, report_to=t.report_to, run_name=spec.name)


def _resume_dirs(path: Path, name: str) -> tuple[Path, Path]:
    """(run directory, staging folder) of the unfinished run at ``path``, which may name either."""
    path = path.resolve()
    run_id = path.name[1:-len(".partial")] if path.name.startswith(".") and path.name.endswith(".partial") else path.name
    run_dir, staging = path.parent / run_id, path.parent / f".{run_id}.partial"
    if run_dir.is_dir():
        raise RecipeError(f"run {run_dir} is finished: there is nothing to resume", hint="start a new run without --resume")
    if not staging.is_dir():
        raise RecipeError(f"no unfinished run at {path}",
                          hint=f"pass the run's .partial folder under <output_dir>/{name}/ (or the run directory it was to become)")
    if path.parent.name != name:
        raise RecipeError(f"{staging} is a run of {path.parent.name!r}, not of this recipe ({name!r})",
                          hint="resume with the recipe the run was started with")
    return run_dir, staging


def _limit(items: list, max_rows: int | None) -> list:
    return items[:max_rows] if max_rows else items


def _run_classification(spec: Recipe, base, data: PreparedData, run_dir: Path, console: Console,
                        timings: dict[str, float], init_from: Path | None = None) -> tuple[RunResult, list[dict]]:
    from domaintune.train.classification import (MeanPoolClassifier, embed_texts, fit_probe, init_head_from_probe,
                                                 predict_proba, save_classifier, train_classifier)
    from domaintune.train.speed import accelerated, cpu_plan, placement

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
        base_proba = _softmax(probe.logits(embed_texts(model, tokenizer, eval_texts, max_len)))
    base_pred = [labels[i] for i in base_proba.argmax(1)]
    bias = {}
    if spec.evaluate.bias_probes:  # the base must be probed before training changes the encoder
        groups = load_term_groups(spec.evaluate.bias_terms)
        with console.status("base: counterfactual bias probes"):
            bias["base"] = flip_rate(lambda texts: [labels[i] for i in probe.logits(
                embed_texts(model, tokenizer, texts, max_len)).argmax(1)], eval_texts, groups)
    timings["base_eval_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    init_head_from_probe(model, probe)
    seed_everything(spec.training.seed)  # adapters start from random weights: the seed's, in every process
    if init_from is not None:  # an update continues from that run's encoder and head
        from domaintune.update.warm_start import continue_classifier

        continue_classifier(model, labels, init_from, spec.method)
    else:
        model.encoder = apply_method(model.encoder, spec, task_type=None)
    trainable, total = count_parameters(model)
    console.print(f"training {trainable:,} of {total:,} parameters")
    held_out = evaluation[:spec.training.eval_rows]  # for training.eval_every
    plan = cpu_plan(spec.training.speed)  # classification models are small: they train on the CPU
    training = {"processes": distributed.world_size(), **plan.describe(), "evaluation": placement(model)}
    with accelerated(model, plan):
        log = train_classifier(model, tokenizer, train_texts, train_y.tolist(), loop=_loop_config(spec, run_dir),
                               batch_size=int(spec.training.batch_size), max_length=max_len, console=console,
                               eval_texts=[e.text for e in held_out], eval_labels=[index[e.label] for e in held_out])
    distributed.end_training()  # under torchrun, rank 0 alone goes on to evaluate and write the run
    timings["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    proba = predict_proba(model, tokenizer, eval_texts, max_len)
    compared = compare_classification([e.label for e in evaluation], labels, base_proba, proba)
    base_metrics, tuned_metrics, tuned_pred = compared.base, compared.tuned, compared.tuned_pred
    base_metrics["model"] = f"{spec.base_model} frozen + logistic-regression probe"
    tuned_metrics["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    save_classifier(model, tokenizer, labels, spec.method, run_dir / "adapter")
    timings["tuned_eval_s"] = time.perf_counter() - clock
    if spec.evaluate.bias_probes:
        with console.status("tuned: counterfactual bias probes"):
            bias["tuned"] = flip_rate(lambda texts: [labels[i] for i in predict_proba(
                model, tokenizer, texts, max_len).argmax(1)], eval_texts, groups)
    samples = [{"where": e.where, "text": e.text, "label": e.label, "base": b, "tuned": t,
                "base_confidence": float(bp.max()), "tuned_confidence": float(p.max()), "meta": e.meta}
               for e, b, t, bp, p in zip(evaluation, base_pred, tuned_pred, base_proba, proba)]
    result = RunResult(run_dir, spec.task, len(evaluation), len(data.train), base_metrics, tuned_metrics, samples,
                       training=training)
    result.intervals, result.extra = compared.intervals, compared.extra
    if bias:
        result.extra["bias"] = bias
    if spec.evaluate.explain_rows:
        with console.status("explanations: word occlusion"):
            result.extra["explanations"] = explain_classification(
                lambda texts: predict_proba(model, tokenizer, texts, max_len), eval_texts[:spec.evaluate.explain_rows],
                labels)
    return result, log


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _run_causal(spec: Recipe, base, data: PreparedData, run_dir: Path, console: Console,
                timings: dict[str, float], init_from: Path | None = None,
                preference: PreferencePhase | None = None) -> tuple[RunResult, list[dict]]:
    from domaintune.evaluate.run_eval import score_causal, sft_max_new_tokens
    from domaintune.train.causal import pack_text, save_causal, tokenize_chat, train_causal
    from domaintune.train.speed import accelerated, place, placement, plan_speed

    clock = time.perf_counter()
    tokenizer = catalog.load_tokenizer(base)
    # Under torchrun rank 0 alone evaluates the base (the others would compete with it for the CPU
    # and report nothing). Under FSDP the others also get their shards from rank 0
    # (train.fsdp.shard): they need only the model's shapes. Updates keep the whole model
    # everywhere (their warm start loads weights).
    sharded = spec.training.distributed == "fsdp" and distributed.world_size() > 1
    worker = distributed.world_size() > 1 and not distributed.is_main()
    weightless = sharded and worker and init_from is None and preference is None
    if spec.method == "qlora":
        model = load_quantized_causal_lm(base.path)
    else:
        model = catalog.load_causal_lm(base, weights=not weightless)
    max_len = int(spec.training.max_seq_length)
    evaluation = _limit(data.eval, spec.evaluate.max_rows)
    ev = spec.evaluate
    clean_train, canaries = data.train, None  # the training rows without canaries
    if ev.privacy_audit:  # planted before tokenisation, so that training sees them
        data, canaries = with_canaries(data, spec.task, ev.canary_repeats, spec.training.seed)

    if spec.task == "sft":
        train_rows, too_long = _sft_train_rows(tokenizer, data.train, max_len, console)
        eval_rows = [tokenize_chat(tokenizer, e, max_len) for e in evaluation]
        references = [e.answer for e in evaluation]
        max_new = sft_max_new_tokens(spec, tokenizer, data.train)
    else:
        train_rows = pack_text(tokenizer, [e.text for e in data.train], max_len)
        eval_rows = pack_text(tokenizer, [e.text for e in evaluation], max_len)
        max_new, too_long = 0, 0

    def evaluate(name: str) -> tuple[dict, dict, list[str]]:
        return score_causal(model, tokenizer, spec, evaluation, max_new, console, name)

    plan = plan_speed(spec.training.speed, getattr(model.config, "model_type", None), spec.method,
                      checkpointing=spec.training.activation_checkpointing, fsdp=sharded)
    model = place(model, plan, spec.method)  # base and tuned are evaluated where training runs
    training = {"processes": distributed.world_size(), **plan.describe(), "evaluation": placement(model),
                "rows_too_long": too_long}
    base_metrics, base_scores, base_out = ({}, {}, []) if worker else evaluate("base")
    base_metrics["model"] = f"{spec.base_model} (no fine-tuning)"
    timings["base_eval_s"] = time.perf_counter() - clock
    if distributed.world_size() > 1:  # for as long as rank 0 evaluates the base, past the group's timeout
        distributed.wait_for_main()

    clock = time.perf_counter()
    seed_everything(spec.training.seed)  # adapters start from random weights: the seed's, in every process
    if init_from is not None:  # an update continues from that run's weights
        from domaintune.update.warm_start import continue_causal

        model = place(continue_causal(model, init_from, spec.method), plan, spec.method)  # a saved full model loads on the CPU
    else:
        model = apply_method(model, spec, task_type="CAUSAL_LM", tokenizer_path=str(base.path))
    trainable, total = count_parameters(model)
    console.print(f"training {trainable:,} of {total:,} parameters on {len(train_rows)} sequences ({plan.device})")
    if preference is not None:
        preference.start(model, tokenizer, console)
    with accelerated(model, plan):
        log = train_causal(model, tokenizer, train_rows, loop=_loop_config(spec, run_dir),
                           batch_size=int(spec.training.batch_size), console=console, description="train",
                           eval_rows=eval_rows[:spec.training.eval_rows], packing=spec.training.packing, speed=plan)
        if preference is not None:
            preference.train(model, tokenizer, _loop_config(spec, run_dir / "preference"), console)
    distributed.end_training()  # under torchrun, rank 0 alone goes on to evaluate and write the run
    timings["train_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    tuned_metrics, tuned_scores, tuned_out = evaluate("tuned")
    tuned_metrics["model"] = f"{spec.base_model} fine-tuned ({spec.method})"
    save_causal(model, tokenizer, run_dir / "adapter")
    timings["tuned_eval_s"] = time.perf_counter() - clock

    samples: list[dict] = []
    if spec.task == "sft":
        samples = [{"where": e.where, "prompt": e.prompt_messages[-1]["content"], "reference": r, "base": b,
                    "tuned": t, "base_exact": eb, "tuned_exact": et, "base_rouge_l": rb, "tuned_rouge_l": rt,
                    "meta": e.meta}
                   for e, r, b, t, eb, et, rb, rt in zip(evaluation, references, base_out, tuned_out,
                                                         base_scores["exact_match"], tuned_scores["exact_match"],
                                                         base_scores["rouge_l"], tuned_scores["rouge_l"])]
    # train_rows counts the rows trained on: not those whose answer lay beyond max_seq_length
    result = RunResult(run_dir, spec.task, len(evaluation), len(clean_train) - too_long, base_metrics, tuned_metrics,
                       samples, training=training)
    compared = compare_generation(base_scores, tuned_scores)
    result.intervals, result.extra = compared.intervals, compared.extra
    clock = time.perf_counter()
    result.extra.update(causal_extras(
        spec, model, tokenizer,
        lambda: load_quantized_causal_lm(base.path) if spec.method == "qlora" else place(catalog.load_causal_lm(base), plan, spec.method),
        clean_train, evaluation, canaries, console))
    timings["extras_s"] = time.perf_counter() - clock
    return result, log

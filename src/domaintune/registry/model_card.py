"""model_card.md, in the sections of "Model Cards for Model Reporting" (Mitchell et al., 2019).

Written from the files of a run directory alone (recipe.yaml, metrics.json, lineage.json,
data_card.json, train_log.jsonl), so the run writes it and the registry rewrites it, with the
version's stage and who promoted it, whenever a version is promoted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline
from domaintune.registry.policy import gate_name

INTENDED = {
    "classification": "Assigns one of the training labels to a text from the same domain and distribution as the training data.",
    "sft": "Answers prompts of the kind seen in training, in the format of the training answers.",
    "pretrain": "A base for further fine-tuning on text from the training domain; not an assistant on its own.",
}
TESTS = {"exact": "McNemar's exact test", "chi2": "McNemar's chi-square test", "paired bootstrap": "paired bootstrap"}
METHODS = {
    "lora": "LoRA",
    "dora": "DoRA, weight-decomposed LoRA",
    "qlora": "QLoRA, LoRA on a 4-bit base",
    "ia3": "IA3 (learned rescaling of activations)",
    "prompt_tuning": "prompt tuning (learned virtual tokens)",
    "prefix_tuning": "prefix tuning (learned key/value prefixes)",
    "full": "full fine-tuning (every weight)",
}


def write_model_card(run_dir: Path, registry: dict[str, Any] | None = None) -> Path:
    """Write ``run_dir/model_card.md``; ``registry`` (name, version, stage, and who promoted it,
    when and why) adds the version's place in the registry."""
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    lineage = json.loads((run_dir / "lineage.json").read_text(encoding="utf-8"))
    card_path = run_dir / "data_card.json"
    data = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else None
    sections = [
        f"# {recipe['name']}",
        _details(recipe, metrics, lineage, registry, _train_log(run_dir / "train_log.jsonl")),
        _intended_use(recipe),
        _factors(metrics),
        _metrics(recipe, metrics, lineage),
        _evaluation_data(recipe, metrics, data, run_dir),
        _training_data(lineage, data),
        _quantitative(recipe, metrics),
        _ethics(metrics, data),
        _caveats(),
    ]
    path = run_dir / "model_card.md"
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


def _train_log(path: Path) -> list[dict]:
    """The run's per-step records; none for a run directory written without one."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash says nothing the records before it do not
    return [r for r in records if isinstance(r, dict) and "step" in r]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def _epochs(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _training_done(t: dict, log: list[dict]) -> str:
    """What training did, from its log: the recipe's epochs are a plan that training.max_steps,
    training.max_minutes and early stopping can each cut short."""
    planned = t.get("epochs")
    planned_text = f"{_epochs(planned)} epoch{'s' if planned != 1 else ''}" if planned else "epochs"
    if not log:
        return f"{planned_text} planned (the run has no train_log.jsonl to say how many were completed)"
    last = log[-1]
    steps, done = int(last["step"]), float(last.get("epoch", 0.0))
    max_steps, max_minutes, patience = t.get("max_steps"), t.get("max_minutes"), t.get("early_stopping_patience")
    done_text = f"{_epochs(done)} epoch{'s' if _epochs(done) != '1' else ''}"
    steps_text = f"{steps} optimiser step{'s' if steps != 1 else ''}"
    # train_log.jsonl rounds epochs to 4 decimals
    completed = steps >= max_steps if max_steps else planned is None or done >= planned - 5e-5
    if completed:
        if max_steps and planned and done < planned - 5e-5:
            return (f"{steps_text} ({_epochs(done)} of the {planned_text} planned; "
                    f"stopped by training.max_steps={max_steps})")
        if max_steps and planned and done > planned + 5e-5:
            return f"{steps_text} ({done_text}: training.max_steps={max_steps} replaced the {planned_text} planned)"
        return f"{done_text} ({steps_text})"
    of_plan = (f"{done_text}, of the {max_steps} steps training.max_steps planned" if max_steps
               else f"{_epochs(done)} of the {planned_text} planned")
    stopped = last.get("stopped") or _stop_inferred(last, log, max_minutes, patience)
    if stopped == "max_minutes":
        why = f"stopped by training.max_minutes={max_minutes}"
    elif stopped == "early_stopping":
        why = (f"stopped early: the held-out loss did not improve for {patience} evaluations, and the weights of "
               f"the best evaluation were kept")
    else:
        why = "stopped before its plan for a reason train_log.jsonl does not record"
    return f"{steps_text} ({of_plan}; {why})"


def _stop_inferred(last: dict, log: list[dict], max_minutes: float | None, patience: int | None) -> str | None:
    """Why a run from before train_log.jsonl recorded ``stopped`` stopped short, from its last record."""
    evals = [r["eval_loss"] for r in log if r.get("eval_loss") is not None]
    if max_minutes and float(last.get("elapsed_s", 0.0)) >= 60 * max_minutes:
        return "max_minutes"
    if patience and len(evals) > patience and "eval_loss" in last and min(evals[-patience:]) >= min(evals[:-patience]):
        return "early_stopping"
    return None


def _details(recipe: dict, metrics: dict, lineage: dict, registry: dict | None, log: list[dict]) -> str:
    t, method = recipe["training"], recipe["method"]
    adapter = recipe.get("lora", {}) if method in ("lora", "dora", "qlora") else {}
    settings = f" (r={adapter['r']}, alpha={adapter['alpha']}, dropout={adapter['dropout']})" if adapter else ""
    lines = ["## Model details",
             f"- Task: {recipe['task']}; base model `{recipe['base_model']}`; method: {METHODS[method]}{settings}.",
             f"- Training: {_training_done(t, log)}, learning rate {t['learning_rate']}, batch size {t['batch_size']}, "
             f"max sequence length {t['max_seq_length']}, seed {t['seed']}.",
             f"- Made by domaintune {lineage['domaintune_version']}, run `{lineage['run_id']}`; weights in `adapter/`; "
             f"how it was made, with the sha256 of every input and output, in `lineage.json`.",
             f"- Compared against: {metrics['base'].get('model', recipe['base_model'])}."]
    if registry:
        lines.append(f"- Registry: `{registry['name']}:{registry['version']}`, stage **{registry['stage']}**"
                     + (f", promoted by {registry['actor']} on {registry['time']}" if registry.get("actor") else "")
                     + (f" ({registry['reason']})" if registry.get("reason") else "") + ".")
    return "\n".join(lines)


def _intended_use(recipe: dict) -> str:
    return "\n".join([
        "## Intended use",
        f"- Primary use: {INTENDED[recipe['task']]}",
        "- Primary users: the team whose data it was trained on, for the task in its recipe.",
        "- Out of scope: text unlike the training data (other domains, languages, channels); decisions about "
        "people without a human review; any use the evaluation below does not cover.",
    ])


def _factors(metrics: dict) -> str:
    lines = ["## Factors"]
    for sliced in metrics.get("slices", []):
        worst, gap = sliced["worst"].get("tuned"), sliced["gap"].get("tuned")
        lines.append(f"- `{sliced['field']}`: {len(sliced['slices'])} values"
                     + (f"; weakest `{worst}`, {gap:.3f} {sliced['metric']} below the best" if worst is not None else ""))
    if metrics.get("bias"):
        # a group none of the held-out rows mentions was not probed at all: naming it would claim a check never made
        results = metrics["bias"].get("tuned", {})
        probed = [g for g, r in results.items() if r.get("rows")]
        unprobed = [g for g, r in results.items() if not r.get("rows")]
        if probed:
            lines.append(f"- Counterfactual term swaps probed: {', '.join(probed)} (see Ethical considerations)"
                         + (f"; no held-out row had terms of {_listed(unprobed)} to swap" if unprobed else "") + ".")
        elif unprobed:
            lines.append(f"- Counterfactual term swaps: no held-out row had terms of {_listed(unprobed)} to swap, "
                         "so none were probed.")
    if len(lines) == 1:
        lines.append("- No slices were evaluated: set `evaluate.slices` to the metadata columns (region, channel, "
                     "product, ...) the model must work equally well for.")
    return "\n".join(lines)


def _metrics(recipe: dict, metrics: dict, lineage: dict) -> str:
    names = ", ".join(name for name, _, _ in headline(recipe["task"], metrics["base"], metrics["tuned"]))
    lines = ["## Metrics", f"- {names}, for the base and the tuned model on the same held-out rows, with 95% "
             "intervals (Wilson's for accuracy and exact match, the bootstrap's for ROUGE-L); the change is paired "
             "(the same rows resampled for both)."]
    placed = lineage.get("training", {}).get("evaluation")
    if placed:  # bfloat16 weights on a GPU score a little differently from float32 on a CPU
        lines.append(f"- Both scored with their weights in {placed.replace(' ', ', ')}; `domaintune eval` places them "
                     "the same way on a machine like this one.")
    for name, test in metrics.get("significance", {}).items():
        # a p-value is not the probability that the change is chance: say what it is, as report.html does
        method = TESTS.get(test.get("method", ""), test.get("method", ""))
        lines.append(f"- {name}: p = {test['p_value']:.2g}{f' ({method})' if method else ''}: the chance of a "
                     "difference at least this large if the two models were equally good.")
    if "ece" in metrics["tuned"]:
        lines.append(f"- Calibration (expected calibration error): base {metrics['base']['ece']:.3f}, "
                     f"tuned {metrics['tuned']['ece']:.3f}.")
    for gate in metrics.get("gates", []):
        lines.append(f"- Gate {gate_name(gate)}: {'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate.get('failing', []))}.")
    return "\n".join(lines)


def _held_out(data: dict | None, run_dir: Path) -> int | None:
    if data and "eval" in data.get("kept", {}):
        return int(data["kept"]["eval"])
    path = run_dir / "data" / "eval.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    return None


def _evaluation_data(recipe: dict, metrics: dict, data: dict | None, run_dir: Path) -> str:
    scored, held_out = metrics["eval_rows"], _held_out(data, run_dir)
    if held_out is not None and held_out > scored:  # evaluate.max_rows scores the first rows only
        max_rows = (recipe.get("evaluate") or {}).get("max_rows")
        lines = ["## Evaluation data", f"- {scored} of the {held_out} held-out rows (the first {scored} in "
                 f"`data/eval.jsonl`{f'; evaluate.max_rows={max_rows}' if max_rows else ''})."]
    else:
        lines = ["## Evaluation data", f"- {scored} held-out rows (`data/eval.jsonl`)."]
    if data:
        split = data["split"]
        how = "a separate eval file" if split["by"] == "eval file" else f"a {split['by']} split of the training file"
        leaks = sum(data["dropped"]["leakage"].values())
        lines.append(f"- Held out by {how}; {leaks} eval rows that duplicated or overlapped training rows were removed (leakage).")
    return "\n".join(lines)


def _training_data(lineage: dict, data: dict | None) -> str:
    lines = ["## Training data"]
    lines += [f"- `{Path(d['file']).name}` (sha256 `{d['sha256'][:16]}…`)" for d in lineage["data"]]
    if data:
        dropped = data["dropped"]
        too_long = lineage.get("training", {}).get("rows_too_long", 0)
        lines.append(f"- Of {data['rows_in']} rows read, {data['kept']['train'] - too_long} trained on: "
                     f"{sum(dropped['validate'].values())} invalid, {sum(dropped['dedup'].values())} duplicates, "
                     f"{sum(dropped['clean'].values())} empty after cleaning were dropped"
                     + (f", and {too_long} whose answer starts after training.max_seq_length tokens"
                        if too_long else "") + ". See `data_card.md`.")
        pii = data["pii"]
        found = ", ".join(f"{n} {t}" for t, n in pii["found"].items()) or "none found"
        lines.append(f"- Personal data: {'redacted (' + pii['mode'] + '): ' + found if pii['redact'] else 'not redacted'}.")
    return "\n".join(lines)


def _quantitative(recipe: dict, metrics: dict) -> str:
    intervals = metrics.get("intervals", {})

    def ci(name: str, which: str) -> str:
        lo_hi = intervals.get(name, {}).get(which)
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""

    lines = ["## Quantitative analyses", "", "| metric | base | tuned | change |", "|---|---|---|---|"]
    lines += [f"| {name} | {b:.4f}{ci(name, 'base')} | {t:.4f}{ci(name, 'tuned')} | {t - b:+.4f}{ci(name, 'difference')}"
              f"{' (lower is better)' if name in LOWER_IS_BETTER else ''} |"
              for name, b, t in headline(recipe["task"], metrics["base"], metrics["tuned"])]
    for sliced in metrics.get("slices", []):
        metric = sliced["metric"]
        lines += ["", f"By `{sliced['field']}` ({metric}):", "", "| value | rows | base | tuned |", "|---|---|---|---|"]
        lines += [f"| {value} | {s['rows']} | {s['base'][metric]:.3f} | {s['tuned'][metric]:.3f} |"
                  for value, s in sliced["slices"].items()]
    return "\n".join(lines)


def _ethics(metrics: dict, data: dict | None) -> str:
    lines = ["## Ethical considerations"]
    if data and data["pii"]["redact"]:
        lines.append("- Personal data was redacted automatically before training and evaluation; the redaction is "
                     "rule-based and misses some names. Review `data_card.md` before sharing the model or its data.")
    else:
        lines.append("- No personal-data redaction was applied: do not train on data you may not process.")
    for group, result in metrics.get("bias", {}).get("tuned", {}).items():
        base = metrics["bias"].get("base", {}).get(group, {})
        if result.get("rate") is not None:
            lines.append(f"- Swapping {group} terms changed {result['rate']:.1%} of {result['rows']} predictions "
                         f"(base: {base.get('rate', 0) or 0:.1%}).")
    lines.append("- The model can reproduce biases and errors in its training data; a human should review outputs "
                 "that affect people.")
    return "\n".join(lines)


def _caveats() -> str:
    return "\n".join([
        "## Caveats and recommendations",
        "- Results hold for data like the held-out rows; with few rows the intervals are wide: read them, not only "
        "the point estimates.",
        "- Re-evaluate on fresh data as the domain changes (`domaintune eval`), and update with a regression gate "
        "(`domaintune update`).",
    ])

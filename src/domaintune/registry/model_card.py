"""The model card written into every run directory."""

from __future__ import annotations

from pathlib import Path

from domaintune.evaluate.metrics import LOWER_IS_BETTER, headline
from domaintune.recipe import Recipe

INTENDED = {
    "classification": "Assigns one of the training labels to a text from the same domain and distribution as the training data.",
    "sft": "Answers prompts of the kind seen in training, in the format of the training answers.",
    "pretrain": "A base for further fine-tuning on text from the training domain; not an assistant on its own.",
}


def write_model_card(path: Path, spec: Recipe, metrics: dict, lineage: dict, data_card: dict) -> None:
    rows = headline(spec.task, metrics["base"], metrics["tuned"])
    intervals = metrics.get("intervals", {})

    def ci(name: str, which: str) -> str:
        lo_hi = intervals.get(name, {}).get(which)
        return f" [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else ""

    table = "\n".join(
        f"| {name} | {b:.4f}{ci(name, 'base')} | {t:.4f}{ci(name, 'tuned')} | {t - b:+.4f}{ci(name, 'difference')}"
        f"{' (lower is better)' if name in LOWER_IS_BETTER else ''} |"
        for name, b, t in rows
    )
    data_lines = "\n".join(f"- `{Path(d['file']).name}` (sha256 `{d['sha256'][:16]}…`)" for d in lineage["data"])
    t = spec.training
    method = _method(spec)
    base_desc = metrics["base"].get("model", spec.base_model)
    text = f"""# {spec.name}

## Model details
- Task: {spec.task}
- Base model: `{spec.base_model}`
- Method: {method}
- Training: {t.epochs} epochs, learning rate {t.learning_rate}, batch size {t.batch_size}, max sequence length {t.max_seq_length}, seed {t.seed}
- Made by domaintune {lineage['domaintune_version']} (run `{lineage['run_id']}`); the weights are in `adapter/`.

## Intended use
{INTENDED[spec.task]} It has not been evaluated outside the held-out rows below.

## Training data
{data_lines}
- {metrics['train_rows']} training rows; {metrics['eval_rows']} held-out rows for evaluation.
- {_data_steps(data_card)} See `data_card.md`.

## Results against the base
Base: {base_desc}. Both evaluated on the same {metrics['eval_rows']} held-out rows; brackets are 95%
bootstrap intervals (the change: paired, same rows resampled for both).

| metric | base | tuned | change |
|---|---|---|---|
{table}

## Limitations
- Results hold for data like the held-out rows; on a small evaluation set the intervals are wide: read them, not only the point estimates.
- The model may reproduce biases and errors in the training data; check its outputs before relying on them in decisions about people.
- {_pii_limit(data_card)}
"""
    path.write_text(text, encoding="utf-8")


def _data_steps(card: dict) -> str:
    dropped = card["dropped"]
    dups = dropped["dedup"]["train"] + dropped["dedup"]["eval"]
    return (f"Of {card['rows_in']} rows read, {sum(dropped['validate'].values())} were invalid, {dups} duplicates, "
            f"{sum(dropped['leakage'].values())} eval rows leaked from training (all removed).")


def _pii_limit(card: dict) -> str:
    pii = card["pii"]
    if not pii["redact"]:
        return "No personal-data redaction was applied to the training data in this run: do not train on data you may not process."
    found = ", ".join(f"{n} {t}" for t, n in pii["found"].items()) or "none found"
    return (f"Personal data was redacted ({pii['mode']}) before training: {found}. Redaction is automatic and "
            "imperfect (person names especially); review the data card before sharing the model.")


def _method(spec: Recipe) -> str:
    lora = f"r={spec.lora.r}, alpha={spec.lora.alpha}, dropout={spec.lora.dropout}"
    return {
        "lora": f"LoRA ({lora})",
        "dora": f"DoRA, weight-decomposed LoRA ({lora})",
        "qlora": f"QLoRA, LoRA on a 4-bit base ({lora})",
        "ia3": "IA3 (learned rescaling of activations)",
        "prompt_tuning": "prompt tuning (learned virtual tokens)",
        "prefix_tuning": "prefix tuning (learned key/value prefixes)",
        "full": "full fine-tuning (every weight)",
    }[spec.method]

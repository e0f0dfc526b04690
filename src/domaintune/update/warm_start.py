"""Continue training from an earlier run's weights instead of a fresh adapter.

An update must start where production is, not from the base: the PEFT adapter is loaded
trainable (or, for ``method: full``, the whole saved model), and a classifier keeps its trained
head rows for the labels it already knows. Labels new to this run keep the rows the caller
initialised (the probe's), so a new label starts from the best no-training guess.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from domaintune.errors import RecipeError


def adapter_dir(run_dir: Path) -> Path:
    """The weights folder of a run directory; refuses a folder that holds none."""
    folder = Path(run_dir) / "adapter"
    if not folder.is_dir() or not any(folder.iterdir()):
        raise RecipeError(f"{run_dir} has no trained weights in adapter/ to start from",
                          hint="start from a finished run directory (the registry's production version)")
    return folder


def _check_method(folder: Path, method: str, saved_method: str) -> None:
    if (saved_method == "full") != (method == "full"):
        raise RecipeError(f"the weights in {folder} were trained with method {saved_method}, this run uses {method}",
                          hint=f"keep method: {saved_method} when continuing from that run")


def continue_classifier(model, labels: list[str], run_dir: Path, method: str) -> None:
    """Put the trained encoder of ``run_dir`` into ``model`` (a ``MeanPoolClassifier``, its head
    already initialised for ``labels``), trainable, and copy the head rows of the labels it knew."""
    folder = adapter_dir(run_dir)
    meta = json.loads((folder / "classifier.json").read_text(encoding="utf-8"))
    _check_method(folder, method, meta["method"])
    if meta["method"] == "full":
        from transformers import AutoModel

        model.encoder = AutoModel.from_pretrained(folder, dtype=torch.float32)
    else:
        from peft import PeftModel

        model.encoder = PeftModel.from_pretrained(model.encoder, folder, is_trainable=True)
    head = load_file(folder / "head.safetensors")
    known = {label: i for i, label in enumerate(meta["labels"])}
    with torch.no_grad():
        for row, label in enumerate(labels):
            if label in known:
                model.head.weight[row] = head["weight"][known[label]]
                model.head.bias[row] = head["bias"][known[label]]


def continue_causal(model, run_dir: Path, method: str):
    """The causal LM of ``run_dir``, trainable: its adapter on ``model`` (the base), or the saved
    full model."""
    folder = adapter_dir(run_dir)
    config = folder / "adapter_config.json"
    saved = json.loads(config.read_text(encoding="utf-8"))["peft_type"].lower() if config.is_file() else "full"
    _check_method(folder, method, saved)
    if not config.is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder, is_trainable=True)

"""Export a finished run's model for use without domaintune: the base with the adapter merged
in, as safetensors with the tokenizer (and its chat template), loadable by plain transformers;
or, for Llama-family causal LMs, as one GGUF file for llama.cpp and Ollama (``export_gguf``)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from domaintune import catalog
from domaintune.errors import DomaintuneError, ModelError
from domaintune.recipe import load_recipe

# Virtual tokens are inputs the model reads, not weight updates: there is nothing to merge.
UNMERGEABLE = ("prompt_tuning", "prefix_tuning")


def _base_model(run_dir: Path, name: str) -> catalog.BaseModel:
    """The base the run was trained on: the folder recorded in its lineage, else the catalog."""
    lineage = run_dir / "lineage.json"
    if lineage.is_file():
        path = Path(json.loads(lineage.read_text(encoding="utf-8"))["base_model"]["path"])
        if (path / "config.json").is_file():
            return catalog.BaseModel(name=name, path=path, weight_files=[])
    return catalog.resolve(name)


def export_merged(run_dir: Path, out: Path) -> Path:
    """Write ``run_dir``'s model to ``out`` with its adapter merged into the base.

    Causal LMs become a plain ``AutoModelForCausalLM`` folder. Classifiers become the merged
    encoder (an ``AutoModel`` folder) plus ``head.safetensors`` and ``classifier.json``: the
    layout of a ``full`` run's adapter, which ``load_classifier`` reads. ``out`` appears only
    when complete.
    """
    run_dir, out = Path(run_dir), Path(out)
    adapter = run_dir / "adapter"
    if not (run_dir / "recipe.yaml").is_file() or not adapter.is_dir():
        raise DomaintuneError(f"{run_dir} is not a finished run directory (no recipe.yaml or adapter/)",
                              hint="pass the directory `domaintune run` printed at its end")
    if out.exists() and any(out.iterdir()):
        raise DomaintuneError(f"{out} exists and is not empty", hint="choose a new folder for --merged")
    spec = load_recipe(run_dir / "recipe.yaml")
    if spec.method in UNMERGEABLE:
        raise ModelError(f"a {spec.method} run cannot be merged: its virtual tokens are inputs, not base weights",
                         hint="serve the adapter on its base instead, or train with method: lora")
    base = _base_model(run_dir, spec.base_model)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if spec.task == "classification":
            _export_classifier(adapter, base, staging, spec.method)
        else:
            _export_causal(adapter, base, staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_gguf(run_dir: Path, out: Path, dtype: str = "f16") -> Path:
    """Write ``run_dir``'s causal LM, adapter merged in, to the GGUF file ``out`` (see
    ``export_gguf.write_gguf`` for ``dtype``). The file appears only when complete."""
    from domaintune.train.export_gguf import write_gguf

    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise DomaintuneError(f"{out} exists", hint="choose a new file name for --gguf")
    if (run_dir / "recipe.yaml").is_file() and load_recipe(run_dir / "recipe.yaml").task == "classification":
        raise ModelError("GGUF files hold language models for llama.cpp; this run is a classifier",
                         hint="export it with --merged")
    partial = out.with_name(f".{out.name}.partial")
    with tempfile.TemporaryDirectory(prefix="domaintune-gguf-") as scratch:
        merged = export_merged(run_dir, Path(scratch) / "merged")
        try:
            write_gguf(merged, partial, dtype)
            partial.rename(out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def _merged(model):
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _export_causal(adapter: Path, base: catalog.BaseModel, out: Path) -> None:
    from transformers import AutoTokenizer

    from domaintune.train.causal import load_causal

    model = _merged(load_causal(adapter, lambda: catalog.load_causal_lm(base)))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)  # with the chat template trained on


def _export_classifier(adapter: Path, base: catalog.BaseModel, out: Path, method: str) -> None:
    from transformers import AutoTokenizer

    from domaintune.train.classification import load_classifier

    model, labels = load_classifier(adapter, lambda: catalog.load_encoder(base))
    _merged(model.encoder).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    shutil.copy2(adapter / "head.safetensors", out / "head.safetensors")
    meta = json.loads((adapter / "classifier.json").read_text(encoding="utf-8"))
    (out / "classifier.json").write_text(json.dumps({**meta, "method": "full", "merged_from": method}, indent=2),
                                         encoding="utf-8")

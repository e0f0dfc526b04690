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

    Causal LMs become a plain ``AutoModelForCausalLM`` folder, whose chat template puts an sft
    recipe's ``data.system_prompt`` first in conversations without a system message.
    Classifiers become the merged encoder (an ``AutoModel`` folder) plus ``head.safetensors`` and
    ``classifier.json``: the layout of a ``full`` run's adapter, which ``load_classifier`` reads.
    ``out`` appears only when complete.
    """
    run_dir, out = Path(run_dir), Path(out)
    adapter = run_dir / "adapter"
    if not (run_dir / "recipe.yaml").is_file() or not adapter.is_dir():
        raise DomaintuneError(f"{run_dir} is not a finished run directory (no recipe.yaml or adapter/)",
                              hint="pass the directory `domaintune run` printed at its end")
    check_merged_target(out)
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
            _export_causal(adapter, base, staging, spec.data.system_prompt if spec.task == "sft" else None)
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_merged_target(out: Path) -> None:
    """Raise unless ``out`` can become the merged model's folder: new, or an empty folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DomaintuneError(f"{out} is a file, not a folder", hint="give --merged a new (or empty) folder")
    if out.exists() and any(out.iterdir()):
        raise DomaintuneError(f"{out} exists and is not empty", hint="choose a new folder for --merged")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise DomaintuneError(f"{blocker} is a file, so the folder {out} cannot be made in it",
                              hint="give --merged a folder path whose parents are folders")


def check_gguf_target(out: Path, dtype: str = "f16") -> None:
    """Raise unless ``out`` can be written as a new GGUF file of type ``dtype``: checked before
    the merge, which takes a while, rather than after it."""
    from domaintune.train.export_gguf import TYPES

    out = Path(out)
    if dtype not in TYPES:
        raise ModelError(f"unknown GGUF type {dtype!r}", hint=f"use one of {', '.join(TYPES)} for --gguf-type")
    if out.exists():
        raise DomaintuneError(f"{out} exists", hint="choose a new file name for --gguf")
    if not out.parent.exists():
        raise DomaintuneError(f"the folder {out.parent} does not exist",
                              hint=f"create it first (mkdir -p {out.parent}) or give --gguf a file in a folder "
                                   "that exists")
    if not out.parent.is_dir():
        raise DomaintuneError(f"{out.parent} is a file, not a folder", hint="give --gguf a file in an existing folder")


def export_gguf(run_dir: Path, out: Path, dtype: str = "f16") -> Path:
    """Write ``run_dir``'s causal LM, adapter merged in, to the GGUF file ``out`` (see
    ``export_gguf.write_gguf`` for ``dtype``). The file appears only when complete."""
    from domaintune.train.export_gguf import write_gguf

    run_dir, out = Path(run_dir), Path(out)
    check_gguf_target(out, dtype)
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


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """``template`` with ``system_prompt`` as the system message of a conversation that has none.

    The prompt goes in as a Jinja string literal: JSON's escapes (quotes, backslashes, newlines)
    are ones Jinja's string literals read back, and inside a literal ``{{``/``%}`` are plain text.
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def _export_causal(adapter: Path, base: catalog.BaseModel, out: Path, system_prompt: str | None = None) -> None:
    from transformers import AutoTokenizer

    from domaintune.train.causal import load_causal

    model = _merged(load_causal(adapter, lambda: catalog.load_causal_lm(base)))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter)  # with the chat template trained on
    if system_prompt and tokenizer.chat_template:
        # Every training row had the recipe's system prompt; without it a plain-transformers user
        # who sends only a user message gets the base template's own default system message
        # (SmolLM's "You are a helpful AI assistant...") and answers the model never learnt.
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates: each gets the default
            tokenizer.chat_template = {k: with_default_system_prompt(v, system_prompt) for k, v in template.items()}
        else:
            tokenizer.chat_template = with_default_system_prompt(template, system_prompt)
    tokenizer.save_pretrained(out)


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

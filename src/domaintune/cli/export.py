"""`domaintune export`: a finished run's model as plain Hugging Face weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from domaintune.cli.common import fail, out
from domaintune.errors import DomaintuneError


def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    merged: Annotated[Path | None, typer.Option("--merged", help="Folder to write the merged model to.")] = None,
    gguf: Annotated[Path | None, typer.Option("--gguf", help="GGUF file to write (Llama-family causal LMs), "
                                                              "for llama.cpp and Ollama.")] = None,
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="f16 (default), f32, or q8_0 (8-bit).")] = "f16",
) -> None:
    """Write the run's base model with its adapter merged in (safetensors or GGUF).

    With --merged as safetensors, tokenizer and chat template, loadable by plain transformers
    (AutoModelForCausalLM; for classifiers the encoder as AutoModel, plus head.safetensors and
    classifier.json); with --gguf as one GGUF file with the tokenizer and chat template. When the
    recipe has data.system_prompt, the chat template puts it first in conversations that have no
    system message, as every training row had it.
    """
    from domaintune.pipeline import quiet_libraries
    from domaintune.train.export import check_gguf_target, check_merged_target, export_gguf, export_merged

    if merged is None and gguf is None:
        fail(DomaintuneError("nothing to write", hint="pass --merged FOLDER and/or --gguf FILE.gguf"))
    quiet_libraries()
    try:
        # both targets checked before either export starts: a bad --gguf should not cost a merge first
        if merged is not None:
            check_merged_target(merged)
        if gguf is not None:
            check_gguf_target(gguf, gguf_type)
        if merged is not None:
            out.print(str(export_merged(run_dir, merged)))
        if gguf is not None:
            out.print(str(export_gguf(run_dir, gguf, gguf_type)))
    except DomaintuneError as exc:
        fail(exc)

"""`domaintune export`: a finished run's model as plain Hugging Face weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from domaintune.cli.common import fail, out
from domaintune.errors import DomaintuneError


def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    merged: Annotated[Path, typer.Option("--merged", help="Folder to write the merged model to.")],
) -> None:
    """Write the run's base model with its adapter merged in: safetensors, tokenizer and chat
    template, loadable by plain transformers (AutoModelForCausalLM; for classifiers the encoder
    as AutoModel, plus head.safetensors and classifier.json)."""
    from domaintune.pipeline import quiet_libraries
    from domaintune.train.export import export_merged

    quiet_libraries()
    try:
        path = export_merged(run_dir, merged)
    except DomaintuneError as exc:
        fail(exc)
    out.print(str(path))

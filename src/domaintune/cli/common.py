"""What every command group shares: the two consoles and how a user's error is printed."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from domaintune.errors import DomaintuneError

out = Console()
err = Console(stderr=True)


def fail(exc: DomaintuneError, code: int = 2) -> None:
    """Print a user's error in a line or two (no traceback) and exit with ``code``."""
    # Messages quote the user's data (labels like "[refund]", roles like "[/INST]"): not markup.
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

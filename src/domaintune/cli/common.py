"""What every command group shares: the two consoles and how a user's error is printed."""

from __future__ import annotations

import typer
from rich.console import Console

from domaintune.errors import DomaintuneError

out = Console()
err = Console(stderr=True)


def fail(exc: DomaintuneError, code: int = 2) -> None:
    """Print a user's error in a line or two (no traceback) and exit with ``code``."""
    err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)

"""The ``domaintune`` command: one module per command group, each thin (parse, call the API, print)."""

from domaintune.cli.main import app

__all__ = ["app"]

"""The README stays true: its recipe example validates, and every `domaintune ...` command line in
it names commands and options that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from domaintune.cli import app
from domaintune.recipe import Recipe

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _command_lines() -> list[str]:
    return [line.strip() for block in _blocks("bash") for line in block.splitlines()
            if line.strip().startswith("domaintune ")]


def test_the_recipe_example_is_a_valid_recipe():
    recipes = [yaml.safe_load(block) for block in _blocks("yaml")]
    recipes = [r for r in recipes if isinstance(r, dict) and "task" in r]
    assert recipes
    for raw in recipes:
        Recipe.model_validate(raw)


@pytest.mark.parametrize("line", _command_lines())
def test_every_command_line_names_existing_commands_and_options(line):
    words = shlex.split(line, comments=True)[1:]
    root = command = typer.main.get_command(app)
    while hasattr(command, "commands") and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    used = [w.split("=")[0] for w in words if w.startswith("-")]
    assert all(u in known for u in used), f"{line}: unknown {[u for u in used if u not in known]}; known {sorted(known)}"
    assert command is not root or words == ["--version"], f"{line}: names no command"

"""Errors a user can cause. The CLI prints them in a line or two and exits with code 2."""

from __future__ import annotations


class DomaintuneError(Exception):
    """A problem with the user's input, with where it is and how to fix it.

    ``where`` is a location such as ``data/train.csv:17`` or ``recipe.yaml``;
    ``hint`` tells the user what to change.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class RecipeError(DomaintuneError):
    """The recipe file or an override is invalid."""


class DataError(DomaintuneError):
    """A data file cannot be read or a row does not have the expected shape."""


class ModelError(DomaintuneError):
    """A base model cannot be found or loaded."""


class ResourceError(DomaintuneError):
    """This machine cannot do what the recipe asks (e.g. it runs out of GPU memory); the hint
    names the settings to lower."""

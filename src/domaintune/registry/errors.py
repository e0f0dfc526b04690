"""What can go wrong in the registry that a user can fix."""

from __future__ import annotations

from domaintune.errors import DomaintuneError


class RegistryError(DomaintuneError):
    """An unknown model or version, a bad stage, a run directory that cannot be registered."""


class PromotionRefused(RegistryError):
    """The promotion policy refused a stage change; ``reasons`` says why, one line each."""

    def __init__(self, target: str, to: str, reasons: list[str], first: str | None = None):
        self.reasons = reasons
        force = "--force --reason '<justification>' (written to the audit log)"
        super().__init__(
            f"promotion of {target} to {to} refused: " + "; ".join(reasons),
            # ``first``: the command that clears the refusal the usual way, where there is one
            hint=f"`{first}` first; or, if it must go ahead anyway: {force}" if first else
            f"if it must go ahead anyway: {force}",
        )

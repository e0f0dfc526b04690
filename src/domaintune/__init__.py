"""domaintune: turn a general foundation model into a domain specialist.

    from domaintune import run
    result = run("recipe.yaml", overrides={"training.epochs": 1})
    print(result.run_dir, result.base, result.tuned)
"""

import os

# Offline by default: nothing in a run may reach a model hub unless the user asks for it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

from domaintune.errors import DataError, DomaintuneError, ModelError, RecipeError  # noqa: E402


def run(recipe, overrides=None, output_dir=None, console=None, gates=None, register=True, registry_url=None,
        resume=None):
    """Run a recipe end to end; see ``domaintune.pipeline.run``."""
    from domaintune.pipeline import run as _run

    return _run(recipe, overrides=overrides, output_dir=output_dir, console=console, gates=gates,
                register=register, registry_url=registry_url, resume=resume)


__all__ = ["run", "DomaintuneError", "DataError", "ModelError", "RecipeError", "__version__"]

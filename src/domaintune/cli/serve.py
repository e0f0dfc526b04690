"""``domaintune serve``: the OpenAI-compatible server over run directories or the registry."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from domaintune.cli.common import err, fail
from domaintune.errors import DomaintuneError

ENGINES = ("transformers", "vllm")
SHUTDOWN_TIMEOUT_S = 5  # without a limit, SIGTERM waits for every running generation, however long


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="NAME=RUN_DIR: serve a run directory as NAME (repeatable). Its base is served too, under its catalog or folder name.")] = None,
    registry_stage: Annotated[Optional[str], typer.Option(help="Serve every registered model's version in this stage (e.g. production), following promotions while running.")] = None,
    registry_url: Annotated[Optional[str], typer.Option(help="Registry database URL (default: $DOMAINTUNE_REGISTRY_URL, else the local one).")] = None,
    poll_seconds: Annotated[float, typer.Option(help="How often to check the registry for promotions (SIGHUP checks at once).")] = 30.0,
    api_keys: Annotated[Optional[Path], typer.Option(help="Keys file (YAML/JSON: hashed keys, allowed models, rate limits). Without it anyone who can connect may call any model.")] = None,
    engine: Annotated[str, typer.Option(help="transformers (on --device) or vllm (GPU, with vLLM installed; not available yet).")] = "transformers",
    device: Annotated[str, typer.Option(help="Where the transformers engine runs causal LMs: auto (a CUDA GPU when one is visible, in bfloat16; else the CPU in float32), cpu or cuda. Classifiers run on the CPU.")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Most requests generated together in one batch.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 5.0,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 1_000_000,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt accepted, in tokens.")] = 4096,
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for (and the chat default).")] = 512,
    redact_pii: Annotated[bool, typer.Option(help="Redact personal data in prompts before the model sees them, and in answers.")] = False,
    log_bodies: Annotated[bool, typer.Option(help="Log prompts and answers (off by default: they may hold personal data).")] = False,
    feedback_db: Annotated[Optional[Path], typer.Option(help="SQLite file for feedback (default: $DOMAINTUNE_HOME/feedback.db).")] = None,
    shutdown_timeout: Annotated[int, typer.Option(min=0, help="Seconds a stopping server (SIGTERM, Ctrl-C) lets running requests finish before it cancels them.")] = SHUTDOWN_TIMEOUT_S,
) -> None:
    """Serve fine-tuned models over an OpenAI-compatible HTTP API.

    Endpoints: POST /v1/chat/completions, /v1/completions, /v1/classify, /v1/feedback;
    GET /v1/models, /health, /metrics. Point any OpenAI client at http://HOST:PORT/v1.
    """
    try:
        check_engine(engine)
        from domaintune.serve.pool import serving_device

        serving_device(device)  # before any model is read
        models = dict(parse_model(item) for item in (model or []))
        if not models and not registry_stage:
            raise DomaintuneError("nothing to serve", hint="add --model NAME=RUN_DIR or --registry-stage production")
        import uvicorn

        from domaintune.pipeline import quiet_libraries
        from domaintune.serve.app import ServeConfig, create_app

        quiet_libraries()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        with err.status("loading models"):
            app = create_app(ServeConfig(
                models=models, registry_url=registry_url, registry_stage=registry_stage, poll_seconds=poll_seconds,
                api_keys=api_keys, max_batch=max_batch, max_wait_ms=max_wait_ms, max_request_bytes=max_request_bytes,
                max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, redact_pii=redact_pii,
                log_bodies=log_bodies, feedback_db=feedback_db, device=device))
    except DomaintuneError as exc:
        fail(exc)
    err.print(f"serving on http://{host}:{port}/v1", highlight=False)
    # past the timeout uvicorn cancels the requests still running; their generation stops at the next step
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)


def parse_model(item: str) -> tuple[str, Path]:
    """``NAME=RUN_DIR`` → (name, path)."""
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise DomaintuneError(f"--model {item!r} is not NAME=RUN_DIR", hint="e.g. --model support=runs/support/20250101-120000-ab12")
    return name, Path(path)


def check_engine(engine: str) -> None:
    """Raise a ``DomaintuneError`` unless ``engine`` can run here."""
    if engine not in ENGINES:
        raise DomaintuneError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")
    if engine == "transformers":
        return
    import torch

    missing = [what for what, ok in (("vLLM is not installed", importlib.util.find_spec("vllm") is not None),
                                     ("no CUDA GPU is visible", torch.cuda.is_available())) if not ok]
    if missing:
        raise DomaintuneError(f"--engine vllm cannot run here: {' and '.join(missing)}",
                              hint="use --engine transformers, or run on a machine with a CUDA GPU and `pip install vllm`")
    raise DomaintuneError("--engine vllm is not available in this version of domaintune",
                          hint="use --engine transformers (it serves the same API)")

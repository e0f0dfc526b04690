"""``domaintune serve``: the OpenAI-compatible server over run directories or the registry."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from domaintune.cli.common import err, fail
from domaintune.errors import DomaintuneError

if TYPE_CHECKING:
    from fastapi import FastAPI

ENGINES = ("transformers", "vllm")
SHUTDOWN_TIMEOUT_S = 5  # without a limit, SIGTERM waits for every running generation, however long


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="NAME=RUN_DIR: serve a run directory as NAME (repeatable). A LoRA run of a causal LM (sft, pretrain) also serves its base, under its catalog or folder name.")] = None,
    registry_stage: Annotated[Optional[str], typer.Option(help="Serve every registered model's version in this stage (e.g. production), following promotions while running.")] = None,
    registry_url: Annotated[Optional[str], typer.Option(help="Registry database URL (default: $DOMAINTUNE_REGISTRY_URL, else the local one).")] = None,
    poll_seconds: Annotated[float, typer.Option(help="How often to check the registry for promotions (SIGHUP checks at once).")] = 30.0,
    api_keys: Annotated[Optional[Path], typer.Option(help="Keys file (YAML/JSON: hashed keys, allowed models, rate limits). Without it anyone who can connect may call any model.")] = None,
    engine: Annotated[str, typer.Option(help="transformers (on --device). vllm is not implemented in this version.")] = "transformers",
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
    GET /v1/models, /v1/models/{id}, /health, /metrics. Point any OpenAI client at http://HOST:PORT/v1.
    """
    try:
        check_engine(engine)
        from domaintune.serve.pool import serving_device

        serving_device(device)  # before any model is read
        models = dict(parse_model(item) for item in (model or []))
        if not models and not registry_stage:
            raise DomaintuneError("nothing to serve", hint="add --model NAME=RUN_DIR or --registry-stage production")
        listener = bind(host, port)  # before the models load: a port in use fails at once, not minutes later
    except DomaintuneError as exc:
        fail(exc)
    with listener:
        try:
            from domaintune.pipeline import quiet_libraries
            from domaintune.serve.app import ServeConfig, create_app

            quiet_libraries()
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            logging.getLogger("alembic").setLevel(logging.WARNING)  # the registry's migrations, each time it is opened
            with err.status("loading models"):
                app = create_app(ServeConfig(
                    models=models, registry_url=registry_url, registry_stage=registry_stage, poll_seconds=poll_seconds,
                    api_keys=api_keys, max_batch=max_batch, max_wait_ms=max_wait_ms,
                    max_request_bytes=max_request_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                    redact_pii=redact_pii, log_bodies=log_bodies, feedback_db=feedback_db, device=device),
                    # at once with run directories only; with --registry-stage, after its first poll
                    on_ready=lambda: err.print(f"serving on http://{host}:{port}/v1", highlight=False))
        except DomaintuneError as exc:
            fail(exc)
        run_server(app, listener, shutdown_timeout)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to listen on, made as uvicorn makes its own."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free to reuse
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise DomaintuneError(f"port {port} on {host} is in use: pick another with --port") from None
        raise DomaintuneError(f"cannot listen on {host}:{port}: {exc.strerror}",
                              hint="check --host and --port") from None
    return sock


def run_server(app: FastAPI, listener: socket.socket, shutdown_timeout: int) -> None:
    """Serve ``app`` on ``listener`` until stopped (SIGTERM, Ctrl-C)."""
    import uvicorn

    host, port = listener.getsockname()[:2]
    # past the timeout uvicorn cancels the requests still running; their generation stops at the next step
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=shutdown_timeout))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[listener])
    if not server.started:  # uvicorn logged why; its own exit code, 3, means a failed gate in this CLI
        raise typer.Exit(1)


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
    if engine == "vllm":  # an option already, so that asking for it says why it cannot be had
        raise DomaintuneError("--engine vllm: serving with vLLM is not implemented in this version of domaintune",
                              hint="use --engine transformers (the same API, on a CUDA GPU when one is visible)")

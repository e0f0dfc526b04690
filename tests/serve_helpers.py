"""Helpers shared by the server tests: a real ``domaintune serve`` process on localhost, the
official openai client pointed at it, and the answers an adapter gives loaded alone."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

STARTUP_TIMEOUT_S = 120  # loading torch and the models in a fresh process, on a busy machine


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(args: list[str], folder: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``domaintune serve ARGS`` on a free port until the block ends; yields its base URL and
    the process once /health answers. Its log goes to ``folder/server.log``, and its tail into the
    failure when the server exits early or never answers."""
    port = free_port()
    launcher = "import typer; from domaintune.cli.serve import serve; typer.run(serve)"
    log_path = folder / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-c", launcher, "--port", str(port), *args],
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _healthy(url):
                if process.poll() is not None:
                    pytest.fail(f"server exited: {log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"server did not answer /health: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield url, process
        finally:
            process.terminate()
            process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def openai_client(url: str, key: str | None = None):
    """The official openai client for the server at ``url`` (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0)


def reference_answers(run_dir: Path, questions: list[str]) -> list[str]:
    """What the adapter gives loaded alone, through the training code's greedy generation."""
    from rich.console import Console

    from domaintune import catalog
    from domaintune.train.causal import generate, load_causal, render

    base = catalog.resolve(yaml.safe_load((run_dir / "recipe.yaml").read_text())["base_model"])
    tokenizer = catalog.load_tokenizer(base)
    model = load_causal(run_dir / "adapter", lambda: catalog.load_causal_lm(base))
    prompts = [tokenizer(render(tokenizer, [{"role": "user", "content": q}], True), add_special_tokens=False)["input_ids"]
               for q in questions]
    return generate(model, tokenizer, prompts, 4, 1, Console(quiet=True), "reference")

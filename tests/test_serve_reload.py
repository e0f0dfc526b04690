"""Hot reload in a real server process: ``domaintune serve --registry-stage production`` follows
promotions, rollbacks and archiving in the registry, checked with the official openai client,
without the process restarting."""

from __future__ import annotations

import time

import pytest

from domaintune import run
from domaintune.registry.store import Registry
from serve_helpers import openai_client, reference_answers, serve_process

NAME = "tiny-colours"  # the name sft_recipe registers its runs under
QUESTIONS = ["what is the colour of sky ?", "what is the colour of grass ?"]
POLL_SECONDS = 0.2
SWITCH_TIMEOUT_S = 30


def served_version(client) -> int | None:
    """The registry version the server routes ``NAME`` to, per /v1/models (None: not served)."""
    return next((getattr(m, "version", None) for m in client.models.list() if m.id == NAME), None)


def wait_for_version(client, version: int | None, process) -> None:
    """Poll /v1/models until it shows ``version`` of ``NAME``; fail after ``SWITCH_TIMEOUT_S``."""
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while (seen := served_version(client)) != version:
        assert process.poll() is None, "the server exited"
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not switch {NAME} to version {version}; it serves {seen}")
        time.sleep(POLL_SECONDS / 2)


def answers(client) -> list[str]:
    return [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": q}], temperature=0,
                                           max_tokens=4).choices[0].message.content.strip() for q in QUESTIONS]


def poll_errors(client) -> float:
    """The failed registry polls a server (a TestClient) has counted."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(client.get("/metrics").text)
    return next(s.value for f in families for s in f.samples if s.name == "domaintune_registry_poll_errors_total")


def test_promotion_rollback_and_archive_followed_by_a_running_server(sft_recipe, tmp_path):
    import openai

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    # one epoch against three: the two versions answer differently, so a switch shows in the answers
    runs = [run(sft_recipe, {"training.epochs": epochs}, output_dir=tmp_path / f"runs-{epochs}", registry_url=url)
            for epochs in (1, 3)]
    registry = Registry(url)
    v1, v2 = (registry.get(NAME, i) for i in (1, 2))
    assert [v.run_dir for v in (v1, v2)] == [r.run_dir for r in runs]
    expected = {v.version: reference_answers(v.run_dir, QUESTIONS) for v in (v1, v2)}
    assert expected[1] != expected[2], "the two runs answer alike: the test could not see a switch"

    folder = tmp_path / "server"
    folder.mkdir()
    args = ["--registry-stage", "production", "--registry-url", url, "--poll-seconds", str(POLL_SECONDS),
            "--feedback-db", str(folder / "feedback.db")]
    with serve_process(args, folder) as (server_url, process):
        client = openai_client(server_url)
        assert served_version(client) is None  # nothing is in production yet

        for stage in ("staging", "production"):
            registry.promote(NAME, 1, stage)
        wait_for_version(client, 1, process)
        assert answers(client) == expected[1]

        registry.promote(NAME, 2, "staging")
        registry.promote(NAME, 2, "production", force=True, reason="test: a version that answers differently")
        wait_for_version(client, 2, process)
        assert answers(client) == expected[2]

        registry.rollback(NAME, reason="test: back to the first version")
        wait_for_version(client, 1, process)
        assert answers(client) == expected[1]

        registry.promote(NAME, 1, "archived", reason="test: pulled")
        wait_for_version(client, None, process)
        with pytest.raises(openai.NotFoundError) as missing:
            answers(client)
        assert missing.value.body["code"] == "model_not_found"
        assert process.poll() is None  # one process throughout: nothing restarted
    registry.close()


def unreadable_registry(tmp_path):
    """A server config following a registry file that is not a database, and that file."""
    from domaintune.serve.app import ServeConfig

    path = tmp_path / "registry.db"
    path.write_text("not a database, only text long enough to be read as a header")
    return ServeConfig(registry_url=f"sqlite:///{path}", registry_stage="production", poll_seconds=0.05,
                       feedback_db=tmp_path / "feedback.db"), path


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.05)


def test_a_registry_that_cannot_be_read_is_polled_again(tmp_path):
    """Any error from the database (here: the file is not one) is logged and counted, and the
    next poll opens the registry afresh instead of following stopping for good."""
    from fastapi.testclient import TestClient

    from domaintune.serve.app import create_app

    config, path = unreadable_registry(tmp_path)
    with TestClient(create_app(config)) as client:
        wait_until(lambda: poll_errors(client) >= 2, "a second poll failed after the first")
        path.unlink()
        # opening a registry creates and migrates it; the server is ready once that poll has read it
        wait_until(lambda: client.get("/health").status_code == 200, "a poll recreated the registry")
        assert client.get("/health").json() == {"status": "ok", "models": 0, "device": "cpu"}
    with Registry(f"sqlite:///{path}") as registry:
        assert registry.list() == []


def test_health_is_503_until_a_poll_has_read_the_registry(tmp_path):
    """A probe must not send traffic to a server whose models are still loading: /health and the
    model endpoints answer 503 until a poll has read the stage (here, once the file is a registry)."""
    from fastapi.testclient import TestClient

    from domaintune.serve.app import create_app

    config, path = unreadable_registry(tmp_path)
    ready = []
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(config, on_ready=lambda: ready.append(True))) as client:
        wait_until(lambda: poll_errors(client) >= 1, "a poll failed")
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading", "models": 0, "device": "cpu"}
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "loading"
        assert not ready

        path.unlink()  # the next poll creates the registry and reads its empty stage
        wait_until(lambda: client.get("/health").status_code == 200, "the server was ready")
        assert ready == [True]  # the command prints its "serving on" line then, once
        assert client.post("/v1/chat/completions", json=chat).status_code == 404  # not in the stage


def test_a_version_whose_files_changed_since_registration_is_not_served(tmp_path, caplog):
    """Promoted before its adapter was edited: the server following the stage refuses to load it
    and says which file changed, instead of serving weights nobody reviewed."""
    from fastapi.testclient import TestClient

    from domaintune.serve.app import ServeConfig, create_app
    from test_registry import make_run

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    with Registry(url) as registry:
        version = registry.register(make_run(tmp_path / "runs"))
        registry.promote(version.name, version.version, "staging")
        registry.promote(version.name, version.version, "production")
    weights = version.run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[::-1])
    config = ServeConfig(registry_url=url, registry_stage="production", poll_seconds=0.05,
                         feedback_db=tmp_path / "feedback.db")
    with caplog.at_level("ERROR", logger="domaintune.serve"), TestClient(create_app(config)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, "the first poll was done")
        assert client.get("/health").json()["models"] == 0
    assert any(f"cannot serve {version.ref}" in r.getMessage() and "adapter/adapter_model.safetensors: sha256"
               in r.getMessage() for r in caplog.records), caplog.text

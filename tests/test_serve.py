"""The server: the official openai client against a real server process, and in-process checks
of batching across adapters, auth, limits, feedback, privacy and following the registry.

Two LoRA adapters of one tiny base are trained on different colour answers; the server must
give each adapter's own answers, the same as the adapter loaded alone gives."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from conftest import COLOURS, ticket_rows, write_csv, write_jsonl, write_recipe
from serve_helpers import free_port, openai_client, reference_answers, serve_process
from domaintune import run
from domaintune.serve.app import ServeConfig, create_app
from domaintune.serve.auth import KeyRing, hash_key
from domaintune.serve.feedback import FeedbackStore

THINGS = sorted(COLOURS)
QUESTIONS = [f"what is the colour of {t} ?" for t in THINGS]
FULL_KEY, SCOPED_KEY = "key-full", "key-scoped"


def _colour_recipe(folder: Path, base: Path, shift: int) -> Path:
    """A recipe teaching the colours shifted by ``shift`` (so that two shifts disagree)."""
    colours = [COLOURS[t] for t in THINGS]
    answer = {t: colours[(i + shift) % len(colours)] for i, t in enumerate(THINGS)}
    rng = random.Random(shift)
    rows = [{"prompt": f"what is the colour of {t} ?", "completion": f"{answer[t]} ."}
            for t in (rng.choice(THINGS) for _ in range(60))]
    write_jsonl(folder / "data" / "colours.jsonl", rows)
    return write_recipe(folder / "recipe.yaml", {
        "name": "colours", "task": "sft", "base_model": str(base), "method": "lora",
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.2, "dedup": {"exact": False, "near": False}},
        "training": {"epochs": 6, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 4},
    })


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    """Two versions of the model "colours", trained on different answers."""
    root = tmp_path_factory.mktemp("colour-runs")
    return {key: run(_colour_recipe(root / key, tiny_llama, shift), output_dir=root / key / "runs").run_dir
            for key, shift in (("a", 0), ("b", 1))}


@pytest.fixture(scope="module")
def intent_run(tmp_path_factory, tiny_bert) -> Path:
    root = tmp_path_factory.mktemp("intent-run")
    write_csv(root / "data" / "tickets.csv", ticket_rows())
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "intents", "task": "classification", "base_model": str(tiny_bert), "method": "lora",
        "data": {"train": "data/tickets.csv"},
        "training": {"epochs": 4, "learning_rate": 1e-2, "batch_size": 16, "max_seq_length": 32},
    })
    return run(recipe, output_dir=root / "runs").run_dir


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [
        {"name": "ops", "sha256": hash_key(FULL_KEY), "models": ["*"]},
        {"name": "team-a", "sha256": hash_key(SCOPED_KEY), "models": ["colours-a"], "rate_limit_per_minute": 3},
    ]}))
    return path


def chat_body(model: str, question: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 4,
            **extra}


# -- the openai client against a real server process -------------------------------------------


@pytest.fixture(scope="module")
def server_url(colour_runs, intent_run, keys_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    feedback_db = folder / "feedback.db"
    with serve_process(["--api-keys", str(keys_file), "--model", f"colours-a={colour_runs['a']}",
                        "--model", f"colours-b={colour_runs['b']}", "--model", f"intents={intent_run}",
                        "--feedback-db", str(feedback_db)], folder) as (url, _):
        yield url, feedback_db


def _client(url: str, key: str | None = FULL_KEY):
    return openai_client(url, key)


def test_openai_client_chat_stream_completions_models(server_url, colour_runs):
    url, _ = server_url
    client = _client(url)
    assert {m.id for m in client.models.list()} >= {"colours-a", "colours-b", "intents", "tiny-llama0"}

    question = QUESTIONS[0]
    expected = reference_answers(colour_runs["a"], [question])[0]
    reply = client.chat.completions.create(model="colours-a", messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=4)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 5

    stream = client.chat.completions.create(model="colours-a", messages=[{"role": "user", "content": question}],
                                            temperature=0, max_tokens=4, stream=True)
    chunks = list(stream)
    assert len(chunks) >= 3  # role, at least one piece of content, the finish
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason

    completion = client.completions.create(model="colours-b", prompt="what is the colour of", max_tokens=3,
                                           temperature=0)
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 3


def test_openai_client_classify_and_feedback(server_url, colour_runs):
    url, feedback_db = server_url
    client = _client(url)
    result = client.post("/classify", cast_to=object, body={"model": "intents", "input": ["my parcel tracking",
                                                                                        "please refund the charge"],
                                                             "explain": True})
    assert [d["index"] for d in result["data"]] == [0, 1]
    for item in result["data"]:
        assert set(item["probabilities"]) == {"billing", "account", "shipping", "product"}
        assert sum(item["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
        assert item["explanation"] and all(e["word"] in ("my parcel tracking please refund the charge").split()
                                           for e in item["explanation"])

    reply = client.chat.completions.create(model="colours-b", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                           temperature=0, max_tokens=4)
    stored = client.post("/feedback", cast_to=object, body={"response_id": reply.id, "rating": 2,
                                                            "correction": "green ."})
    assert stored["response_id"] == reply.id
    records = FeedbackStore(feedback_db).records()
    mine = [r for r in records if r.response_id == reply.id]
    assert len(mine) == 1
    # stored under the registry name (the run's recipe name), which `domaintune update colours --feedback` reads
    assert (mine[0].model, mine[0].rating, mine[0].correction, mine[0].reviewer) == ("colours", 2, "green .", "ops")
    assert (mine[0].alias, mine[0].key, mine[0].version) == ("colours-b", "ops", None)
    assert mine[0].run_id == Path(colour_runs["b"]).name
    assert [r.id for r in FeedbackStore(feedback_db).records(model="colours")] == [stored["id"]]
    assert mine[0].answer == reply.choices[0].message.content
    assert json.loads(mine[0].prompt) == [{"role": "user", "content": QUESTIONS[1]}]

    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        client.post("/feedback", cast_to=object, body={"response_id": "chatcmpl-nope", "rating": 5})
    assert missing.value.body["code"] == "response_not_found"

    assert client.models.retrieve("colours-a").id == "colours-a"  # the openai client's own call for one model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_openai_client_auth(server_url):
    import openai

    url, _ = server_url
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").chat.completions.create(model="colours-a", messages=messages, max_tokens=2)
    no_key = httpx.get(f"{url}/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    scoped = _client(url, key=SCOPED_KEY)
    assert [m.id for m in scoped.models.list()] == ["colours-a"]  # 1 of its 3 requests this minute
    with pytest.raises(openai.PermissionDeniedError):  # 2
        scoped.chat.completions.create(model="colours-b", messages=messages, max_tokens=2)
    scoped.chat.completions.create(model="colours-a", messages=messages, max_tokens=2)  # 3
    with pytest.raises(openai.RateLimitError):
        scoped.chat.completions.create(model="colours-a", messages=messages, max_tokens=2)


# -- batching and isolation ------------------------------------------------------------------------


def test_adapters_batched_together_answer_as_when_alone(colour_runs):
    """Concurrent requests for two adapters and the base share batches; each adapter answers as it
    does loaded alone, and the two adapters answer differently."""
    app = create_app(ServeConfig(models={"colours-a": colour_runs["a"], "colours-b": colour_runs["b"]},
                                 max_wait_ms=50))
    server = app.state.server
    assert len(server.pool.backends) == 1  # one copy of the base for both adapters

    async def ask_all() -> dict[str, list[str]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            names = ["colours-a", "colours-b", "tiny-llama0"]
            replies = await asyncio.gather(*[client.post("/v1/chat/completions", json=chat_body(name, q))
                                             for q in QUESTIONS for name in names])
        answers: dict[str, list[str]] = {name: [] for name in names}
        for reply in replies:
            assert reply.status_code == 200, reply.text
            answers[reply.json()["model"]].append(reply.json()["choices"][0]["message"]["content"].strip())
        return answers

    answers = asyncio.run(ask_all())
    batches = server.metrics.batch_rows.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    rows = next(s.value for s in batches if s.name.endswith("_sum"))
    assert rows == 3 * len(QUESTIONS) and count < rows  # some batch held several rows
    assert answers["colours-a"] == reference_answers(colour_runs["a"], QUESTIONS)
    assert answers["colours-b"] == reference_answers(colour_runs["b"], QUESTIONS)
    assert answers["colours-a"] != answers["colours-b"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_causal_models_are_served_there_and_answer_as_their_run_evaluated(colour_runs, intent_run):
    from rich.console import Console

    from domaintune.evaluate.run_eval import load_run_model
    from domaintune.train.causal import generate, render
    from domaintune.train.speed import placement

    config = ServeConfig(models={"colours-a": colour_runs["a"], "intents": intent_run}, device="cuda")
    with TestClient(create_app(config)) as client:
        pool = client.app.state.server.pool
        assert client.get("/health").json()["device"] == "cuda"
        assert placement(pool.get("colours-a").backend.model) == "cuda bfloat16"  # the adapter stays float32
        assert placement(pool.get("intents").backend.model) == "cpu float32"
        replies = [client.post("/v1/chat/completions", json=chat_body("colours-a", q)) for q in QUESTIONS]
        assert all(r.status_code == 200 for r in replies), replies[0].text
        answers = [r.json()["choices"][0]["message"]["content"].strip() for r in replies]
        # sampling, log-probs, penalties and biases all run on the GPU's tensors; a seed repeats
        sampled = [client.post("/v1/chat/completions", json=chat_body(
            "colours-a", QUESTIONS[0], temperature=0.9, top_p=0.9, seed=5, logprobs=True, top_logprobs=2,
            logit_bias={"5": 3}, frequency_penalty=0.5, presence_penalty=0.2)) for _ in range(2)]
        assert sampled[0].status_code == 200, sampled[0].text
        assert sampled[0].json()["choices"][0] == sampled[1].json()["choices"][0]
        assert client.post("/v1/classify", json={"model": "intents", "input": ["where is my parcel"]}).status_code == 200
    run_model = load_run_model(colour_runs["a"])  # placed as the run's evaluation was: the same weights
    assert placement(run_model.model) == "cuda bfloat16"
    tokenizer = run_model.tokenizer
    prompts = [tokenizer(render(tokenizer, [{"role": "user", "content": q}], True), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    assert answers == generate(run_model.model, tokenizer, prompts, 4, 1, Console(quiet=True), "reference")


# -- in-process API checks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(colour_runs, intent_run, keys_file, tmp_path_factory):
    config = ServeConfig(models={"colours-a": colour_runs["a"], "intents": intent_run}, api_keys=keys_file,
                         max_request_bytes=2_000, max_prompt_tokens=40, max_tokens=8,
                         feedback_db=tmp_path_factory.mktemp("fb") / "feedback.db")
    with TestClient(create_app(config), headers={"Authorization": f"Bearer {FULL_KEY}"}) as client:
        yield client


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_malformed_and_oversized_requests(api):
    headers = {"Content-Type": "application/json"}
    assert _error(api.post("/v1/chat/completions", content=b'{"model": "colours-a", "mess', headers=headers),
                  400)["code"] == "invalid_json"
    assert _error(api.post("/v1/chat/completions", content=b"[1, 2]", headers=headers), 400)["code"] == "invalid_request"
    assert _error(api.post("/v1/chat/completions", json={"model": "colours-a"}), 400)["param"] == "messages"
    assert _error(api.post("/v1/chat/completions", json=chat_body("colours-a", "hi", temperature=3)),
                  400)["param"] == "temperature"
    assert _error(api.post("/v1/chat/completions", json=chat_body("colours-a", "sky " * 1000)), 413)["code"] == \
        "request_too_large"
    assert _error(api.post("/v1/chat/completions", json=chat_body("colours-a", "sky " * 60)), 400)["code"] == \
        "context_length_exceeded"
    assert _error(api.post("/v1/chat/completions", json=chat_body("colours-a", "sky", max_tokens=9)),
                  400)["param"] == "max_tokens"
    assert _error(api.post("/v1/chat/completions", json=chat_body("nope", "sky")), 404)["code"] == "model_not_found"
    assert _error(api.post("/v1/chat/completions", json=chat_body("intents", "sky")), 400)["param"] == "model"
    assert _error(api.post("/v1/classify", json={"model": "colours-a", "input": "sky"}), 400)["param"] == "model"
    assert _error(api.post("/v1/feedback", json={"response_id": "x"}), 400)["message"]
    assert _error(api.get("/v1/nothing-here"), 404)


def test_error_messages_say_what_to_change(api):
    no_rating = _error(api.post("/v1/feedback", json={"response_id": "x"}), 400)
    assert no_rating["message"] == "give a rating, a correction, or both"  # the validator's, not "must be an object"
    form = _error(api.post("/v1/feedback", data={"response_id": "x", "rating": "5"}), 400)  # as curl -d sends it
    assert "Content-Type: application/json" in form["message"]
    assert "must be a JSON object" in _error(api.post("/v1/feedback", json=[1]), 400)["message"]
    assert _error(api.get("/v1/chat/completions"), 405)["type"] == "invalid_request_error"
    for path, body, typo in (("/v1/classify", {"model": "intents", "input": "x", "lables": 1}, "lables"),
                             ("/v1/feedback", {"response_id": "x", "rating": 5, "score": 5}, "score")):
        assert _error(api.post(path, json=body), 400)["param"] == typo


def test_a_key_is_checked_before_the_body_is(api):
    headers = {"Authorization": "", "Content-Type": "application/json"}
    assert _error(api.post("/v1/chat/completions", content=b'{"model": "colours-a", "mess', headers=headers),
                  401)["code"] == "invalid_api_key"
    assert _error(api.post("/v1/chat/completions", json={"model": "colours-a"}, headers={"Authorization": ""}),
                  401)["code"] == "invalid_api_key"


def test_auth_errors_in_openai_shape(api):
    assert _error(api.get("/v1/models", headers={"Authorization": ""}), 401)["type"] == "authentication_error"
    assert _error(api.get("/v1/models", headers={"Authorization": "Bearer key-wrong"}), 401)
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    assert _error(api.post("/v1/classify", json={"model": "intents", "input": "x"}, headers=scoped), 403)["type"] == \
        "permission_error"
    health = api.get("/health", headers={"Authorization": ""})  # probes need no key
    assert health.status_code == 200 and health.json()["device"] == "cpu"


def test_keys_file_errors(tmp_path):
    from domaintune.errors import DomaintuneError

    bad = tmp_path / "keys.yaml"
    bad.write_text(yaml.safe_dump({"keys": [{"name": "x", "sha256": "not-a-hash", "models": ["*"]}]}))
    with pytest.raises(DomaintuneError, match="sha256"):
        KeyRing.from_file(bad)
    bad.write_text(yaml.safe_dump({"keys": [{"name": "x", "sha256": hash_key("k"), "models": ["*"]}] * 2}))
    with pytest.raises(DomaintuneError, match="share"):
        KeyRing.from_file(bad)
    # two entries pasted as `python -m domaintune.serve.auth` prints them: YAML alone would keep the second
    bad.write_text("".join(yaml.safe_dump({"keys": [{"name": name, "sha256": hash_key(name), "models": ["*"]}]})
                           for name in ("first", "second")))
    with pytest.raises(DomaintuneError, match=r"line 6: 'keys' is given twice"):
        KeyRing.from_file(bad)


def test_stream_and_metrics(api):
    with api.stream("POST", "/v1/completions", json={"model": "colours-a", "prompt": "what is the colour of sky ?",
                                                     "max_tokens": 3, "temperature": 0.7, "stream": True,
                                                     "stream_options": {"include_usage": True}}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert 1 <= usage["completion_tokens"] <= 3
    metrics = api.get("/metrics").text
    assert 'domaintune_requests_total{endpoint="/v1/completions",key="ops",model="colours-a",status="200"}' in metrics
    assert "domaintune_completion_tokens_total" in metrics


def test_pii_redacted_and_bodies_not_logged(colour_runs, tmp_path, caplog):
    email = "jane.roe@corp.example"
    config = ServeConfig(models={"colours-a": colour_runs["a"]}, redact_pii=True, feedback_db=tmp_path / "fb.db")
    with caplog.at_level("INFO", logger="domaintune.serve"), TestClient(create_app(config)) as client:
        reply = client.post("/v1/chat/completions", json=chat_body("colours-a", f"mail {email} the colour of sky ?"))
        assert reply.status_code == 200
        client.post("/v1/feedback", json={"response_id": reply.json()["id"], "correction": f"ask {email}"})
    record = FeedbackStore(tmp_path / "fb.db").records()[0]
    assert email not in record.prompt and "[EMAIL]" in record.prompt
    assert record.correction == "ask [EMAIL]"
    assert "/v1/chat/completions 200" in caplog.text  # requests are logged, their content is not
    assert "colour of sky" not in caplog.text and email not in caplog.text


def test_auth_covers_metrics_and_model_retrieval(api):
    assert _error(api.get("/metrics", headers={"Authorization": ""}), 401)["type"] == "authentication_error"
    assert api.get("/metrics").status_code == 200  # any valid key
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    assert api.get("/v1/models/colours-a", headers=scoped).json()["id"] == "colours-a"
    # a model the key may not call is not listed for it, nor found
    assert _error(api.get("/v1/models/intents", headers=scoped), 404)["code"] == "model_not_found"
    entry = api.get("/v1/models/intents").json()
    assert entry["object"] == "model" and entry["task"] == "classification"


def test_the_access_log_and_metrics_name_the_key_that_called(api, caplog):
    with caplog.at_level("INFO", logger="domaintune.serve"):
        assert api.get("/v1/models/colours-a").status_code == 200  # with the fixture's key, named "ops"
        assert api.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    messages = [r.getMessage() for r in caplog.records]
    assert any("GET /v1/models/colours-a 200" in m and "key=ops" in m for m in messages), caplog.text
    assert any("GET /v1/models 401" in m and "key=-" in m for m in messages), caplog.text
    assert 'endpoint="/v1/models/{id}",key="ops",model="",status="200"}' in api.get("/metrics").text
    assert FULL_KEY not in caplog.text and SCOPED_KEY not in caplog.text  # the name, never the key


def test_feedback_records_the_key_beside_the_reviewers_claim(api, colour_runs):
    store = FeedbackStore(api.app.state.server.config.feedback_db)
    reply = api.post("/v1/chat/completions", json=chat_body("colours-a", QUESTIONS[0])).json()
    claimed = api.post("/v1/feedback", json={"response_id": reply["id"], "rating": 1,
                                             "reviewer": "dr-chief-medical-officer"}).json()
    unclaimed = api.post("/v1/feedback", json={"response_id": reply["id"], "rating": 4}).json()
    records = {r.id: r for r in store.records()}
    assert (records[claimed["id"]].reviewer, records[claimed["id"]].key) == ("dr-chief-medical-officer", "ops")
    assert (records[unclaimed["id"]].reviewer, records[unclaimed["id"]].key) == ("ops", "ops")
    assert {records[i].model for i in (claimed["id"], unclaimed["id"])} == {"colours"}
    assert records[claimed["id"]].run_id == Path(colour_runs["a"]).name


def test_classification_feedback_takes_one_of_the_labels_for_one_input(api):
    one = api.post("/v1/classify", json={"model": "intents", "input": "my parcel tracking"}).json()
    wrong = _error(api.post("/v1/feedback", json={"response_id": one["id"], "correction": "parcels"}), 400)
    assert wrong["param"] == "correction"
    assert all(label in wrong["message"] for label in ("billing", "account", "shipping", "product"))
    assert api.post("/v1/feedback", json={"response_id": one["id"], "correction": "shipping"}).status_code == 200
    listed = api.post("/v1/classify", json={"model": "intents", "input": ["my parcel tracking"]}).json()
    assert api.post("/v1/feedback", json={"response_id": listed["id"], "correction": "shipping"}).status_code == 200

    batch = api.post("/v1/classify", json={"model": "intents", "input": ["my parcel", "a refund"]}).json()
    for body in ({"correction": "shipping"}, {"rating": 2}):
        refused = _error(api.post("/v1/feedback", json={"response_id": batch["id"], **body}), 400)
        assert "one input per response" in refused["message"]


def test_feedback_store_adds_the_new_columns_to_an_older_file(tmp_path):
    import sqlite3

    path = tmp_path / "feedback.db"
    with sqlite3.connect(path) as db:  # the table as the first release wrote it
        db.execute("CREATE TABLE feedback (id TEXT PRIMARY KEY, response_id TEXT NOT NULL, model TEXT NOT NULL, "
                   "prompt TEXT NOT NULL, answer TEXT NOT NULL, rating INTEGER, correction TEXT, reviewer TEXT, "
                   "comment TEXT, created_at TEXT NOT NULL)")
        db.execute("INSERT INTO feedback VALUES ('fb-old', 'r0', 'intents', 'my parcel', 'billing', NULL, 'shipping', "
                   "'ana', NULL, '2025-01-01T00:00:00+00:00')")
    db.close()
    from domaintune.serve.feedback import Response

    store = FeedbackStore(path)
    new = store.add("r1", Response("intents", "a refund", "billing", alias="triage", version="intents:3",
                                   run_id="20250101-000000-ab12"), correction="billing", key="ops")
    old, added = store.records(model="intents")
    assert (old.id, old.correction, old.alias, old.version, old.run_id, old.key) == \
        ("fb-old", "shipping", None, None, None, None)
    assert added == new and (added.alias, added.version, added.run_id, added.key) == \
        ("triage", "intents:3", "20250101-000000-ab12", "ops")
    store.close()
    FeedbackStore(path).close()  # opening it again changes nothing


def test_classifier_reads_what_its_run_evaluated_on(intent_run, tmp_path):
    """A text longer than the run's training.max_seq_length (32) is cut there, as in evaluation."""
    from domaintune.evaluate.run_eval import load_run_model
    from domaintune.train.classification import predict_proba

    text = " ".join(["my parcel tracking is late"] + ["please refund the invoice charge today"] * 12)
    run_model = load_run_model(intent_run)
    max_len = run_model.spec.training.max_seq_length
    assert max_len == 32 and len(run_model.tokenizer(text)["input_ids"]) > 2 * max_len
    evaluated = predict_proba(run_model.model, run_model.tokenizer, [text], max_len)[0]
    longer = predict_proba(run_model.model, run_model.tokenizer, [text], 128)[0]
    assert abs(evaluated - longer).max() > 1e-3  # the length matters for this text

    config = ServeConfig(models={"intents": intent_run}, feedback_db=tmp_path / "fb.db")
    with TestClient(create_app(config)) as client:
        served = client.post("/v1/classify", json={"model": "intents", "input": text}).json()["data"][0]
    assert [served["probabilities"][label] for label in run_model.labels] == pytest.approx(evaluated.tolist(),
                                                                                         abs=1e-5)


@pytest.fixture(scope="module")
def system_prompt_run(tmp_path_factory, tiny_llama) -> Path:
    """The colours taught under a system prompt, which the run's data steps put before every chat."""
    root = tmp_path_factory.mktemp("system-prompt-run")
    recipe = _colour_recipe(root, tiny_llama, 0)
    spec = yaml.safe_load(recipe.read_text())
    spec["data"]["system_prompt"] = "you answer with the colour . please answer with the colour of it ."
    spec["training"]["epochs"] = 2
    recipe.write_text(yaml.safe_dump(spec))
    return run(recipe, output_dir=root / "runs", register=False).run_dir


@torch.no_grad()
def test_served_chat_answers_as_its_run_evaluated_with_its_system_prompt(system_prompt_run, tmp_path):
    """The same prompt as evaluation (the run's system prompt first), so the same answers and the
    same distributions: the tiny model's greedy answers alone hardly depend on the prompt."""
    from domaintune.data.examples import ChatExample
    from domaintune.evaluate.run_eval import load_run_model
    from domaintune.train.causal import prompt_ids, render

    samples = [json.loads(line) for line in (system_prompt_run / "predictions.jsonl").read_text().splitlines()]
    chats = [json.loads(line)["messages"] for line in (system_prompt_run / "data" / "eval.jsonl").open()]
    assert [c[-2]["content"] for c in chats] == [s["prompt"] for s in samples]
    assert all(c[0]["role"] == "system" for c in chats)  # put there by the run's data steps
    run_model = load_run_model(system_prompt_run)  # as `domaintune eval` loads it
    evaluated = [prompt_ids(run_model.tokenizer, ChatExample(c)) for c in chats]
    max_new = run_model.spec.evaluate.max_new_tokens
    config = ServeConfig(models={"colours": system_prompt_run}, feedback_db=tmp_path / "fb.db")
    with TestClient(create_app(config)) as client:
        def ask(messages: list[dict]) -> dict:
            reply = client.post("/v1/chat/completions", json={"model": "colours", "messages": messages,
                                                             "temperature": 0, "max_tokens": max_new, "logprobs": True})
            assert reply.status_code == 200, reply.text
            return reply.json()

        served = [ask([{"role": "user", "content": s["prompt"]}]) for s in samples]
        own = [{"role": "system", "content": "you answer"}, {"role": "user", "content": samples[0]["prompt"]}]
        own_reply = ask(own)
    assert [r["choices"][0]["message"]["content"].strip() for r in served] == [s["tuned"] for s in samples]
    assert [r["usage"]["prompt_tokens"] for r in served] == [len(ids) for ids in evaluated]
    for reply, ids in zip(served, evaluated):
        first = run_model.model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        assert reply["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(float(first.max()), abs=1e-4)
    # a chat with a system message of its own is sent as it is, without a second one
    tokenizer = run_model.tokenizer
    assert own_reply["usage"]["prompt_tokens"] == len(tokenizer(render(tokenizer, own, True),
                                                                add_special_tokens=False)["input_ids"])


def test_an_abandoned_request_stops_generating(colour_runs):
    """A client that gives up on a long non-streaming answer frees the model at once, as a
    streaming client does; the answer is not kept for feedback."""
    app = create_app(ServeConfig(models={"colours-a": colour_runs["a"]}))
    served = app.state.server.pool.get("colours-a")
    batcher, started = served.backend.batcher, []
    inner = batcher.run_batch

    def slow(rows, on_token):  # 20 ms a token: 200 tokens take 4 s unless the rows stop
        started.extend(rows)
        inner(rows, lambda i, token: (time.sleep(0.02), on_token(i, token)))

    batcher.run_batch = slow
    sky = served.tokenizer.convert_tokens_to_ids("sky")
    body = json.dumps(chat_body("colours-a", QUESTIONS[0], max_tokens=200, logit_bias={str(sky): 100})).encode()

    async def abandon() -> tuple[list[dict], float]:
        incoming = [{"type": "http.request", "body": body, "more_body": False}]
        gone, sent = asyncio.Event(), []

        async def receive() -> dict:
            if incoming:
                return incoming.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
                 "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        request = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.5)
        gone.set()
        left = time.monotonic()
        await asyncio.wait_for(request, 30)
        return sent, time.monotonic() - left

    sent, after = asyncio.run(abandon())
    assert len(started) == 1 and 0 < started[0].produced < 100, started[0].produced
    assert after < 2, after
    assert served.inflight == 0
    assert sent[0]["status"] == 499  # logged and counted as the client's closing, not as an answer
    assert not app.state.server.responses._items


def test_cli_bounds_the_wait_for_running_requests_at_shutdown(monkeypatch, tmp_path):
    import typer
    import uvicorn
    from typer.testing import CliRunner

    import domaintune.serve.app
    from domaintune.cli.serve import SHUTDOWN_TIMEOUT_S, serve

    calls = []

    class Server:  # records its config; uvicorn's own would configure logging in this process
        started = True

        def __init__(self, config: dict):
            calls.append(config)

        def run(self, sockets) -> None:
            pass

    monkeypatch.setattr(domaintune.serve.app, "create_app", lambda config, on_ready: "app")
    monkeypatch.setattr(uvicorn, "Config", lambda app, **options: options)
    monkeypatch.setattr(uvicorn, "Server", Server)
    command = typer.Typer()
    command.command()(serve)
    runner = CliRunner()
    args = ["--model", f"x={tmp_path}", "--port", str(free_port())]
    assert runner.invoke(command, args).exit_code == 0
    assert runner.invoke(command, [*args, "--shutdown-timeout", "2"]).exit_code == 0
    assert [c["timeout_graceful_shutdown"] for c in calls] == [SHUTDOWN_TIMEOUT_S, 2]
    assert 0 < SHUTDOWN_TIMEOUT_S <= 30


# -- following the registry --------------------------------------------------------------------------


def test_promotion_is_served_without_restart(colour_runs, tmp_path):
    from domaintune.registry.store import Registry

    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url)
    first, second = (registry.register(colour_runs[k]) for k in ("a", "b"))
    for version in (first, second):
        registry.promote("colours", version.version, "staging")
    registry.promote("colours", first.version, "production")
    expected = {k: reference_answers(colour_runs[k], QUESTIONS[:2]) for k in ("a", "b")}

    def wait_for(client: TestClient, version: int | None) -> None:
        for _ in range(200):
            served = {m["id"]: m["version"] for m in client.get("/v1/models").json()["data"]}
            if served.get("colours") == version:
                return
            time.sleep(0.05)
        pytest.fail(f"the server did not switch to version {version}: {served}")

    def answers(client: TestClient) -> list[str]:
        return [client.post("/v1/chat/completions", json=chat_body("colours", q)).json()["choices"][0]["message"]
                ["content"].strip() for q in QUESTIONS[:2]]

    config = ServeConfig(registry_url=url, registry_stage="production", poll_seconds=0.1,
                         feedback_db=tmp_path / "fb.db")
    app = create_app(config)
    pool = app.state.server.pool
    with TestClient(app) as client:
        wait_for(client, first.version)
        assert answers(client) == expected["a"]
        reply = client.post("/v1/chat/completions", json=chat_body("colours", QUESTIONS[0])).json()
        client.post("/v1/feedback", json={"response_id": reply["id"], "rating": 5})
        record = FeedbackStore(tmp_path / "fb.db").records()[-1]
        assert (record.model, record.alias, record.version, record.run_id) == \
            ("colours", "colours", f"colours:{first.version}", Path(colour_runs["a"]).name)
        in_flight = pool.acquire("colours")  # a request still running on the first version

        registry.promote("colours", second.version, "production", force=True, reason="test: switch answers")
        wait_for(client, second.version)
        assert answers(client) == expected["b"]
        backend = in_flight.backend
        assert in_flight.adapter in backend.adapters  # kept until its request is done
        pool.release(in_flight)
        pool.executor.submit(lambda: None).result()  # the detach runs on the model thread
        assert in_flight.adapter not in backend.adapters

        registry.promote("colours", second.version, "archived", reason="test: pulled")
        wait_for(client, None)
        assert _error(client.post("/v1/chat/completions", json=chat_body("colours", "sky")), 404)
    registry.close()


# -- the command -----------------------------------------------------------------------------------------


def test_cli_errors_exit_2(tmp_path):
    import typer
    from typer.testing import CliRunner

    from domaintune.cli.serve import serve

    app = typer.Typer()
    app.command()(serve)
    runner = CliRunner()
    vllm = runner.invoke(app, ["--engine", "vllm", "--model", f"x={tmp_path}"])
    assert vllm.exit_code == 2 and "not implemented in this version" in vllm.output
    assert "install" not in vllm.output  # installing vLLM would not help
    assert runner.invoke(app, ["--model", "no-equals-sign"]).exit_code == 2
    not_a_run = runner.invoke(app, ["--model", f"x={tmp_path}", "--port", str(free_port())])
    assert not_a_run.exit_code == 2 and "not a run directory" in not_a_run.output
    unknown = runner.invoke(app, ["--device", "tpu", "--model", f"x={tmp_path}"])
    assert unknown.exit_code == 2 and "unknown device 'tpu'" in unknown.output and "auto, cpu, cuda" in unknown.output
    if not torch.cuda.is_available():  # before any model is read, so the folder need not be a run
        no_gpu = runner.invoke(app, ["--device", "cuda", "--model", f"x={tmp_path}"])
        assert no_gpu.exit_code == 2 and "no CUDA GPU is visible" in no_gpu.output


def test_a_port_in_use_is_found_before_any_model_loads(tmp_path):
    import socket

    import typer
    from typer.testing import CliRunner

    from domaintune.cli.serve import serve

    app = typer.Typer()
    app.command()(serve)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the folder is not a run: reading it would be the error, were the port not checked first
        busy = CliRunner().invoke(app, ["--port", str(port), "--model", f"x={tmp_path}"])
    assert busy.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use: pick another with --port" in busy.output


def test_help_names_every_endpoint_and_which_bases_are_served():
    import typer
    from typer.testing import CliRunner

    from domaintune.cli.serve import serve

    app = typer.Typer()
    app.command()(serve)
    shown = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    text = " ".join(shown.replace("│", " ").split())
    assert "/v1/models/{id}" in text
    assert "A LoRA run of a causal LM (sft, pretrain) also serves its base" in text


def test_the_key_maker_prints_an_entry_that_goes_under_one_keys_list(tmp_path, capsys):
    from domaintune.serve.auth import main

    entries = []
    for argv in (["ci-bot", "colours-*", "--rate-limit", "60"], ["ops"]):
        assert main(argv) == 0
        printed = capsys.readouterr().out
        key = printed.split("give it to the caller): ")[1].split()[0]
        entries.append((key, printed.split("`keys:`):\n")[1]))
    assert "every model" in printed  # the second key names no models
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n" + "".join(entry for _, entry in entries))  # both pasted under one keys:
    ring = KeyRing.from_file(path)
    bot = ring.authenticate(f"Bearer {entries[0][0]}")
    assert (bot.name, bot.models, bot.rate_limit_per_minute) == ("ci-bot", ["colours-*"], 60)
    assert ring.authenticate(f"Bearer {entries[1][0]}").models == ["*"]
    assert main(["x", "--rate-limit", "0"]) == 2 and "1 or more" in capsys.readouterr().err

"""OpenAI's ``stop``, ``n``, ``seed``, ``logprobs``, penalties and ``logit_bias`` request fields: the official openai client
against a real server process on a tiny random Llama, with log-probs checked against the same
model run here; plus the stop-string text handling on its own, and batching of mixed settings."""

from __future__ import annotations

import asyncio
import math

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import colour_rows, write_jsonl, write_recipe
from serve_helpers import openai_client, serve_process
from domaintune import run
from domaintune.serve.app import ServeConfig, create_app
from domaintune.serve.generation import AnswerText, Piece, Token

QUESTION = [{"role": "user", "content": "what is the colour of sky ?"}]
SAMPLED = {"temperature": 1.5, "seed": 11}  # varied text from the random base, the same on every call


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("options-run")
    write_jsonl(root / "data" / "colours.jsonl", colour_rows())
    recipe = write_recipe(root / "recipe.yaml", {
        "name": "colours", "task": "sft", "base_model": str(tiny_llama), "method": "lora",
        "data": {"train": "data/colours.jsonl", "eval_fraction": 0.25, "dedup": {"exact": False, "near": False}},
        "training": {"epochs": 1, "learning_rate": 1e-2, "batch_size": 8, "max_seq_length": 64},
        "evaluate": {"max_new_tokens": 2},
    })
    return run(recipe, output_dir=root / "runs", register=False).run_dir


@pytest.fixture(scope="module")
def client(colour_run, tmp_path_factory):
    """The openai client on a server that serves the run and, under its folder's name, the base."""
    folder = tmp_path_factory.mktemp("options-server")
    with serve_process(["--model", f"colours={colour_run}", "--feedback-db", str(folder / "fb.db")],
                       folder) as (url, _):
        yield openai_client(url)


@pytest.fixture(scope="module")
def base(tiny_llama):
    """The base model the server serves as ``tiny_llama.name``, and its tokenizer, loaded here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def chat(client, model: str, **options):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, **options)


# -- stop -------------------------------------------------------------------------------------------


def test_stop_ends_the_answer_before_the_stop_text(client, tiny_llama):
    whole = chat(client, tiny_llama.name, logprobs=True, **SAMPLED).choices[0]
    full, tokens = whole.message.content, [t.token for t in whole.logprobs.content]
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = words[1][-2:] + " " + words[2][:1]  # spans a token boundary: held back until decided
    expected = full[:full.index(stop)]
    # the tokens generated up to the one that completes the stop string count as used
    used = next(k for k in range(1, len(tokens) + 1) if len("".join(tokens[:k])) >= len(expected) + len(stop))

    reply = chat(client, tiny_llama.name, stop=[stop, "never-generated"], **SAMPLED)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == used

    chunks = list(chat(client, tiny_llama.name, stop=stop, stream=True, **SAMPLED))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]

    # a stop string that begins to match but never completes holds nothing back in the end
    unmatched = chat(client, tiny_llama.name, stop=words[-1] + "zzz", stream=True, **SAMPLED)
    assert "".join(c.choices[0].delta.content or "" for c in unmatched if c.choices) == full

    completion = client.completions.create(model=tiny_llama.name, prompt="what is the colour of", max_tokens=8,
                                           **SAMPLED)
    text = completion.choices[0].text
    cut = text.split(" ")[2]
    stopped = client.completions.create(model=tiny_llama.name, prompt="what is the colour of", max_tokens=8,
                                        stop=cut, **SAMPLED)
    assert stopped.choices[0].text == text[:text.index(cut)] and stopped.choices[0].finish_reason == "stop"


# -- n and seed -------------------------------------------------------------------------------------


def test_n_greedy_choices_are_equal(client):
    one = chat(client, "colours", temperature=0)
    three = chat(client, "colours", temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.prompt_tokens == one.usage.prompt_tokens


def test_n_sampled_choices_differ_by_seed_and_repeat_with_it(client, tiny_llama):
    first = chat(client, tiny_llama.name, n=4, logprobs=True, **SAMPLED)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert len(set(texts)) > 1, texts
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    again = chat(client, tiny_llama.name, n=4, **SAMPLED)
    assert [c.message.content for c in again.choices] == texts
    other = chat(client, tiny_llama.name, n=4, temperature=1.5, seed=12)
    assert [c.message.content for c in other.choices] != texts


def test_a_tiny_nucleus_samples_the_greedy_answer(client, tiny_llama):
    greedy = chat(client, tiny_llama.name, temperature=0).choices[0].message.content
    nucleus = chat(client, tiny_llama.name, n=2, top_p=1e-6, **SAMPLED)
    assert [c.message.content for c in nucleus.choices] == [greedy, greedy]


def test_n_streams_interleaved_by_index(client, tiny_llama):
    whole = chat(client, tiny_llama.name, n=3, **SAMPLED)
    chunks = list(chat(client, tiny_llama.name, n=3, stream=True, stream_options={"include_usage": True}, **SAMPLED))
    texts, finishes = ["", "", ""], [[], [], []]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [[c.finish_reason] for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# -- logprobs ---------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, messages) -> list[int]:
    from domaintune.train.causal import render

    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _next_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    return (model(torch.tensor([ids])).logits[0, -1] / temperature).log_softmax(-1)


def test_chat_logprobs_match_the_model(client, base, tiny_llama):
    model, tokenizer = base
    reply = chat(client, tiny_llama.name, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    ids = _prompt_ids(tokenizer, QUESTION)
    for entry in content:  # greedy: each token is the model's most likely one
        expected = _next_logprobs(model, ids)
        best = int(expected.argmax())
        assert entry.logprob == pytest.approx(float(expected[best]), abs=1e-4)
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-4)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6
        ids.append(best)

    streamed = list(chat(client, tiny_llama.name, temperature=0, logprobs=True, top_logprobs=3, stream=True))
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in tokens] == [(t.token, t.logprob) for t in content]
    assert chat(client, tiny_llama.name, temperature=0).choices[0].logprobs is None


def test_sampled_logprobs_are_after_temperature(client, base, tiny_llama):
    model, tokenizer = base
    reply = chat(client, tiny_llama.name, temperature=0.7, seed=5, logprobs=True, top_logprobs=2)
    vocab = tokenizer.get_vocab()
    ids = _prompt_ids(tokenizer, QUESTION)
    for entry in reply.choices[0].logprobs.content:
        if not entry.token.strip():  # a special token decodes to nothing: its id is not known here
            break
        expected = _next_logprobs(model, ids, 0.7)
        token = vocab[entry.token.strip()]
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(expected.topk(2).values.tolist(), abs=1e-4)
        ids.append(token)


def test_completion_logprobs_in_the_legacy_shape(client, tiny_llama):
    prompt = "what is the colour of"
    completion = client.completions.create(model=tiny_llama.name, prompt=prompt, max_tokens=5, logprobs=2,
                                           **SAMPLED)
    choice = completion.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == \
        completion.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len(prompt) + len("".join(lp.tokens[:k])) for k in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert top[token] == logprob and 1 <= len(top) <= 3  # the 2 likeliest, and the sampled one
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-6


# -- penalties and logit_bias -----------------------------------------------------------------------


@torch.no_grad()
def _greedy(model, tokenizer, ids: list[int], steps: int, adjust) -> list[tuple[str, float]]:
    """Greedy tokens after ``ids`` with ``adjust(logits, counts of the tokens generated so far)``,
    up to a stop token, as the server is to choose them: each token's text (special tokens have
    none) and its log-prob in the adjusted distribution."""
    from domaintune.train.causal import stop_token_ids

    out, chosen = [], []
    for _ in range(steps):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        adjusted = adjust(logits, torch.bincount(torch.tensor(out, dtype=torch.long), minlength=len(logits)))
        token = int(adjusted.argmax())
        if token in stop_token_ids(model, tokenizer):
            break
        out.append(token)
        chosen.append((tokenizer.decode([token], skip_special_tokens=True),
                       round(float(adjusted.float().log_softmax(-1)[token]), 3)))
    return chosen


def _served(reply) -> list[tuple[str, float]]:
    return [(t.token.strip(), round(t.logprob, 3)) for t in reply.choices[0].logprobs.content]


def test_frequency_and_presence_penalties_choose_what_openai_describes(client, base, tiny_llama):
    model, tokenizer = base
    ids = _prompt_ids(tokenizer, QUESTION)
    plain = _greedy(model, tokenizer, ids, 8, lambda logits, counts: logits)
    # the random model repeats itself: what the penalties act on
    assert len({token for token, _ in plain}) < len(plain), plain
    for frequency, presence in ((2.0, 0.0), (0.0, 2.0), (0.5, -1.0)):
        expected = _greedy(model, tokenizer, ids, 8, lambda logits, counts: logits - frequency * counts
                           - presence * (counts > 0))
        reply = chat(client, tiny_llama.name, temperature=0, logprobs=True, frequency_penalty=frequency,
                     presence_penalty=presence)
        assert _served(reply) == expected
        if presence >= 0:  # fewer repeats
            assert len({token for token, _ in expected}) > len({token for token, _ in plain})
    unchanged = chat(client, tiny_llama.name, temperature=0, logprobs=True, frequency_penalty=0, presence_penalty=0)
    assert _served(unchanged) == plain


@torch.no_grad()
def test_logit_bias_forces_and_bans_tokens(client, base, tiny_llama):
    model, tokenizer = base
    ids = _prompt_ids(tokenizer, QUESTION)
    first = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    sky = tokenizer.get_vocab()["sky"]
    forced = chat(client, tiny_llama.name, temperature=0, logprobs=True, logit_bias={str(sky): 100})
    assert [token for token, _ in _served(forced)] == ["sky"] * 8
    assert all(t.logprob > -1e-3 for t in forced.choices[0].logprobs.content)  # the biased distribution's
    bias = {first: -100.0, sky: 2.0}
    expected = _greedy(model, tokenizer, ids, 8, lambda logits, counts: logits.index_add(
        0, torch.tensor(list(bias)), torch.tensor(list(bias.values()))))
    banned = chat(client, tiny_llama.name, temperature=0, logprobs=True, logit_bias={str(k): v for k, v in bias.items()})
    assert _served(banned) == expected
    assert expected[0][0] != tokenizer.decode([first], skip_special_tokens=True)
    sampled = chat(client, tiny_llama.name, n=3, logit_bias={str(sky): 100}, **SAMPLED)
    assert {c.message.content for c in sampled.choices} == {forced.choices[0].message.content}


# -- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "param"), [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"sky": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"logit_bias": {"99999": -100}}, "logit_bias"),  # past the vocabulary
])
def test_invalid_chat_options_are_400_naming_the_parameter(client, options, param):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, "colours", **options)
    assert refused.value.body["param"] == param and refused.value.body["message"]


@pytest.mark.parametrize("logprobs", [6, -1, True])
def test_invalid_completion_logprobs_are_400(client, logprobs):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="colours", prompt="sky", max_tokens=2, logprobs=logprobs)
    assert refused.value.body["param"] == "logprobs"


def test_echo_and_best_of_are_refused_rather_than_ignored(client):
    """Ignored, they would change what the client reads the answer as."""
    for options, param in (({"echo": True}, "echo"), ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="colours", prompt="sky", max_tokens=2, **options)
        assert refused.value.body["param"] == param and "not supported" in refused.value.body["message"]
    assert client.completions.create(model="colours", prompt="sky", max_tokens=2, echo=False, best_of=1).choices


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "colour", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "colour", "parameters": {"type": "object"}}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("foo", 1),  # neither OpenAI's nor this server's
])
def test_fields_that_would_change_the_answer_or_are_unknown_are_refused(client, field, value):
    """Ignored, a tool or JSON mode would leave the client reading plain text as a call or JSON."""
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, "colours", extra_body={field: value})
    assert refused.value.body["param"] == field and "not supported" in refused.value.body["message"]


def test_fields_that_change_nothing_in_the_answer_are_accepted_and_ignored(client):
    ignored = {"response_format": {"type": "text"}, "user": "u-1", "metadata": {"team": "a"}, "store": True,
               "service_tier": "auto", "parallel_tool_calls": False, "safety_identifier": "s-1"}
    assert chat(client, "colours", temperature=0, extra_body=ignored).choices[0].message.content == \
        chat(client, "colours", temperature=0).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:  # a completion has no suffix here
        client.completions.create(model="colours", prompt="sky", max_tokens=2, suffix=" .")
    assert refused.value.body["param"] == "suffix"


def test_logprobs_refused_where_answers_are_redacted(colour_run, tmp_path):
    config = ServeConfig(models={"colours": colour_run}, redact_pii=True, feedback_db=tmp_path / "fb.db")
    with TestClient(create_app(config)) as api:
        body = {"model": "colours", "messages": QUESTION, "max_tokens": 2, "logprobs": True}
        refused = api.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        assert api.post("/v1/chat/completions", json=body | {"logprobs": False}).status_code == 200


# -- OpenAI request shapes beyond the basics ----------------------------------------------------------


def test_content_parts_and_the_developer_role_read_as_text_and_system(client):
    def answer(messages) -> str:
        return client.chat.completions.create(model="colours", messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content

    parts = [{"type": "text", "text": "what is the colour"}, {"type": "text", "text": "of sky ?"}]
    assert answer([{"role": "user", "content": parts}]) == \
        answer([{"role": "user", "content": "what is the colour\nof sky ?"}])
    system = "answer with the colour ."
    assert answer([{"role": "developer", "content": system}, *QUESTION]) == \
        answer([{"role": "system", "content": system}, *QUESTION])
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as refused:
        answer([{"role": "user", "content": [parts[0], image]}])
    assert refused.value.body["param"] == "messages.0.content" and "text only" in refused.value.body["message"]


def test_null_request_fields_take_their_defaults(client):
    nulls = dict.fromkeys(("temperature", "top_p", "n", "seed", "stop", "stream", "stream_options", "presence_penalty",
                           "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_completion_tokens",
                           "user"))
    reply = client.post("/chat/completions", cast_to=object,
                        body={"model": "colours", "messages": QUESTION, "max_tokens": 4, **nulls})
    assert len(reply["choices"]) == 1 and reply["choices"][0]["logprobs"] is None
    completion = client.post("/completions", cast_to=object, body={
        "model": "colours", "prompt": "sky", "max_tokens": 2, "echo": None, "best_of": None, **nulls})
    assert len(completion["choices"]) == 1


def test_completions_default_to_16_tokens_as_openai(client, base, tiny_llama):
    _, tokenizer = base
    forced = {str(tokenizer.get_vocab()["sky"]): 100}  # never a stop token: the limit ends the answer
    for limit in ({}, {"max_tokens": None}):
        reply = client.post("/completions", cast_to=object, body={"model": tiny_llama.name, "prompt": "what is the",
                                                                  "logit_bias": forced, "temperature": 0, **limit})
        assert reply["usage"]["completion_tokens"] == 16 and reply["choices"][0]["finish_reason"] == "length"
    chat_reply = client.post("/chat/completions", cast_to=object, body={
        "model": tiny_llama.name, "messages": QUESTION, "logit_bias": forced, "temperature": 0, "max_tokens": None})
    assert chat_reply["usage"]["completion_tokens"] > 16  # chat keeps the server's own default


def test_completions_answer_each_prompt_of_a_list(client, tiny_llama):
    prompts = ["what is the colour of", "the colour of sky is"]
    alone = [client.completions.create(model=tiny_llama.name, prompt=p, max_tokens=4, **SAMPLED) for p in prompts]
    both = client.completions.create(model=tiny_llama.name, prompt=prompts, max_tokens=4, n=2, **SAMPLED)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt * n + choice
    assert [both.choices[0].text, both.choices[2].text] == [a.choices[0].text for a in alone]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    greedy = client.completions.create(model=tiny_llama.name, prompt=prompts, max_tokens=4, temperature=0)
    assert [c.text for c in greedy.choices] == [
        client.completions.create(model=tiny_llama.name, prompt=p, max_tokens=4, temperature=0).choices[0].text
        for p in prompts]
    with pytest.raises(openai.BadRequestError) as refused:  # feedback on a batch is refused: one input each
        client.post("/feedback", cast_to=object, body={"response_id": both.id, "rating": 4})
    assert "one input per response" in refused.value.body["message"]
    for prompt in ([], [[1, 2, 3]]):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=tiny_llama.name, prompt=prompt, max_tokens=2)
        assert refused.value.body["param"] == "prompt"


def test_models_retrieve(client, tiny_llama):
    model = client.models.retrieve("colours")
    assert (model.id, model.object, model.task) == ("colours", "model", "sft")
    assert client.models.retrieve(tiny_llama.name).task == "base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# -- batching ---------------------------------------------------------------------------------------


def test_mixed_options_share_batches_and_answer_as_alone(colour_run, tiny_llama):
    app = create_app(ServeConfig(models={"colours": colour_run}, max_wait_ms=100))
    bodies = [{"model": name, "messages": QUESTION, "max_tokens": 6, **options}
              for name in ("colours", tiny_llama.name)
              for options in ({"temperature": 0}, {"temperature": 0, "stop": " "}, {"temperature": 0, "n": 2},
                              {"temperature": 0, "logprobs": True, "top_logprobs": 2}, {**SAMPLED, "n": 2},
                              {"temperature": 0, "frequency_penalty": 1.5, "logit_bias": {"5": 3}})]

    async def ask(concurrently: bool) -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            if concurrently:
                replies = await asyncio.gather(*[api.post("/v1/chat/completions", json=b) for b in bodies])
            else:
                replies = [await api.post("/v1/chat/completions", json=b) for b in bodies]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [[(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]] for r in replies]

    def batches_and_rows() -> tuple[float, float]:
        samples = app.state.server.metrics.batch_rows.collect()[0].samples
        return tuple(next(s.value for s in samples if s.name.endswith(end)) for end in ("_count", "_sum"))

    alone = asyncio.run(ask(concurrently=False))
    batches_before, rows_before = batches_and_rows()
    together = asyncio.run(ask(concurrently=True))
    batches, rows = batches_and_rows()
    assert batches - batches_before < rows - rows_before  # the concurrent requests shared batches
    assert together == alone
    assert alone[1][0][1] == "stop" and " " not in alone[1][0][0]


# -- the text handling on its own -----------------------------------------------------------------------


def _bytes_decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_answer_text_holds_back_possible_stops_and_splits_characters_right():
    pieces = {1: b"ab", 2: b"c ", 3: "\u00e9".encode()[:1], 4: "\u00e9".encode()[1:] + b"X", 5: b"YZ"}
    answer = AnswerText(_bytes_decoder(pieces), stop=["c \u00e9Q", "XY"])
    sent = [answer.add(Token(i, -0.5)) for i in (1, 2, 3, 4, 5)]
    assert [p.text for p in sent] == ["ab", "", "", "c \u00e9", ""]  # "c \u00e9" was a possible start of a stop
    assert answer.stopped and answer.used == 5
    tokens = [t for p in sent for t in p.tokens]
    # the split character goes with the token that completes it; the cut token keeps its text before the stop
    assert [(t.text, t.offset) for t in tokens] == [("ab", 0), ("c ", 2), ("", 4), ("\u00e9", 4)]
    assert answer.add(Token(1)) == Piece() and answer.finish() == Piece()


def test_answer_text_flushes_what_it_held_when_no_stop_came():
    answer = AnswerText(_bytes_decoder({1: b"hello ", 2: b"wor"}), stop=["world"])
    assert answer.add(Token(1)).text == "hello "
    assert answer.add(Token(2)).text == ""
    rest = answer.finish()
    assert rest.text == "wor" and [t.text for t in rest.tokens] == ["wor"] and not answer.stopped

"""The HTTP API: OpenAI's chat completions, completions and models endpoints, plus classify,
feedback, health and Prometheus metrics. ``create_app(ServeConfig(...))`` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from domaintune.data.examples import with_system_prompt
from domaintune.serve.auth import ApiKey, KeyRing, check_scope
from domaintune.serve.batcher import END
from domaintune.serve.errors import ApiError, error_body, error_response
from domaintune.serve.explain import occlusion
from domaintune.serve.feedback import FeedbackStore, Response as Answered, ResponseLog, chat_prompt
from domaintune.serve.generation import AnswerText, AnswerToken, Piece, Row
from domaintune.serve.limits import BodySizeLimit
from domaintune.serve.metrics import CONTENT_TYPE, Metrics
from domaintune.serve.pool import ModelPool, Served
from domaintune.serve.schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, FeedbackRequest

log = logging.getLogger("domaintune.serve")

MAX_CLASSIFY_INPUTS = 256


@dataclass
class ServeConfig:
    """What ``domaintune serve`` was asked to do."""

    models: dict[str, Path] = field(default_factory=dict)  # name → run directory
    registry_url: str | None = None
    registry_stage: str | None = None  # follow the registry: serve every name's version in this stage
    poll_seconds: float = 30.0
    api_keys: Path | None = None  # None: no authentication
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_request_bytes: int = 1_000_000
    max_prompt_tokens: int = 4096
    max_tokens: int = 512  # the largest max_tokens a request may ask for, and the chat default
    redact_pii: bool = False  # redact prompts before the model sees them and answers before they leave
    log_bodies: bool = False
    feedback_db: Path | None = None
    response_log_size: int = 10_000
    device: str = "cpu"  # where causal LMs run: cpu, cuda, or auto (a GPU when one is visible; the CLI's default)


class Server:
    """Everything a request handler needs, built once per app."""

    def __init__(self, config: ServeConfig, on_ready: Callable[[], None] | None = None):
        self.config = config
        self.ready = False  # see mark_ready
        self._on_ready = on_ready
        self.metrics = Metrics()
        self.keys = KeyRing.from_file(config.api_keys) if config.api_keys else KeyRing(None)
        self.pool = ModelPool(max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                              on_batch=self.metrics.batch_rows.observe, device=config.device)
        for name, run_dir in config.models.items():
            self.pool.load(name, run_dir)
        self.metrics.models.set(len(self.pool.routes))
        self.responses = ResponseLog(config.response_log_size)
        self.feedback = FeedbackStore(config.feedback_db)
        self.redactor = None
        if config.redact_pii:
            from domaintune.data.pii import PiiRedactor

            self.redactor = PiiRedactor()
        if not config.registry_stage:
            self.mark_ready()

    def mark_ready(self) -> None:
        """Every model asked for is loaded: at start with run directories only; when following the
        registry, once its first poll has loaded the stage's versions. Until then /health is 503,
        so that a load balancer or probe does not send requests that would find no model."""
        if self.ready:
            return
        self.ready = True
        if self._on_ready is not None:
            self._on_ready()

    def redact(self, text: str) -> str:
        return self.redactor.redact(text)[0] if self.redactor else text

    def acquire(self, request: Request, key: ApiKey | None, name: str, *, generates: bool) -> Served:
        """The model a request names, checked against the key's scope; release it when done."""
        request.state.model = name
        check_scope(key, name)
        served = self.pool.acquire(name)
        if served is None and not self.ready:  # it may be one the registry is still loading
            raise ApiError(503, "the server is still loading its models; /health answers 200 once it is ready",
                           code="loading")
        if served is None:
            raise ApiError(404, f"the model {name!r} is not served here; GET /v1/models lists them",
                           code="model_not_found", param="model")
        if served.generates != generates:
            self.pool.release(served)
            other = "/v1/chat/completions or /v1/completions" if served.generates else "/v1/classify"
            raise ApiError(400, f"the model {name!r} is a {served.task} model: use {other}", param="model")
        return served

    def rows(self, served: Served, prompt_ids: list[int], body: ChatCompletionRequest | CompletionRequest,
             param: str) -> list[Row]:
        """The generation rows for the request, within the server's limits: one per choice when
        sampling, one shared by all choices when greedy (they would be equal)."""
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                           f"{self.config.max_prompt_tokens}", code="context_length_exceeded", param=param)
        room = served.backend.max_context - len(prompt_ids)
        asked = body.token_limit
        if asked is not None and asked > self.config.max_tokens:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {self.config.max_tokens}",
                           param="max_tokens")
        if room < 1 or (asked is not None and asked > room):
            raise ApiError(400, f"the model's context is {served.backend.max_context} tokens: {len(prompt_ids)} in "
                           f"the prompt leave room for {max(room, 0)}", code="context_length_exceeded", param=param)
        if body.alternatives is not None and self.redactor is not None:
            raise ApiError(400, "this server redacts answers, and log-probs would show the tokens it redacts",
                           param="logprobs")
        unknown = [t for t in body.logit_bias if t >= len(served.tokenizer)]
        if unknown:
            raise ApiError(400, f"token {unknown[0]} is not in the vocabulary of {body.model!r} "
                           f"({len(served.tokenizer)} tokens)", param="logit_bias")
        row = Row(prompt_ids=prompt_ids, max_new_tokens=min(asked or self.config.max_tokens, room),
                  adapter=served.adapter, temperature=body.temperature, top_p=body.top_p,
                  presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                  logit_bias=body.logit_bias, logprobs=body.alternatives)
        if body.temperature == 0:
            return [row]
        return [replace(row, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]

    async def generate(self, served: Served, rows: list[Row], readers: list[list[int]], answers: list[AnswerText],
                       cancel: threading.Event, prompt_tokens: int) -> AsyncIterator[tuple[int, Piece, str | None]]:
        """Each answer as it is generated, in pieces: ``(choice index, piece, finish_reason)``,
        the finish reason with a choice's last piece only. ``readers[r]`` are the answers row
        ``r`` is read into: one, or all choices of a greedy prompt. ``prompt_tokens`` (of all
        prompts, each once) is counted in the metrics when all is generated."""
        halts = [threading.Event() for _ in rows]
        for row, halt in zip(rows, halts):
            row.cancelled = lambda halt=halt: halt.is_set() or cancel.is_set()
        tokens = served.backend.batcher.submit(rows)
        running = set(range(len(rows)))
        while running:
            r, item = await tokens.get()
            if r not in running:
                continue
            if isinstance(item, Exception):
                log.error("generation failed for %s", served.name, exc_info=item)
                raise ApiError(500, "generation failed; the server log has the details", code="server_error")
            for i in readers[r]:
                answer = answers[i]
                if answer.stopped:
                    continue
                if item is END:
                    yield i, answer.finish(), rows[r].finish_reason
                    continue
                piece = answer.add(item)
                if answer.stopped:
                    yield i, piece, "stop"
                elif piece:
                    yield i, piece, None
            if item is END or all(answers[i].stopped for i in readers[r]):
                # a row whose answers all met a stop string leaves its batch at the next step; its END
                # comes only when the whole batch ends, and is not waited for
                halts[r].set()
                running.discard(r)
        self.metrics.prompt_tokens.labels(served.name).inc(prompt_tokens)
        self.metrics.completion_tokens.labels(served.name).inc(sum(a.used for a in answers))

    def answered(self, served: Served, prompt: str, answer: str, *, inputs: int = 1) -> Answered:
        """What feedback on a response will be about: stored under the model's registry name, which
        updates look feedback up by, whatever name the request used."""
        return Answered(served.registry_name or served.name, prompt, answer, alias=served.name,
                        version=served.version_ref, run_id=served.run_id,
                        labels=tuple(served.labels) if served.labels is not None else None, inputs=inputs)


def create_app(config: ServeConfig, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``config``; loads its models now (raises ``DomaintuneError`` for a
    model or keys file that cannot be used) and follows the registry while it runs. ``on_ready``
    is called once every model asked for is loaded (see ``Server.mark_ready``)."""
    server = Server(config, on_ready)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher_task = None
        if config.registry_stage:
            from domaintune.serve.reload import RegistryWatcher

            watcher = RegistryWatcher(server.pool, config.registry_url, config.registry_stage, config.poll_seconds,
                                      server.metrics, on_sync=server.mark_ready)
            app.state.watcher = watcher
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, watcher.poke)
            watcher_task = asyncio.create_task(watcher.run())
        yield
        if watcher_task is not None:
            watcher_task.cancel()
            await asyncio.gather(watcher_task, return_exceptions=True)
        await server.pool.close()
        server.feedback.close()

    app = FastAPI(title="domaintune", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    _install_errors(app, server)
    _install_observability(app, server)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)

    def caller(request: Request) -> ApiKey | None:
        key = server.keys.authenticate(request.headers.get("authorization"))
        request.state.key = key.name if key is not None else ""  # who called: the access log and metrics say
        return key

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "ok" if server.ready else "loading", "models": len(server.pool.routes),
                "device": server.pool.device}
        return JSONResponse(body, status_code=200 if server.ready else 503)

    @app.get("/metrics")
    async def metrics(key: ApiKey | None = Depends(caller)) -> Response:
        # any valid key: the metrics name every model served and count its feedback
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(key: ApiKey | None = Depends(caller)) -> dict:
        return {"object": "list", "data": [_model_entry(s) for s in server.pool.list()
                                           if key is None or key.may_call(s.name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, key: ApiKey | None = Depends(caller)) -> dict:
        served = server.pool.get(model_id)
        # a model the key may not call is not listed for it either: not found rather than forbidden
        if served is None or (key is not None and not key.may_call(model_id)):
            raise ApiError(404, f"the model {model_id!r} is not served here; GET /v1/models lists them",
                           code="model_not_found", param="model")
        return _model_entry(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: ApiKey | None = Depends(caller)):
        from domaintune.train.causal import render

        served = server.acquire(request, key, body.model, generates=True)
        try:
            messages = [{"role": m.role, "content": server.redact(m.content)} for m in body.messages]
            # as the run's data steps did for its training and evaluation
            text = render(served.tokenizer, with_system_prompt(messages, served.system_prompt), add_generation_prompt=True)
            rows = server.rows(served, served.tokenizer(text, add_special_tokens=False)["input_ids"], body, "messages")
        except BaseException:
            server.pool.release(served)
            raise
        # feedback keeps the chat as sent: an update's data steps add the system prompt as the run's did
        return await _answer(server, request, served, [(chat_prompt(messages), rows)], body, "chatcmpl-", chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, key: ApiKey | None = Depends(caller)):
        served = server.acquire(request, key, body.model, generates=True)
        try:
            prompts = [server.redact(p) for p in body.prompts]
            jobs = [(p, server.rows(served, served.tokenizer(p)["input_ids"], body, "prompt")) for p in prompts]
        except BaseException:
            server.pool.release(served)
            raise
        return await _answer(server, request, served, jobs, body, "cmpl-", chat=False,
                             listed=not isinstance(body.prompt, str))

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request, key: ApiKey | None = Depends(caller)) -> dict:
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_CLASSIFY_INPUTS:
            raise ApiError(400, f"at most {MAX_CLASSIFY_INPUTS} inputs per request", param="input")
        served = server.acquire(request, key, body.model, generates=False)
        try:
            texts = [server.redact(t) for t in texts]
            loop = asyncio.get_running_loop()
            predict = lambda batch: server.pool.classify(served, batch)  # noqa: E731
            proba = await loop.run_in_executor(server.pool.executor, predict, texts)
            data = []
            for i, (text, p) in enumerate(zip(texts, proba)):
                best = int(p.argmax())
                item = {"index": i, "label": served.labels[best], "score": float(p[best]),
                        "probabilities": {label: float(x) for label, x in zip(served.labels, p)}}
                if body.explain:
                    item["explanation"] = await loop.run_in_executor(
                        server.pool.executor, occlusion, predict, text, best, float(p[best]))
                data.append(item)
        finally:
            server.pool.release(served)
        response_id = "clf-" + secrets.token_hex(12)
        single = len(texts) == 1  # a list of one is one input too
        labels = [d["label"] for d in data]
        server.responses.add(response_id, server.answered(served, texts[0] if single else json.dumps(texts),
                                                          labels[0] if single else json.dumps(labels),
                                                          inputs=len(texts)))
        if config.log_bodies:
            log.info("classify %s %s: %r -> %r", response_id, served.name, texts, labels)
        return {"id": response_id, "object": "classification", "created": int(time.time()), "model": served.name,
                "data": data}

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackRequest, request: Request, key: ApiKey | None = Depends(caller)) -> dict:
        answered = server.responses.get(body.response_id)
        if answered is None:
            raise ApiError(404, f"no recent response with id {body.response_id!r}", code="response_not_found",
                           param="response_id")
        request.state.model = answered.route
        check_scope(key, answered.route)
        if answered.inputs > 1:  # an update could not tell which input a rating or correction is about
            raise ApiError(400, f"feedback takes one input per response, and {body.response_id!r} answered "
                           f"{answered.inputs}: send each input in a request of its own to give feedback on it",
                           param="response_id")
        correction = body.correction
        if correction is not None and answered.labels is not None:
            if correction not in answered.labels:  # it becomes a training label: one the model has
                raise ApiError(400, f"the correction {correction!r} is not a label of {answered.route!r}; its labels "
                               f"are: {', '.join(answered.labels)}", param="correction")
        elif correction is not None:
            correction = server.redact(correction)
        # the key is who is known to have sent it; the reviewer is who the caller says it is
        record = await asyncio.to_thread(server.feedback.add, body.response_id, answered, rating=body.rating,
                                         correction=correction, reviewer=body.reviewer or (key.name if key else None),
                                         comment=body.comment, key=key.name if key else None)
        server.metrics.feedback.labels(answered.route).inc()
        return {"id": record.id, "object": "feedback", "response_id": record.response_id, "model": record.model,
                "created_at": record.created_at}

    return app


async def _answer(server: Server, request: Request, served: Served, jobs: list[tuple[str, list[Row]]],
                  body: ChatCompletionRequest | CompletionRequest, prefix: str, *, chat: bool, listed: bool = False):
    """Generate ``body.n`` choices for each prompt of one request (``jobs``: each prompt's text and
    its rows, see ``Server.rows``): a JSON body, or server-sent events when ``body.stream`` (the
    choices' chunks interleaved, each with its ``index``: prompt * n + choice). ``listed``: the
    prompt came as a list, and feedback is not taken on the response (one input per response)."""
    response_id = prefix + secrets.token_hex(12)
    created = int(time.time())
    cancel = threading.Event()
    kind = "chat.completion" if chat else "text_completion"
    decode = lambda ids: served.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    n, prompts = body.n, [prompt for prompt, _ in jobs]
    count = n * len(jobs)
    answers = [AnswerText(decode, body.stop) for _ in range(count)]
    rows, readers = [], []
    for p, (_, prompt_rows) in enumerate(jobs):
        rows += prompt_rows
        # greedy: one row read by every choice of its prompt (they would be equal)
        readers += [[p * n + i for i in range(n)]] if len(prompt_rows) == 1 else [[p * n + i] for i in range(n)]
    prompt_tokens = sum(len(prompt_rows[0].prompt_ids) for _, prompt_rows in jobs)

    def finish(texts: list[str]) -> dict:
        first = [texts[p * n] for p in range(len(jobs))]  # feedback rates each prompt's first choice
        if listed:
            answered = server.answered(served, json.dumps(prompts), json.dumps(first), inputs=len(jobs))
        else:
            answered = server.answered(served, prompts[0], first[0])
        server.responses.add(response_id, answered)
        if server.config.log_bodies:
            log.info("%s %s: %r -> %r", response_id, served.name, prompts if listed else prompts[0], texts)
        used = sum(a.used for a in answers)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}

    def logprobs(i: int, tokens: list[AnswerToken]) -> dict | None:
        if body.alternatives is None:
            return None
        return _chat_logprobs(tokens) if chat else _legacy_logprobs(tokens, len(prompts[i // n]))

    if not body.stream:
        texts, tokens, reasons = [""] * count, [[] for _ in range(count)], ["length"] * count
        # a client that gives up on a long answer must not keep the model busy (streams stop when
        # their client leaves too): its rows stop at the next step, or never start
        watcher = asyncio.create_task(_until_disconnected(request, cancel))
        try:
            async for i, piece, reason in server.generate(served, rows, readers, answers, cancel, prompt_tokens):
                texts[i] += piece.text
                tokens[i] += piece.tokens
                reasons[i] = reason or reasons[i]
        finally:
            gone = _left(watcher)
            watcher.cancel()
            cancel.set()
            server.pool.release(served)
        if gone:  # nobody reads the answer: not kept for feedback; 499 (client closed request) in logs and metrics
            return Response(status_code=499)
        texts = [server.redact(text) for text in texts]
        usage = finish(texts)
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": logprobs(i, tokens[i]), "finish_reason": reasons[i]} if chat else
                   {"index": i, "text": texts[i], "logprobs": logprobs(i, tokens[i]), "finish_reason": reasons[i]}
                   for i in range(count)]
        return {"id": response_id, "object": kind, "created": created, "model": served.name, "choices": choices,
                "usage": usage}

    def event(choices: list[dict], **extra) -> str:
        payload = {"id": response_id, "object": f"{kind}.chunk" if chat else kind, "created": created,
                   "model": served.name, "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(i: int, content: str | None, tokens: list[AnswerToken] | None = None, finish_reason: str | None = None,
              first: bool = False) -> str:
        lp = logprobs(i, tokens) if tokens else None
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | (
                {"content": content} if content is not None else {})
            return event([{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}])
        return event([{"index": i, "text": content or "", "logprobs": lp, "finish_reason": finish_reason}])

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(count):
                    yield chunk(i, None, first=True)
            texts = [""] * count
            async for i, piece, reason in server.generate(served, rows, readers, answers, cancel, prompt_tokens):
                texts[i] += piece.text
                if server.redactor is None and piece:  # redaction needs the whole answer: it is sent at the end
                    yield chunk(i, piece.text, piece.tokens)
                if reason is not None:
                    if server.redactor is not None:
                        texts[i] = server.redact(texts[i])
                        yield chunk(i, texts[i])
                    yield chunk(i, None, finish_reason=reason)
            usage = finish(texts)
            if body.stream_options and body.stream_options.include_usage:
                yield event([], usage=usage)
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield f"data: {json.dumps(error_body(exc.status, exc.message, exc.code))}\n\n"
        finally:
            cancel.set()  # a client that left stops its rows at the next step
            server.pool.release(served)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _until_disconnected(request: Request, cancel: threading.Event) -> bool:
    """Wait until the client disconnects, then set ``cancel`` and return True. The request body
    has been read by then, so what ``receive`` brings next is the disconnect."""
    message = await request.receive()
    if message["type"] != "http.disconnect":  # not a server that keeps to ASGI: nothing to watch
        return False
    cancel.set()
    return True


def _left(watcher: asyncio.Task) -> bool:
    """Whether ``_until_disconnected`` saw the client leave (a receive that failed says nothing)."""
    if not watcher.done() or watcher.cancelled():
        return False
    return watcher.exception() is None and watcher.result()


def _model_entry(served: Served) -> dict:
    """A model as ``GET /v1/models`` lists it."""
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "domaintune",
            "task": served.task, "base_model": served.base_model, "version": served.version}


def _token_entry(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _chat_logprobs(tokens: list[AnswerToken]) -> dict:
    """Chat's ``choices[i].logprobs``: each token with its log-prob and the most likely alternatives."""
    return {"content": [_token_entry(t.text, t.logprob) | {"top_logprobs": [_token_entry(s, lp) for s, lp in t.top]}
                        for t in tokens], "refusal": None}


def _legacy_logprobs(tokens: list[AnswerToken], prompt_chars: int) -> dict:
    """Completions' ``choices[i].logprobs``; ``top_logprobs`` holds the chosen token too (so up to
    k+1 entries) and ``text_offset`` counts from the start of the prompt, as OpenAI's do."""
    tops = []
    for t in tokens:
        top: dict[str, float] = {}
        for text, logprob in (*t.top, (t.text, t.logprob)):
            top.setdefault(text, logprob)  # texts two tokens share keep the likelier one's
        tops.append(top)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
            "text_offset": [prompt_chars + t.offset for t in tokens]}


def _install_errors(app: FastAPI, server: Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        if first["type"] == "json_invalid":
            # FastAPI parses the JSON before it runs the dependencies: a caller without a valid key
            # must learn that first, as it does for any other body
            try:
                server.keys.authenticate(request.headers.get("authorization"))
            except ApiError as refused:
                return error_response(refused)
            return error_response(ApiError(400, "the request body is not valid JSON", code="invalid_json"))
        return error_response(_invalid_body(request, first))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(ApiError(exc.status_code, str(exc.detail)))


def _invalid_body(request: Request, first: dict) -> ApiError:
    """The 400 for a body that does not validate, from its first error."""
    loc = [str(part) for part in first["loc"] if part != "body"]
    param = ".".join(loc) or None
    # a validator's own message, without pydantic's "Value error, " before it
    message = str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if first["type"] == "extra_forbidden":
        message = "not supported by this server: a field it does not know is refused rather than ignored"
    elif not param and first["type"] != "value_error":  # the body as a whole is not an object
        content_type = request.headers.get("content-type", "")
        if content_type and not _is_json(content_type):  # e.g. curl -d, which sends a form
            message = (f"the request body must be JSON sent with the header Content-Type: application/json, "
                       f"not {content_type.split(';')[0]}")
        else:
            message = "the request body must be a JSON object"
    return ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_request")


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of ``content_type`` as JSON (otherwise it validates the raw bytes)."""
    kind = content_type.split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _install_observability(app: FastAPI, server: Server) -> None:
    """One log line and the metrics per request; bodies are logged only with ``log_bodies``."""
    paths = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/classify",
             "/v1/feedback"}

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        server.metrics.inflight.inc()
        try:
            response = await call_next(request)
        finally:
            server.metrics.inflight.dec()
        elapsed = time.perf_counter() - start
        # labels only from known values: a client must not be able to mint new time series
        path = request.url.path
        endpoint = path if path in paths else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        model = getattr(request.state, "model", "")
        model = model if model in server.pool.routes or not model else "other"
        key = getattr(request.state, "key", "") or "-"  # a key's name (the keys file bounds them), never the key
        server.metrics.requests.labels(endpoint, model, str(response.status_code), key).inc()
        server.metrics.latency.labels(endpoint).observe(elapsed)
        log.info("%s %s %d model=%s key=%s %.3fs", request.method, request.url.path, response.status_code,
                 model or "-", key, elapsed)
        return response

"""Request bodies in OpenAI's shape, plus the classify and feedback bodies of this API. A field
this server does not support is refused with a 400 naming it, not ignored: ignored, ``tools``,
``response_format`` or completions' ``echo`` would change what the answer means, and an unknown
field is more often a typo than a wish. Accepted and ignored are only fields that change nothing in
the answer (``user``, and chat's ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
``safety_identifier``). A field sent as ``null`` takes its default, as OpenAI reads it (clients send
``"temperature": null`` for "not set")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_CHOICES = 8  # the largest n
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_TOP_LOGPROBS = 5  # alternatives per token, as OpenAI's completions allow
MAX_LOGIT_BIAS = 100.0  # the largest bias either way, as OpenAI allows
MAX_PROMPTS = 32  # prompts in one /v1/completions request
COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens for (legacy) completions


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # see the module's docstring

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        # OpenAI's clients and SDKs send null for a field they leave unset: it must not be a 400
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if v is not None}
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        # OpenAI's newer name for the system message; chat templates know only "system"
        return "system" if value == "developer" else value

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        """Content as a list of parts: its text parts joined (with newlines, as vLLM joins them)."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"a part of type {kind!r}" if kind else "a part that is not an object with a type"
                raise ValueError(f"{what}: this server's models read text only; send text parts "
                                 "({\"type\": \"text\", \"text\": ...}) or a string")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text part needs \"text\", a string")
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[int, float] = Field(default_factory=dict)  # token id -> bias added to its logit
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = None  # sampled choice i uses seed + i: the same seed gives the same answers
    stop: list[str] = Field(default_factory=list)  # a string or up to 4; the answer ends before the first
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # ignored: who the end user is, for OpenAI's abuse monitoring

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> list[str]:
        # checked here, not by the type, so that every error names the parameter "stop"
        stops = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("give a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if "" in stops:
            raise ValueError("a stop string cannot be empty")
        return stops

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_biases(cls, value: Any) -> dict[int, float]:
        # here rather than by the type, so that every error names the parameter "logit_bias"
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("give an object mapping token ids to biases, such as {\"50256\": -100}")
        biases = {}
        for key, bias in value.items():
            if not str(key).isdigit():
                raise ValueError(f"{key!r} is not a token id")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"the bias of token {key} must be a number from {-MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}")
            biases[int(key)] = float(bias)
        return biases


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None  # only {"type": "text"}, the default
    # refused whenever sent (not null): the models answer in text, never with a tool or function call
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    # ignored: about OpenAI's storage, billing and monitoring, or (parallel_tool_calls) about tools
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None

    @field_validator("tools", "tool_choice", "functions", "function_call")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        raise ValueError("not supported by this server: its models answer in text, without tool or function calls")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value != {"type": "text"}:  # JSON mode or a schema: the client would trust the answer to parse
            raise ValueError("not supported by this server: answers are plain text, unconstrained; only "
                             "{\"type\": \"text\"} is accepted")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("set logprobs to true to use top_logprobs")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """How many most likely tokens to list with each token's log-prob; None: no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str]  # a list: each prompt answered, its choices at index prompt * n + choice
    max_tokens: int = Field(default=COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)  # strict: true is no count
    echo: bool = False
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        # checked here, not by the type, so that every error names the parameter "prompt"
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise ValueError("give a string or a list of strings (token ids are not supported)")
        if not value:
            raise ValueError("give at least one prompt")
        if len(value) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:  # refused rather than ignored: the client would read the answer as prompt + answer
            raise ValueError("not supported by this server: the answer never repeats the prompt")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("not supported by this server: ask for n choices with logprobs and rank them")
        return value

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def alternatives(self) -> int | None:
        """How many most likely tokens to list with each token's log-prob; None: no log-probs."""
        return self.logprobs


class ClassifyRequest(_Request):
    model: str
    input: str | list[str] = Field(min_length=1)
    explain: bool = False  # add the words that moved the prediction most


class FeedbackRequest(_Request):
    response_id: str
    rating: int | None = Field(default=None, ge=1, le=5)  # 1 worst, 5 best
    correction: str | None = Field(default=None, min_length=1)  # the answer the model should have given
    reviewer: str | None = None
    comment: str | None = None

    @model_validator(mode="after")
    def _something_to_record(self) -> FeedbackRequest:
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating, a correction, or both")
        return self

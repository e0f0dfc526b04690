"""Request bodies in OpenAI's shape (fields this server does not use are accepted and ignored,
as clients send them), plus the classify and feedback bodies of this API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: Literal[1] = 1  # one choice per prompt: batching already serves parallel calls
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


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

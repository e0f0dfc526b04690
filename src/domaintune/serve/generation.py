"""One ``generate`` call over rows that each bring their own adapter, length limit, sampling
settings, seed and log-prob request, handing every new token to a callback as it is produced; and
``AnswerText``, which turns a row's tokens into the text a client may be sent (stop strings).

Rows of one batch may name different LoRA adapters of the same base: PEFT routes each row
through its own adapter when ``generate`` gets ``adapter_names=[...]`` (``"__base__"`` for the
plain base), so one forward pass serves them all. Tokens are chosen by ``_RowDecoding`` (greedy,
or sampled with the row's own random generator), so that a row's answer does not depend on the
rows it happens to share a batch with, and a seed repeats it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names
LOGPROB_FLOOR = -9999.0  # reported for impossible tokens, as OpenAI does
_CONTEXT_TOKENS = 4  # tokens before an alternative that are decoded with it, for its leading space


@dataclass
class Row:
    """One prompt to complete."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None = None  # None: the base model
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    presence_penalty: float = 0.0  # taken from a token's logit once the answer has it
    frequency_penalty: float = 0.0  # taken from a token's logit for each time the answer has it
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits
    seed: int | None = None  # sampling: None draws a fresh one
    logprobs: int | None = None  # None: none; k: the chosen token's log-prob and the k most likely
    cancelled: Callable[[], bool] = lambda: False  # the client went away or has all it wants: stop early
    finish_reason: str = field(default="length", init=False)  # "stop" or "length", set by generate_rows
    produced: int = field(default=0, init=False)  # tokens generated, set by generate_rows


@dataclass(frozen=True)
class Token:
    """A generated token; with log-probs when its row asked for them."""

    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()  # the row's ``logprobs`` most likely (id, log-prob), best first


class _RowDecoding(LogitsProcessor):
    """Chooses each row's next token and records its log-probs; returns scores that leave only
    that token, so that ``generate``'s own greedy pick takes it.

    Log-probs are those of the distribution the token is chosen from: after the row's penalties,
    logit biases and temperature (the model's own for greedy rows without them), before nucleus
    truncation: tokens outside the nucleus keep a finite log-prob.
    """

    def __init__(self, rows: list[Row], width: int):
        self.rows = rows
        self.width = width  # the left-padded prompts' length: what follows is generated
        self.temperature = torch.tensor([r.temperature or 1.0 for r in rows]).unsqueeze(1)
        self.generators: list[torch.Generator | None] | None = None
        self.want = max((r.logprobs for r in rows if r.logprobs is not None), default=None)
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []  # per step, for the streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is None:  # on the first step, where the scores' device is known
            self.generators = [self._generator(r, scores.device) for r in self.rows]
            self.temperature = self.temperature.to(scores.device)
        scaled = self._adjusted(input_ids, scores.float()) / self.temperature
        chosen = scaled.argmax(-1)
        for i, generator in enumerate(self.generators):
            if generator is not None:
                chosen[i] = torch.multinomial(_nucleus(scaled[i], self.rows[i].top_p).softmax(-1), 1,
                                              generator=generator)[0]
        if self.want is None:
            self.steps.append(None)
        else:
            logprobs = scaled.log_softmax(-1)
            top = logprobs.topk(self.want, dim=-1)
            # a token the model's own processors ruled out has -inf, which JSON cannot carry
            self.steps.append((logprobs.gather(1, chosen[:, None])[:, 0].clamp(min=LOGPROB_FLOOR).cpu(),
                               top.values.clamp(min=LOGPROB_FLOOR).cpu(), top.indices.cpu()))
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen[:, None], 0.0)

    def _adjusted(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Each row's logits with OpenAI's presence and frequency penalties (counted over the
        tokens generated so far, as OpenAI and vLLM count them) and its logit biases."""
        if not any(r.presence_penalty or r.frequency_penalty or r.logit_bias for r in self.rows):
            return scores
        scores = scores.clone()
        for i, row in enumerate(self.rows):
            if row.presence_penalty or row.frequency_penalty:
                counts = torch.bincount(input_ids[i, self.width:], minlength=scores.shape[1])[:scores.shape[1]]
                scores[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0)
            if row.logit_bias:
                ids = torch.tensor(list(row.logit_bias), device=scores.device)
                scores[i, ids] += torch.tensor(list(row.logit_bias.values()), device=scores.device)
        return scores

    @staticmethod
    def _generator(row: Row, device: torch.device) -> torch.Generator | None:
        if row.temperature == 0:
            return None
        generator = torch.Generator(device=device)
        if row.seed is None:
            generator.seed()
        else:
            generator.manual_seed(row.seed)
        return generator

    def token(self, step: int, i: int, token_id: int) -> Token:
        """Token ``token_id`` chosen for row ``i`` at ``step``, with the log-probs its row asked for."""
        recorded, k = self.steps[step], self.rows[i].logprobs
        if recorded is None or k is None:
            return Token(token_id)
        chosen, values, indices = recorded
        return Token(token_id, float(chosen[i]), tuple(zip(indices[i, :k].tolist(), values[i, :k].tolist())))


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``scores`` with the tokens outside the smallest set holding ``top_p`` of the mass removed."""
    if top_p >= 1:
        return scores
    ordered, order = scores.sort(descending=True)
    probs = ordered.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # always keeps the most likely token
    return scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))


class _RowLimits(StoppingCriteria):
    """Finishes each row at its own ``max_new_tokens``, or when its client is gone."""

    def __init__(self, rows: list[Row], width: int):
        self.rows = rows
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        produced = input_ids.shape[1] - self.width
        return torch.tensor([produced >= r.max_new_tokens or r.cancelled() for r in self.rows], device=input_ids.device)


class _RowStreamer(BaseStreamer):
    """Receives each step's tokens for the whole batch and passes on those of unfinished rows."""

    def __init__(self, rows: list[Row], stop_ids: set[int], decoding: _RowDecoding,
                 on_token: Callable[[int, Token], None]):
        self.rows = rows
        self.stop_ids = stop_ids
        self.decoding = decoding
        self.on_token = on_token
        self.done = [False] * len(rows)
        self.step = -1  # -1: generate hands over the prompt first

    def put(self, value: torch.Tensor) -> None:
        step, self.step = self.step, self.step + 1
        if step < 0:
            return
        for i, token in enumerate(value.tolist()):
            row = self.rows[i]
            if self.done[i]:
                continue
            if token in self.stop_ids:
                self.done[i], row.finish_reason = True, "stop"
                continue
            row.produced += 1
            self.on_token(i, self.decoding.token(step, i, token))
            if row.produced >= row.max_new_tokens or row.cancelled():
                self.done[i] = True

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_rows(model, rows: list[Row], *, pad_id: int, stop_ids: list[int],
                  on_token: Callable[[int, Token], None]) -> None:
    """Complete ``rows`` in one left-padded batch; ``on_token(row_index, token)`` is called for
    every generated token (stop tokens excluded) and each row's ``finish_reason`` is set."""
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=model.device)
    attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                             device=model.device)
    extra = {}
    if hasattr(model, "peft_config"):
        extra["adapter_names"] = [r.adapter or BASE_ADAPTER for r in rows]
    decoding = _RowDecoding(rows, width)
    # _RowDecoding leaves one token per row, so generate's greedy pick is the row's choice (and the
    # model's own sampling defaults stay out of the way)
    model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(r.max_new_tokens for r in rows),
                   do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id,
                   logits_processor=LogitsProcessorList([decoding]),
                   stopping_criteria=StoppingCriteriaList([_RowLimits(rows, width)]),
                   streamer=_RowStreamer(rows, set(stop_ids), decoding, on_token), **extra)


@dataclass(frozen=True)
class AnswerToken:
    """A token of the answer as sent: its text (a character split across tokens goes with the
    token that completes it), where that text starts in the answer, and its log-probs."""

    text: str
    offset: int
    logprob: float | None
    top: tuple[tuple[str, float], ...]  # the most likely tokens' texts and log-probs, best first


@dataclass
class Piece:
    """Answer text that may be sent now, and the tokens it completes."""

    text: str = ""
    tokens: list[AnswerToken] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.tokens)


class AnswerText:
    """One answer's tokens turned into text a client may be sent: whole characters only, cut
    before the first occurrence of any stop string, and held back while its end could still turn
    out to begin one."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the decoded answer so far, up to its last whole character
        self.tokens: list[tuple[Token, int, tuple[tuple[str, float], ...]]] = []  # token, offset, alternatives
        self.sent = 0  # characters handed out
        self.handed = 0  # tokens handed out
        self.stopped = False  # a stop string ended the answer

    @property
    def used(self) -> int:
        """Tokens generated for this answer (a stop string's included)."""
        return len(self.ids)

    def add(self, token: Token) -> Piece:
        """Take the next generated token; returns what may be sent now (nothing once stopped)."""
        if self.stopped:
            return Piece()
        self.tokens.append((token, len(self.text), tuple((self._alternative(t), lp) for t, lp in token.top)))
        self.ids.append(token.id)
        text = self.decode(self.ids)
        if not text.endswith("\ufffd"):  # otherwise half of a multi-byte character: wait for the rest
            self.text = text
        # no stop string starts in text already sent: that text was held back while it could
        hits = [i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0]
        if hits:
            self.stopped = True
            return self._upto(min(hits), final=True)
        return self._upto(len(self.text) - self._held())

    def finish(self) -> Piece:
        """The rest of the answer, once generation has ended."""
        return Piece() if self.stopped else self._upto(len(self.text), final=True)

    def _held(self) -> int:
        """The length of the longest end of the unsent text that begins a stop string."""
        longest = 0
        for s in self.stop:
            for start in range(max(self.sent, len(self.text) - len(s) + 1), len(self.text)):
                if s.startswith(self.text[start:]):
                    longest = max(longest, len(self.text) - start)
                    break
        return longest

    def _upto(self, end: int, *, final: bool = False) -> Piece:
        """Hand out the text up to ``end`` and the tokens it completes; ``final``: also the
        tokens that begin before ``end`` (a cut), or all (the end of generation)."""
        piece = Piece(self.text[self.sent:end] if end > self.sent else "")
        self.sent = max(self.sent, end)
        while self.handed < len(self.tokens):
            token, start, top = self.tokens[self.handed]
            after = self.tokens[self.handed + 1][1] if self.handed + 1 < len(self.tokens) else len(self.text)
            if final:
                if self.stopped and start >= end:  # only stop-string text from here on
                    break
            elif after > end:
                break
            piece.tokens.append(AnswerToken(self.text[start:min(after, end)], start, token.logprob, top))
            self.handed += 1
        return piece

    def _alternative(self, token_id: int) -> str:
        """The text ``token_id`` would have added at this point of the answer."""
        context = self.ids[-_CONTEXT_TOKENS:]
        before = self.decode(context)
        after = self.decode(context + [token_id])
        return after[len(before):] if after.startswith(before) else self.decode([token_id])

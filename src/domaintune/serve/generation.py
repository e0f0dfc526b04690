"""One ``generate`` call over rows that each bring their own adapter, length limit and sampling
settings, handing every new token to a callback as it is produced.

Rows of one batch may name different LoRA adapters of the same base: PEFT routes each row
through its own adapter when ``generate`` gets ``adapter_names=[...]`` (``"__base__"`` for the
plain base), so one forward pass serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass
class Row:
    """One prompt to complete."""

    prompt_ids: list[int]
    max_new_tokens: int
    adapter: str | None = None  # None: the base model
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    cancelled: Callable[[], bool] = lambda: False  # the client went away: stop early
    finish_reason: str = field(default="length", init=False)  # "stop" or "length", set by generate_rows
    produced: int = field(default=0, init=False)  # tokens generated, set by generate_rows


class _RowSampling(LogitsProcessor):
    """Per-row temperature and nucleus filtering; greedy rows keep only their argmax, so that
    greedy and sampled rows can share one sampled batch."""

    def __init__(self, rows: list[Row]):
        self.temperature = torch.tensor([max(r.temperature, 1e-6) for r in rows]).unsqueeze(1)
        self.top_p = torch.tensor([r.top_p for r in rows]).unsqueeze(1)
        self.greedy = torch.tensor([r.temperature == 0 for r in rows])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores / self.temperature
        ordered, order = scores.sort(dim=-1, descending=True)
        mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        drop = mass_before >= self.top_p  # always keeps the most likely token
        drop[self.greedy, 1:] = True
        return scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


class _RowLimits(StoppingCriteria):
    """Finishes each row at its own ``max_new_tokens``, or when its client is gone."""

    def __init__(self, rows: list[Row], width: int):
        self.rows = rows
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        produced = input_ids.shape[1] - self.width
        return torch.tensor([produced >= r.max_new_tokens or r.cancelled() for r in self.rows])


class _RowStreamer(BaseStreamer):
    """Receives each step's tokens for the whole batch and passes on those of unfinished rows."""

    def __init__(self, rows: list[Row], stop_ids: set[int], on_token: Callable[[int, int], None]):
        self.rows = rows
        self.stop_ids = stop_ids
        self.on_token = on_token
        self.done = [False] * len(rows)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for i, token in enumerate(value.tolist()):
            row = self.rows[i]
            if self.done[i]:
                continue
            if token in self.stop_ids:
                self.done[i], row.finish_reason = True, "stop"
                continue
            row.produced += 1
            self.on_token(i, token)
            if row.produced >= row.max_new_tokens or row.cancelled():
                self.done[i] = True

    def end(self) -> None:
        pass


@torch.no_grad()
def generate_rows(model, rows: list[Row], *, pad_id: int, stop_ids: list[int],
                  on_token: Callable[[int, int], None]) -> None:
    """Complete ``rows`` in one left-padded batch; ``on_token(row_index, token_id)`` is called for
    every generated token (stop tokens excluded) and each row's ``finish_reason`` is set."""
    width = max(len(r.prompt_ids) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
    attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
    extra = {}
    if hasattr(model, "peft_config"):
        extra["adapter_names"] = [r.adapter or BASE_ADAPTER for r in rows]
    sampled = any(r.temperature > 0 for r in rows)
    if sampled:
        # top_k=0 and neutral temperature/top_p switch off the model's own sampling defaults
        extra.update(logits_processor=LogitsProcessorList([_RowSampling(rows)]), temperature=1.0, top_k=0, top_p=1.0)
    model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(r.max_new_tokens for r in rows),
                   do_sample=sampled, eos_token_id=stop_ids, pad_token_id=pad_id,
                   stopping_criteria=StoppingCriteriaList([_RowLimits(rows, width)]),
                   streamer=_RowStreamer(rows, set(stop_ids), on_token), **extra)

"""Preference pairs for causal LMs: direct preference optimisation (DPO, Rafailov et al. 2023),
written out on the training loop like ``causal``.

A pair is a prompt (chat messages), a chosen answer and a rejected one. With log π(a) the summed
log-probability of an answer's tokens after the prompt (rendered with the chat template as in
``causal.tokenize_chat``: the answer and its end-of-turn token), the loss of a pair is

    −log σ(β · ((log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected))))

where π_ref is the model as it starts. Its log-probs are computed once, before training, and kept:
no second model is held while training, and a run resumed from a checkpoint keeps the same
reference. ``β`` sets how far the policy may move from the reference for a given margin.

``PreferencePhase`` is the form a run takes it in: ``start`` computes the reference on the model
as it starts, ``train`` runs DPO after the run's own supervised training (``pipeline.run``'s
``preference``, used by ``domaintune update``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from domaintune.data.examples import ChatExample
from domaintune.errors import DataError
from domaintune.train import distributed
from domaintune.train.batching import length_grouped_batches
from domaintune.train.causal import Tokenized, _batch, _token_losses, tokenize_chat
from domaintune.train.loop import LoopConfig, param_groups, seed_everything, train_loop
from domaintune.train.packing import IGNORE


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two answers to it, the chosen one better than the rejected one."""

    prompt: list[dict[str, str]]  # chat messages before the answer
    chosen: str
    rejected: str
    where: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # where it came from (source, reviewer)


@dataclass(frozen=True)
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized


@dataclass(frozen=True)
class Reference:
    """The reference model's summed answer log-probs, one per pair."""

    chosen: torch.Tensor
    rejected: torch.Tensor


def tokenize_pair(tokenizer, pair: PreferencePair, max_length: int) -> TokenizedPair:
    """Both chats of ``pair`` tokenised with the chat template, labels on the answer only."""
    def chat(answer: str) -> Tokenized:
        messages = [*pair.prompt, {"role": "assistant", "content": answer}]
        return tokenize_chat(tokenizer, ChatExample(messages, where=pair.where), max_length)

    return TokenizedPair(chat(pair.chosen), chat(pair.rejected))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean DPO loss over pairs, and each pair's reward margin
    β((π_c − ref_c) − (π_r − ref_r)) (positive: the policy prefers the chosen answer more than
    the reference does)."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margins).mean(), margins


def _pair_batch(pairs: list[TokenizedPair], pad_id: int) -> dict:
    """The chosen chats then the rejected ones, padded into one batch: one forward pass."""
    return _batch([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def _answer_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the answers of a ``_pair_batch``: (chosen, rejected)."""
    nll, mask = _token_losses(model, batch)
    logps = -(nll * mask).sum(1)
    half = logps.size(0) // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def answer_logprobs(model, tokenizer, pairs: list[TokenizedPair], batch_size: int = 8) -> Reference:
    """Summed log-probs of each pair's chosen and rejected answers under ``model`` (in eval mode)."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        c, r = _answer_logprobs(model, _pair_batch(pairs[start:start + batch_size], tokenizer.pad_token_id))
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    return Reference(torch.cat(chosen), torch.cat(rejected))


def preference_metrics(model, tokenizer, pairs: list[TokenizedPair], reference: Reference, beta: float,
                       batch_size: int = 8) -> dict[str, float]:
    """DPO loss, reward accuracy (share of pairs whose margin is positive) and mean reward margin
    of ``model`` on ``pairs``."""
    policy = answer_logprobs(model, tokenizer, pairs, batch_size)
    loss, margins = dpo_loss(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta)
    return {"loss": float(loss), "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean())}


def train_preference(model, tokenizer, pairs: list[TokenizedPair], *, beta: float, loop: LoopConfig,
                     batch_size: int, console: Console, reference: Reference | None = None,
                     description: str = "preference") -> list[dict]:
    """Train ``model`` with the DPO loss on ``pairs`` through ``train_loop`` (its schedule,
    accumulation, checkpoints and log) and return the loop's records.

    ``reference`` holds the reference log-probs of the pairs; without it they are computed from
    ``model`` as it is now, before training. Batches hold ``batch_size`` pairs of similar length.
    """
    if reference is None:
        reference = answer_logprobs(model, tokenizer, pairs, batch_size)
    seed_everything(loop.seed)
    lengths = [max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs]

    def batches_for_epoch(epoch: int) -> list[dict]:
        return [{**_pair_batch([pairs[i] for i in idx], tokenizer.pad_token_id), "pair": torch.tensor(idx)}
                for idx in length_grouped_batches(lengths, batch_size, loop.seed + epoch)]

    def loss_fn(m, batch: dict) -> tuple[torch.Tensor, int]:
        chosen, rejected = _answer_logprobs(m, batch)
        index = batch["pair"]
        loss, _ = dpo_loss(chosen, rejected, reference.chosen[index].to(chosen.device),
                           reference.rejected[index].to(rejected.device), beta)
        return loss, int(batch["attention_mask"].sum())

    groups = param_groups(model.named_parameters(), loop.weight_decay)
    return train_loop(model, groups, batches_for_epoch, loss_fn, loop, console, description)


class PreferencePhase:
    """DPO on ``pairs`` as a phase of a run: ``start`` takes the reference from the model as the
    run starts it (before any training), ``train`` runs after the run's supervised training and
    leaves in ``loop.run_dir`` its ``train_log.jsonl``, the ``pairs.jsonl`` it trained on and a
    ``summary.json`` (β, the pairs, and loss, reward accuracy and margin before and after)."""

    def __init__(self, pairs: list[PreferencePair], *, beta: float, batch_size: int, max_length: int):
        if not pairs:
            raise ValueError("a preference phase needs at least one pair")
        self.pairs = pairs
        self.beta = beta
        self.batch_size = batch_size
        self.max_length = max_length
        self._tokenized: list[TokenizedPair] = []
        self._reference: Reference | None = None

    def start(self, model, tokenizer, console: Console) -> None:
        """Tokenise the pairs and compute the reference log-probs on ``model`` as it is now."""
        tokenized = [(p, tokenize_pair(tokenizer, p, self.max_length)) for p in self.pairs]
        # an answer cut off entirely by max_length has no tokens to prefer
        kept = [(p, t) for p, t in tokenized if _has_answer(t.chosen) and _has_answer(t.rejected)]
        if len(kept) < len(tokenized):
            console.print(f"[yellow]{len(tokenized) - len(kept)} preference pairs dropped: an answer starts after "
                          f"training.max_seq_length={self.max_length} tokens[/]")
        if not kept:
            raise DataError("no preference pair has both answers within training.max_seq_length tokens",
                            hint="raise training.max_seq_length")
        self.pairs = [p for p, _ in kept]
        self._tokenized = [t for _, t in kept]
        self._reference = answer_logprobs(model, tokenizer, self._tokenized, self.batch_size)

    def train(self, model, tokenizer, loop: LoopConfig, console: Console) -> list[dict]:
        """Run DPO on ``model`` (after ``start``) and write the phase's files into ``loop.run_dir``."""
        if self._reference is None:
            raise RuntimeError("PreferencePhase.train before start: the reference must be the model as it starts")
        before = self._metrics(model, tokenizer)
        log = train_preference(model, tokenizer, self._tokenized, beta=self.beta, loop=loop,
                               batch_size=self.batch_size, console=console, reference=self._reference)
        summary = {"beta": self.beta, "pairs": len(self.pairs), "steps": len(log), "before": before,
                   "after": self._metrics(model, tokenizer)}
        if loop.run_dir is not None and distributed.is_main():  # under torchrun, rank 0 writes the run
            shutil.rmtree(loop.run_dir / "checkpoints", ignore_errors=True)  # they serve a resume only
            with open(loop.run_dir / "pairs.jsonl", "w", encoding="utf-8") as fh:
                for p in self.pairs:
                    fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                         "where": p.where, **p.meta}, ensure_ascii=False) + "\n")
            (loop.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        console.print(f"preference: {len(self.pairs)} pairs, reward accuracy {before['reward_accuracy']:.2f} → "
                      f"{summary['after']['reward_accuracy']:.2f}, DPO loss {before['loss']:.3f} → "
                      f"{summary['after']['loss']:.3f}")
        return log

    def _metrics(self, model, tokenizer) -> dict[str, float]:
        return preference_metrics(model, tokenizer, self._tokenized, self._reference, self.beta, self.batch_size)


def _has_answer(row: Tokenized) -> bool:
    return any(label != IGNORE for label in row.labels)


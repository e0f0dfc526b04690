"""Causal language models: supervised fine-tuning on chats (loss on the answers only) and
continued pretraining on raw text; greedy generation and perplexity for evaluation."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from domaintune.data.examples import ChatExample
from domaintune.errors import DataError
from domaintune.train import distributed, fsdp
from domaintune.train.batching import length_grouped_batches, pad_right
from domaintune.train.loop import LoopConfig, param_groups, seed_everything, train_loop
from domaintune.train.packing import IGNORE, pack_rows, packing_honoured, row_attention
from domaintune.train.speed import SpeedPlan, decoder_layers, hidden_and_head, linear_cross_entropy

# Used only when a tokenizer has no chat template of its own (plain base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE outside the tokens the loss is taken on


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(tokenizer, example: ChatExample, max_length: int) -> Tokenized:
    """Token ids of the whole chat and labels that keep only the assistant turns (with their
    end-of-turn token, so that the model learns to stop)."""
    messages = example.messages
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(before) or not full.startswith(through):
            raise DataError(
                "the chat template does not render this conversation turn by turn, so the answer tokens cannot be found",
                where=example.where,
            )
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [
        token if any(start <= lo < end for start, end in spans) else IGNORE
        for token, (lo, _hi) in zip(ids, offsets)
    ]
    return Tokenized(ids[:max_length], labels[:max_length])


def prompt_ids(tokenizer, example: ChatExample) -> list[int]:
    text = render(tokenizer, example.prompt_messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def pack_text(tokenizer, texts: list[str], block: int) -> list[Tokenized]:
    """Continued pretraining: texts joined with EOS and cut into blocks of ``block`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    blocks = [stream[i:i + block] for i in range(0, len(stream), block)]
    return [Tokenized(b, list(b)) for b in blocks if len(b) > 1]


def _batch(rows: list[Tokenized], pad_id: int) -> dict:
    input_ids = pad_right([r.input_ids for r in rows], pad_id)
    attention = pad_right([[1] * len(r.input_ids) for r in rows], 0)
    labels = pad_right([r.labels for r in rows], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _pack(rows: list[Tokenized]) -> dict:
    batch = pack_rows([r.input_ids for r in rows], [r.labels for r in rows])
    batch["real_tokens"] = torch.tensor(sum(len(r.input_ids) for r in rows))
    return batch


def _prompt_learning(model) -> bool:
    """Prompt and prefix tuning put learned positions before each row: rows cannot be packed."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def _virtual_tokens(model) -> int:
    """How many positions prompt tuning puts before the input (its logits cover them too)."""
    config = getattr(model, "active_peft_config", None)
    return config.num_virtual_tokens if config is not None and config.peft_type == "PROMPT_TUNING" else 0


def _token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled tokens, and their mask. ``batch`` is
    padded (with ``attention_mask``) or packed (with ``position_ids``, see ``packing``).

    Logits are computed only at the positions where some row of the batch has a label: for sft
    that is the answers, a fraction of each sequence, and the vocabulary projection is the
    largest single matrix product of a small model.
    """
    batch = {k: v.to(model.device) for k, v in batch.items()}  # a quantised model sits on the GPU
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    keep = mask.any(0).nonzero().squeeze(1)
    full = len(keep) == targets.size(1)
    offset = _virtual_tokens(model)
    logits = model(**_model_inputs(batch), logits_to_keep=0 if full else keep + offset).logits
    logits = logits[:, offset:-1] if full else logits
    targets, mask = (targets, mask) if full else (targets[:, keep], mask[:, keep])
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view_as(targets)
    return nll, mask


def _model_inputs(batch: dict) -> dict:
    if "position_ids" in batch:  # packed; transformers reads the restarts as row boundaries only without a cache
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _fused_loss(decoder, head, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed NLL of the labelled tokens, and their count, from the decoder's hidden states
    and the head's weight (``speed.linear_cross_entropy``): no logits are materialised."""
    batch = {k: v.to(head.weight.device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    hidden = decoder(**_model_inputs(batch)).last_hidden_state[:, :-1]
    return linear_cross_entropy(hidden[mask], head.weight, targets[mask]), mask.sum()


def train_causal(model, tokenizer, rows: list[Tokenized], *, loop: LoopConfig, batch_size: int,
                 console: Console, description: str, eval_rows: list[Tokenized] | None = None,
                 packing: bool = True, speed: SpeedPlan = SpeedPlan()) -> list[dict]:
    """Fine-tune on ``rows`` with next-token cross-entropy over the labelled tokens; with
    ``eval_rows``, ``loop.eval_every`` measures the same loss on them.

    Batches hold ``batch_size`` rows of similar length. With ``packing`` each batch is laid end
    to end as one sequence instead of padded (see ``packing``), unless the method or the
    architecture cannot keep packed rows apart, or the rows differ in length where the plan says
    not to pack those (``SpeedPlan.pack_mixed_lengths``: off on a GPU without a variable-length attention kernel). Under torchrun each process takes its share of
    the rows of every batch. ``speed`` says how the forward pass and the loss run (see ``speed``);
    the model is already on its device.
    """
    seed_everything(loop.seed)
    packing = packing and not _prompt_learning(model)
    with row_attention(model) if packing else nullcontext():
        if packing and not _keeps_rows_apart(model, rows, speed):
            console.print("[yellow]this architecture lets packed rows attend to each other: training on padded batches[/]")
            packing = False
        return _train(model, tokenizer, rows, loop, batch_size, console, description, eval_rows, packing, speed)


def _keeps_rows_apart(model, rows: list[Tokenized], speed: SpeedPlan) -> bool:
    """``packing_honoured`` on the first two rows; under FSDP rank 0's answer, for the other
    processes may hold no weights to try it with."""
    tries_here = not speed.fsdp or distributed.is_main()
    answer = packing_honoured(model, [r.input_ids for r in rows[:2]]) if tries_here else None
    return distributed.from_main(answer) if speed.fsdp else answer


def _train(model, tokenizer, rows: list[Tokenized], loop: LoopConfig, batch_size: int, console: Console,
           description: str, eval_rows: list[Tokenized] | None, packing: bool, speed: SpeedPlan) -> list[dict]:
    lengths = [len(r.input_ids) for r in rows]
    trained = model
    if speed.fsdp and distributed.world_size() > 1:  # every shard is cut from rank 0's weights
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        trained = fsdp.shard(model, decoder_layers(base), speed.device, bf16=speed.bf16)
    fused = hidden_and_head(trained) if speed.fused_loss else None

    def batches_for_epoch(epoch: int) -> list[dict]:
        batches = []
        for idx in length_grouped_batches(lengths, batch_size, loop.seed + epoch):
            mine = [rows[i] for i in distributed.shard(idx)]
            # A process left without rows (a last batch smaller than the number of processes) still
            # runs one, weighted 0: under FSDP every forward pass is collective.
            held = mine or [rows[idx[0]]]
            pack = packing and (speed.pack_mixed_lengths or len({len(r.input_ids) for r in held}) == 1)
            batch = _pack(held) if pack else _batch(held, tokenizer.pad_token_id)
            batches.append({**batch, "counts": bool(mine)})
        return batches

    def loss_fn(m, batch: dict) -> tuple[torch.Tensor, int]:
        # The loss is the mean over the labelled tokens of the whole batch, in every process:
        # each sums its own and divides by the count over all of them (gradients are then averaged).
        batch = dict(batch)
        counts = batch.pop("counts")
        with speed.autocast():
            if fused is not None:
                total, count = _fused_loss(*fused, batch)
            else:
                nll, mask = _token_losses(m, batch)
                total, count = (nll * mask).sum(), mask.sum()
        if not counts:
            return total * 0.0, int(distributed.all_sum(0))
        labelled = distributed.all_sum(int(count)) / distributed.world_size()
        tokens = batch["real_tokens"] if "real_tokens" in batch else batch["attention_mask"].sum()
        return total / max(1.0, labelled), int(tokens)

    def eval_loss(m) -> float:
        with speed.autocast():
            return math.log(perplexity(m, tokenizer, eval_rows, batch_size)[0])

    groups = param_groups(trained.named_parameters(), loop.weight_decay)
    log = train_loop(trained, groups, batches_for_epoch, loss_fn, loop, console, description,
                     eval_loss=eval_loss if eval_rows else None)
    if trained is not model:  # every process gathers; the caller's model gets the whole weights
        fsdp.gather_into(model, trained)
    return log


@torch.no_grad()
def perplexity(model, tokenizer, rows: list[Tokenized], batch_size: int = 8) -> tuple[float, list[float]]:
    """Perplexity over all labelled tokens, and the mean NLL of each row."""
    model.eval()
    total, count, per_row = 0.0, 0, [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        nll, mask = _token_losses(model, _batch([rows[i] for i in idx], tokenizer.pad_token_id))
        nll = nll * mask
        total += float(nll.sum())
        count += int(mask.sum())
        for j, i in enumerate(idx):
            per_row[i] = float(nll[j].sum() / mask[j].sum().clamp(min=1))
    return math.exp(total / max(1, count)), per_row


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             console: Console, description: str, stop_when=None) -> list[str]:
    """Greedy completions of token-id prompts, batched with left padding. ``stop_when(width)``,
    given the padded prompt width of a batch, makes a transformers stopping criterion for it
    (besides EOS)."""
    from transformers import StoppingCriteriaList

    from domaintune.progress import Progress

    model.eval()
    outputs = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=model.device)
            attention = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx],
                                     device=model.device)
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([stop_when(width)]) if stop_when else None)
            for j, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[j, width:], skip_special_tokens=True).strip()
            progress.advance(bar, len(idx))
    return outputs


def save_causal(model, tokenizer, directory: Path) -> None:
    """Write the adapter (PEFT methods) or the whole model (full), with the tokenizer and its chat template."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_causal(directory: Path, base_loader):
    """Reload a saved run's model: the adapter on ``base_loader()``, or the full model."""
    from transformers import AutoModelForCausalLM

    if (directory / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(base_loader(), directory).eval()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()

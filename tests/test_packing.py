"""Packed batches: rows laid end to end must train exactly as the same rows padded, or alone."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from domaintune.data.examples import ChatExample
from domaintune.train.causal import IGNORE, Tokenized, _batch, _pack, _token_losses, tokenize_chat, train_causal
from domaintune.train.loop import LoopConfig
from domaintune.train.packing import pack_rows, packing_honoured, row_attention


def test_positions_restart_and_the_first_token_of_each_row_is_never_a_target():
    batch = pack_rows([[5, 6, 7], [8, 9], [1, 2, 3, 4]], [[5, 6, 7], [IGNORE, 9], [1, 2, 3, 4]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, 2, 3, 4]]


def _chats(tokenizer, n: int = 7) -> list[Tokenized]:
    things = ["apple", "sky", "grass", "snow", "coal", "sun"]
    rows = []
    for i in range(n):
        prompt = " ".join(["please", "help", "with"] * (i % 4) + ["what", "is", "the", "colour", "of", things[i % 6], "?"])
        answer = " ".join(["red", "blue", "green"][: 1 + i % 3] + ["."])
        example = ChatExample(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                              where=f"row {i}")
        rows.append(tokenize_chat(tokenizer, example, 64))
    return rows


@pytest.fixture()
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def _row_losses_alone(model, rows: list[Tokenized]) -> list[torch.Tensor]:
    out = []
    for r in rows:
        logits = model(input_ids=torch.tensor([r.input_ids])).logits[0, :-1]
        out.append(F.cross_entropy(logits, torch.tensor(r.labels[1:]), ignore_index=IGNORE, reduction="sum"))
    return out


@pytest.mark.parametrize("per_row, same_length", [(False, False), (True, False), (True, True)],
                         ids=["block-diagonal mask", "row attention", "row attention, rows of one length"])
def test_a_packed_batch_gives_each_row_the_loss_it_has_alone(llama, per_row, same_length):
    model, tokenizer = llama
    rows = _chats(tokenizer)
    if same_length:  # one batched attention call instead of one per row
        shortest = min(len(r.input_ids) for r in rows)
        rows = [Tokenized(r.input_ids[:shortest], r.input_ids[:shortest]) for r in rows]
    else:
        assert len({len(r.input_ids) for r in rows}) > 3
    packed = pack_rows([r.input_ids for r in rows], [r.labels for r in rows])
    with torch.no_grad(), row_attention(model) if per_row else nullcontext() as switched:
        assert switched is not False or not per_row
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    nll = F.cross_entropy(logits[:-1], packed["labels"][0, 1:], ignore_index=IGNORE, reduction="none")
    with torch.no_grad():
        alone = _row_losses_alone(model, rows)
    start = 0
    for r, loss in zip(rows, alone):
        end = start + len(r.input_ids)
        assert float(nll[start:end - 1].sum()) == pytest.approx(float(loss), abs=1e-5)
        start = end


def test_row_attention_is_switched_off_after_training(llama):
    model, _ = llama
    with row_attention(model) as switched:
        assert switched and model.config._attn_implementation != "sdpa"
    assert model.config._attn_implementation == "sdpa"


def test_packed_and_padded_batches_give_the_same_training_loss(llama):
    model, tokenizer = llama
    rows = _chats(tokenizer)
    with torch.no_grad():
        losses = []
        for batch, per_row in ((_batch(rows, tokenizer.pad_token_id), False), (_pack(rows), False), (_pack(rows), True)):
            with row_attention(model) if per_row else nullcontext():
                nll, mask = _token_losses(model, batch)
            losses.append(float((nll * mask).sum() / mask.sum()))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)


def test_the_guard_accepts_llama_and_rejects_a_model_that_lets_rows_mix(llama):
    model, tokenizer = llama
    rows = [r.input_ids for r in _chats(tokenizer)]
    assert packing_honoured(model, rows)
    with row_attention(model):
        assert packing_honoured(model, rows)

    class IgnoresPositions(torch.nn.Module):  # attention over the whole packed sequence
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    assert not packing_honoured(IgnoresPositions(model), rows)


def test_training_on_packed_batches_ends_at_the_same_weights_as_on_padded_ones(tiny_llama, llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, tokenizer = llama
    rows = _chats(tokenizer, n=12)
    trained = []
    for packing in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "v_proj", "down_proj"]))
        loop = LoopConfig(epochs=2, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0,
                          seed=0, checkpoint_every=0)
        log = train_causal(model, tokenizer, rows, loop=loop, batch_size=4, console=Console(quiet=True),
                           description="train", packing=packing)
        trained.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, log))
    (padded, padded_log), (packed, packed_log) = trained
    assert [r["loss"] for r in packed_log] == pytest.approx([r["loss"] for r in padded_log], abs=1e-5)
    assert padded_log[0]["loss"] != pytest.approx(padded_log[-1]["loss"], abs=1e-3)  # it did train
    for name, weight in padded.items():
        assert torch.allclose(packed[name], weight, atol=1e-5), name

"""Packed batches: rows laid end to end must train exactly as the same rows padded, or alone."""

from __future__ import annotations

import functools
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


def _segments_attention(query, key, value, cu, causal: bool, scale: float | None = None):
    """Variable-length attention done row by row with SDPA: (length, heads, head_dim) in and out."""
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        if k.shape[0] != q.shape[0]:
            k, v = k.repeat_interleave(q.shape[0] // k.shape[0], 0), v.repeat_interleave(q.shape[0] // k.shape[0], 0)
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(out)


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1], "torch 2.10's kernel takes as many key heads as query heads"
    return _segments_attention(query, key, value, cu_seq_q, is_causal)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False):
    assert enable_gqa or key.shape[1] == query.shape[1]
    return _segments_attention(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


@pytest.mark.parametrize("kernel", [varlen_2_10, varlen_2_13], ids=["torch 2.10 signature", "torch 2.13 signature"])
def test_rows_of_mixed_lengths_go_through_the_variable_length_kernel_in_one_call(llama, monkeypatch, kernel):
    # The kernel itself runs on CUDA only: here a row-by-row stand-in with each release's
    # signature checks what is handed to it (layout, boundaries, causality, key/value heads).
    from torch.nn.attention import varlen

    from domaintune.train import packing

    calls = []

    @functools.wraps(kernel)  # the signature is what tells the releases apart
    def counted(*args, **kwargs):
        calls.append(args[3].tolist())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_attn", counted)
    packing._torch_varlen.cache_clear()
    monkeypatch.setattr(packing, "_varlen_kernel", lambda query, options: packing._torch_varlen())
    model, tokenizer = llama
    rows = _chats(tokenizer)
    packed = pack_rows([r.input_ids for r in rows], [r.labels for r in rows])
    try:
        with torch.no_grad(), row_attention(model):
            logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
    finally:
        packing._torch_varlen.cache_clear()
    bounds = [0, *torch.tensor([len(r.input_ids) for r in rows]).cumsum(0).tolist()]
    assert calls == [bounds] * model.config.num_hidden_layers
    nll = F.cross_entropy(logits[:-1], packed["labels"][0, 1:], ignore_index=IGNORE, reduction="none")
    with torch.no_grad():
        alone = _row_losses_alone(model, rows)
    for (start, end), loss in zip(zip(bounds, bounds[1:]), alone):
        assert float(nll[start:end - 1].sum()) == pytest.approx(float(loss), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_variable_length_kernel_on_a_gpu_matches_rows_alone(llama):
    from domaintune.train import packing

    if packing._torch_varlen() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    model, tokenizer = llama
    model = model.to("cuda", torch.bfloat16)
    rows = _chats(tokenizer)
    packed = pack_rows([r.input_ids for r in rows], [r.labels for r in rows])
    with torch.no_grad(), row_attention(model):
        logits = model(input_ids=packed["input_ids"].cuda(), position_ids=packed["position_ids"].cuda(),
                       use_cache=False).logits[0].float()
        start = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r.input_ids], device="cuda")).logits[0].float()
            assert (logits[start:start + len(r.input_ids)] - alone).abs().max() < 0.05 * alone.abs().max()
            start += len(r.input_ids)

"""train/fused_lora.py: LoRA's forward folded into one addmm computes what PEFT's does."""

from __future__ import annotations

from contextlib import nullcontext

import peft
import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from conftest import run_bench
from transformers import LlamaConfig, LlamaForCausalLM

from domaintune.train.dropout import sparse_dropout
from domaintune.train.fused_lora import fused_lora
from domaintune.train.speed import accelerated, cpu_plan

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(**lora) -> peft.PeftModel:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(
        **{"r": 4, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": TARGETS, **lora}))
    with torch.no_grad():  # B starts at zero, which would hide a wrong product
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _loss_and_grads(model, dropout_seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad()
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(dropout_seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse", [False, True], ids=["nn.Dropout", "SparseDropout"])
def test_fused_forward_gives_peft_s_loss_and_gradients_with_the_same_dropout(sparse):
    model = _model()
    with sparse_dropout(model) if sparse else nullcontext():
        peft_loss, peft_grads = _loss_and_grads(model, dropout_seed=7)
        with fused_lora(model):
            fused_loss, fused_grads = _loss_and_grads(model, dropout_seed=7)
            other_loss, _ = _loss_and_grads(model, dropout_seed=8)
    assert len(peft_grads) == 2 * 2 * len(TARGETS)  # A and B of every target in both layers
    torch.testing.assert_close(fused_loss, peft_loss)
    assert fused_grads.keys() == peft_grads.keys()
    for name in peft_grads:
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-6)
    assert other_loss != fused_loss  # dropout is really on: another seed, other masks


def test_plain_lora_layers_skip_peft_s_forward_inside_and_get_it_back_after(monkeypatch):
    model = _model()
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fused_lora(model):
        model(input_ids=torch.randint(0, 64, (2, 5)))
        assert calls == []  # all 14 layers took the fused path
        with model.disable_adapter():  # switched off: PEFT's forward, which runs the base alone
            model(input_ids=torch.randint(0, 64, (2, 5)))
        assert len(calls) == 2 * len(TARGETS)
    assert not any("forward" in vars(m) for m in model.modules())
    model(input_ids=torch.randint(0, 64, (2, 5)))
    assert len(calls) == 2 * 2 * len(TARGETS)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_dora_keeps_peft_s_forward(monkeypatch):
    model = _model(use_dora=True)
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with fused_lora(model):
        assert not any("forward" in vars(m) for m in model.modules())
        model(input_ids=torch.randint(0, 64, (2, 5)))
    assert len(calls) == 2 * len(TARGETS)


def test_the_cpu_plan_fuses_lora_while_training_unless_speed_is_off():
    model = _model()
    assert cpu_plan("auto").fused_lora and not cpu_plan("off").fused_lora
    with accelerated(model, cpu_plan("auto")):
        assert sum("forward" in vars(m) for m in model.modules()) == 2 * len(TARGETS)
    with accelerated(model, cpu_plan("off")):
        assert not any("forward" in vars(m) for m in model.modules())


def test_the_lora_benchmark_runs_both_ways():
    """bench/lora_cpu.py on a random 2-layer Llama (its numbers are in bench/README.md)."""
    stdout, rows = run_bench("lora_cpu.py", "--tiny", "--repeats", "1")
    assert {"PEFT", "fused"} <= rows and "fused / PEFT:" in stdout, stdout


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_under_autocast_float32_adapters_on_a_bfloat16_base_fuse_and_write_less(device, monkeypatch):
    """As a GPU trains: PEFT casts each layer's input to float32 and autocast casts it back; the
    fused forward lets autocast cast only the adapter weights. Same loss and gradients within
    bfloat16 rounding, every layer fused, less written and less kept for backward."""
    bench = _bench("lora_saved")
    model = bench.build("tiny", device)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)

    def run(fused: bool):
        loss, kept, written = bench.step(model, ids, fused, count=True)
        return loss, kept, written, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    peft_loss, peft_kept, peft_written, peft_grads = run(False)
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    fused_loss, fused_kept, fused_written, fused_grads = run(True)
    assert calls == []  # no layer fell back to PEFT's forward
    assert fused_loss == pytest.approx(peft_loss, rel=1e-2)
    assert fused_grads.keys() == peft_grads.keys() and len(peft_grads) == 2 * 2 * len(TARGETS)
    for name, grad in peft_grads.items():
        assert float((fused_grads[name] - grad).norm() / grad.norm()) < 0.05, name
    assert fused_written < 0.8 * peft_written and fused_kept < peft_kept


def test_mixed_dtypes_outside_autocast_keep_peft_s_forward(monkeypatch):
    model = _bench("lora_saved").build("tiny", "cpu")  # a bfloat16 base, float32 adapters
    calls = []
    original = LoraLinear.forward
    monkeypatch.setattr(LoraLinear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with fused_lora(model), torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 5)))
    assert len(calls) == 2 * len(TARGETS)


def test_the_autocast_benchmark_runs_both_ways():
    """bench/lora_saved.py on a small shape (its 1B-shaped numbers are in bench/README.md)."""
    stdout, rows = run_bench("lora_saved.py", "--tiny", "--device", "cpu")
    assert {"PEFT", "fused"} <= rows and "written, fused / PEFT:" in stdout, stdout

"""train.dropout: masks drawn from the gaps between dropped positions are dropout's masks."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from domaintune.train.dropout import SparseDropout, dropped_positions, sparse_dropout
from domaintune.train.speed import SpeedPlan, accelerated, plan_speed


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_each_position_is_dropped_with_probability_p_independently_of_the_others(p):
    torch.manual_seed(0)
    n, masks = 1000, 400
    dropped = torch.zeros(masks, n, dtype=torch.bool)
    for i in range(masks):
        positions = dropped_positions(n, p)
        assert positions.numel() == 0 or (positions.diff() > 0).all() and 0 <= int(positions[0]) and int(positions[-1]) < n
        dropped[i, positions] = True
    per_position = dropped.float().mean(0)  # each position, over the masks
    sd = (p * (1 - p) / masks) ** 0.5
    assert abs(float(per_position.mean()) - p) < 4 * sd / n ** 0.5
    assert float((per_position - p).abs().max()) < 5 * sd  # the first and the last positions too
    # neighbours and far pairs are both dropped with probability p², as independence asks
    for gap in (1, 7, 500):
        both = (dropped[:, :-gap] & dropped[:, gap:]).float().mean()
        assert abs(float(both) - p * p) < 0.02 * p + 0.002
    # the count per mask has the binomial's spread
    counts = dropped.float().sum(1)
    assert abs(float(counts.var()) / (n * p * (1 - p)) - 1) < 0.25


def test_dropout_zeroes_the_drawn_positions_and_scales_the_rest_forward_and_backward():
    x = torch.randn(64, 48, requires_grad=True)
    layer = SparseDropout(0.3)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    positions = dropped_positions(x.numel(), 0.3)
    kept = torch.ones(x.numel(), dtype=torch.bool)
    kept[positions] = False
    kept = kept.view_as(x)
    assert torch.equal(y == 0, ~kept | (x == 0))
    assert torch.allclose(y[kept], x[kept] / 0.7)
    grad = torch.randn_like(x)
    y.backward(grad)
    assert torch.allclose(x.grad, torch.where(kept, grad / 0.7, 0.0))


def test_dropout_passes_inputs_through_in_eval_mode_at_p_0_and_when_empty():
    x = torch.randn(5, 7)
    assert SparseDropout(0.5).eval()(x) is x
    assert SparseDropout(0.0)(x) is x
    assert SparseDropout(0.5)(torch.empty(0, 3)).shape == (0, 3)
    t = torch.randn(6, 4).t()  # not contiguous
    assert SparseDropout(0.5)(t).shape == (4, 6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparseDropout(1.0)


def test_the_same_seed_draws_the_same_mask():
    x = torch.ones(300, 20)
    torch.manual_seed(3)
    a = SparseDropout(0.1)(x)
    torch.manual_seed(3)
    b = SparseDropout(0.1)(x)
    torch.manual_seed(4)
    c = SparseDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _lora_model() -> peft.PeftModel:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, lora_dropout=0.1,
                                                                          target_modules=["q_proj", "v_proj"]))


def test_auto_on_the_cpu_swaps_loras_dropout_while_training_and_puts_it_back():
    model = _lora_model()
    originals = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert len(originals) == 4  # q and v of 2 layers
    plan = plan_speed("auto", "llama", "lora")
    assert plan.sparse_dropout == (plan.device == "cpu")
    with accelerated(model, SpeedPlan(sparse_dropout=True)):
        inside = [m for m in model.modules() if isinstance(m, SparseDropout)]
        assert len(inside) == 4 and {m.p for m in inside} == {0.1}
        assert not any(type(m) is torch.nn.Dropout for m in model.modules())
        model.train()
        out = model(input_ids=torch.randint(0, 64, (2, 9)), labels=torch.randint(0, 64, (2, 9)))
        out.loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        model.eval()
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == originals
    assert all(not m.training for m in originals)  # the mode set inside is kept
    assert not any(isinstance(m, SparseDropout) for m in model.modules())
    with accelerated(model, plan_speed("off", "llama", "lora")):  # off keeps nn.Dropout
        assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == originals
    with sparse_dropout(model):
        state = model.state_dict()
    assert state.keys() == model.state_dict().keys()  # dropout holds no state to save


def test_the_dropout_benchmark_runs_both_ways():
    """bench/dropout_cpu.py on small shapes and a random BERT (its numbers are in bench/README.md)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "dropout_cpu.py"
    done = subprocess.run([sys.executable, str(bench), "--tiny", "--repeats", "2"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line.endswith("x |")]
    assert len(rows) == 3 and "(20 dropouts)" in rows[2], done.stdout

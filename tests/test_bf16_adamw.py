"""train/bf16_adamw.py: AdamW whose bfloat16 weights are rounded back stochastically."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from conftest import run_bench
from transformers import LlamaConfig, LlamaForCausalLM

from domaintune.train import bf16_adamw
from domaintune.train.bf16_adamw import BF16AdamW, round_stochastically


def test_float32_weights_follow_torch_s_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]  # noqa: E731
    a, b = BF16AdamW(groups(ours), lr=1e-2), torch.optim.AdamW(groups(theirs), lr=1e-2)
    for step in range(6):
        for opt in (a, b):
            opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = 1e-2 / (step + 1)  # as a schedule sets it
        grads = [torch.randn_like(w) for w in weights]
        for ps in (ours, theirs):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        a.step(), b.step()
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rounding_keeps_the_expected_value_and_lands_on_a_neighbour(sign):
    index = torch.arange(200_000)
    value = torch.full((200_000,), sign * (1.0 + 2 ** -10))  # a quarter of the way to bfloat16's next value
    out = round_stochastically(value, index, torch.tensor(5))
    assert set(out.float().unique().tolist()) == {sign * 1.0, sign * (1.0 + 2 ** -7)}
    assert float(out.float().mean()) == pytest.approx(sign * (1.0 + 2 ** -10), abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 1.0 + 2 ** -7])  # bfloat16 values stay as they are
    assert round_stochastically(exact, torch.arange(3), torch.tensor(1)).float().tolist() == exact.tolist()
    again = round_stochastically(value, index, torch.tensor(5))
    assert torch.equal(out, again) and not torch.equal(out, round_stochastically(value, index, torch.tensor(6)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_small_steps_move_bfloat16_weights_that_nearest_rounding_freezes(device):
    """A norm weight of 1.0 with a steady gradient: each AdamW step is about lr = 5e-5, a
    hundredth of bfloat16's spacing at 1.0 (2^-7)."""
    def after(optimizer_class, steps: int = 400) -> torch.Tensor:
        weight = torch.ones(4096, dtype=torch.bfloat16, device=device, requires_grad=True)
        optimizer = optimizer_class([weight], lr=5e-5, weight_decay=0.0)
        for _ in range(steps):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        return weight.detach().float()

    assert torch.equal(after(torch.optim.AdamW).cpu(), torch.ones(4096))  # nearest rounding: no step ever lands
    moved = after(BF16AdamW).cpu()
    assert float(moved.mean()) == pytest.approx(1 - 400 * 5e-5, abs=2e-3)  # the float32 trajectory, on average


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _markov_batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, 256, (256, 4), generator=g)
    batches = []
    for _ in range(n):
        seq = [torch.randint(0, 256, (8,), generator=g)]
        for _ in range(47):
            seq.append(successors[seq[-1], torch.randint(0, 4, (8,), generator=g)])
        batches.append(torch.stack(seq, 1))
    return batches


def _train(model, optimizer, batches) -> float:
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model = copy.deepcopy(model).float()
        return sum(float(model(input_ids=ids, labels=ids).loss) for ids in batches[:10]) / 10


def test_full_fine_tuning_in_bfloat16_learns_like_float32():
    """The default full fine-tuning learning rate (5e-5) on bfloat16 weights: torch's AdamW falls
    behind float32 training; stochastic rounding keeps up."""
    batches = _markov_batches(120)
    base = _llama()
    fp32 = copy.deepcopy(base)
    loss32 = _train(fp32, torch.optim.AdamW(fp32.parameters(), lr=5e-5), batches)
    nearest = copy.deepcopy(base).to(torch.bfloat16)
    loss_nearest = _train(nearest, torch.optim.AdamW(nearest.parameters(), lr=5e-5), batches)
    stochastic = copy.deepcopy(base).to(torch.bfloat16)
    loss_stochastic = _train(stochastic, BF16AdamW(stochastic.parameters(), lr=5e-5), batches)
    start = _train(copy.deepcopy(base), torch.optim.SGD(base.parameters(), lr=0.0), batches[:10])
    # measured: 5.551 before; float32 5.294, nearest 5.427, stochastic 5.294
    assert loss32 < start - 0.2  # float32 training learns something in these steps
    assert loss_stochastic == pytest.approx(loss32, abs=0.03)
    assert loss_nearest > loss32 + 0.08


def test_a_resumed_optimiser_rounds_as_an_uninterrupted_one(monkeypatch):
    monkeypatch.setattr(bf16_adamw, "CHUNK", 100)  # the chunked path too: the weight has 256 elements
    torch.manual_seed(0)
    grads = [torch.randn(16, 16) for _ in range(6)]

    def run(resume_at: int | None = None, seed: int = 7) -> torch.Tensor:
        weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).requires_grad_()
        optimizer = BF16AdamW([weight], lr=1e-3, seed=seed)
        for i, g in enumerate(grads):
            if i == resume_at:  # a new optimiser from the saved state, as --resume makes one
                saved = copy.deepcopy(optimizer.state_dict())
                optimizer = BF16AdamW([weight], lr=1e-3, seed=seed)
                optimizer.load_state_dict(saved)
            weight.grad = g.to(torch.bfloat16)
            optimizer.step()
        return weight.detach().clone()

    assert torch.equal(run(), run(resume_at=3))
    assert not torch.equal(run(), run(seed=8))  # the seed decides the rounding


def test_the_training_loop_picks_it_for_bfloat16_weights_only(tmp_path):
    from rich.console import Console

    from domaintune.train.loop import LoopConfig, train_loop

    seen = []
    original = BF16AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(type(self).__name__)
        return original(self, *args, **kwargs)

    for dtype in (torch.float32, torch.bfloat16):
        model = torch.nn.Linear(4, 1).to(dtype)
        loop = LoopConfig(epochs=1, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0, seed=0)
        BF16AdamW.step = spy
        try:
            train_loop(model, [{"params": list(model.parameters()), "weight_decay": 0.0}],
                       lambda epoch: [torch.ones(2, 4, dtype=dtype)] * 3,
                       lambda m, x: (m(x).float().pow(2).mean(), 2), loop, Console(quiet=True), "t")
        finally:
            BF16AdamW.step = original
    assert seen == ["BF16AdamW"] * 3  # the three steps of the bfloat16 model, none of the float32 one


def _steps(compile: bool, device: str = "cpu") -> list[torch.Tensor]:
    torch.manual_seed(0)
    weights = [torch.randn(shape, device=device).to(torch.bfloat16).requires_grad_() for shape in ((64, 48), (1000,))]
    optimizer = BF16AdamW(weights, lr=1e-3, weight_decay=0.1, seed=3, compile=compile)
    for step in range(5):
        for w in weights:
            w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(step)).to(device, torch.bfloat16)
        optimizer.param_groups[0]["lr"] = 1e-3 / (step + 1)  # a schedule's new rate: no recompiling
        optimizer.step()
    return [w.detach().float().cpu() for w in weights]


def _compiles_on_the_cpu() -> bool:
    """Whether torch.compile works here (on the CPU it needs a C++ compiler and Python's headers)."""
    if shutil.which("g++") is None:
        return False
    try:
        return bool(torch.compile(lambda x: x * 2 + 1)(torch.ones(3)).eq(3).all())
    except Exception:
        return False


def test_the_compiled_update_computes_the_uncompiled_one(monkeypatch):
    """What a GPU runs (one compiled call for all the tensors), here compiled for the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _compiles_on_the_cpu():
        pytest.skip("torch.compile does not work on this machine's CPU")
    monkeypatch.setattr(bf16_adamw, "_compiled", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "the bfloat16 AdamW update could not be compiled")  # else it falls back
        compiled = _steps(True, device)
    for fast, plain in zip(compiled, _steps(False, device)):
        # the same random bits; float32 arithmetic fused in another order may cross a rounding edge
        assert float((fast != plain).float().mean()) < 0.01
        torch.testing.assert_close(fast, plain, rtol=2e-2, atol=1e-3)


def test_a_compile_that_fails_warns_and_runs_uncompiled(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(bf16_adamw, "_compiled", broken)
    with pytest.warns(UserWarning, match="could not be compiled .*no compiler here"):
        fallen_back = _steps(True)
    assert bf16_adamw._compiled is False  # not tried again
    assert all(torch.equal(a, b) for a, b in zip(fallen_back, _steps(False)))


def test_the_optimiser_benchmark_runs():
    """bench/bf16_adamw.py on a small set (its numbers on a GPU go to bench/README.md)."""
    stdout, rows = run_bench("bf16_adamw.py", "--tiny", "--device", "cpu")
    assert {"torch AdamW", "BF16AdamW", "BF16AdamW, uncompiled"} <= rows, stdout
    assert "BF16AdamW / torch AdamW:" in stdout

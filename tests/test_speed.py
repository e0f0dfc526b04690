"""training.speed: the fused loss equals the plain one, CPU runs are untouched, and on a CUDA GPU
(skipped elsewhere) Liger's kernels and bfloat16 train to the same losses as the plain path."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from domaintune.data.examples import ChatExample
from domaintune.errors import RecipeError
from domaintune.recipe import load_recipe
from domaintune.train import speed
from domaintune.train.causal import Tokenized, tokenize_chat, train_causal
from domaintune.train.loop import LoopConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("weight_trains", [False, True], ids=["frozen head", "trained head"])
def test_chunked_linear_cross_entropy_equals_cross_entropy_of_the_logits(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.tensor(0.7, dtype=torch.float64)

    fused = speed._ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8)  # 5 chunks, the last short
    (fused * upstream).backward()
    grads = hidden.grad.clone(), weight.grad.clone() if weight_trains else None
    hidden.grad = weight.grad = None
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (plain * upstream).backward()

    torch.testing.assert_close(fused.double(), plain, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[0], hidden.grad)
    if weight_trains:
        torch.testing.assert_close(grads[1], weight.grad)


def test_on_a_machine_without_a_gpu_the_plan_changes_only_dropout_and_loras_forward():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for setting in ("auto", "off"):
        plan = speed.plan_speed(setting, "llama", "lora")
        assert plan == speed.SpeedPlan(sparse_dropout=setting == "auto", fused_lora=setting == "auto")
        model = torch.nn.Linear(2, 2)
        assert speed.place(model, plan, "lora") is model and model.weight.dtype == torch.float32


def test_a_gpu_that_only_emulates_bfloat16_trains_in_float32(monkeypatch):
    """A T4 or V100: torch's default check says bfloat16 works (emulated, slowly)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for ampere in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: ampere or including_emulation)
        for setting in ("auto", "off"):
            plan = speed.plan_speed(setting, "llama", "full")
            assert plan.device == "cuda" and plan.bf16 is ampere
            assert isinstance(plan.autocast(), torch.autocast) is ampere  # no bfloat16 autocast either
        assert speed.plan_speed("auto", "llama", "lora", fsdp=True).bf16 is ampere


def test_auto_on_a_gpu_fuses_loras_forward_and_packs_mixed_lengths_only_with_a_varlen_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    for varlen in (True, False):
        monkeypatch.setattr(speed, "varlen_attention_available", lambda: varlen)
        auto = speed.plan_speed("auto", "llama", "lora")
        assert auto.fused_lora and auto.pack_mixed_lengths is varlen
        off = speed.plan_speed("off", "llama", "lora")
        assert not off.fused_lora and not off.pack_mixed_lengths and not off.fused_loss
        assert not speed.plan_speed("auto", "llama", "lora", fsdp=True).fused_lora
    # without bfloat16 (a T4) the kernel takes no float32: padded
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert not speed.plan_speed("auto", "llama", "lora").pack_mixed_lengths


def test_the_recipe_takes_auto_or_off(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\ntask: sft\nbase_model: smollm2-135m\ndata:\n  train: x.jsonl\n", encoding="utf-8")
    assert load_recipe(path).training.speed == "auto"
    assert load_recipe(path, {"training.speed": "off"}).training.speed == "off"
    with pytest.raises(RecipeError, match="training.speed"):
        load_recipe(path, {"training.speed": "fast"})


def _rows(tokenizer, n: int = 12) -> list[Tokenized]:
    things = ["apple", "sky", "grass", "snow", "coal", "sun"]
    rows = []
    for i in range(n):
        prompt = " ".join(["please", "help"] * (i % 3) + ["what", "is", "the", "colour", "of", things[i % 6], "?"])
        answer = ["red", "blue", "green", "white", "black", "yellow"][i % 6] + " ."
        example = ChatExample(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                              where=f"row {i}")
        rows.append(tokenize_chat(tokenizer, example, 64))
    return rows


def _lora(path, plan: speed.SpeedPlan):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = speed.place(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), plan, "lora")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                                            task_type="CAUSAL_LM"))


def _train(path, tokenizer, plan: speed.SpeedPlan, packing: bool, steps: int = 6) -> list[float]:
    model = _lora(path, plan)
    loop = LoopConfig(epochs=1, learning_rate=5e-3, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0, seed=3,
                      max_steps=steps)
    with speed.accelerated(model, plan):
        log = train_causal(model, tokenizer, _rows(tokenizer), loop=loop, batch_size=4, console=Console(quiet=True),
                           description="t", packing=packing, speed=plan)
    return [r["loss"] for r in log]


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_the_fused_loss_trains_exactly_as_the_plain_one(tiny_llama, packing):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    plain = _train(tiny_llama, tokenizer, speed.SpeedPlan(), packing)
    fused = _train(tiny_llama, tokenizer, speed.SpeedPlan(fused_loss=True), packing)
    assert plain == pytest.approx(fused, rel=1e-4)
    assert plain[-1] < plain[0]


def test_recomputing_half_the_layers_trains_to_the_same_losses(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = _lora(tiny_llama, speed.SpeedPlan(checkpointing=0.5))
    layers = speed.decoder_layers(model.get_base_model())
    with speed.accelerated(model, speed.SpeedPlan(checkpointing=0.5)):
        assert sum(layer.gradient_checkpointing for layer in layers) == 1
    assert not any(layer.gradient_checkpointing for layer in layers)
    plain = _train(tiny_llama, tokenizer, speed.SpeedPlan(), packing=True)
    recomputed = _train(tiny_llama, tokenizer, speed.SpeedPlan(checkpointing=0.5), packing=True)
    assert recomputed == pytest.approx(plain, rel=1e-5)


def test_a_plan_that_packs_only_rows_of_one_length_pads_the_others(tiny_llama, monkeypatch):
    from domaintune.train import causal

    packed = []
    real_pack = causal._pack
    monkeypatch.setattr(causal, "_pack", lambda rows: packed.append(len(rows)) or real_pack(rows))
    mixed = [Tokenized(list(range(5, 10 + n)), list(range(5, 10 + n))) for n in range(8)]  # 8 lengths
    same = [Tokenized(list(range(5, 15)), list(range(5, 15)))] * 8
    loop = LoopConfig(epochs=1, learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0, seed=0)
    for rows, plan, expected in [(mixed, speed.SpeedPlan(pack_mixed_lengths=False), []),
                                 (same, speed.SpeedPlan(pack_mixed_lengths=False), [4, 4]),
                                 (mixed, speed.SpeedPlan(), [4, 4])]:
        packed.clear()
        train_causal(_lora(tiny_llama, plan), SimpleNamespace(pad_token_id=0), rows, loop=loop, batch_size=4,
                     console=Console(quiet=True), description="t", speed=plan)
        assert packed == expected


def test_prompt_learning_keeps_the_plain_loss(tiny_llama):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert speed.hidden_and_head(model) is not None
    prompt = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert speed.hidden_and_head(prompt) is None


@cuda
def test_liger_loss_on_the_gpu_equals_the_chunked_one():
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", requires_grad=True)
    weight = torch.randn(1000, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (300,), device="cuda")
    liger = speed.linear_cross_entropy(hidden, weight, targets)
    liger.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    chunked = speed._ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 128)
    chunked.backward()
    torch.testing.assert_close(liger, chunked, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grads[1], weight.grad, rtol=1e-3, atol=1e-4)


@cuda
@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_auto_on_the_gpu_trains_like_the_plain_path(tiny_llama, packing):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    auto = speed.plan_speed("auto", "llama", "lora")
    off = speed.plan_speed("off", "llama", "lora")
    assert auto.device == "cuda" and auto.fused_loss and not off.fused_loss
    fast = _train(tiny_llama, tokenizer, auto, packing, steps=10)
    plain = _train(tiny_llama, tokenizer, off, packing, steps=10)
    assert fast == pytest.approx(plain, rel=2e-2)  # bfloat16 rounding, not a different function
    assert fast[-1] < fast[0]


@cuda
def test_after_training_the_model_runs_plain_where_it_trained_and_so_do_other_models(tiny_llama):
    from transformers import AutoModelForCausalLM

    pytest.importorskip("liger_kernel")
    plan = speed.plan_speed("auto", "llama", "lora")
    assert plan.liger
    model = _lora(tiny_llama, plan)
    ids = torch.tensor([[5, 6, 7, 8]])
    with speed.accelerated(model, plan):
        assert "Liger" in repr(model)
    assert "Liger" not in repr(model)
    assert speed.placement(model) == "cuda bfloat16"  # the base; the adapter stays float32
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids.cuda()).logits).all()
        # a fresh model on the CPU: Liger's Triton kernels, left in transformers' module, would refuse it
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits).all()

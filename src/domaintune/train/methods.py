"""Fine-tuning methods: which weights train. ``lora`` wraps the model with PEFT adapters on a
preset of modules per architecture; ``full`` trains every weight."""

from __future__ import annotations

import torch

from domaintune.errors import RecipeError
from domaintune.recipe import LoraConfig

# Every linear layer of the transformer blocks: adapting attention and MLP together is what
# gives LoRA full fine-tuning quality (QLoRA paper, Dettmers et al. 2023).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def lora_targets(model: torch.nn.Module, config: LoraConfig) -> list[str] | str:
    if config.target_modules:
        return list(config.target_modules)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LORA_TARGETS.get(model_type, "all-linear")


def apply_lora(model: torch.nn.Module, config: LoraConfig, task_type: str | None):
    """Wrap ``model`` with LoRA adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora_targets(model, config)
    peft_config = PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha or 2 * config.r,
        lora_dropout=config.dropout,
        target_modules=targets,
        task_type=task_type,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise RecipeError(
            f"LoRA could not be applied: {exc}",
            hint="set lora.target_modules to module names of this model (e.g. [q_proj, v_proj])",
        ) from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

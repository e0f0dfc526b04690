"""Fine-tuning methods: which weights train.

``full`` trains every weight; the others wrap the model with PEFT: ``lora`` and ``dora`` add
low-rank updates to a preset of modules per architecture, ``qlora`` does the same on a base
loaded in 4 bits (CUDA only), ``ia3`` learns scaling vectors, ``prompt_tuning`` and
``prefix_tuning`` learn virtual tokens (causal LMs only: see ``recipe.METHODS_BY_TASK``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from domaintune.errors import ModelError, RecipeError
from domaintune.recipe import LoraConfig, Recipe

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BERT_LIKE = ["query", "key", "value", "dense"]

# Every linear layer of the transformer blocks: adapting attention and MLP together is what
# gives LoRA full fine-tuning quality (QLoRA paper, Dettmers et al. 2023).
LORA_TARGETS: dict[str, list[str]] = {
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    **{name: _BERT_LIKE for name in ("bert", "roberta", "xlm-roberta")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}

# IA3 rescales keys, values and the MLP's inner activations ((IA)^3 paper, Liu et al. 2022):
# (targets, the subset that is a feed-forward layer and so scales its input).
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    **{name: (["k_proj", "v_proj", "down_proj"], ["down_proj"])
       for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    **{name: (["key", "value", "output.dense"], ["output.dense"]) for name in ("bert", "roberta", "xlm-roberta")},
    "distilbert": (["k_lin", "v_lin", "lin2"], ["lin2"]),
}


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def lora_targets(model: torch.nn.Module, config: LoraConfig) -> list[str] | str:
    """The recipe's ``lora.target_modules``, else the preset for the architecture, else every linear layer."""
    if config.target_modules:
        return list(config.target_modules)
    return LORA_TARGETS.get(_model_type(model), "all-linear")


def check_runs_here(spec: Recipe) -> None:
    """Fail before anything is loaded when this machine cannot run the recipe: qlora needs a
    CUDA GPU and bitsandbytes; ``training.report_to`` needs its package."""
    if spec.method == "qlora":
        if not torch.cuda.is_available():
            raise ModelError("method qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                             "this machine has none", hint="run on a machine with an NVIDIA GPU, or set method: lora")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError("method qlora needs the bitsandbytes package", hint="pip install bitsandbytes")
    tracker = spec.training.report_to
    if tracker and importlib.util.find_spec(tracker) is None:
        raise RecipeError(f"training.report_to: {tracker} is not installed", hint=f"pip install {tracker}, "
                          "or remove training.report_to")


def load_quantized_causal_lm(path):
    """A causal LM in 4-bit NF4 with bfloat16 compute (the QLoRA recipe) on this process's GPU:
    under torchrun each process has its own (``LOCAL_RANK``), else the first."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    gpu = int(os.environ.get("LOCAL_RANK", "0"))
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": gpu})


def apply_method(model: torch.nn.Module, spec: Recipe, task_type: str | None, tokenizer_path: str | None = None):
    """Make ``model`` trainable by ``spec.method``: the PEFT-wrapped model (base weights frozen),
    or the model itself for ``full``. ``task_type`` is PEFT's ("CAUSAL_LM", or None for the
    classifier's bare encoder); ``tokenizer_path`` serves ``prompt.init_text``."""
    from peft import get_peft_model

    if spec.method == "full":
        return model
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    try:
        return get_peft_model(model, _peft_config(model, spec, task_type, tokenizer_path))
    except ValueError as exc:
        section = "ia3" if spec.method == "ia3" else "lora"
        raise RecipeError(
            f"{spec.method} could not be applied: {exc}",
            hint=f"set {section}.target_modules to module names of this model (e.g. [q_proj, v_proj])",
        ) from None


def _peft_config(model: torch.nn.Module, spec: Recipe, task_type: str | None, tokenizer_path: str | None):
    import peft

    if spec.method in ("lora", "dora", "qlora"):
        lora = spec.lora
        return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha or 2 * lora.r, lora_dropout=lora.dropout,
                               target_modules=lora_targets(model, lora), use_dora=spec.method == "dora",
                               task_type=task_type)
    if spec.method == "ia3":
        targets, feedforward = IA3_TARGETS.get(_model_type(model), (None, None))
        if spec.ia3.target_modules is not None:
            targets = spec.ia3.target_modules
            feedforward = [m for m in feedforward or [] if m in targets]  # the preset's, where still targeted
        if spec.ia3.feedforward_modules is not None:
            feedforward = spec.ia3.feedforward_modules
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)
    if spec.method == "prompt_tuning":
        text = spec.prompt.init_text
        return peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=spec.prompt.num_virtual_tokens,
            prompt_tuning_init=peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM,
            prompt_tuning_init_text=text, tokenizer_name_or_path=tokenizer_path if text else None)
    if spec.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.prompt.num_virtual_tokens)
    raise AssertionError(f"unhandled method {spec.method}")  # the recipe schema lists every method


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total

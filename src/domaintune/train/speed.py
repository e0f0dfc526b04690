"""Training speed on a GPU: what ``training.speed: auto`` turns on, and the fused loss.

On a CUDA GPU, ``auto`` trains causal LMs in bfloat16 on the GPU with:
- Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (when the ``liger-kernel`` package is
  installed and the architecture is one it patches), which fuse the element-wise work of each layer;
- the loss taken from the last hidden states without materialising the logits
  (``linear_cross_entropy``): the vocabulary projection and cross-entropy run chunk by chunk, so
  the (tokens x vocabulary) logits, the largest activation of a small model, never exist whole;
- LoRA's forward with its scaling and sum in one matrix product (``train.fused_lora``);
- rows of mixed lengths packed end to end, attention run by torch's variable-length
  flash-attention kernel (``train.packing``), where this torch has it; else padded batches of rows
  of similar length;
- the fused AdamW step (``train.loop`` picks it for float32 parameters on a GPU; full fine-tuning's
  bfloat16 weights step with stochastic rounding instead, ``train.bf16_adamw``);
- optionally ``torch.compile`` of each decoder layer (``compile_layers``), and activation
  checkpointing of a share of the layers (``training.activation_checkpointing``).
The kernels are in place only inside ``accelerated(model, plan)``.
``off`` keeps the plain Hugging Face path on the same device and dtype, as the baseline of
``bench/gpu_train.py``. On a machine without a GPU the model stays on the CPU in float32 and the
loss takes the plain path (the CPU has no kernels to gain from); ``auto`` only draws dropout masks
more cheaply there (``train.dropout``), which the CPU's slow random numbers make worth it.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from domaintune.train.dropout import sparse_dropout
from domaintune.train.fused_lora import fused_lora
from domaintune.train.packing import varlen_attention_available

# Architectures whose layers Liger's instance patcher rewrites (liger_kernel.transformers.monkey_patch).
LIGER_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


@dataclass(frozen=True)
class SpeedPlan:
    device: str = "cpu"
    bf16: bool = False  # weights in bfloat16 and matrix products under bfloat16 autocast
    liger: bool = False  # Liger's RMSNorm, RoPE and SwiGLU kernels
    fused_loss: bool = False  # cross-entropy from hidden states, logits never materialised
    compile_layers: bool = False  # torch.compile each decoder layer
    checkpointing: float = 0.0  # the fraction of decoder layers whose activations are recomputed in backward
    # Rows of different lengths laid end to end. On a GPU this pays only with a variable-length
    # attention kernel (torch's varlen_attn: 1.72x padded batches on an H100); without one, packed
    # rows measured slower than padding rows of similar length (bench/README.md): padded there.
    pack_mixed_lengths: bool = True
    # Train a copy sharded across the processes (``train.fsdp``); the model itself stays on the CPU
    # and gets the trained weights back.
    fsdp: bool = False
    # Dropout drawing only the positions it drops (``train.dropout``): the CPU's random numbers
    # are slow, a GPU's dropout is one fused kernel already.
    sparse_dropout: bool = False
    # LoRA's scaling and sum folded into one matrix product (``train.fused_lora``): faster on the CPU,
    # and on a GPU 1.03x the step speed at 0.84x the peak memory of PEFT's forward (bench/README.md).
    fused_lora: bool = False

    def describe(self) -> dict:
        return asdict(self)

    def autocast(self):
        """The context the forward pass runs in: bfloat16 autocast with bfloat16 weights (on a GPU;
        the CPU's own plans never ask for it, tests do, to run a GPU's arithmetic on the CPU)."""
        return torch.autocast(self.device, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def plan_speed(setting: str, model_type: str | None, method: str, compile_layers: bool = False,
               checkpointing: float = 0.0, fsdp: bool = False) -> SpeedPlan:
    """What to turn on for a causal LM of ``model_type`` trained by ``method`` on this machine.

    ``setting`` is the recipe's ``training.speed``: ``auto`` or ``off``. A GPU is used whenever one
    is visible (``off`` only leaves out the kernels); quantised bases (qlora) keep their own dtype.
    ``checkpointing`` (``training.activation_checkpointing``) holds on every machine. ``fsdp``
    (several processes, ``training.distributed: fsdp``) trains a sharded copy on the GPU (float32
    shards gathered in bfloat16, see ``train.fsdp``), without Liger and the fused loss (FSDP gathers a unit's weights only when the unit runs
    through its own forward, which the fused loss and Liger's patched forwards bypass).
    """
    if not torch.cuda.is_available():
        return cpu_plan(setting, checkpointing=checkpointing, fsdp=fsdp)
    bf16 = gpu_has_bf16()
    if fsdp:
        return SpeedPlan(device="cuda", bf16=bf16, checkpointing=checkpointing, pack_mixed_lengths=False, fsdp=True)
    if setting == "off":
        return SpeedPlan(device="cuda", bf16=bf16, checkpointing=checkpointing, pack_mixed_lengths=False)
    # Liger's autograd functions broke torch.compile's tracing (dynamo, torch 2.11): one or the other
    liger = (importlib.util.find_spec("liger_kernel") is not None and model_type in LIGER_ARCHITECTURES
             and method != "qlora" and not compile_layers)
    return SpeedPlan(device="cuda", bf16=bf16, liger=liger, fused_loss=True, compile_layers=compile_layers,
                     checkpointing=checkpointing, pack_mixed_lengths=bf16 and varlen_attention_available(),
                     fused_lora=True)


def gpu_has_bf16() -> bool:
    """Whether the GPU computes in bfloat16 itself (Ampere and later). torch's default check also
    says yes for older GPUs (a T4, a V100) that only emulate it, slowly (and Triton's bfloat16
    matrix products need Ampere): they train in float32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_plan(setting: str, checkpointing: float = 0.0, fsdp: bool = False) -> SpeedPlan:
    """The plan on the CPU (where classification always trains): ``auto`` draws dropout sparsely
    and fuses LoRA's forward."""
    auto = setting != "off"
    return SpeedPlan(checkpointing=checkpointing, fsdp=fsdp, sparse_dropout=auto, fused_lora=auto)


def place(model: torch.nn.Module, plan: SpeedPlan, method: str) -> torch.nn.Module:
    """Move a model to the plan's device and dtype, where it is evaluated before and after training
    as well as trained, so that base and tuned are scored alike (and on a GPU, fast). Place a base
    before PEFT wraps it, so that its adapter weights are made next to it in float32; a model
    already wrapped only moves. Under FSDP the whole model stays on the CPU (only its shards go to
    the GPUs: the whole may not fit one), and a 4-bit base is on its GPU already."""
    if plan.fsdp or method == "qlora":
        return model
    if hasattr(model, "get_base_model") or not plan.bf16:
        return model.to(device=plan.device)
    return model.to(device=plan.device, dtype=torch.bfloat16)


def placement(model: torch.nn.Module) -> str:
    """Where ``model`` runs, for lineage.json: its device and the dtype of most of its weights
    (``4-bit`` for a bitsandbytes-quantised base)."""
    counts: dict[tuple[str, torch.dtype], int] = {}
    for p in model.parameters():
        key = (p.device.type, p.dtype)
        counts[key] = counts.get(key, 0) + p.numel()
    device, dtype = max(counts, key=counts.get)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        return f"{device} 4-bit"  # qlora's base is the only quantised model domaintune loads
    return f"{device} {str(dtype).removeprefix('torch.')}"


@contextmanager
def accelerated(model: torch.nn.Module, plan: SpeedPlan) -> Iterator[torch.nn.Module]:
    """While inside, the (possibly PEFT-wrapped) model runs with the planned kernels, activation
    checkpointing and compiled layers; on leaving, all of it is undone, so that evaluation and every
    other model of the process see plain transformers again."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    undo_liger = _patch_liger(base) if plan.liger else None
    if plan.checkpointing > 0 and layers and hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # spread evenly: recomputing a share of the layers buys that share of their activation memory
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = int((i + 1) * plan.checkpointing) > int(i * plan.checkpointing)
    if plan.compile_layers:
        for layer in layers:
            layer.compile(dynamic=True)
    try:
        with (sparse_dropout(model) if plan.sparse_dropout else nullcontext(),
              fused_lora(model) if plan.fused_lora else nullcontext()):
            yield model
    finally:
        if plan.compile_layers:
            for layer in layers:
                layer._compiled_call_impl = None  # what nn.Module.compile set
        if plan.checkpointing > 0 and hasattr(base, "gradient_checkpointing_disable"):
            base.gradient_checkpointing_disable()
        if undo_liger is not None:
            undo_liger()


def _patch_liger(base: torch.nn.Module) -> Callable[[], None] | None:
    """Liger's kernels on ``base``, and the undoing of it. Liger binds new forwards to module
    instances and also rewrites names in the architecture's modeling module (RoPE, the norm and MLP
    classes), which every later model of the process would pick up, on any device."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except Exception as exc:  # a version mismatch must cost speed, never the run
        warnings.warn(f"Liger kernels not applied ({type(exc).__name__}: {exc}); training without them")
        return None
    modeling = sys.modules[type(base).__module__]
    names = dict(vars(modeling))
    bound = {m: dict(vars(m)) for m in base.modules()}
    # the loss is ours (linear_cross_entropy): Liger's forward replacement would bypass PEFT's
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)

    def undo() -> None:
        for name, value in names.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
        for module, before in bound.items():
            for name in ("forward", "_get_name", "extra_repr"):
                if name in vars(module) and name not in before:
                    delattr(module, name)
    return undo


def decoder_layers(base: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return list(getattr(decoder, "layers", []))


def hidden_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The decoder (returning last hidden states) and the plain linear vocabulary projection, where
    the loss can be fused: not for prompt learning (its virtual tokens live in PEFT's forward),
    nor for an adapted or biased head, nor for heads that soft-cap their logits."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if (decoder is None or type(head) is not torch.nn.Linear or head.bias is not None
            or getattr(base.config, "final_logit_softcapping", None)):
        return None
    return decoder, head


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk of rows.

    The gradients are computed in the forward pass, chunk by chunk, so that no chunk's logits
    outlive it: the same matrix products as the plain path, a fraction of its memory."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        wide = torch.promote_types(hidden.dtype, torch.float32)  # softmax in float32 at least
        grad_weight = torch.zeros_like(weight, dtype=wide) if weight.requires_grad else None
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = (h @ weight.t().to(h.dtype)).to(wide)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1)
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0
            grad_logits = grad_logits.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad_logits @ weight.to(h.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).to(wide)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Sum over rows of ``-log softmax(hidden @ weight.T)[target]``, without the (rows x vocabulary)
    logits: Liger's Triton kernel on a GPU when installed, else ``chunk`` rows at a time in PyTorch."""
    liger = _liger_loss() if hidden.is_cuda else None
    if liger is not None:
        return liger(weight, hidden, targets)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)


@functools.cache
def _liger_loss():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # e.g. a Triton too old for it
        warnings.warn(f"Liger's fused loss unavailable ({type(exc).__name__}: {exc}); using the chunked one")
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")

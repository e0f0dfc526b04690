"""A merged Llama-family model as one GGUF file, for llama.cpp and Ollama users.

Written with the ``gguf`` package (llama.cpp's own Python library): its tensor-name map and
writer, the architecture's keys, the byte-level BPE vocabulary with each token's type, the merges,
special tokens and chat template. Like llama.cpp's converter, the query and key projections are
permuted from Hugging Face's rotate-half layout to the interleaved one llama.cpp computes RoPE in.
Transformers reads such files back (``from_pretrained(folder, gguf_file=...)``), which is how the
tests check an export: same logits as the merged model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from domaintune.errors import ModelError

# Architectures with Llama's tensor layout (llama.cpp runs Mistral-style models as "llama").
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
TYPES = ("f32", "f16", "q8_0")


def write_gguf(model_dir: Path, out: Path, dtype: str = "f16") -> Path:
    """Write the Hugging Face model in ``model_dir`` (weights, config, tokenizer.json) to ``out``.

    ``dtype``: ``f32``, ``f16`` (llama.cpp's usual full-quality file) or ``q8_0`` (8-bit blocks, a
    quarter of f32's size). One-dimensional tensors (norms) stay float32, as in llama.cpp's files.
    """
    import gguf
    import torch
    from safetensors.torch import load_file

    if dtype not in TYPES:
        raise ModelError(f"unknown GGUF type {dtype!r}", hint=f"use one of {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise ModelError(f"GGUF export supports the Llama family ({', '.join(ARCHITECTURES)}), "
                         f"not {config.get('model_type')!r}", hint="export with --merged and convert with llama.cpp")
    tokens, types, merges = _vocabulary(model_dir)

    writer = gguf.GGUFWriter(out, arch)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(tokens))
    special.merges = merges
    special.add_to_gguf(writer, quiet=True)  # bos/eos/pad ids, add_bos, merges, chat template

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(file))
    for name, tensor in weights.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp uses the token embeddings when there is no output tensor
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ModelError(f"no GGUF name for the tensor {name}", hint="this model's layout is not Llama's")
        data = tensor.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        _add(writer, target, data, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _vocabulary(model_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """Token texts by id, their llama.cpp types, and the merges, from a byte-level BPE tokenizer.json."""
    import gguf

    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError("GGUF export needs a byte-level BPE tokenizer (GPT-2 style: Llama 3, SmolLM, Qwen); "
                         f"this one is {model.get('type') or 'missing'}",
                         hint="export with --merged and convert with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: text for text, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    size = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [gguf.TokenType.UNUSED if i not in by_id
             else gguf.TokenType.CONTROL if added.get(i, {}).get("special")
             else gguf.TokenType.USER_DEFINED if i in added
             else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from rotate-half order (first halves, then second halves) to interleaved pairs."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _add(writer, name: str, data: np.ndarray, dtype: str) -> None:
    import gguf

    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif dtype == "f16":
        writer.add_tensor(name, data.astype(np.float16))
    else:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

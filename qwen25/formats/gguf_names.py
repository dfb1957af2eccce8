"""GGUF <-> Hugging Face: tensor names, metadata keys, and Llama's Q/K row order.

Pure tables and functions, shared by the importer (`gguf_import.py`) and the exporter; no
file is read here. The names are llama.cpp's (`blk.N.attn_q.weight`, `llama.block_count`),
the HF side is the checkpoint layout of `Qwen2ForCausalLM` / `LlamaForCausalLM` /
`Qwen2MoeForCausalLM` (one tensor per expert). `tests/test_gguf_names.py` checks every row
against the `gguf` package's own `TensorNameMap` and `Keys`.

Two layout facts the tables do not show:
- llama.cpp stores a matrix with its dimensions listed fastest first (`ne = [in, out]`); read
  as a row-major array it is already HF's `[out, in]`. Nothing is transposed.
- Its Llama converter reorders the rows of Q and K inside every head, from HF's half-split
  RoPE layout (pairs (i, i + d/2)) to adjacent pairs (2i, 2i + 1), because llama.cpp's
  "normal" RoPE rotates adjacent elements. `unpermute_qk` undoes it. Qwen2 files use the
  NEOX RoPE (half-split, as HF) and keep HF's order.
"""

from __future__ import annotations

import re
from typing import Any

ARCHITECTURES = ("qwen2", "qwen2moe", "llama")
# Architectures whose Q/K rows llama.cpp permutes on conversion.
PERMUTED_QK = frozenset({"llama"})

# ---- tensors -------------------------------------------------------------------------
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the head is tied to the embedding
}

# Per block: `blk.{i}.<gguf>` <-> `model.layers.{i}.<hf>`.
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    # dense SwiGLU
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    # MoE: router, and the shared expert with its sigmoid gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",  # GGUF [h], HF [1, h]
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}

# GGUF stacks the routed experts of a block in one 3-D tensor [E, out, in]; HF stores
# `model.layers.{i}.mlp.experts.{e}.<proj>.weight` per expert.
EXPERT_TENSORS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_TO_BLOCK = {hf: g for g, hf in BLOCK_TENSORS.items()}
_HF_TO_GLOBAL = {hf: g for g, hf in GLOBAL_TENSORS.items()}
_PROJ_TO_EXPERTS = {p: g for g, p in EXPERT_TENSORS.items()}


def hf_name(gguf_name: str) -> str | None:
    """The HF checkpoint key of a GGUF tensor; None when it has no one-to-one key (stacked
    experts: see `expert_tensor`) or is not one of ours."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{BLOCK_TENSORS[m.group(2)]}"
    return None


def expert_tensor(gguf_name: str) -> tuple[int, str] | None:
    """(layer, "gate_proj" | "up_proj" | "down_proj") of a stacked-expert GGUF tensor."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in EXPERT_TENSORS:
        return int(m.group(1)), EXPERT_TENSORS[m.group(2)]
    return None


def hf_expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def gguf_name(hf_key: str) -> str:
    """The GGUF tensor name of an HF checkpoint key; per-expert keys map to the stacked
    tensor of their block (an exporter stacks experts 0..E-1 in order)."""
    if hf_key in _HF_TO_GLOBAL:
        return _HF_TO_GLOBAL[hf_key]
    m = _HF_EXPERT.match(hf_key)
    if m:
        return f"blk.{m.group(1)}.{_PROJ_TO_EXPERTS[m.group(3)]}"
    m = _HF_BLOCK.match(hf_key)
    if m and m.group(2) in _HF_TO_BLOCK:
        return f"blk.{m.group(1)}.{_HF_TO_BLOCK[m.group(2)]}"
    raise KeyError(f"{hf_key!r} has no GGUF name (not a Qwen2/Llama checkpoint tensor)")


# ---- metadata ------------------------------------------------------------------------
# ModelConfig field -> GGUF key, "{arch}" standing for `general.architecture`.
CONFIG_KEYS = {
    "max_position_embeddings": "{arch}.context_length",
    "hidden_size": "{arch}.embedding_length",
    "num_hidden_layers": "{arch}.block_count",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length",  # optional: default hidden / heads
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
    "vocab_size": "{arch}.vocab_size",  # optional: rows of token_embd
    "num_experts": "{arch}.expert_count",
    "num_experts_per_tok": "{arch}.expert_used_count",
    "moe_intermediate_size": "{arch}.expert_feed_forward_length",
    "shared_expert_intermediate_size": "{arch}.expert_shared_feed_forward_length",
    "norm_topk_prob": "{arch}.expert_weights_norm",
}

# Keys that shape the network but have no ModelConfig field of their own.
VALUE_LENGTH = "{arch}.attention.value_length"  # must equal head_dim
ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"  # must equal head_dim (no partial RoPE)
ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"  # "none" | "linear" | "yarn" (RopeScaling.type)
ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
ROPE_SCALING_ORIGINAL_CONTEXT = "{arch}.rope.scaling.original_context_length"
ROPE_SCALING_ATTN_FACTOR = "{arch}.rope.scaling.attn_factor"
ROPE_SCALING_YARN_BETA_FAST = "{arch}.rope.scaling.yarn_beta_fast"
ROPE_SCALING_YARN_BETA_SLOW = "{arch}.rope.scaling.yarn_beta_slow"
SLIDING_WINDOW = "{arch}.attention.sliding_window"

ARCHITECTURE = "general.architecture"
FILE_NAME = "general.name"

# Tokenizer metadata (llama.cpp's vocabulary keys).
TOKENIZER_MODEL = "tokenizer.ggml.model"  # "gpt2" = byte-level BPE
TOKENIZER_PRE = "tokenizer.ggml.pre"  # which pre-tokenizer regex the merges were learned with
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPE = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
PAD_ID = "tokenizer.ggml.padding_token_id"
UNK_ID = "tokenizer.ggml.unknown_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
CHAT_TEMPLATE = "tokenizer.chat_template"

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def key(template: str, arch: str) -> str:
    """A metadata key for one architecture: key(CONFIG_KEYS["hidden_size"], "llama")."""
    return template.format(arch=arch)


# ---- Llama Q/K rows ------------------------------------------------------------------
def permute_qk(w: Any, n_heads: int) -> Any:
    """HF half-split rows -> llama.cpp's adjacent-pair rows, per head (what its converter
    does to Llama's q_proj / k_proj; for K pass the KV head count).

    w: [n_heads * head_dim] (bias) or [n_heads * head_dim, in] (weight); torch or numpy.
    Row h*d + j of the result is row h*d + (j//2 + (j%2) * d/2) of `w`.
    """
    rest = tuple(w.shape[1:])
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: Any, n_heads: int) -> Any:
    """The inverse of `permute_qk`: llama.cpp rows back to HF's half-split layout."""
    rest = tuple(w.shape[1:])
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)

"""The GGUF name tables against the `gguf` package's own maps, and the Llama Q/K row order
against an explicit per-row formula and against transformers' GGUF loader."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from qwen25.checkpoint import checkpoint_shapes
from qwen25.config import ModelConfig
from qwen25.formats import gguf_names as names

DENSE = ModelConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
MOE = DENSE.replace(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
ARCH = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE, "llama": gguf.MODEL_ARCH.LLAMA}


@pytest.mark.parametrize("arch,cfg", [("qwen2", DENSE), ("qwen2moe", MOE), ("llama", DENSE)])
def test_every_checkpoint_key_maps_like_the_gguf_package(arch, cfg):
    tmap = gguf.get_tensor_name_map(ARCH[arch], cfg.num_hidden_layers)
    keys = checkpoint_shapes(cfg)
    if arch == "llama":
        keys = {k: v for k, v in keys.items() if not k.endswith(".bias")}
    for key in keys:
        # llama.cpp maps the stacked expert tensor (per-expert index removed) to one name
        stacked = re.sub(r"\.experts\.\d+\.", ".experts.", key)
        expected = tmap.get_name(stacked, try_suffixes=(".weight", ".bias"))
        assert expected is not None, key
        assert names.gguf_name(key) == expected, key
        if stacked == key:
            assert names.hf_name(expected) == key
        else:
            layer, proj = names.expert_tensor(expected)
            assert key == names.hf_expert_name(layer, int(key.split(".")[5]), proj)


def test_metadata_keys_are_the_gguf_package_keys():
    k = gguf.Keys
    expected = {
        "max_position_embeddings": k.LLM.CONTEXT_LENGTH, "hidden_size": k.LLM.EMBEDDING_LENGTH,
        "num_hidden_layers": k.LLM.BLOCK_COUNT, "intermediate_size": k.LLM.FEED_FORWARD_LENGTH,
        "num_attention_heads": k.Attention.HEAD_COUNT, "num_key_value_heads": k.Attention.HEAD_COUNT_KV,
        "head_dim": k.Attention.KEY_LENGTH, "rms_norm_eps": k.Attention.LAYERNORM_RMS_EPS,
        "rope_theta": k.Rope.FREQ_BASE, "vocab_size": k.LLM.VOCAB_SIZE,
        "num_experts": k.LLM.EXPERT_COUNT, "num_experts_per_tok": k.LLM.EXPERT_USED_COUNT,
        "moe_intermediate_size": k.LLM.EXPERT_FEED_FORWARD_LENGTH,
        "shared_expert_intermediate_size": k.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH,
        "norm_topk_prob": k.LLM.EXPERT_WEIGHTS_NORM,
    }
    assert names.CONFIG_KEYS == expected
    assert (names.ROPE_SCALING_TYPE, names.ROPE_SCALING_FACTOR, names.ROPE_SCALING_ORIGINAL_CONTEXT,
            names.ROPE_DIMENSION_COUNT, names.VALUE_LENGTH) == (
        k.Rope.SCALING_TYPE, k.Rope.SCALING_FACTOR, k.Rope.SCALING_ORIG_CTX_LEN,
        k.Rope.DIMENSION_COUNT, k.Attention.VALUE_LENGTH)
    t = k.Tokenizer
    assert (names.TOKENIZER_MODEL, names.TOKENIZER_PRE, names.TOKENS, names.TOKEN_TYPE, names.MERGES,
            names.BOS_ID, names.EOS_ID, names.PAD_ID, names.CHAT_TEMPLATE) == (
        t.MODEL, t.PRE, t.LIST, t.TOKEN_TYPE, t.MERGES, t.BOS_ID, t.EOS_ID, t.PAD_ID, t.CHAT_TEMPLATE)
    assert names.TOKEN_CONTROL == gguf.TokenType.CONTROL and names.TOKEN_USER_DEFINED == gguf.TokenType.USER_DEFINED


@pytest.mark.parametrize("n_heads,head_dim,cols", [(3, 8, 5), (1, 4, None), (9, 64, 2)])
def test_permute_matches_the_row_formula_and_round_trips(n_heads, head_dim, cols):
    shape = (n_heads * head_dim,) + ((cols,) if cols else ())
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    p = names.permute_qk(w, n_heads)
    for h in range(n_heads):
        for j in range(head_dim):  # adjacent pair (2i, 2i+1) <- half-split pair (i, i + d/2)
            src = h * head_dim + j // 2 + (j % 2) * (head_dim // 2)
            assert torch.equal(p[h * head_dim + j], w[src])
    assert torch.equal(names.unpermute_qk(p, n_heads), w)
    assert np.array_equal(names.unpermute_qk(p.numpy(), n_heads), w.numpy())  # numpy too


def test_unpermute_is_what_transformers_does_to_llama_gguf_rows():
    """transformers' GGUF loader reverses the same permutation (LlamaTensorProcessor)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.random.default_rng(0).standard_normal((6 * 8, 5)).astype(np.float32)
    for heads in (6, 3):  # Q (all heads) and K (fewer KV heads): 8 or 16 rows each
        ref = LlamaTensorProcessor()._reverse_permute_weights(w, 6, heads)
        assert np.array_equal(names.unpermute_qk(w, heads), ref)


def test_unknown_names():
    assert names.hf_name("blk.0.ssm_conv1d.weight") is None
    assert names.expert_tensor("blk.3.ffn_up.weight") is None
    with pytest.raises(KeyError):
        names.gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")

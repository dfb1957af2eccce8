"""ModelConfig: presets against the report's parameter counts, HF round trips, bad fields."""

from __future__ import annotations

import json

import pytest
import torch

from qwen25.config import ConfigError, ModelConfig, RopeScaling, count_parameters
from qwen25.model.model import Transformer

# Spec §1.3: totals and non-embedding counts computed from the released configs, in billions
# rounded to 3 decimals (they match the model cards: 0.49B/0.36B ... 72.7B/70.0B).
SPEC_COUNTS = {
    "0.5B": (0.494, 0.358), "1.5B": (1.544, 1.310), "3B": (3.086, 2.775), "7B": (7.616, 6.526),
    "14B": (14.770, 13.213), "32B": (32.764, 31.207), "72B": (72.706, 70.215),
}
# Spec §1.3: KV-cache bytes per token in bf16.
SPEC_KV_BYTES = {"0.5B": 12288, "1.5B": 28672, "3B": 36864, "7B": 57344, "14B": 196608,
                 "32B": 262144, "72B": 327680}


def meta_numel(cfg: ModelConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    return total, total - model.model.embed_tokens.weight.numel() * (1 if cfg.tie_word_embeddings else 2)


@pytest.mark.parametrize("name", SPEC_COUNTS)
def test_dense_presets_have_report_parameter_counts(name):
    cfg = ModelConfig.preset(name)
    total, non_emb = meta_numel(cfg)
    assert (round(total / 1e9, 3), round(non_emb / 1e9, 3)) == SPEC_COUNTS[name]
    counts = count_parameters(cfg)
    assert (counts["total"], counts["non_embedding"]) == (total, non_emb)
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    assert kv_bytes == SPEC_KV_BYTES[name]


def test_moe_presets_have_published_sizes():
    # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B activated (spec §1.6); Qwen2-57B-A14B: 57B / 14B.
    a27 = count_parameters(ModelConfig.preset("moe-a2.7b"))
    assert round(a27["total"] / 1e9, 1) == 14.3 and round(a27["active"] / 1e9, 1) == 2.7
    assert meta_numel(ModelConfig.preset("moe-a2.7b"))[0] == a27["total"]
    b57 = count_parameters(ModelConfig.preset("moe-57b-a14b"))
    assert round(b57["total"] / 1e9) == 57 and round(b57["active"] / 1e9) == 14


def test_transformers_config_round_trip():
    """Our to_hf() is read by transformers into the same shapes, and back again."""
    from transformers import AutoConfig

    for name in ("0.5B", "72B", "moe-a2.7b"):
        cfg = ModelConfig.preset(name)
        hf = AutoConfig.for_model(**cfg.to_hf())
        assert hf.hidden_size == cfg.hidden_size and hf.num_key_value_heads == cfg.num_key_value_heads
        assert hf.tie_word_embeddings == cfg.tie_word_embeddings
        assert ModelConfig.from_hf(hf.to_dict()) == cfg


def test_released_and_transformers5_styles_read_the_same():
    released = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
                "rope_scaling": {"type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32768},
                "torch_dtype": "bfloat16", "tie_word_embeddings": True, "sliding_window": 32768,
                "use_sliding_window": False, "max_window_layers": 21, "rms_norm_eps": 1e-6,
                "bos_token_id": 151643, "eos_token_id": 151645, "max_position_embeddings": 32768}
    v5 = {k: v for k, v in released.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5 |= {"dtype": "bfloat16", "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "yarn",
                                                     "factor": 4.0,
                                                     "original_max_position_embeddings": 32768}}
    a, b = ModelConfig.from_hf(released), ModelConfig.from_hf(v5)
    assert a == b
    assert a.rope_scaling == RopeScaling("yarn", 4.0, 32768)
    assert ModelConfig.from_hf(a.to_hf()) == a
    written = a.to_hf()
    assert written["rope_theta"] == 1e6 and written["rope_scaling"]["type"] == "yarn"


@pytest.mark.parametrize("change,needle", [
    (dict(hidden_size=66), "not divisible by num_attention_heads"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8), "num_experts_per_tok"),
])
def test_inconsistent_fields_are_clear_errors(change, needle):
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.preset("tiny").replace(**change)


@pytest.mark.parametrize("patch,needle", [
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"qkv_bias": False}, "qkv_bias=false is not supported"),
    ({"frobnicate": 3}, "unknown config.json field"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_scaling.type='longrope'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "bogus": 1}}, "unknown rope_scaling field"),
    ({"dual_chunk_attention_config": {"chunk_size": 100, "local_size": 200}}, "chunk_size=100"),
])
def test_bad_hf_configs(patch, needle):
    d = ModelConfig.preset("tiny").to_hf() | patch
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf(d)


def test_from_hf_reads_a_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.preset("small").to_hf()))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.preset("small")
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_hf(tmp_path / "nope")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path / "bad.json")


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="0.5B"):
        ModelConfig.preset("0.6B")

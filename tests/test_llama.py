"""Llama-family checkpoints (Qwen2 without q/k/v biases): logits parity with transformers'
LlamaForCausalLM both ways through HF folders (fp32, max relative error <= 1e-4), and the
Llama config fields we cannot honour are one-line errors naming the field."""

from __future__ import annotations

import json

import pytest
import torch

import qwen25
from conftest import randomize_
from qwen25.checkpoint import CheckpointError, load_model, save_model
from qwen25.config import ConfigError, ModelConfig

LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
             rope_theta=100_000.0, rms_norm_eps=1e-5)


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("tie", [True, False])
def test_llama_folder_loads_with_transformers_logits(tmp_path, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tie))).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32)
    assert not ours.config.qkv_bias and ours.config.model_type == "llama"
    assert ours.model.layers[0].self_attn.q_proj.bias is None
    ids = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4


def test_our_llama_folder_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    cfg = ModelConfig(**LLAMA, qkv_bias=False, tie_word_embeddings=False, bos_token_id=1,
                      eos_token_id=2, torch_dtype="float32")
    ours = randomize_(qwen25.build_model(cfg, seed=0), seed=2)
    save_model(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "llama" and written["attention_bias"] is False
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert isinstance(hf, LlamaForCausalLM)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(ids).logits) <= 1e-4
    assert ModelConfig.from_hf(written) == cfg  # and the config round-trips


@pytest.mark.parametrize("patch,needle", [
    ({"attention_bias": True}, "attention_bias=true"),
    ({"mlp_bias": True}, "mlp_bias=true"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
     "rope_scaling.type='llama3' is not supported"),
    ({"num_experts": 4}, "use 'qwen2_moe'"),
])
def test_llama_features_we_do_not_have_are_errors(patch, needle):
    d = ModelConfig(**LLAMA, qkv_bias=False).to_hf() | patch
    with pytest.raises(ConfigError, match=needle):
        ModelConfig.from_hf(d)


def test_llama_defaults_are_llamas():
    """A Llama config.json that omits keys means LlamaConfig's defaults, not Qwen's."""
    d = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4}
    cfg = ModelConfig.from_hf(d)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.max_position_embeddings, cfg.bos_token_id,
            cfg.eos_token_id, cfg.num_key_value_heads) == (32000, 10_000.0, 2048, 1, 2, 4)


def test_moe_without_qkv_bias_is_an_error():
    with pytest.raises(ConfigError, match="qkv_bias=false with num_experts"):
        ModelConfig.preset("tiny-moe").replace(qkv_bias=False)


def test_a_qwen2_folder_passed_as_llama_is_caught(tmp_path):
    """A Qwen2 folder whose config claims llama: the q/k/v biases are unexpected tensors."""
    cfg = ModelConfig(**LLAMA)
    save_model(qwen25.build_model(cfg, seed=0), tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    written.update(model_type="llama")
    for k in ("use_sliding_window", "sliding_window", "max_window_layers"):
        written.pop(k)
    (tmp_path / "m" / "config.json").write_text(json.dumps(written))
    with pytest.raises(CheckpointError, match=r"unexpected tensor .*_proj\.bias.* llama model"):
        load_model(tmp_path / "m")

"""LoRA through peft on our model: the saved adapter loads in peft + transformers unchanged.

Reference: `peft.PeftModel.from_pretrained(Qwen2ForCausalLM, adapter_folder)`, on the same
base weights. The adapter's B matrices are set to random values (a fresh adapter is the
identity and would prove nothing). Logits must agree to 1e-5 (float32); the merged
weights (`--merge`) must give the adapted logits too, and only adapter weights train.
"""

from __future__ import annotations

import json

import pytest
import torch

import sft_support as S
from qwen25.checkpoint import load_model
from qwen25.train import lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


def _adapted(seed=0):
    model = load_model(S.model_dir(), dtype=torch.float32).eval()
    lora.add_lora(model, rank=4, alpha=8.0, targets=TARGETS, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _ids():
    tok = S.tokenizer()
    return torch.tensor([tok.encode(S.conversations()[0]["messages"][0]["content"])[:48]])


def test_adapter_logits_equal_peft_on_transformers(tmp_path):
    ours = _adapted()
    folder = lora.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == sorted(TARGETS)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(S.model_dir()), torch_dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, str(folder)).eval()
    ids = _ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = load_model(S.model_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (plain(ids) - got).abs().max() > 1e-3  # the adapter changes the model


def test_merged_weights_give_the_adapted_logits():
    ours = _adapted(seed=3)
    merged = load_model(S.model_dir(), dtype=torch.float32).eval()
    merged.load_state_dict(lora.merged_state(ours))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ours(ids), rtol=1e-5, atol=1e-5)


def test_only_adapter_weights_train_and_the_adapter_round_trips(tmp_path):
    ours = _adapted(seed=5)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    lora.save_adapter(ours, tmp_path / "a")
    again = load_model(S.model_dir(), dtype=torch.float32).eval()
    lora.add_lora(again, rank=4, alpha=8.0, targets=TARGETS, seed=99)
    lora.load_adapter(again, tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    base = lora.base_state(ours.state_dict())
    assert set(base) == set(load_model(S.model_dir()).state_dict())

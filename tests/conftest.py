"""Shared fixtures: tiny random reference models built with `transformers`."""

from __future__ import annotations

import os

import pytest
import torch

# Two pytest-xdist workers share two cores: one thread each keeps them from fighting.
torch.set_num_threads(int(os.environ.get("QWEN25_TEST_THREADS", "1")))


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Fill every parameter (norm scales and biases too) with seeded noise.

    HF's own init leaves norms at 1 and biases at 0, which would hide a missing bias or a
    norm applied in the wrong place; random values make every parameter matter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith("norm.weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model


@pytest.fixture
def hf_qwen2(tmp_path):
    """Factory: a saved random HF Qwen2/Qwen2-MoE checkpoint folder for the given config."""

    def make(moe: bool = False, seed: int = 0, dtype=torch.float32, name: str = "hf", **kw):
        from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

        torch.manual_seed(seed)
        if moe:
            model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**kw))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**kw))
        randomize_(model, seed)
        model = model.to(dtype)
        path = tmp_path / name
        model.save_pretrained(path)
        return path, model.eval()

    return make

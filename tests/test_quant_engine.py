"""The engine's C++ decoder runs int8/int4 QuantLinear projections with the int kernels:
same logits as the PyTorch path (which runs QuantLinear's own forward), batch-invariant."""

from __future__ import annotations

import pytest
import torch

from qwen25 import Engine, ModelConfig, build_model
from qwen25.engine.fast import unsupported_reason
from qwen25.engine.runner import ModelRunner
from qwen25.quant import kernels
from qwen25.quant.modules import quantize_model

pytestmark = pytest.mark.skipif(kernels.load() is None or unsupported_reason(
    build_model(ModelConfig.preset("tiny").replace(vocab_size=64), init=False), "avx512") is not None,
    reason="needs the AVX-512 decode kernels")

CFG = ModelConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True, rope_theta=10_000.0)


def _model(dtype, bits, group, lm_head=False):
    return quantize_model(build_model(CFG, dtype=dtype, seed=0).eval(), bits, group, lm_head=lm_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group,head", [(8, None, False), (4, 32, False), (4, 64, True), (8, None, True)])
def test_fast_decode_equals_torch_path(dtype, bits, group, head):
    model = _model(dtype, bits, group, head)
    fast, slow = ModelRunner(model, 3, 64, decode="fast"), ModelRunner(model, 3, 64, decode="torch")
    prompts = [[5, 17, 99, 3], [250, 1], [7, 7, 7, 7, 7, 8]]
    for s, p in enumerate(prompts):
        fast.prefill(s, p, False)
        slow.prefill(s, p, False)
    tokens = [11, 12, 13]
    for _ in range(4):
        a, b = fast.decode([0, 1, 2], tokens).logits, slow.decode([0, 1, 2], tokens).logits
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: a rounding of the same values
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        tokens = a.argmax(-1).tolist()


def test_engine_uses_the_fast_path_and_is_batch_invariant():
    model = _model(torch.bfloat16, 4, 32)
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    assert engine.runner.decode_path == "fast"
    prompts = [[1, 2, 3], [40, 41], [300, 2, 9, 9], [77]]
    together = engine.generate(prompts, max_new_tokens=6, temperature=0.0, logprobs=1)
    for p, out in zip(prompts, together):
        alone = engine.generate([p], max_new_tokens=6, temperature=0.0, logprobs=1)[0]
        assert alone.tokens == out.tokens

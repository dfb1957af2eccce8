"""The C++ decode kernels: GEMV against F.linear, the decoder on every model variant the
engine meets, and the clean fallback when the kernels cannot be built or used.

Tolerances: GEMV results are compared with a float64 reference at 1e-5 of sum|x||w| (both
fp32 and bf16 inputs are exact in fp32, only the summation order differs).
"""

import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize_
from qwen25 import Engine, build_model
from qwen25.config import DCAConfig, ModelConfig, RopeScaling
from qwen25.engine import kernels
from qwen25.engine.fast import unsupported_reason

ISAS = ["portable"] + (["avx512"] if kernels.best_isa("bfloat16") else [])


def linear(x, W, isa):
    M, K = x.shape
    y = torch.empty(M, W.shape[0])
    code = kernels.DTYPE_CODES[str(W.dtype).removeprefix("torch.")]
    assert kernels.load().q25_linear(code, kernels.ISAS[isa], x.data_ptr(), W.data_ptr(), M, K, W.shape[0],
                                     y.data_ptr(), torch.get_num_threads()) == 0
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 37, 17), (3, 100, 64), (8, 333, 896), (11, 64, 200), (1, 5, 1)])
def test_gemv_matches_f_linear(isa, dtype, M, N, K):
    g = torch.Generator().manual_seed(M * N + K)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = torch.randn(N, K, generator=g).to(dtype)
    ours = linear(x, W, isa)
    ref = torch.nn.functional.linear(x.double(), W.double())
    bound = 1e-5 * (x.double().abs() @ W.double().abs().T)
    assert ((ours.double() - ref).abs() <= bound + 1e-30).all()
    torch.testing.assert_close(ours, torch.nn.functional.linear(x, W).float(),
                               atol=1e-4 if dtype == torch.float32 else 0.25, rtol=1e-4 if dtype == torch.float32 else 2e-2)


def test_gemv_rows_do_not_depend_on_the_batch():
    """Every input's result is bit-identical alone or with 1..15 others (seeded sampling,
    and the server's promise that a batched answer equals the same request alone)."""
    isa = ISAS[-1]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(50, 300, generator=g).to(dtype)
        x = torch.randn(16, 300, generator=g).to(dtype)
        alone = torch.cat([linear(x[i:i + 1], W, isa) for i in range(16)])
        for m in range(2, 17):  # 50 rows: blocks of 3 and a tail; K = 300: a masked tail
            assert torch.equal(linear(x[:m], W, isa), alone[:m])


def tiny(**changes) -> ModelConfig:
    return ModelConfig.preset("tiny").replace(vocab_size=300, **changes)


def naive_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name, cfg, path", [
    ("yarn", tiny(rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16)), "fast"),
    ("untied", tiny(tie_word_embeddings=False), "fast"),
    ("moe", ModelConfig.preset("tiny-moe").replace(vocab_size=300), "torch"),
    ("dca", tiny(dual_chunk_attention=DCAConfig(chunk_size=12, local_size=4)), "torch"),
])
def test_engine_greedy_equals_a_naive_loop_on_model_variants(name, cfg, path):
    model = randomize_(build_model(cfg, seed=0), seed=1, std=0.15).eval()
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    expected = path if path == "torch" or kernels.best_isa("float32") else "torch"
    assert engine.decode_path == expected, engine.fast_path_reason
    prompts = [list(range(3, 23)), [7, 8, 9]]  # the first runs past 16 (YaRN) and 2 DCA chunks
    results = engine.generate(prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    for p, r in zip(prompts, results):
        assert r.tokens == naive_greedy(model, p, 12)


def test_dynamic_ntk_decodes_like_the_cached_model():
    """Dynamic NTK changes the RoPE base as the sequence grows, so cached keys keep the base
    they were written with (as in transformers); the reference is the PyTorch model decoding
    through the same cache, not a fresh forward over the whole sequence."""
    cfg = tiny(rope_scaling=RopeScaling("dynamic", 2.0, original_max_position_embeddings=16))
    model = randomize_(build_model(cfg, seed=0), seed=1, std=0.15).eval()
    prompts = [list(range(3, 23)), [7, 8, 9]]
    runs = {}
    for path in ("torch", "auto"):
        engine = Engine(model, max_batch_size=2, max_seq_len=64, decode=path)
        runs[path] = [r.tokens for r in engine.generate(prompts, max_new_tokens=12, temperature=0)]
    assert runs["auto"] == runs["torch"]


def test_unsupported_models_name_the_reason():
    assert "mixture-of-experts" in unsupported_reason(build_model(ModelConfig.preset("tiny-moe").replace(vocab_size=300)))
    assert "dual chunk" in unsupported_reason(build_model(tiny(dual_chunk_attention=DCAConfig(12, 4))))
    assert "dtype" in unsupported_reason(build_model(tiny(), dtype=torch.float16))


def test_replaced_parameters_are_picked_up():
    """A new parameter tensor (not an in-place update) rebinds the C++ decoder."""
    model = randomize_(build_model(tiny(), seed=0), seed=2, std=0.15).eval()
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    before = engine.generate([[1, 2, 3]], max_new_tokens=5, temperature=0)[0].tokens
    layer = model.model.layers[0].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * -3.0)
    after = engine.generate([[1, 2, 3]], max_new_tokens=5, temperature=0)[0].tokens
    assert after == naive_greedy(model, [1, 2, 3], 5) and after != before


FALLBACK = """
import torch
from qwen25 import Engine, build_model
from qwen25.config import ModelConfig
from qwen25.engine import kernels
model = build_model(ModelConfig.preset("tiny").replace(vocab_size=300), seed=0)
engine = Engine(model, max_batch_size=1, max_seq_len=32)
out = engine.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)[0].tokens
print(engine.decode_path, "|", engine.fast_path_reason, "|", len(out))
"""


@pytest.mark.parametrize("env, reason", [
    ({"CXX": "/nonexistent/g++"}, "no C++ compiler"),
    ({"QWEN25_KERNELS": "0"}, "disabled"),
])
def test_engine_falls_back_to_torch_without_the_kernels(tmp_path, env, reason):
    full_env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=full_env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
    assert out.returncode == 0, out.stderr
    path, why, n = [s.strip() for s in out.stdout.strip().splitlines()[-1].split("|")]
    assert path == "torch" and reason in why and n == "4"


def test_the_library_is_cached_by_source_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = kernels.build()
    assert first.parent == tmp_path / "qwen25" / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert kernels.build() == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    assert not list(first.parent.glob(".build-*"))  # no temporary left behind


def test_hugepage_collapse_keeps_every_value():
    from qwen25.engine import hugepages

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3_000_000, generator=g)  # 12 MB, not 2 MiB aligned
    b = a[5:]  # a view of the same storage: collapsed once
    small = torch.randn(100)
    expected = a.clone()
    regions = hugepages.ranges([a, b, small])
    assert len(regions) == 1
    start, length = regions[0]
    base = a.untyped_storage().data_ptr()
    assert start % hugepages.HUGE == 0 and length % hugepages.HUGE == 0
    assert base <= start and start + length <= base + a.numel() * 4
    hugepages.collapse(regions)  # may be refused by the kernel; must never change data
    assert torch.equal(a, expected)
    model = build_model(tiny(), seed=0)
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    before = engine.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)[0].tokens
    if engine._hugepages is not None:
        engine._hugepages.join()
    assert engine.generate([[1, 2, 3]], max_new_tokens=4, temperature=0)[0].tokens == before

"""One context rule for every verb: `serve` builds what `generate` builds for the same flags.

`serve` once skipped the context check when dual chunk attention was on (so --max-model-len
could exceed what the model allows) and held a second, different `extend_context`. The
reference here is `qwen25 generate` itself: each verb runs through the real CLI with the
Engine class recorded (and the HTTP server not started), and the two engines must hold the
same context and the same rope/DCA config; a length past the limit is the same one-line
error (exit 2) for both. Also: `--device cuda` on a machine without CUDA is a one-line error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen25.engine
import qwen25.serve
from qwen25 import ModelConfig, build_model, save_model
from qwen25.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=151936, max_position_embeddings=64, rope_theta=10_000.0)
    path = tmp_path_factory.mktemp("ctx-ckpt")
    save_model(build_model(cfg, seed=0), path)
    return path


@pytest.fixture
def engines(monkeypatch):
    """Record every Engine the CLI builds; `qwen25 serve` returns instead of serving."""
    built = []

    class Recording(qwen25.engine.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(qwen25.engine, "Engine", Recording)
    monkeypatch.setattr(qwen25.serve, "run", lambda state, **kw: None)
    return built


def _verb(verb: str, checkpoint, flags, capsys):
    argv = [verb, str(checkpoint), "--tokenizer", "qwen2.5", *flags]
    if verb == "generate":
        argv += ["--prompt", "hi", "--max-new-tokens", "1", "--temperature", "0"]
    else:
        argv += ["--port", "1"]
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--dca", "32:8"], ["--rope-scaling", "yarn:2", "--dca", "32:8"],
                                   ["--rope-scaling", "yarn:2"]])
def test_serve_context_and_rope_equal_generate(checkpoint, engines, capsys, flags):
    # a length the extended model allows: both build it, with the same config
    code_g, err_g = _verb("generate", checkpoint, [*flags, "--max-seq-len", "100"], capsys)
    code_s, err_s = _verb("serve", checkpoint, [*flags, "--max-model-len", "100"], capsys)
    assert (code_g, code_s) == (0, 0), err_g + err_s
    gen, srv = engines
    assert srv.max_seq_len == gen.max_seq_len == 100
    for field in ("dual_chunk_attention", "rope_scaling", "max_position_embeddings"):
        assert getattr(srv.model.config, field) == getattr(gen.model.config, field), field
    # past the limit (DCA 32 x 4 = 128; yarn 2 x 64 = 128): the same one-line error, exit 2
    engines.clear()
    code_g, err_g = _verb("generate", checkpoint, [*flags, "--max-seq-len", "200"], capsys)
    code_s, err_s = _verb("serve", checkpoint, [*flags, "--max-model-len", "200"], capsys)
    assert (code_g, code_s) == (2, 2) and not engines
    tail = lambda err: err.strip().split("error: ", 1)[1].replace("--max-model-len", "FLAG").replace("--max-seq-len", "FLAG")
    assert len(err_s.strip().splitlines()) == 1 and tail(err_s) == tail(err_g)
    assert "context of 128 tokens" in err_s


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_generate_on_a_missing_cuda_device_is_one_line_exit_2(checkpoint):
    out = subprocess.run([sys.executable, "-m", "qwen25", "generate", str(checkpoint), "--tokenizer", "qwen2.5",
                          "--device", "cuda", "--prompt", "hi"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen25 generate: error: --device cuda")

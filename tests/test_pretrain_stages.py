"""The long-context stage (ABF): longer sequences, a raised RoPE base, HF-loadable result.

Reference: transformers' `Qwen2ForCausalLM` loading the run's final folder must report the
new `rope_theta` and give our logits (fp32, max relative error 1e-4) at positions past the
first stage's sequence length.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qwen25.checkpoint import load_model
from qwen25.train.config import PretrainConfig, Stage
from qwen25.train.pretrain import pretrain
from train_fakes import fake_factory, write_fake_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    rng = np.random.default_rng(3)
    toks = np.cumsum(rng.integers(1, 5, 12000)) % 80
    return str(write_fake_manifest(tmp_path_factory.mktemp("data"), toks[:10000], toks[10000:]))


def _run(out, manifest, reset=False, compile=False, **stage2):
    cfg = PretrainConfig(compile=compile,
        out=str(out), model="tiny", model_overrides={"vocab_size": 80}, data=manifest,
        seq_len=16, batch_tokens=128, micro_batch=4, lr=3e-3, warmup_steps=2, eval_every=0,
        eval_tokens=256, checkpoint_every=0, keep_checkpoints=5, peak_flops=1e12,
        stages=(Stage("short", steps=5),
                Stage("long", steps=4, seq_len=64, micro_batch=2, rope_theta=1e6, reset_optimizer=reset,
                      **stage2)))
    return pretrain(cfg, loader_factory=fake_factory)


def test_long_stage_raises_rope_base_and_context_and_loads_in_transformers(tmp_path, manifest):
    from transformers import Qwen2ForCausalLM

    summary = _run(tmp_path / "run", manifest, short_fraction=0.5, short_seq_len=16)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_00000005", "step_00000009"]  # each stage's end
    first = json.loads((ckpts[0] / "config.json").read_text())
    assert first["rope_theta"] == 10_000.0 and first["max_position_embeddings"] == 16
    final = tmp_path / "run" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["max_position_embeddings"] == 64
    assert summary["step"] == 9 and summary["tokens"] == 9 * 128

    hf = Qwen2ForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    rope = getattr(hf.config, "rope_parameters", None) or {"rope_theta": hf.config.rope_theta}
    assert rope["rope_theta"] == 1e6
    ours = load_model(final, dtype=torch.float32)
    ids = torch.randint(0, 80, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    # the stage-1 weights were really continued (not re-initialised): the long stage starts
    # well below the loss of the run's first step
    train = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    long_first = next(r for r in train if r["stage"] == "long")
    assert long_first["loss"] < train[0]["loss"] - 0.2


def test_reset_optimizer_starts_the_stage_with_fresh_moments(tmp_path, manifest):
    _run(tmp_path / "keep", manifest)
    _run(tmp_path / "reset", manifest, reset=True)

    def adam_steps(run):
        ck = sorted((tmp_path / run / "checkpoints").glob("step_*"))[-1]
        t = load_file(str(ck / "trainer_state" / "optimizer.safetensors"))
        return {float(v) for k, v in t.items() if k.endswith("::step")}

    assert adam_steps("keep") == {9.0}
    assert adam_steps("reset") == {4.0}


def test_moe_model_trains_with_the_load_balancing_loss(tmp_path, manifest):
    cfg = PretrainConfig(
        out=str(tmp_path / "moe"), model="tiny-moe", model_overrides={"vocab_size": 80}, data=manifest,
        seq_len=16, batch_tokens=128, micro_batch=4, lr=3e-3, warmup_steps=1, eval_every=0,
        eval_tokens=256, checkpoint_every=0, peak_flops=1e12, stages=(Stage("main", steps=4),))
    summary = pretrain(cfg, loader_factory=fake_factory)
    train = [r for r in map(json.loads, (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert len(train) == 4 and all(r["aux_loss"] is not None and r["aux_loss"] >= 1.0 - 1e-6 for r in train)
    assert json.loads((tmp_path / "moe" / "final" / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert summary["eval"]["all"]["loss"] < np.log(80)


def _train_losses(run):
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_compiled_run_follows_the_eager_run_through_both_stages(tmp_path, manifest):
    """`compile` (blocks + loss through torch.compile, recompiled for the long stage's
    shapes) trains the same run as eager mode: per-step losses within 1e-4 relative (fp32;
    fused kernels sum in another order, and the difference grows a little step by step)."""
    _run(tmp_path / "eager", manifest, short_fraction=0.5, short_seq_len=16)
    _run(tmp_path / "compiled", manifest, compile=True, short_fraction=0.5, short_seq_len=16)
    eager, compiled = _train_losses(tmp_path / "eager"), _train_losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 9
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert (tmp_path / "compiled" / "final" / "config.json").is_file()


def test_a_held_out_set_smaller_than_one_micro_batch_is_still_scored(tmp_path, manifest):
    """2,000 held-out tokens, micro-batches of 64 x 64 = 4,096: the evaluation falls back to
    one sequence at a time (it used to divide by zero tokens). Reference: the loss over the
    same held-out rows recomputed from the saved model with F.cross_entropy, rtol 1e-5."""
    from pathlib import Path

    import torch.nn.functional as F

    cfg = PretrainConfig(
        out=str(tmp_path / "run"), model="tiny", model_overrides={"vocab_size": 80}, data=manifest,
        seq_len=64, batch_tokens=4096, micro_batch=64, lr=1e-3, warmup_steps=1, eval_every=0,
        eval_tokens=0, checkpoint_every=0, peak_flops=1e12, stages=(Stage("short", steps=1),))
    r = pretrain(cfg, loader_factory=fake_factory)["eval"]["all"]
    meta = json.loads(Path(manifest).read_text())
    val = torch.from_numpy(np.load(Path(manifest).parent / meta["val"]).astype(np.int64))
    rows = (len(val) - 1) // 64  # the fake loader's rows: T + 1 tokens starting every T
    ids = torch.stack([val[i * 64:i * 64 + 65] for i in range(rows)])
    assert rows < 64 and r["tokens"] == rows * 64
    assert r["bpb"] is not None and np.isfinite(r["bpb"])
    model = load_model(tmp_path / "run" / "final", dtype=torch.float32)
    with torch.no_grad():
        ref = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    assert r["loss"] == pytest.approx(float(ref), rel=1e-5)

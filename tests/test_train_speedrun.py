"""Speedrun pieces that need no corpus: profiles validate, the time plan, timings, the report."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qwen25.recipes import speedrun as sr
from qwen25.train.config import validate
from qwen25.train.pretrain import pretrain
from qwen25.train.report import write_report
from train_fakes import fake_factory, write_fake_manifest


@pytest.mark.parametrize("name", sorted(sr.PROFILES))
def test_profiles_are_valid_two_stage_abf_runs(name, tmp_path):
    prof = sr.profile(name)
    cfg = sr.run_config(prof, tmp_path)
    validate(cfg)
    short, long = cfg.stages
    assert (long.seq_len or cfg.seq_len) > (short.seq_len or cfg.seq_len)
    assert long.rope_theta == 1e6 and cfg.model_overrides["rope_theta"] == 1e4
    assert cfg.data == str(tmp_path / "data" / "manifest.json")
    if prof.budget_s:
        assert len(prof.stage_shares) == len(cfg.stages) and abs(sum(prof.stage_shares) - 1) < 1e-9


def test_apply_plan_keeps_tokens_per_micro_batch_and_sets_steps(tmp_path):
    cfg = sr.run_config(sr.CPU, tmp_path)
    planned = sr.apply_plan(cfg, {"precision": "bf16", "micro_batch": 16, "steps": [170, 30]})
    validate(planned)
    assert planned.precision == "bf16" and planned.micro_batch == 16
    assert [s.steps for s in planned.stages] == [170, 30]
    assert [s.micro_batch * (s.seq_len or cfg.seq_len) for s in planned.stages] == [16 * 256] * 2


def test_plan_steps_fit_the_time_and_respect_the_floors():
    cfg = sr.run_config(sr.CPU, Path("x"))
    cost = 0.85 + 0.15 * sr.LONG_STAGE_COST
    steps = sr.plan_steps(sr.CPU, cfg, rate=6000.0, seconds=600.0)
    expected = int((600.0 - sr.AFTER_TRAINING_S) * sr.OVERHEAD * 6000.0 / cost / cfg.batch_tokens)
    assert abs(sum(steps) - expected) <= 1 and steps[0] > 5 * steps[1]
    assert sum(sr.plan_steps(sr.CPU, cfg, rate=6000.0, seconds=1.0)) >= sr.MIN_STEPS
    assert sum(sr.plan_steps(sr.CPU, cfg, 1e6, 1e6)) * cfg.batch_tokens <= sr.CPU.max_tokens + cfg.batch_tokens
    # after 40 steps the plan may shrink, but never below a run whose decay starts after them
    late = sr.plan_steps(sr.CPU, cfg, rate=100.0, seconds=10.0, done=40)
    assert sum(late) * (1 - cfg.decay_frac) > 40 and late[0] > 40


def test_measure_rates_times_every_candidate(tmp_path):
    cfg = replace(sr.run_config(sr.CPU, tmp_path), batch_tokens=1024, seq_len=64,
                  model_overrides={**sr.CPU.pretrain.model_overrides, "vocab_size": 128, "hidden_size": 64,
                                   "intermediate_size": 96, "num_attention_heads": 2})
    rates = sr.measure_rates(cfg, (("fp32", 4), ("bf16", 8), ("bf16", 8, "compile")), tokenizer=None, rounds=1)
    assert set(rates) == {"fp32/4", "bf16/8", "bf16/8/compile"} and all(r > 0 for r in rates.values())


def test_a_paused_run_continued_under_a_longer_plan_equals_that_plan_run_straight(tmp_path):
    """The speedrun's re-planning: steps before the pause sit in warmup + constant LR."""
    toks = np.cumsum(np.random.default_rng(1).integers(1, 4, 12000)) % 60
    manifest = str(write_fake_manifest(tmp_path / "data", toks[:10000], toks[10000:]))

    def cfg(out, short, long, stop=0):
        base = sr.run_config(sr.CPU, tmp_path / out)
        return replace(base, data=manifest, tokenizer=None, eval_sets=("all",), batch_tokens=1024,
                       micro_batch=2, eval_every=0, checkpoint_every=0, peak_flops=1e12, warmup_steps=3,
                       model_overrides={**base.model_overrides, "vocab_size": 64, "hidden_size": 64,
                                        "intermediate_size": 96, "num_attention_heads": 2},
                       stop_after_step=stop,
                       stages=(replace(base.stages[0], steps=short, mix=None),
                               replace(base.stages[1], steps=long, mix=None, micro_batch=1)))

    paused = pretrain(cfg("run", 20, 4, stop=6), loader_factory=fake_factory)
    assert paused["paused"] == 6 and not (tmp_path / "run" / "final").exists()
    pretrain(cfg("run", 26, 5), loader_factory=fake_factory)  # the final plan: longer
    pretrain(cfg("straight", 26, 5), loader_factory=fake_factory)
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for d in ("run", "straight")]
    assert len(losses[0]) == 31 and losses[0] == losses[1]


def test_timings_accumulate_across_invocations(tmp_path):
    t = sr.Timings(tmp_path / "timings.json")
    t.add("data", 2.0)
    with t.phase("pretrain"):
        pass
    t2 = sr.Timings(tmp_path / "timings.json")
    t2.add("data", 1.5)
    assert json.loads((tmp_path / "timings.json").read_text())["data"] == 3.5
    assert "pretrain" in t2.seconds


def test_report_states_the_held_out_result_timings_stages_and_chat_command(tmp_path):
    toks = np.cumsum(np.random.default_rng(0).integers(1, 4, 12000)) % 60
    manifest = write_fake_manifest(tmp_path / "data", toks[:9000], toks[9000:], bytes_per_token=3.0)
    cfg = sr.run_config(sr.CPU, tmp_path / "run")
    cfg = replace(cfg, data=str(manifest), tokenizer=None, model_overrides={**cfg.model_overrides, "vocab_size": 64},
                  eval_sets=("all",), batch_tokens=2048, micro_batch=2, eval_every=0, checkpoint_every=0,
                  peak_flops=1e12, stages=tuple(replace(s, steps=3, mix=None) for s in cfg.stages))
    summary = pretrain(cfg, loader_factory=fake_factory)
    summary["eval"]["shakespeare"] = dict(summary["eval"]["all"])  # the real run reports this set
    plan = {"precision": "fp32", "micro_batch": 2, "rates_tokens_per_s": {"fp32/2": 1234.0, "bf16/2": 99.0},
            "final": True, "measured_tokens_per_s": 1500.0, "seconds_left": 600.0, "steps": [3, 3],
            "tokens": 12288}
    path = write_report(tmp_path / "run", sr.CPU, cfg, summary, {"setup": 61.0, "pretrain": 12.5}, {"torch": "x"}, plan)
    text = path.read_text()
    bpb = summary["eval"]["all"]["bpb"]
    assert f"**Held-out Shakespeare: {bpb:.3f} bits per byte**" in text
    assert "| setup | 1:01 |" in text and "| **total** | **1:14** |" in text
    assert "| short | 3 | 256 | 10000 |" in text and "| long | 3 | 1024 | 1e+06 |" in text
    assert "fp32/2: 1,234, bf16/2: 99)" in text and "ran at 1,500 tokens/s with 10:00 left" in text
    assert "3 + 3 steps (12,288 tokens)" in text
    assert f"qwen25 chat {tmp_path / 'run' / 'final'}" in text
    assert (tmp_path / "run" / "plots" / "loss.png").exists() and (tmp_path / "run" / "plots" / "bpb.png").exists()

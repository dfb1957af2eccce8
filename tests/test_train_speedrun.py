"""Speedrun pieces that need no corpus: profiles validate, the time plan, timings, the report."""

import json
from dataclasses import replace

import numpy as np
import pytest

from qwen25.train import speedrun as sr
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


def test_plan_measures_once_then_reuses_the_saved_plan(tmp_path, monkeypatch):
    calls = []

    def fake_rate(cfg, precision, micro_batch, tokenizer, steps=2):
        calls.append((precision, micro_batch))
        return {"fp32": 5000.0, "bf16": 6000.0}[precision] + micro_batch

    monkeypatch.setattr(sr, "measure_rate", fake_rate)
    cfg = sr.run_config(sr.CPU, tmp_path)
    path = tmp_path / "plan.json"
    p = sr.plan(sr.CPU, cfg, None, seconds_left=600.0, path=path)
    assert calls == list(sr.CPU.candidates)
    assert (p["precision"], p["micro_batch"]) == ("bf16", 8)
    train_s = (600.0 - sr.AFTER_TRAINING_S) * sr.OVERHEAD
    cost = 0.85 + 0.15 * sr.LONG_STAGE_COST
    expected_total = int(train_s * 6008.0 / cost // cfg.batch_tokens)
    assert sum(p["steps"]) in (expected_total, expected_total + 1)  # rounding of the shares
    assert p["steps"][0] > 5 * p["steps"][1]
    again = sr.plan(sr.CPU, cfg, None, seconds_left=10.0, path=path)  # a resumed run: same plan
    assert again == p and len(calls) == len(sr.CPU.candidates)
    # little time left still plans a run that can learn something, capped by max_tokens
    tiny = sr.plan(sr.CPU, cfg, None, seconds_left=1.0, path=tmp_path / "p2.json")
    assert sum(tiny["steps"]) >= 60
    big = sr.plan(sr.CPU, cfg, None, seconds_left=1e6, path=tmp_path / "p3.json")
    assert big["tokens"] <= sr.CPU.max_tokens


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
    plan = {"precision": "fp32", "micro_batch": 2, "rates_tokens_per_s": {"fp32/2": 1234.0},
            "seconds_for_training": 600.0, "steps": [3, 3], "tokens": 3072}
    path = write_report(tmp_path / "run", sr.CPU, cfg, summary, {"setup": 61.0, "pretrain": 12.5}, {"torch": "x"}, plan)
    text = path.read_text()
    bpb = summary["eval"]["all"]["bpb"]
    assert f"**Held-out Shakespeare: {bpb:.3f} bits per byte**" in text
    assert "| setup | 1:01 |" in text and "| **total** | **1:14** |" in text
    assert "| short | 3 | 256 | 10000 |" in text and "| long | 3 | 1024 | 1e+06 |" in text
    assert "fp32/2: 1,234 tokens/s" in text
    assert f"qwen25 chat {tmp_path / 'run' / 'final'}" in text
    assert (tmp_path / "run" / "plots" / "loss.png").exists() and (tmp_path / "run" / "plots" / "bpb.png").exists()

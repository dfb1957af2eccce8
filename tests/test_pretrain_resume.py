"""Exact resume: kill -9 at random points, re-run the same command, get the same run.

A two-stage run (short context, then long context with the RoPE base raised and a
short/long sequence mix) checkpoints after every step. The reference runs uninterrupted; the
other is SIGKILLed several times at random moments (mid-step and mid-save, since saves take
a good share of each step) and re-run each time. Per-step losses and gradient norms in
`metrics.jsonl` and the final weights must be bitwise equal (CPU, float32, one thread).
SIGTERM must save at the next step boundary, exit 0, and resume identically too.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from train_fakes import write_fake_manifest

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path, out: str) -> Path:
    rng = np.random.default_rng(0)
    V = 64
    nxt = rng.integers(0, V, V)
    toks = [0]
    for _ in range(30000):  # a noisy Markov chain: something to learn, so losses move
        toks.append(int(nxt[toks[-1]]) if rng.random() < 0.6 else int(rng.integers(0, V)))
    toks = np.array(toks)
    manifest = write_fake_manifest(tmp / "data", toks[:27000], toks[27000:])
    cfg = {
        "out": str(tmp / out), "model": "tiny", "model_overrides": {"vocab_size": V},
        "data": str(manifest), "seq_len": 16, "batch_tokens": 128, "micro_batch": 4,
        "lr": 3e-3, "warmup_steps": 3, "threads": 1, "checkpoint_every": 1, "keep_checkpoints": 2,
        "eval_every": 5, "eval_tokens": 256, "peak_flops": 1e12,
        "stages": [{"name": "short", "steps": 10},
                   {"name": "long", "steps": 8, "seq_len": 32, "micro_batch": 2, "rope_theta": 1e6,
                    "short_fraction": 0.5, "short_seq_len": 8}],
    }
    path = tmp / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return path


def _start(config: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_fakes.py"), str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if r["kind"] == "train":
            recs.append(r)
    return recs


def _wait_for_step(proc, out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _train_records(out)
        if recs and recs[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _finish(config: Path) -> None:
    proc = _start(config)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_is_bitwise_identical(tmp_path):
    ref_cfg = _config(tmp_path, "reference")
    _finish(ref_cfg)
    reference = _train_records(tmp_path / "reference")
    assert [r["step"] for r in reference] == list(range(1, 19))

    cfg = _config(tmp_path, "killed")
    out = tmp_path / "killed"
    rnd = random.Random(7)
    resumed_from = []
    for target in sorted(rnd.sample(range(2, 17), 4)):
        proc = _start(cfg)
        _wait_for_step(proc, out, target)
        time.sleep(rnd.uniform(0.0, 0.05))  # land anywhere inside the next step or save
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = sorted((out / "checkpoints").glob("step_*"))
        resumed_from.append(ckpts[-1].name if ckpts else None)
    _finish(cfg)

    got = _train_records(out)
    assert [r["step"] for r in got] == list(range(1, 19)), "each step logged exactly once"
    for a, b in zip(reference, got):
        assert a["loss"] == b["loss"], f"step {a['step']}: {a['loss']} != {b['loss']} (resumed from {resumed_from})"
        assert a["grad_norm"] == b["grad_norm"]
        assert a["lr"] == b["lr"]
    ref_w, got_w = _final_weights(tmp_path / "reference"), _final_weights(out)
    assert ref_w.keys() == got_w.keys()
    for k in ref_w:
        assert torch.equal(ref_w[k], got_w[k]), k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    final_cfg = json.loads((out / "final" / "config.json").read_text())
    assert final_cfg["rope_theta"] == 1e6


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_boundary_and_exits_zero(tmp_path):
    ref_cfg = _config(tmp_path, "reference")
    _finish(ref_cfg)
    cfg = _config(tmp_path, "term")
    out = tmp_path / "term"
    proc = _start(cfg)
    _wait_for_step(proc, out, 6)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "run the same command to resume" in err
    saved = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert 6 <= saved < 18
    assert not (out / "final").exists()  # the run is not finished
    _finish(cfg)
    assert [r["loss"] for r in _train_records(out)] == [r["loss"] for r in _train_records(tmp_path / "reference")]

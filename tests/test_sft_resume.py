"""SFT runs resume exactly and split over processes: kill -9, re-run, same run; 2 ranks = 1.

The CLI (`python -m qwen25 sft --config FILE`) runs in a subprocess on CPU, float32, one
thread, checkpointing after every step. A reference run goes uninterrupted; the other is
SIGKILLed at random moments and re-run until done. Per-step losses and gradient norms in
metrics.jsonl and the final weights (or the LoRA adapter) must be bitwise equal. The LoRA
run uses adapter dropout, so the restored RNG state is on the path too.
2 processes (torchrun, gloo, DDP) must log the losses of 1 process with the same global
batch, to 1e-5 (float32 sums in another order).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft_support as S

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def _config(tmp: Path, name: str, **over) -> Path:
    data = tmp / "data.jsonl"
    if not data.exists():
        S.write_jsonl(data, S.conversations() * 2)
    cfg = {"out": str(tmp / name), "model": str(S.model_dir()), "data": str(data), "eval_fraction": 0.1,
           "seq_len": 1024, "batch_size": 4, "micro_batch": 2, "layout": "pack", "steps": STEPS, "lr": 3e-3,
           "warmup_steps": 2, "threads": 1, "device": "cpu", "checkpoint_every": 1, "eval_every": 4,
           "eval_examples": 2, "sample_count": 1, "sample_tokens": 4, "keep_checkpoints": 2} | over
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _cmd(config: Path, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "qwen25", "sft", "--config", str(config)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "qwen25", "sft", "--config", str(config)]


def _start(config: Path, nproc: int = 1) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(_cmd(config, nproc), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finish(config: Path, nproc: int = 1) -> None:
    proc = _start(config, nproc)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    recs = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["kind"] == "train":
            recs.append(r)
    return recs


def _wait_for_step(proc, out: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = _records(out)
        if (recs and recs[-1]["step"] >= step) or proc.poll() is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_kill9_then_resume_gives_bitwise_equal_losses(tmp_path, kind):
    over = {"lora_rank": 4, "lora_dropout": 0.1, "lr": 1e-2} if kind == "lora" else {}
    _finish(_config(tmp_path, "reference", **over))
    reference = _records(tmp_path / "reference")
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    cfg = _config(tmp_path, "killed", **over)
    out = tmp_path / "killed"
    rnd = random.Random(3 if kind == "lora" else 4)
    for target in sorted(rnd.sample(range(1, STEPS - 1), 2)):
        proc = _start(cfg)
        _wait_for_step(proc, out, target)
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _finish(cfg)

    got = _records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step logged exactly once"
    for a, b in zip(reference, got):
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), a["step"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] is not None
    name = "adapter/adapter_model.safetensors" if kind == "lora" else "final/model.safetensors"
    ref_w, got_w = load_file(str(tmp_path / "reference" / name)), load_file(str(out / name))
    assert ref_w.keys() == got_w.keys() and all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


@pytest.mark.slow
def test_two_ddp_processes_log_the_losses_of_one(tmp_path):
    _finish(_config(tmp_path, "one", parallel="ddp", steps=4, checkpoint_every=0))
    _finish(_config(tmp_path, "two", parallel="ddp", steps=4, checkpoint_every=0), nproc=2)
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)

"""GRPO over 2 processes (torchrun, gloo, CPU, DDP) = GRPO in 1 process with the same config.

Reference: the one-process run. Each run is a subprocess (`grpo_support.py` as a script,
which registers the parity reward), float32, one thread per process. The step rolls out 2
queries x 4 answers, so under torchrun each rank rolls out one query and trains on its 4
answers as one micro-batch, where the one process takes 2 micro-batches: the same
micro-batches, so the forward passes are the same arithmetic. What must match:

- the rollouts, exactly: the variance-ordered selection (each rank scores half the pool,
  rewards all-gathered) and the answers (seeded per query, not per rank) give the same
  reward and length statistics, bit for bit;
- per-step losses and the objective's statistics (clip fraction, KL, |ρ − 1|, entropy) to
  1e-6 absolute: float32 sums in another order (one process accumulates the two loss sums
  in float32, two add them in float64); gradient norms to 1e-6 relative; the held-out
  accuracy (each rank answers half) exactly;
- the final weights to 1e-6: DDP's pre-divided all-reduce of two gradients is the one
  process's accumulated sum scaled by a power of two, so with the same rollouts they come
  out bitwise equal (measured on an AVX-512 CPU: weights and statistics 0, losses <= 6e-9).

Cases: full fine-tuning, and LoRA with beta > 0 (the reference is the base with the
adapters off). And a bad input: queries_per_step not divisible by the processes is a
one-line error from the CLI under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from grpo_support import build_chat_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).with_name("grpo_support.py")
TOL = 1e-6
CASES = {
    "full": {"lr": 3e-3},
    "lora": {"lr": 2e-2, "lora_rank": 4, "lora_alpha": 8.0, "beta": 0.05},
}


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    return build_chat_checkpoint(tmp_path_factory.mktemp("grpo-dist"))


def _config(ck: Path, out: Path, **over) -> Path:
    cfg = {"model": str(ck), "out": str(out), "reward": "parity", "group_size": 4, "queries_per_step": 2,
           "rollouts": 2, "mu": 2, "max_new_tokens": 10, "micro_batch": 4, "max_batch_size": 8,
           "eval_queries": 4, "eval_max_new_tokens": 8, "eval_every": 0, "checkpoint_every": 0,
           "threads": 1, "device": "cpu"} | over
    path = out.with_suffix(".json")
    path.write_text(json.dumps(cfg))
    return path


def _run(cmd: list[str], nproc: int) -> subprocess.CompletedProcess:
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launch, *cmd], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=300)


def _records(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_give_the_run_of_one(ck, tmp_path, case):
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        proc = _run([str(SUPPORT), str(_config(ck, out, **CASES[case]))], nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[nproc] = out
    one, two = outs[1], outs[2]

    ra, rb = _records(one, "rollout"), _records(two, "rollout")
    assert len(ra) == len(rb) == 2
    for a, b in zip(ra, rb):
        for k in ("pool", "zero_variance", "selected_variance", "pool_variance", "reward_mean", "reward_std",
                  "reward_failed", "answers", "length_mean"):
            assert a[k] == b[k], (k, a[k], b[k])
    assert any(r["reward_std"] > 0 for r in ra)  # the advantages are not all zero

    worst = {"loss": 0.0, "stats": 0.0, "weights": 0.0}
    ta, tb = _records(one, "train"), _records(two, "train")
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == [1, 2, 3, 4]
    for a, b in zip(ta, tb):
        assert a["tokens"] == b["tokens"] and not a["skipped"] and not b["skipped"]
        worst["loss"] = max(worst["loss"], abs(a["loss"] - b["loss"]))
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=TOL)
    assert any(r["loss"] != 0.0 for r in ta)
    ua, ub = _records(one, "grpo_update"), _records(two, "grpo_update")
    assert len(ua) == len(ub) == 4
    for a, b in zip(ua, ub):
        for k in ("clip_frac", "kl", "ratio_dev", "entropy"):
            worst["stats"] = max(worst["stats"], abs(a[k] - b[k]))
    if case == "lora":
        assert ua[0]["kl"] == ub[0]["kl"] == 0.0 and ua[-1]["kl"] > 0  # the reference ran (policy = base at first)
    ha, hb = _records(one, "heldout"), _records(two, "heldout")
    assert len(ha) == len(hb) == 2 and [r["heldout_n"] for r in ha] == [4, 4]
    assert ha == hb

    weights = "adapter/adapter_model.safetensors" if case == "lora" else "final/model.safetensors"
    wa, wb = load_file(str(one / weights)), load_file(str(two / weights))
    assert wa.keys() == wb.keys()
    worst["weights"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    start = load_file(str(ck / "model.safetensors"))
    moved = max(float((wa[k] - start[k]).abs().max()) for k in wa if k in start) if case == "full" else \
        max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k)
    print(f"{case}: max |difference| 1 vs 2 processes: {worst}; weights moved {moved:.3g}")
    assert moved > 1e-3  # training did something for the comparison to show
    assert max(worst.values()) <= TOL, worst


def test_queries_per_step_not_divisible_by_the_processes_is_one_line(ck, tmp_path):
    config = _config(ck, tmp_path / "bad", queries_per_step=3, reward="format")
    proc = _run(["-m", "qwen25", "grpo", "--config", str(config)], nproc=2)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("qwen25 grpo: error: ")]
    assert lines and "queries_per_step=3 is not divisible by the 2 processes" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made

"""DPO and the reward model split over processes: 2 ranks (torchrun, gloo, CPU) = 1 rank.

Both stages run from the CLI in subprocesses, float32, one thread, with the same global
batch (8 pairs per step): one process takes them as 4 micro-batches of 2 (gradient
accumulation), each of two processes takes its 4 as 2 micro-batches (accumulation without
sync, then DDP's all-reduce). Per-step losses, gradient norms and the per-step pair metrics
(reduced over ranks), the held-out metrics (each rank scores half) and the final weights
must match to 1e-5 (float32 sums in another order). For DPO the stored reference log-probs
(each rank computes every world_size-th pair, all-reduced, rank 0 writes the file) must
equal those of the one-process run (and the first step's rewards, policy = reference, be
exactly 0 on both); FSDP2 (`parallel: auto` under torchrun) must match the one-process run
as DDP does. The reward model also runs on a backbone with an untied LM head,
which a reward model never uses: DDP must not wait for its gradient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from preference_support import lm_folder, records, train_small_tokenizer, write_pairs
from qwen25.train.dpo import REF_FILE

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
STEPS = 4  # 42 good pairs -> 4 held out, 38 train -> 4 steps of 8


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref-dist")
    tok = train_small_tokenizer(root)
    return {"root": root, "sft": lm_folder(root, tok, 0),
            "untied": lm_folder(root, tok, 2, tie_word_embeddings=False),
            "pairs": write_pairs(root / "pairs.jsonl", 42)}


def _config(env, stage: str, name: str, **over) -> Path:
    cfg = {"model": str(env["sft"]), "data": str(env["pairs"]), "out": str(env["root"] / name), "batch_size": 8,
           "micro_batch": 2, "lr": 1e-3, "eval_fraction": 0.1, "eval_every": 2, "checkpoint_every": 0,
           "threads": 1, "device": "cpu", "max_length": 128, "parallel": "ddp"}
    if stage == "dpo":
        cfg |= {"beta": 0.5}
    else:
        cfg |= {"center": 0.01}
    path = env["root"] / f"{name}.json"
    path.write_text(json.dumps(cfg | over))
    return path


def _run(stage: str, config: Path, nproc: int) -> None:
    verb = ["dpo"] if stage == "dpo" else ["reward", "train"]
    launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launch, "-m", "qwen25", *verb, "--config", str(config)]
    envv = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=envv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]




def _max_diff(a: dict, b: dict, keys) -> float:
    return max(abs(a[k] - b[k]) for k in keys)


def _compare_runs(one: Path, two: Path, start: Path) -> float:
    """Assert the two runs match; returns the largest difference seen."""
    worst = 0.0
    ta, tb = records(one, "train"), records(two, "train")
    assert [r["step"] for r in ta] == [r["step"] for r in tb] == list(range(1, STEPS + 1))
    for a, b in zip(ta, tb):
        assert a["tokens"] == b["tokens"] and not a["skipped"] and not b["skipped"]
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=TOL), (a, b)
        worst = max(worst, abs(a["loss"] - b["loss"]))
    for kind in ("pairs", "eval"):
        ra, rb = records(one, kind), records(two, kind)
        assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra, kind
        for a, b in zip(ra, rb):
            keys = [k for k in a if "/" in k or k == "loss"]
            assert keys and set(keys) <= b.keys()
            d = _max_diff(a, b, keys)
            assert d <= TOL, (kind, a, b)
            worst = max(worst, d)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (one, two))
    for key in ("eval", "eval_before"):
        if key in sa:
            d = _max_diff(sa[key], sb[key], sa[key])
            assert d <= TOL, (key, sa[key], sb[key])
            worst = max(worst, d)
    wa, wb = (load_file(str(p / "final" / "model.safetensors")) for p in (one, two))
    assert wa.keys() == wb.keys()
    for k in wa:
        d = float((wa[k] - wb[k]).abs().max())
        assert d <= TOL, k
        worst = max(worst, d)
    # the run moved the weights, so matching them means something
    w0 = load_file(str(start / "model.safetensors"))
    common = [k for k in wa if k in w0]
    assert common and any(not torch.allclose(wa[k], w0[k]) for k in common)
    return worst


@pytest.fixture(scope="module")
def dpo_single(env):
    _run("dpo", _config(env, "dpo", "dpo-one"), 1)
    return env["root"] / "dpo-one"


@pytest.mark.parametrize("mode", ["ddp", "auto"])  # auto under torchrun: FSDP2
def test_dpo_two_processes_match_one_and_store_the_same_reference(env, dpo_single, mode):
    two = env["root"] / f"dpo-two-{mode}"
    _run("dpo", _config(env, "dpo", two.name, parallel=mode), 2)
    worst = _compare_runs(dpo_single, two, env["sft"])
    # step 1 scores the starting weights, which are the reference: the rewards tie exactly on
    # 2 ranks as on 1 (the wrapped policy and the plain reference compute the same numbers)
    first = records(two, "pairs")[0]
    assert first["rewards/chosen"] == first["rewards/margins"] == first["rewards/accuracies"] == 0.0, first

    # reference log-probs: both ranks computed a share; the stored file is the 1-rank run's
    with (safe_open(str(dpo_single / REF_FILE), framework="pt") as f1,
          safe_open(str(two / REF_FILE), framework="pt") as f2):
        assert json.loads(f1.metadata()["fingerprint"]) == json.loads(f2.metadata()["fingerprint"])
        for k in ("ref_chosen", "ref_rejected"):
            a, b = f1.get_tensor(k), f2.get_tensor(k)
            assert a.shape == b.shape == (42,) and bool((a < 0).all())  # every pair, each a real log-prob
            d = float((a - b).abs().max())
            assert d <= TOL, k
            worst = max(worst, d)
    print(f"dpo {mode}: max |1 rank - 2 ranks| = {worst:.3g}")


@pytest.mark.parametrize("backbone", ["sft", "untied"])
def test_reward_two_processes_match_one(env, backbone):
    one, two = env["root"] / f"rm-one-{backbone}", env["root"] / f"rm-two-{backbone}"
    _run("reward", _config(env, "reward", one.name, model=str(env[backbone])), 1)
    _run("reward", _config(env, "reward", two.name, model=str(env[backbone])), 2)
    worst = _compare_runs(one, two, env[backbone])
    print(f"reward ({backbone}): max |1 rank - 2 ranks| = {worst:.3g}")

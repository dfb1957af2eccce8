"""Training checkpoints: exact round trips, the last K kept, and SIGKILL during a save.

The kill test forks a writer that saves checkpoints in a loop and SIGKILLs it at random
moments (20 trials, many of them mid-write): afterwards the newest complete checkpoint must
always load, with weights and optimizer state that belong to its own step, and never a
partial folder.
"""

import json
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
import torch

from qwen25.checkpoint import load_model
from qwen25.config import ModelConfig
from qwen25.model.model import build_model
from qwen25.train import checkpointing as ck
from qwen25.train.optim import build_optimizer
from qwen25.train.parallel import full_model_state, full_optimizer_state, load_full_optimizer_state

CFG = ModelConfig.preset("tiny").replace(vocab_size=64)


def _trained(seed=0):
    model = build_model(CFG, seed=seed)
    opt = build_optimizer(model, lr=1e-3)
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(root, step, model, opt, keep=3, trainer_state=None):
    return ck.save_checkpoint(
        root, step, model_state=full_model_state(model), model_config=CFG,
        optimizer_state=full_optimizer_state(model, opt), trainer_state=trainer_state or {"stage": 0},
        rng_states=[ck.rng_state(torch.device("cpu"))], keep=keep)


def test_round_trip_restores_weights_optimizer_and_rng_exactly(tmp_path):
    model, opt = _trained()
    torch.manual_seed(123)
    path = _save(tmp_path, 7, model, opt, trainer_state={"stage": 1, "data": [{"cursor": 5}]})
    expected_draw = torch.rand(3)
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.path == path and latest.step == 7
    assert latest.state["stage"] == 1 and latest.state["data"] == [{"cursor": 5}]
    assert latest.model_config.to_hf() == CFG.to_hf() | {"torch_dtype": "float32"}

    loaded = load_model(path, dtype=torch.float32)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    opt2 = build_optimizer(loaded, lr=1e-3)
    load_full_optimizer_state(loaded, opt2, ck.load_optimizer_state(latest))
    for p, q in zip(model.parameters(), loaded.parameters()):
        for slot in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][slot], opt2.state[q][slot]), slot
    assert tuple(opt2.param_groups[0]["betas"]) == opt.param_groups[0]["betas"]
    assert [g["weight_decay"] for g in opt2.param_groups] == [g["weight_decay"] for g in opt.param_groups]

    ck.set_rng_state(ck.load_rng_state(latest, 0), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draw)

    manifest = json.loads((path / ck.COMPLETE).read_text())
    assert "model.safetensors" in manifest["files"] and "trainer_state/optimizer.safetensors" in manifest["files"]


def test_keeps_the_newest_k_and_ignores_incomplete_folders(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    # a newer folder without COMPLETE.json, one with a truncated file, and a temp folder
    (tmp_path / "step_00000009").mkdir()
    import shutil

    shutil.copytree(tmp_path / "step_00000004", tmp_path / "step_00000008")
    with open(tmp_path / "step_00000008" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    (tmp_path / ".tmp-step_00000010").mkdir()
    assert ck.latest_checkpoint(tmp_path).step == 4
    ck.remove_stale_temporaries(tmp_path)
    assert not (tmp_path / ".tmp-step_00000010").exists()


def test_no_checkpoint_means_none(tmp_path):
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    assert ck.latest_checkpoint(tmp_path) is None


def test_export_copies_the_hf_files_only(tmp_path):
    model, opt = _trained()
    path = _save(tmp_path / "ckpts", 3, model, opt)
    final = ck.export_model(path, tmp_path / "final")
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ck.export_model(path, tmp_path / "final")  # replacing an existing export works
    assert torch.equal(load_model(final).model.norm.weight, model.model.norm.weight)


def _writer(root: str) -> None:
    """Child: save steps 1, 2, 3, ... forever; step k's weights are all k (checkable)."""
    torch.set_num_threads(1)
    model, opt = _trained()
    with torch.no_grad():
        for step in range(1, 10_000):
            for p in model.parameters():
                p.fill_(float(step))
            _save(root, step, model, opt, keep=2, trainer_state={"stage": 0, "marker": step})


@pytest.mark.slow
def test_sigkill_during_saves_always_leaves_a_loadable_newest_checkpoint(tmp_path):
    ctx = mp.get_context("fork")
    rnd = random.Random(0)
    last_seen = 0
    for trial in range(20):
        proc = ctx.Process(target=_writer, args=(str(tmp_path),))
        proc.start()
        time.sleep(rnd.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        latest = ck.latest_checkpoint(tmp_path)
        if latest is None:
            continue  # killed before the first save of this trial completed
        assert latest.state["marker"] == latest.step
        model = load_model(latest.path)
        assert all(torch.all(p == latest.step) for p in model.parameters())
        osd = ck.load_optimizer_state(latest)
        assert len(osd["state"]) == len(list(model.parameters()))
        last_seen = max(last_seen, latest.step)
        ck.remove_stale_temporaries(tmp_path)
    assert last_seen > 0

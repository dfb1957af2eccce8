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


# ---- issue 21 items 17-19, 21: verified resume, fallback, disk full, file modes ----------------

def _flip_same_size(path, offset=None, n=64):
    """Overwrite n bytes in place (the file keeps its size, so only a hash can tell)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    for i in range(start, min(start + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "model_bytes": ("model.safetensors", None),
    "model_header": ("model.safetensors", 8),
    "config": ("config.json", 2),
    "state": ("trainer_state/state.json", 2),
    "optimizer_json": ("trainer_state/optimizer.json", 2),
    "optimizer_tensors": ("trainer_state/optimizer.safetensors", None),
    "rng_header": ("trainer_state/rng.safetensors", 8),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_size_corruption_of_the_newest_falls_back_to_the_previous(tmp_path, name):
    model, opt = _trained()
    _save(tmp_path, 1, model, opt, trainer_state={"stage": 0, "marker": 1})
    newest = _save(tmp_path, 2, model, opt, trainer_state={"stage": 0, "marker": 2})
    rel, offset = CORRUPTIONS[name]
    size = (newest / rel).stat().st_size
    _flip_same_size(newest / rel, offset, n=4 if rel.endswith(".json") else 64)
    assert (newest / rel).stat().st_size == size and ck.is_complete(newest)  # sizes still agree
    with pytest.warns(ck.CheckpointWarning, match=f"step_00000002.*{rel.split('/')[-1]}.*sha256"):
        latest = ck.latest_checkpoint(tmp_path)
    assert latest.step == 1 and latest.state["marker"] == 1
    ck.load_optimizer_state(latest)
    ck.load_rng_state(latest, 0)


def test_resaving_a_step_whose_folder_is_corrupt_replaces_it(tmp_path):
    """After falling back from a corrupt step 2, the run reaches step 2 again: the save must
    write a fresh checkpoint (setting the bad one aside), not keep the corrupt folder."""
    model, opt = _trained()
    _save(tmp_path, 1, model, opt)
    bad = _save(tmp_path, 2, model, opt)
    _flip_same_size(bad / "model.safetensors")
    with pytest.warns(ck.CheckpointWarning):
        assert ck.latest_checkpoint(tmp_path).step == 1
    _save(tmp_path, 2, model, opt)
    assert ck.latest_checkpoint(tmp_path).step == 2  # no warning: verified
    assert [p.name for p in tmp_path.glob(".corrupt-*")] == [".corrupt-step_00000002"]


def test_disk_full_while_saving_is_one_line_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    import qwen25.checkpoint as hf_ckpt

    model, opt = _trained()
    _save(tmp_path, 1, model, opt)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_rust(*args, **kwargs):  # what safetensors raises itself
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    for target, fn in ((ck, full), (hf_ckpt, full_rust)):
        with monkeypatch.context() as m:
            m.setattr(target, "save_file", fn)
            with pytest.raises(ck.CheckpointSaveError, match="no space left on the disk of") as e:
                _save(tmp_path, 2, model, opt)
        assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
        assert "step 1" in str(e.value)  # where a rerun resumes
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temp left
        assert ck.latest_checkpoint(tmp_path).step == 1
    assert _save(tmp_path, 2, model, opt).name == "step_00000002"  # space back: saving works


def test_every_checkpoint_file_gets_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        model, opt = _trained()
        path = _save(tmp_path, 1, model, opt)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(path)): oct(p.stat().st_mode & 0o777) for p in path.rglob("*") if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes

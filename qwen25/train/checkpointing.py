"""Training checkpoints: atomic, self-describing, resumable, the last K kept.

Layout of a run folder (`OUT/checkpoints/`):

    step_00000200/                  one complete checkpoint, named by optimizer step
      config.json                   HF layout: loads in transformers, vLLM and qwen25
      generation_config.json
      model.safetensors             float32 master weights (or sharded + index)
      tokenizer.json ...            the run's tokenizer files, when it has one
      trainer_state/
        state.json                  step, stage, tokens, data-loader states (one per rank),
                                    spike-guard history, the run's config
        optimizer.safetensors       AdamW moments and step counts, keyed "<param>::<slot>"
        optimizer.json              AdamW param groups (hyper-parameters, parameter names)
        rng.safetensors             torch CPU (and CUDA) generator states, one per rank
      COMPLETE.json                 size and sha256 of every file above, written last
    .tmp-step_00000300/             a save in progress (ignored; removed by the next save)

Atomicity: everything is written into `.tmp-step_N`, each file fsynced, `COMPLETE.json`
last, then the folder is renamed to `step_N` (one `rename`, atomic on POSIX) and the parent
fsynced. A kill at any moment therefore leaves either the previous set of checkpoints or the
previous set plus a complete new one. `latest_checkpoint` re-checks the sizes listed in
`COMPLETE.json` for every candidate and the sha256 values for the one it returns: a newest
checkpoint corrupted in place (same size, other bytes) is skipped with a `CheckpointWarning`
and the previous complete one is used; saving that step again sets the bad folder aside as
`.corrupt-step_N`. A save that fails (disk full) removes its temporary folder and raises
`CheckpointSaveError` naming the disk, leaving the earlier checkpoints as they were. Old checkpoints are renamed to `.trash-...` before they are deleted, so a
kill during pruning never leaves a half-deleted folder named like a checkpoint.

Only rank 0 writes (per-rank states are gathered to it); every rank reads, which assumes the
run folder is on storage all ranks see (as torchtitan's DCP does). Nothing here unpickles:
tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen25.checkpoint import make_readable, save_model
from qwen25.config import ModelConfig
from qwen25.errors import UserError
from qwen25.model.model import Transformer
from qwen25.files import sha256_file

COMPLETE = "COMPLETE.json"
STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SLOT_SEP = "::"  # "<parameter name>::<optimizer slot>" in optimizer.safetensors


class ResumeError(UserError):
    """A checkpoint that cannot continue this run (incompatible model or config)."""


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (disk full, no permission); earlier ones are intact."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped at resume because its files do not match COMPLETE.json."""


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and its parsed `trainer_state/state.json`."""

    path: Path
    step: int
    state: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.path / "config.json")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def save_checkpoint(root: str | Path, step: int, *, model_state: dict[str, torch.Tensor],
                    model_config: ModelConfig, optimizer_state: dict, trainer_state: dict[str, Any],
                    rng_states: list[dict[str, torch.Tensor]], keep: int = 3,
                    extra_files: list[Path] = ()) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` of them.

    model_state: full (unsharded) weights keyed by the model's parameter names;
    optimizer_state: `parallel.full_optimizer_state` output (names, not ids);
    trainer_state: JSON-able scalars and lists; rng_states: one dict of byte tensors per rank;
    extra_files: plain files copied in beside the weights (tokenizer files).
    """
    root = Path(root)
    final = root / step_dir_name(step)
    if final.exists():
        if verify_checkpoint_files(final) is None:
            return final  # this exact step was saved before (e.g. a save on exit right after one)
        _set_aside(final)  # corrupt (resume fell back past it): write it again
    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_files(tmp, step, model_state, model_config, optimizer_state, trainer_state,
                     rng_states, extra_files)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(e, root, step) from None
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def _save_error(e: Exception, root: Path, step: int) -> CheckpointSaveError:
    text = str(e)
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in text \
        or "No space left" in text
    done = sorted(s for s, _ in _step_dirs(root))
    resume = f"step {done[-1]}" if done else "the start (no checkpoint yet)"
    why = "no space left on the disk of" if full else f"cannot write ({getattr(e, 'strerror', None) or text[:120]}) in"
    fix = "free space there or move --out" if full else "fix the folder's permissions or move --out"
    return CheckpointSaveError(f"checkpoint step {step} not saved: {why} {root}; earlier checkpoints "
                               f"are intact: {fix}, then rerun the same command to resume from {resume}")


def _set_aside(path: Path) -> None:
    """Rename a corrupt checkpoint out of the way (kept for inspection, never loaded)."""
    target = path.with_name(f".corrupt-{path.name}")
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)


def _write_files(tmp: Path, step: int, model_state, model_config, optimizer_state, trainer_state,
                 rng_states, extra_files) -> None:
    _save_weights(model_state, model_config, tmp)
    for f in extra_files:
        shutil.copyfile(f, tmp / Path(f).name)
    state_dir = tmp / STATE_DIR
    state_dir.mkdir()
    tensors, groups = _flatten_optimizer_state(optimizer_state)
    save_file(tensors, str(state_dir / "optimizer.safetensors"))
    make_readable(state_dir / "optimizer.safetensors")
    (state_dir / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))
    rng = {f"rank{r}.{k}": v.contiguous() for r, states in enumerate(rng_states) for k, v in states.items()}
    save_file(rng, str(state_dir / "rng.safetensors"))
    make_readable(state_dir / "rng.safetensors")
    (state_dir / "state.json").write_text(json.dumps(trainer_state | {"step": step}, indent=1))

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {}}
    for p in files:
        _fsync_file(p)
        manifest["files"][str(p.relative_to(tmp))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (tmp / COMPLETE).write_text(json.dumps(manifest, indent=1))
    _fsync_file(tmp / COMPLETE)
    _fsync_dir(state_dir)
    _fsync_dir(tmp)


def _save_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, folder: Path) -> None:
    """HF-layout weights from a plain state dict (no second copy: tensors are assigned)."""
    with torch.device("meta"):
        shell = Transformer(cfg)
    shell.load_state_dict(state, assign=True, strict=False)
    shell.tie_weights()
    missing = [n for n, p in shell.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"model state lacks {missing[:3]}...")  # a bug, not user input
    save_model(shell, folder)


def _flatten_optimizer_state(osd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors = {}
    for name, slots in osd["state"].items():
        for slot, value in slots.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{name}{_SLOT_SEP}{slot}"] = t.detach().cpu().contiguous()
    groups = []
    for g in osd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                       if not isinstance(v, torch.Tensor)})
    return tensors, groups


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and leftovers of interrupted saves."""
    steps = sorted(_step_dirs(root), reverse=True)
    for _, path in steps[max(keep, 1):]:
        trash = root / f".trash-{path.name}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in root.glob(".trash-*"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_stale_temporaries(root: str | Path) -> None:
    """Remove `.tmp-*` folders a killed save left behind (call before training starts)."""
    for stale in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename still stands
        pass
    finally:
        os.close(fd)



# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return out


def is_complete(path: Path) -> bool:
    """COMPLETE.json present and every listed file there with its recorded size."""
    try:
        manifest = json.loads((path / COMPLETE).read_text())
        return all((path / rel).stat().st_size == meta["bytes"] for rel, meta in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_checkpoint_files(path: Path) -> str | None:
    """None when every file COMPLETE.json lists has its recorded size and sha256, else what
    is wrong (the first file that differs). Reads every byte: call it on the one checkpoint
    about to be used, not on all of them."""
    try:
        manifest = json.loads((path / COMPLETE).read_text())
        files = manifest["files"]
        for rel, meta in sorted(files.items()):
            if (path / rel).stat().st_size != meta["bytes"]:
                return f"{rel} has {(path / rel).stat().st_size} bytes, COMPLETE.json records {meta['bytes']}"
            if sha256_file(path / rel) != meta["sha256"]:
                return f"{rel} does not match the sha256 recorded in COMPLETE.json"
        json.loads((path / STATE_DIR / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{COMPLETE} or trainer state unreadable ({e})"
    return None


def latest_checkpoint(root: str | Path) -> Checkpoint | None:
    """The newest complete and verified checkpoint under `root`, or None when there is none.

    A newer one whose files no longer match their recorded sha256 (bit rot, a copy gone
    wrong, an edit) is skipped with a `CheckpointWarning` naming the file."""
    for step, path in sorted(_step_dirs(Path(root)), reverse=True):
        if not is_complete(path):
            continue
        problem = verify_checkpoint_files(path)
        if problem is None:
            state = json.loads((path / STATE_DIR / "state.json").read_text())
            return Checkpoint(path, step, state)
        warnings.warn(f"skipping checkpoint {path}: {problem}; resuming from an earlier one",
                      CheckpointWarning, stacklevel=2)
    return None


def load_optimizer_state(ckpt: Checkpoint) -> dict:
    """The full optimizer state dict saved by `save_checkpoint` (tensors on the CPU)."""
    tensors = load_file(str(ckpt.path / STATE_DIR / "optimizer.safetensors"))
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, slot = key.rpartition(_SLOT_SEP)
        state.setdefault(name, {})[slot] = t
    groups = json.loads((ckpt.path / STATE_DIR / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def load_rng_state(ckpt: Checkpoint, rank: int) -> dict[str, torch.Tensor]:
    tensors = load_file(str(ckpt.path / STATE_DIR / "rng.safetensors"))
    prefix = f"rank{rank}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generator states (what dropout or sampling would draw from)."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def export_model(ckpt_path: Path, dest: str | Path) -> Path:
    """Copy a checkpoint's HF files (not its trainer state) to `dest`, atomically."""
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for p in ckpt_path.iterdir():
        if p.is_file() and p.name != COMPLETE:
            shutil.copyfile(p, tmp / p.name)
            _fsync_file(tmp / p.name)
    if dest.exists():
        old = dest.with_name(f".trash-{dest.name}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    return dest

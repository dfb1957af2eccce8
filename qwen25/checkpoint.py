"""Hugging Face checkpoint folders <-> models, through safetensors only.

A folder holds `config.json`, `generation_config.json` (optional) and either
`model.safetensors` or shards listed in `model.safetensors.index.json`. Nothing else is
read: no pickle, no code.

Loading validates the whole folder before any weight is allocated (names, shapes, dtypes,
shard paths), so a bad checkpoint gives one error naming the file and the problem and never
a partly loaded model. Weights are then copied tensor by tensor into a model materialised
once in the requested dtype: peak memory is the model plus one tensor.

Saving writes the released style (`config.json` with `architectures`/`model_type`, per-expert
MoE tensors, no `lm_head.weight` when tied), each file under a temporary name and renamed
into place, the index last, so an interrupted save never leaves a folder that loads wrong.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen25.config import ConfigError, ModelConfig
from qwen25.errors import UserError
from qwen25.files import atomic_path, atomic_write
from qwen25.model.model import Transformer, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Keys some older exports carry that hold no weights we need (RoPE tables are recomputed).
_IGNORED_KEYS = re.compile(r".*\.rotary_emb\.inv_freq$")
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointError(UserError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


def resolve_dtype(dtype: torch.dtype | str | None, default: str = "float32") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or default).removeprefix("torch.")
    if name == "auto":
        name = default
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


# --------------------------------------------------------------------------------------
# Key mapping: checkpoint names <-> our parameters
# --------------------------------------------------------------------------------------


def checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `cfg` holds, with its shape (HF layout, per-expert)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in _to_checkpoint_tensors(model)}


def _to_checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor view) pairs: stacked experts are split, a tied head dropped."""
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :inter]
                yield f"{prefix}.{e}.up_proj.weight", t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def _destination(params: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The (view of a) parameter that checkpoint tensor `key` is copied into."""
    m = _EXPERT_KEY.match(key)
    if not m:
        return params[key]
    prefix, e, which = m.group(1), int(m.group(2)), m.group(3)
    if which == "down_proj":
        return params[f"{prefix}.down_proj"][e]
    gate_up = params[f"{prefix}.gate_up_proj"][e]
    inter = gate_up.shape[0] // 2
    return gate_up[:inter] if which == "gate_proj" else gate_up[inter:]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_config(path: str | Path) -> ModelConfig:
    folder = _folder(path)
    try:
        return ModelConfig.from_hf(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu") -> Transformer:
    """Read an HF checkpoint folder into a model (eval mode) on `device` in `dtype`.

    dtype None or "auto" keeps the dtype the weights were saved in (`torch_dtype`).
    """
    folder = _folder(path)
    cfg = load_config(folder)
    dtype = resolve_dtype(dtype, default=cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float32")
    plan = _plan(folder, cfg)  # validates everything before allocating
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for file, keys in plan.items():
            _copy_from_file(file, keys, params)
    model.generation_config = read_generation_config(folder, cfg)
    return model.eval()


# The file's pages read through safetensors' memory map stay resident while it is open, on
# top of the model's own copy; reopening every so many bytes keeps the peak near 1x.
_MAP_BUDGET = 128 * 2**20


def _copy_from_file(file: Path, keys: list[str], params: dict[str, torch.Tensor]) -> None:
    """Copy `keys` of one safetensors file into the model, largest first.

    Parameters are materialised lazily (their pages are touched only when written), so the
    transient copies of the big tensors happen while little of the model is resident yet.
    """
    with safe_open(file, framework="pt", device="cpu") as f:
        sizes = {k: _numel(f.get_slice(k).get_shape()) for k in keys}
    order = sorted(keys, key=lambda k: -sizes[k])
    i = 0
    while i < len(order):
        with safe_open(file, framework="pt", device="cpu") as f:
            mapped = 0
            while i < len(order) and (mapped == 0 or mapped + sizes[order[i]] * 4 <= _MAP_BUDGET):
                key = order[i]
                _destination(params, key).copy_(f.get_tensor(key))
                mapped += sizes[key] * 4  # an upper bound in bytes (at most 4 per element)
                i += 1


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass a folder with config.json "
                              "and model.safetensors")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; pass the checkpoint folder that holds it")
    return folder


def _weight_files(folder: Path) -> dict[str, Path] | Path:
    """The shard of every key (from the index) or the single weights file."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a valid shard index (needs a JSON object with "
                                  "'weight_map': {tensor name: file})") from None
        root = folder.resolve()
        files: dict[str, Path] = {}
        for key, name in weight_map.items():
            p = (folder / str(name)).resolve()
            if not isinstance(name, str) or os.path.isabs(name) or p.parent != root:
                raise CheckpointError(f"{index}: shard {name!r} for {key!r} points outside the "
                                      "checkpoint folder; shards must be plain file names in it")
            if not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {name!r} is not a .safetensors file; only "
                                      "safetensors weights are read")
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {name!r} is missing from {folder}")
            files[key] = p
        return files
    single = folder / SINGLE_FILE
    if single.exists():
        return single
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" (found {', '.join(pickled)}: pickled weights are never read; convert them to "
            "safetensors with a trusted tool first)") if pickled else ""
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _plan(folder: Path, cfg: ModelConfig) -> dict[Path, list[str]]:
    """Check names, shapes and dtypes of every tensor; return the keys to read per file."""
    expected = checkpoint_shapes(cfg)
    located = _weight_files(folder)
    files = sorted(set(located.values())) if isinstance(located, dict) else [located]
    found: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if _IGNORED_KEYS.match(key):
                        continue
                    if isinstance(located, dict) and located.get(key) != file:
                        continue  # the index assigns this key to another shard
                    sl = f.get_slice(key)
                    shape, st_dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if key == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # tied: the head is the embedding; an extra copy is ignored
                    if key not in expected:
                        raise CheckpointError(
                            f"{file}: unexpected tensor {key!r} for a {cfg.model_type} model with "
                            f"this config.json; is the config from another checkpoint?")
                    if shape != expected[key]:
                        raise CheckpointError(
                            f"{file}: tensor {key!r} has shape {list(shape)} but config.json "
                            f"implies {list(expected[key])}")
                    if st_dtype not in _ST_DTYPES:
                        raise CheckpointError(f"{file}: tensor {key!r} has dtype {st_dtype}; "
                                              "expected a float dtype (F32, BF16, F16)")
                    found[key] = file
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is "
                                  "truncated or corrupted, download or save it again") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None
    if isinstance(located, dict):
        ghosts = sorted(k for k in located if k not in found and not _IGNORED_KEYS.match(k)
                        and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
        if ghosts:
            raise CheckpointError(f"{folder / INDEX_FILE}: lists {ghosts[:3]} but the shard does not "
                                  "contain them; the shards and the index do not match")
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:3]}{more}; the weights do "
                              "not match config.json or a shard is missing")
    plan: dict[Path, list[str]] = {}
    for key, file in found.items():
        plan.setdefault(file, []).append(key)
    return plan


def read_generation_config(folder: Path, cfg: ModelConfig) -> dict[str, Any]:
    """`generation_config.json` if present (JSON only), else the config's bos/eos ids."""
    path = Path(folder) / "generation_config.json"
    if path.exists():
        try:
            gen = json.loads(path.read_text())
            if isinstance(gen, dict):
                return gen
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        raise CheckpointError(f"{path}: not a JSON object; fix or delete it")
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1_000_000 -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected e.g. '5GB' or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def save_model(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB",
               generation_config: dict[str, Any] | None = None) -> Path:
    """Write an HF checkpoint folder that transformers, vLLM and this package load."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype_name = str(model.dtype).removeprefix("torch.")
    config = cfg.to_hf() | {"torch_dtype": dtype_name}
    gen = generation_config or getattr(model, "generation_config", None) or {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": config["eos_token_id"]}

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in _to_checkpoint_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().to("cpu").contiguous()
        size += nbytes

    # Old files of another layout would confuse a loader: remove them once the new are in.
    stale = [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]
    written: list[Path] = []
    if len(shards) == 1:
        written.append(_atomic_save(shards[0], folder / SINGLE_FILE))
    else:
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            written.append(_atomic_save(shard, folder / name))
            for k, t in shard.items():
                weight_map[k] = name
                total += t.numel() * t.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        written.append(_atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2)))
    _atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    _atomic_write_text(folder / "generation_config.json", json.dumps(gen, indent=2))
    for p in stale:
        if p not in written and p.exists():
            p.unlink()
    return folder


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path


def _atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, text + "\n")


def verify_checkpoint(path: str | Path) -> dict[str, int]:
    """Check a folder as `load_model` would (headers only, no weights read).

    Returns how many weight files it has and their total size in bytes.
    """
    folder = _folder(path)
    plan = _plan(folder, load_config(folder))
    return {"count": len(plan), "bytes": sum(p.stat().st_size for p in plan)}

"""Quantized checkpoint folders: the GPTQ layout we write, and the GPTQ/AWQ layouts we read.

A folder is an HF checkpoint whose `config.json` carries `quantization_config` (what
transformers and vLLM read to pick their kernels) and whose quantized projections are
stored as `qweight`/`qzeros`/`scales`(/`g_idx`) instead of `weight` (layouts.py).
Embeddings, norms and the lm_head stay float, as in the released Qwen2.5-GPTQ/AWQ folders.

Loading builds the model it will fill first (float modules on the meta device, each
projection that has a `qweight` swapped for a `QuantLinear` of the declared bits and group
size), checks every tensor's name and shape against *that* model, and only then allocates
and reads: a wrong group size or a float checkpoint mislabelled as quantized is one error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qwen25.checkpoint import (CheckpointError, _atomic_save, _atomic_write_text, _folder, _weight_files,
                               read_generation_config, resolve_dtype, DTYPES, SINGLE_FILE)
from qwen25.config import ConfigError, ModelConfig
from qwen25.model.model import Transformer
from qwen25.quant.layouts import awq_pack, awq_unpack, gptq_pack, gptq_unpack
from qwen25.quant.modules import QuantLinear, projections
from qwen25.quant.rtn import pack_nibbles

_GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> zero-point offset


@dataclass(frozen=True)
class QuantSpec:
    """What a `quantization_config` declares (the parts that change the tensors)."""

    method: str  # "gptq" or "awq"
    bits: int  # 4 or 8 (awq: 4)
    group_size: int  # inputs per scale; -1 = one group per output channel
    sym: bool  # zero point fixed at 2^(bits-1) (gptq)
    desc_act: bool  # act-order: g_idx may assign columns to groups in any order (gptq)
    zero_offset: int  # 1 for the original GPTQ layout (stores zero - 1), 0 for gptq_v2 / awq

    @staticmethod
    def parse(qc: Any) -> QuantSpec:
        """Validate a quantization_config dict; ConfigError (one line) for what we do not read."""
        if not isinstance(qc, dict):
            raise ConfigError("quantization_config must be a JSON object")
        method = qc.get("quant_method")
        bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size"))
        if not isinstance(group, int) or (group <= 0 and group != -1):
            raise ConfigError(f"quantization_config group_size={group!r}: expected a positive "
                              "integer or -1 (per channel)")
        if method == "gptq":
            fmt = qc.get("checkpoint_format", "gptq")
            if bits not in (4, 8) or fmt not in _GPTQ_FORMATS:
                raise ConfigError(f"GPTQ with bits={bits!r}, checkpoint_format={fmt!r} is not supported; "
                                  "this package reads 4- and 8-bit GPTQ in the 'gptq' or 'gptq_v2' format")
            return QuantSpec("gptq", bits, group, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                             _GPTQ_FORMATS[fmt])
        if method == "awq":
            version = str(qc.get("version", "gemm")).lower()
            if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
                raise ConfigError(f"AWQ with bits={bits!r}, version={version!r}, zero_point="
                                  f"{qc.get('zero_point', True)!r} is not supported; this package reads "
                                  "4-bit AWQ 'gemm' checkpoints with zero points")
            if qc.get("modules_to_not_convert"):
                raise ConfigError("AWQ modules_to_not_convert is not supported; every projection "
                                  "must be quantized")
            return QuantSpec("awq", 4, group, False, False, 0)
        raise ConfigError(f"quantization_config quant_method={method!r} is not supported; this "
                          "package reads 'gptq' (4/8 bit) and 'awq' (4 bit) checkpoints")

    def to_hf(self) -> dict[str, Any]:
        if self.method == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                    "version": "gemm", "modules_to_not_convert": None}
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "desc_act": self.desc_act, "sym": self.sym, "damp_percent": 0.01, "static_groups": False,
                "true_sequential": False, "checkpoint_format": "gptq" if self.zero_offset else "gptq_v2"}

    def tensor_shapes(self, k: int, n: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored tensors of one projection with k inputs, n outputs."""
        g = 1 if self.group_size == -1 else k // self.group_size
        f = 32 // self.bits
        if self.method == "awq":
            return {"qweight": (k, n // 8), "qzeros": (g, n // 8), "scales": (g, n)}
        return {"qweight": (k // f, n), "qzeros": (g, n // f), "scales": (g, n), "g_idx": (k,)}


def read_quant_spec(folder: Path) -> tuple[ModelConfig, QuantSpec | None]:
    """(model config, quantization spec or None) of a checkpoint folder."""
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text())
        qc = d.pop("quantization_config", None)
        return ModelConfig.from_hf(d), None if qc is None else QuantSpec.parse(qc)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; a checkpoint folder needs a config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid config.json ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---- saving --------------------------------------------------------------------------------


def model_spec(model) -> QuantSpec:
    """The GPTQ spec that describes a model quantized by qwen25.quant (one bits/group/sym)."""
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not mods:
        raise ValueError("the model has no quantized layers; run qwen25.quant.quantize_model first")
    bits = {m.bits for m in mods}
    per_channel = all(m.group_size == m.in_features for m in mods)
    groups = {m.group_size for m in mods}
    if len(bits) != 1 or (not per_channel and len(groups) != 1):
        raise ValueError("layers are quantized with different bits or group sizes; one "
                         "quantization_config cannot describe them")
    b = bits.pop()
    sym = all(bool((m.zeros == 2 ** (b - 1)).all()) for m in mods)
    return QuantSpec("gptq", b, -1 if per_channel else groups.pop(), sym,
                     any(m.perm is not None for m in mods), 1)


def save_quantized(model, path: str | Path, method: str = "gptq") -> Path:
    """Write `model` (quantized by qwen25.quant) as a GPTQ (or, 4-bit, AWQ) checkpoint folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    if isinstance(model.lm_head, QuantLinear):
        raise ValueError("a quantized lm_head has no place in the GPTQ/AWQ folder layout; quantize "
                         "without lm_head=True to save a folder (GGUF export keeps it)")
    if method == "awq":
        if spec.bits != 4 or spec.desc_act:
            raise ValueError("the AWQ layout holds 4-bit weights without act-order only")
        spec = QuantSpec("awq", 4, spec.group_size, False, False, 0)
    quant = {name: getattr(parent, attr) for name, parent, attr in projections(model)
             if isinstance(getattr(parent, attr), QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    skip = tuple(f"{name}." for name in quant)
    for key, t in model.state_dict().items():
        if key.startswith(skip) or (key == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        tensors[key] = t.detach().cpu().contiguous()
    for name, m in quant.items():
        q = m.codes()
        if spec.method == "awq":
            packed = awq_pack(q, m.scales, m.zeros)
        else:
            packed = gptq_pack(q, m.scales, m.zeros, m.bits, m.group_size, m.perm, spec.zero_offset)
        for suffix, t in packed.items():
            tensors[f"{name}.{suffix}"] = t.contiguous()
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.detach().contiguous()
    cfg = model.config
    config = cfg.to_hf() | {"torch_dtype": str(model.dtype).removeprefix("torch."),
                            "quantization_config": spec.to_hf()}
    gen = getattr(model, "generation_config", None) or {"bos_token_id": cfg.bos_token_id,
                                                        "eos_token_id": config["eos_token_id"]}
    _atomic_save(tensors, folder / SINGLE_FILE)
    _atomic_write_text(folder / "config.json", json.dumps(config, indent=2))
    _atomic_write_text(folder / "generation_config.json", json.dumps(gen, indent=2))
    return folder


# ---- loading -------------------------------------------------------------------------------


def _headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    located = _weight_files(folder)
    files = sorted(set(located.values())) if isinstance(located, dict) else [located]
    found = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():
                    if isinstance(located, dict) and located.get(key) != file:
                        continue
                    found[key] = (file, tuple(f.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); download or save it again") from None
    return found


def load_quantized(path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu") -> Transformer:
    """Read a GPTQ/AWQ checkpoint folder into a model with `QuantLinear` projections."""
    folder = _folder(path)
    cfg, spec = read_quant_spec(folder)
    if spec is None:
        raise CheckpointError(f"{folder}: config.json has no quantization_config; load it with "
                              "qwen25.load_model")
    if cfg.is_moe:
        raise CheckpointError(f"{folder}: quantized mixture-of-experts checkpoints are not supported")
    dtype = resolve_dtype(dtype, default=cfg.torch_dtype if cfg.torch_dtype in DTYPES else "float32")
    headers = _headers(folder)

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    quantized = {}
    for name, parent, attr in projections(model):
        lin = getattr(parent, attr)
        if f"{name}.qweight" not in headers:
            continue  # stored in float: stays an nn.Linear
        k, n = lin.in_features, lin.out_features
        group = k if spec.group_size == -1 else spec.group_size
        if k % group:
            raise CheckpointError(f"{folder}: group_size={spec.group_size} does not divide the "
                                  f"{k} inputs of {name}; the quantization_config does not fit this model")
        setattr(parent, attr, QuantLinear(k, n, spec.bits, group, lin.bias is not None, dtype, "meta"))
        expected.pop(f"{name}.weight")
        for suffix, shape in spec.tensor_shapes(k, n).items():
            expected[f"{name}.{suffix}"] = shape
        quantized[name] = getattr(parent, attr)
    if not quantized:
        raise CheckpointError(f"{folder}: quantization_config is set but no tensor is quantized "
                              "(no *.qweight); the config and the weights do not match")
    optional = {f"{name}.g_idx" for name in quantized}
    for key, (file, shape) in headers.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key!r} for this {spec.method} "
                                  f"{spec.bits}-bit model")
        if shape != expected[key]:
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(shape)} but config.json "
                                  f"(group_size={spec.group_size}, bits={spec.bits}) implies {list(expected[key])}")
    missing = sorted(k for k in expected if k not in headers and k not in optional)
    if missing:
        raise CheckpointError(f"{folder}: missing tensor(s) {missing[:3]}; the weights do not match config.json")

    model.to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    files: dict[Path, list[str]] = {}
    for key, (file, _) in headers.items():
        files.setdefault(file, []).append(key)
    with torch.no_grad():
        raw: dict[str, torch.Tensor] = {}
        for file, keys in files.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    mod = key.rsplit(".", 1)[0]
                    if mod in quantized and not key.endswith(".bias"):
                        raw[key] = f.get_tensor(key)
                    elif key in params:
                        params[key].copy_(f.get_tensor(key))
        for name, m in quantized.items():
            try:
                if spec.method == "awq":
                    q, s, z = awq_unpack(raw[f"{name}.qweight"], raw[f"{name}.qzeros"], raw[f"{name}.scales"],
                                         spec.group_size)
                    perm = None
                else:
                    q, s, z, perm = gptq_unpack(raw[f"{name}.qweight"], raw[f"{name}.qzeros"], raw[f"{name}.scales"],
                                                raw.get(f"{name}.g_idx"), spec.bits, spec.group_size,
                                                spec.zero_offset)
            except ValueError as e:
                raise CheckpointError(f"{folder}: {name}: {e}") from None
            if perm is not None and not spec.desc_act:
                raise CheckpointError(f"{folder}: {name}.g_idx reorders columns but desc_act is false")
            m.qweight.copy_(q if spec.bits == 8 else pack_nibbles(q))
            m.scales.copy_(s)
            m.zeros.copy_(z)
            m.perm = perm
    model.generation_config = read_generation_config(folder, cfg)
    return model.eval()

"""GGUF (llama.cpp) checkpoints -> models: config from the metadata, weights dequantised.

    model = qwen25.load_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # float32 by default
    convert_gguf("model.gguf", "out_dir")                            # an HF folder

Architectures: `qwen2`, `qwen2moe` (stacked experts, shared expert with its gate) and
`llama` (Qwen2 without q/k/v biases; Q/K rows un-permuted, see `gguf_names`). Every tensor
type the `gguf` package can dequantise loads (F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, the
IQ and TQ types); the values are exactly the dequantised ones, so float32 (the default)
reproduces the file bit for bit and a lower dtype rounds them once.

Memory: the whole file is checked (names, shapes, types, that the data lies inside the
file) before anything is allocated; tensors are then read and dequantised one at a time,
largest first, straight into a model built uninitialised in the target dtype. Peak is the
model plus one tensor's bytes and its float32 copy (no memory map stays resident).

What a GGUF cannot say is an error, never a guess: unknown architectures, RoPE scaling we
do not implement (llama3 `rope_freqs`, scaling types other than linear/yarn), partial RoPE,
sliding windows, attention biases in a llama file.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen25.checkpoint import _destination, checkpoint_shapes, resolve_dtype, save_model
from qwen25.config import ConfigError, ModelConfig, RopeScaling
import qwen25.formats.gguf_names as names
from qwen25.formats.gguf_file import GGUFError, GGUFFile, open_gguf
from qwen25.model.model import Transformer, build_model


def dequantizable_types() -> frozenset[str]:
    """Names of the GGML types the installed `gguf` package can turn into floats."""
    from gguf import quants

    return frozenset({"F32", "F16"} | {t.name for t in quants._type_traits})


# ---- config --------------------------------------------------------------------------
def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """ModelConfig from a file's metadata (and, for tied/untied and biases, its tensors)."""
    arch, path = g.architecture, g.path
    if arch not in names.ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported; this package loads "
                        f"{', '.join(names.ARCHITECTURES)} GGUF files")
    tensors = g.tensors

    def need(field: str) -> Any:
        value = g.arch_get(names.CONFIG_KEYS[field])
        if value is None:
            raise GGUFError(f"{path}: metadata {names.key(names.CONFIG_KEYS[field], arch)!r} is "
                            "missing; the file was not written by a llama.cpp converter we know")
        return value

    def opt(field: str, default: Any = None) -> Any:
        return g.arch_get(names.CONFIG_KEYS[field], default)

    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: no token_embd.weight tensor; the file holds no language model")
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: rope_freqs.weight is present (Llama 3.1-style RoPE frequency "
                        "scaling, rope_scaling.type='llama3'), which is not supported")
    if g.arch_get(names.SLIDING_WINDOW):
        raise GGUFError(f"{path}: {names.key(names.SLIDING_WINDOW, arch)} is set; sliding-window "
                        "attention is not supported")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = int(opt("head_dim", 0)) or (hidden // heads if heads else 0)
    for template in (names.VALUE_LENGTH, names.ROPE_DIMENSION_COUNT):
        value = g.arch_get(template)
        if value is not None and int(value) != head_dim:
            raise GGUFError(f"{path}: {names.key(template, arch)}={value} differs from the head "
                            f"size {head_dim}; partial RoPE / distinct value heads are not supported")
    has_bias = "blk.0.attn_q.bias" in tensors
    if arch == "llama" and has_bias:
        raise GGUFError(f"{path}: a llama file with attention biases (attn_q.bias) is not "
                        "supported; only Llama models without attention biases load")
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden,
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(opt("num_key_value_heads", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(need("max_position_embeddings")),
        rms_norm_eps=float(need("rms_norm_eps")),
        rope_theta=float(opt("rope_theta", 10_000.0)),  # llama.cpp's default base
        vocab_size=int(opt("vocab_size", 0)) or int(tensors["token_embd.weight"].shape[0]),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=arch != "llama",
        rope_scaling=_rope_scaling(g),
        torch_dtype="float32",
        bos_token_id=_int_or_none(g.get(names.BOS_ID)),
        eos_token_id=_int_or_none(g.get(names.EOS_ID)),
        pad_token_id=_int_or_none(g.get(names.PAD_ID)),
    )
    if arch == "qwen2moe":
        kwargs.update(
            num_experts=int(need("num_experts")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            shared_expert_intermediate_size=int(opt("shared_expert_intermediate_size", 0)),
            norm_topk_prob=bool(opt("norm_topk_prob", False)),
            # every block is sparse in a qwen2moe file; no dense MLP width is needed
            intermediate_size=int(opt("intermediate_size", 0)) or int(need("moe_intermediate_size")),
        )
    else:
        kwargs["intermediate_size"] = int(need("intermediate_size"))
    try:
        return ModelConfig(**kwargs)
    except ConfigError as e:
        raise GGUFError(f"{path}: the metadata describes no valid model ({e})") from None


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _rope_scaling(g: GGUFFile) -> RopeScaling | None:
    kind = g.arch_get(names.ROPE_SCALING_TYPE)
    if kind in (None, "none"):
        return None
    field = names.key(names.ROPE_SCALING_TYPE, g.architecture)
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"{g.path}: {field}={kind!r} is not supported; linear and yarn are")
    factor = g.arch_get(names.ROPE_SCALING_FACTOR)
    if factor is None:
        raise GGUFError(f"{g.path}: {field}={kind!r} without "
                        f"{names.key(names.ROPE_SCALING_FACTOR, g.architecture)}")
    extra: dict[str, Any] = {}
    original = g.arch_get(names.ROPE_SCALING_ORIGINAL_CONTEXT)
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    for template, name in ((names.ROPE_SCALING_YARN_BETA_FAST, "beta_fast"),
                           (names.ROPE_SCALING_YARN_BETA_SLOW, "beta_slow")):
        value = g.arch_get(template)
        if value is not None:
            extra[name] = float(value)
    attn = g.arch_get(names.ROPE_SCALING_ATTN_FACTOR)
    if attn is not None and float(attn) != 1.0:
        raise GGUFError(f"{g.path}: {names.key(names.ROPE_SCALING_ATTN_FACTOR, g.architecture)}="
                        f"{attn} is not supported (only the default YaRN attention factor)")
    try:
        return RopeScaling(type=kind, factor=float(factor), **extra)
    except ConfigError as e:
        raise GGUFError(f"{g.path}: {e}") from None


# ---- the tensor plan -----------------------------------------------------------------
def plan_tensors(g: GGUFFile, cfg: ModelConfig) -> list[tuple[Any, str | tuple[int, str]]]:
    """(tensor, HF key or (layer, expert projection)) for every tensor, largest first.

    Checks names, shapes and types of the whole file first: a bad file fails here, before
    any weight is allocated.
    """
    expected = checkpoint_shapes(cfg)
    supported = dequantizable_types()
    plan: list[tuple[Any, str | tuple[int, str]]] = []
    seen: set[str] = set()
    for name, t in g.tensors.items():
        shape = t.shape
        if t.offset + t.n_bytes > g.size:
            raise GGUFError(f"{g.path}: tensor {name!r} ends past the end of the file; the file "
                            "is truncated or corrupted, download or convert it again")
        if t.tensor_type.name not in supported:
            raise GGUFError(f"{g.path}: tensor {name!r} has type {t.tensor_type.name}, which the "
                            "gguf package cannot dequantise; re-quantize the model to a float or "
                            "Q/K type (e.g. Q8_0, Q4_K_M)")
        key = names.hf_name(name)
        if key is not None:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            want = expected.get(key)
            if want is None:
                raise GGUFError(f"{g.path}: unexpected tensor {name!r} for a {g.architecture} "
                                "model with this metadata")
            if _numel(shape) != _numel(want) or (len(shape) == len(want) and shape != want):
                raise GGUFError(f"{g.path}: tensor {name!r} has shape {list(shape)} but the "
                                f"metadata implies {list(want)}")
            plan.append((t, key))
            seen.add(key)
            continue
        expert = names.expert_tensor(name)
        if expert is None or not cfg.is_moe_layer(expert[0]):
            raise GGUFError(f"{g.path}: unexpected tensor {name!r} for a {g.architecture} model "
                            "(not part of the layout this package loads)")
        layer, proj = expert
        inter = cfg.moe_intermediate_size
        want = ((cfg.num_experts, cfg.hidden_size, inter) if proj == "down_proj"
                else (cfg.num_experts, inter, cfg.hidden_size))
        if shape != want:
            raise GGUFError(f"{g.path}: tensor {name!r} has shape {list(shape)} but the metadata "
                            f"implies {list(want)}")
        plan.append((t, expert))
        seen |= {names.hf_expert_name(layer, e, proj) for e in range(cfg.num_experts)}
    missing = sorted(k for k in expected if k not in seen
                     and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise GGUFError(f"{g.path}: missing tensor(s) {[names.gguf_name(k) for k in missing[:3]]}"
                        f"{more}; the file is incomplete or not a {g.architecture} model")
    plan.sort(key=lambda item: -int(item[0].n_elements))
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def dequantize(g: GGUFFile, t: Any) -> np.ndarray:
    """A GGUF tensor as float32 in HF's dimension order."""
    from gguf import quants

    return quants.dequantize(g.read(t), t.tensor_type).reshape(t.shape)


def _unpermute(key: str, w: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
        return names.unpermute_qk(w, cfg.num_attention_heads)
    if key.endswith("k_proj.weight") or key.endswith("k_proj.bias"):
        return names.unpermute_qk(w, cfg.num_key_value_heads)
    return w


# ---- loading -------------------------------------------------------------------------
def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu") -> Transformer:
    """A GGUF file -> model (eval mode) in `dtype` (None/"auto": float32, the dequantised
    values exactly) on `device`; `model.generation_config` holds the file's bos/eos ids."""
    g = open_gguf(path)
    cfg = config_from_gguf(g)
    plan = plan_tensors(g, cfg)
    dtype = resolve_dtype(dtype, default="float32")
    model = build_model(cfg, device=device, dtype=dtype, init=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    permuted = g.architecture in names.PERMUTED_QK
    try:
        with torch.no_grad():
            for t, target in plan:
                w = torch.from_numpy(dequantize(g, t))
                if isinstance(target, tuple):
                    _copy_experts(params, cfg, *target, w)
                    del w
                    _release_free_heap()
                    continue
                if permuted:
                    w = _unpermute(target, w, cfg)
                dest = _destination(params, target)
                dest.copy_(w.reshape(dest.shape))
                del w
                _release_free_heap()
    except (ValueError, IndexError, OSError) as e:  # data cut short behind a valid header
        raise GGUFError(f"{g.path}: tensor data cannot be read ({e}); the file is truncated or "
                        "corrupted, download or convert it again") from None
    model.generation_config = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                                 ("eos_token_id", cfg.eos_token_id),
                                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
    return model.eval()


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_free_heap() -> None:
    """Give the float32 temporaries of the last tensor back to the OS. glibc raises its mmap
    threshold after the first big free, so the next tensors' temporaries (a few MB each)
    land on the heap and stay resident once freed; trimming keeps the peak near the model."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _copy_experts(params: dict[str, torch.Tensor], cfg: ModelConfig, layer: int, proj: str,
                  w: torch.Tensor) -> None:
    """A stacked [E, out, in] GGUF expert tensor into our stacked parameters."""
    prefix = f"model.layers.{layer}.mlp.experts"
    inter = cfg.moe_intermediate_size
    if proj == "down_proj":
        params[f"{prefix}.down_proj"].copy_(w)
    else:
        gate_up = params[f"{prefix}.gate_up_proj"]  # [E, 2I, h]: gate rows, then up rows
        (gate_up[:, :inter] if proj == "gate_proj" else gate_up[:, inter:]).copy_(w)


def convert_gguf(path: str | os.PathLike, out: str | os.PathLike,
                 dtype: torch.dtype | str | None = None) -> Path:
    """Write an HF folder (config.json, safetensors, generation_config.json, tokenizer files
    with the chat template) that transformers and `qwen25.load_model` load."""
    from qwen25.tokenizer.gguf import load_gguf_tokenizer

    config_from_gguf(open_gguf(path))  # the cheap checks first: model metadata, then vocab
    tokenizer = load_gguf_tokenizer(path)
    model = load_gguf_model(path, dtype=dtype)
    folder = save_model(model, out)
    tokenizer.save_pretrained(folder)
    return folder

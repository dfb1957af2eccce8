"""Export a dense Qwen2 / Llama checkpoint to one GGUF file that llama.cpp runs.

Through the `gguf` package's writer and its quantizers; tensor names and metadata keys
from `gguf_names.py` (shared with the importer). What llama.cpp needs and this writes:
- architecture metadata (`qwen2` or `llama`): context length, widths, heads, KV heads,
  RMS eps, RoPE base (and YaRN/linear scaling), file type;
- tokenizer: `gpt2` (byte-level BPE) with `pre` naming the pre-tokenizer regex
  ("qwen2" for the Qwen vocabulary), the tokens padded to the embedding rows with
  `[PAD{i}]` (type UNUSED), token types (CONTROL for special tokens, USER_DEFINED for the
  other added ones), merges, bos/eos/pad ids, `add_bos_token` false, the chat template;
- tensors under llama.cpp names: no `output.weight` when the head is tied to the
  embedding (llama.cpp then reuses `token_embd`); Llama's Q/K rows permuted to its
  adjacent-pair RoPE order.

Tensor types, as llama.cpp's converter and llama-quantize choose them: 1-D tensors
(norms, biases) stay F32; 2-D ones take the requested type, except that a row length that
is not a multiple of the type's block (32) falls back (q4 -> q8_0 -> f16). With q4_0/q4_1
the embedding/output matrix is q8_0: llama-quantize gives it Q6_K, which needs rows that
are a multiple of 256 and falls back to Q8_0 otherwise (Qwen2.5-0.5B: 896), and this
writer has no k-quant encoder, so q8_0 is what it writes for every width.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen25.config import ModelConfig
from qwen25.errors import UserError
from qwen25.formats import gguf_names as names

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_ARCHS = {"qwen2": "qwen2", "llama": "llama"}
# The Qwen2 pre-tokenizer split regex (tokenizer.json), which llama.cpp calls "qwen2".
_QWEN2_REGEX_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}"


class GGUFExportError(UserError):
    """A model or type this exporter cannot write; the message names the fix."""


@dataclass
class ExportReport:
    """What was written: the file, and the type of every tensor (fallbacks visible)."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)


def _qtype(name: str):
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[name]


def _file_type(name: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[name]


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: str) -> str:
    """The type llama.cpp's rules give a tensor for a requested file type (see module doc)."""
    if len(shape) == 1 or requested == "f32":
        return "f32"
    want = requested
    if requested in ("q4_0", "q4_1") and gguf_name in ("token_embd.weight", "output.weight"):
        want = "q8_0"
    if want.startswith("q") and shape[-1] % 32:
        want = "f16"  # every block type here packs 32 values of a row
    return want


def encode_tensor(t: torch.Tensor, kind: str) -> np.ndarray:
    """A float tensor as the bytes (or floats) of a GGUF tensor of type `kind`."""
    from gguf import quants

    data = t.detach().to(torch.float32).cpu().numpy()
    if kind == "f32":
        return data
    if kind == "f16":
        return data.astype(np.float16)
    return quants.quantize(data, _qtype(kind))


def decode_tensor(data: np.ndarray, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 values a GGUF tensor of type `kind` holds (what llama.cpp computes with)."""
    from gguf import quants

    return torch.from_numpy(np.array(quants.dequantize(data, _qtype(kind)), dtype=np.float32).reshape(shape))


# ---- tokenizer metadata ------------------------------------------------------------------


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"<\|.*\|>", token)) or token in ("<s>", "</s>", "<unk>", "<pad>", "<mask>")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json (GGUFExportError if unknown)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    text = json.dumps(pre)
    if _QWEN2_REGEX_START in text or json.dumps(_QWEN2_REGEX_START)[1:-1] in text:
        return "qwen2"
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts if isinstance(p, dict)]
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's regex
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    raise GGUFExportError("the tokenizer's pre-tokenizer is not one llama.cpp names here "
                          "(qwen2, smollm, gpt-2); pass pre='NAME' (--pre) with llama.cpp's name for it")


def _read_tokenizer_files(folder: Path) -> tuple[dict, dict]:
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tc_path = folder / "tokenizer_config.json"
    return tj, json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.exists() else {}


def tokenizer_metadata(tokenizer, vocab_size: int, pre: str | None = None,
                       folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """tokens, token types, merges, special ids, pre and chat template of a tokenizer, read
    from its HF files (tokenizer.json + tokenizer_config.json) as llama.cpp's converter
    reads them: those in `folder` when it has them, else the files the tokenizer saves."""
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        tj, tc = _read_tokenizer_files(Path(folder))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            tj, tc = _read_tokenizer_files(Path(tmp))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer model {model.get('type')!r}: only byte-level BPE exports to GGUF")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special: dict[int, bool] = {}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special[added["id"]] = bool(added.get("special"))
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model only "
                              f"{vocab_size} embeddings; export with the matching tokenizer")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(names.TOKEN_UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(names.TOKEN_CONTROL if special[i] or _looks_special(by_id[i]) else names.TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(names.TOKEN_NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre or pre_tokenizer_name(tj),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "chat_template": tokenizer.chat_template or tc.get("chat_template")}


# ---- the file ------------------------------------------------------------------------------


def gguf_tensors(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF name -> float tensor (llama.cpp's row order) from HF checkpoint keys."""
    arch = _ARCHS[cfg.model_type]
    out = {}
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.gguf_name(key)
        if arch in names.PERMUTED_QK and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = names.permute_qk(t, cfg.num_attention_heads)
        elif arch in names.PERMUTED_QK and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = names.permute_qk(t, cfg.num_key_value_heads)
        out[name] = t
    return out


def export_gguf(cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer, path: str | os.PathLike,
                type: str = "f16", name: str = "qwen25", pre: str | None = None,
                tokenizer_folder: str | os.PathLike | None = None) -> ExportReport:
    """Write `state` (HF checkpoint keys -> float tensors) and `tokenizer` as one GGUF file
    (its vocabulary read from `tokenizer_folder`'s tokenizer.json when given).

    The file is written under a temporary name and renamed, so a failed export leaves no
    half-written file behind.
    """
    import gguf

    if type not in TYPES:
        hint = " (k-quants: write f16 or q8_0 here, then run llama.cpp's llama-quantize)" \
            if re.fullmatch(r"q\d_k(_[sml])?", type.lower()) else ""
        raise GGUFExportError(f"GGUF type {type!r} is not supported; use one of {', '.join(TYPES)}{hint}")
    if cfg.model_type not in _ARCHS:
        raise GGUFExportError(f"model_type {cfg.model_type!r} does not export to GGUF yet (dense qwen2 and llama do)")
    if cfg.dual_chunk_attention is not None:
        raise GGUFExportError("dual chunk attention has no GGUF metadata; export without --dca")
    arch = _ARCHS[cfg.model_type]
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size, pre, tokenizer_folder)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if arch == "llama":
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
    sc = cfg.rope_scaling
    if sc is not None:
        if sc.type not in ("yarn", "linear"):
            raise GGUFExportError(f"rope_scaling type {sc.type!r} has no GGUF metadata (yarn and linear do)")
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN if sc.type == "yarn" else gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(sc.factor)
        if sc.original_max_position_embeddings:
            writer.add_rope_scaling_orig_ctx_len(sc.original_max_position_embeddings)
    writer.add_file_type(_file_type(type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    bos = tok["bos"] if tok["bos"] is not None else cfg.bos_token_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    eos = tok["eos"] if tok["eos"] is not None else (cfg.eos_token_ids or (None,))[0]
    if eos is not None:
        writer.add_eos_token_id(eos)
    if tok["pad"] is not None:
        writer.add_pad_token_id(tok["pad"])
    writer.add_add_bos_token(False)  # Qwen2.5 (and this package's engine) never prepends BOS
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    report = ExportReport(out)
    try:
        for gname, t in gguf_tensors(cfg, state).items():
            kind = tensor_type(gname, tuple(t.shape), type)
            writer.add_tensor(gname, encode_tensor(t, kind), raw_dtype=_qtype(kind))
            report.types[gname] = kind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return report

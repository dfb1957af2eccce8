"""Test helper: GGUF files written with the `gguf` package's own writer, laid out as
llama.cpp's converter lays them out (names from the GGUF side of the tables, Llama Q/K rows
permuted, norms and biases kept F32, experts stacked)."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from qwen25.formats import gguf_names as names

# A tiny byte-level vocabulary: the 256 byte characters, then merged tokens, then a control.
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "a b", "Ġ a", "Ġa b"]


def _byte_chars() -> list[str]:
    from qwen25.tokenizer.bytelevel import byte_to_char

    table = byte_to_char()
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_chars() + ["".join(m.split(" ")) for m in MERGES] + ["<|endoftext|>"]
    types = [names.TOKEN_NORMAL] * (len(tokens) - 1) + [names.TOKEN_CONTROL]
    return tokens, types, MERGES


def add_vocab(w: gguf.GGUFWriter, pre: str = "gpt2", model: str = "gpt2",
              vocab: tuple[list[str], list[int], list[str]] | None = None) -> int:
    tokens, types, merges = vocab or tiny_vocab()
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return len(tokens)


def write_vocab_only(path: Path, pre: str = "gpt2", model: str = "gpt2") -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    add_vocab(w, pre=pre, model=model)
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_model(path: Path, hf_model, arch: str, qtype: str = "F32", vocab: bool = True,
                extra_kv: dict | None = None, override_types: dict | None = None,
                pre: str = "gpt2") -> Path:
    """An HF Qwen2/Qwen2-MoE/Llama model as a GGUF file of `arch` with matrices in `qtype`
    ("F32", "F16" or "Q8_0"). override_types: {gguf tensor name: numpy array} written raw."""
    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10_000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if arch == "qwen2moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        w.add_feed_forward_length(cfg.intermediate_size)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    if vocab:
        add_vocab(w, pre=pre)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    experts: dict[str, dict[int, np.ndarray]] = {}
    for key, arr in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):  # transformers 5 keeps experts stacked
            layer = key.split(".")[2]
            gate, up = np.split(arr, 2, axis=1)  # [E, 2I, h]: gate rows, then up rows
            _add(w, f"blk.{layer}.ffn_gate_exps.weight", gate, qtype, override_types)
            _add(w, f"blk.{layer}.ffn_up_exps.weight", up, qtype, override_types)
            continue
        if key.endswith("mlp.experts.down_proj"):
            _add(w, f"blk.{key.split('.')[2]}.ffn_down_exps.weight", arr, qtype, override_types)
            continue
        name = names.gguf_name(key)
        m = re.search(r"\.experts\.(\d+)\.", key)
        if m:
            experts.setdefault(name, {})[int(m.group(1))] = arr
            continue
        if arch in names.PERMUTED_QK and ".q_proj." in key:
            arr = names.permute_qk(arr, cfg.num_attention_heads)
        elif arch in names.PERMUTED_QK and ".k_proj." in key:
            arr = names.permute_qk(arr, cfg.num_key_value_heads)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            arr = arr.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        _add(w, name, arr, qtype, override_types)
    for name, per_expert in experts.items():
        _add(w, name, np.stack([per_expert[e] for e in sorted(per_expert)]), qtype, override_types)
    _finish(w)
    return path


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: str, override: dict | None) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if override and name in override:
        w.add_tensor(name, override[name])
    elif arr.ndim == 1 or qtype == "F32":  # norms and biases stay F32, as in llama.cpp
        w.add_tensor(name, arr)
    elif qtype == "F16":
        w.add_tensor(name, arr.astype(np.float16))
    else:
        t = getattr(gguf.GGMLQuantizationType, qtype)
        w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)


def gguf_roundtrip_(hf_model, qtype: str) -> None:
    """Replace the HF model's matrices by what a `qtype` GGUF stores (quantise, dequantise
    with the gguf package): the reference a quantised file must match."""
    if qtype == "F32":
        return
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.dim() < 2:
                continue
            a = p.detach().float().numpy()
            if qtype == "F16":
                b = a.astype(np.float16).astype(np.float32)
            else:
                t = getattr(gguf.GGMLQuantizationType, qtype)
                b = gguf.quants.dequantize(gguf.quants.quantize(a, t), t).reshape(a.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(b)))

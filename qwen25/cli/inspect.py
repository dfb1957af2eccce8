"""`qwen25 inspect PATH|PRESET`: config, parameter counts, dtype and weight memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder (HF layout) or a preset name such as 0.5B")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    from qwen25.checkpoint import load_config, verify_checkpoint
    from qwen25.config import PRESETS, ModelConfig, count_parameters

    if args.path in PRESETS and not Path(args.path).exists():
        cfg, disk = ModelConfig.preset(args.path), None
    else:
        cfg, disk = load_config(args.path), verify_checkpoint(args.path)
    counts = count_parameters(cfg)
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.torch_dtype, 2)
    info = {
        "model_type": cfg.model_type,
        "config": cfg.to_hf(),
        "parameters": counts,
        "dtype": cfg.torch_dtype,
        "weights_bytes": counts["total"] * bytes_per,
        "kv_cache_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per,
    }
    if disk is not None:
        info["files"] = disk
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.path}: {cfg.architecture} ({cfg.model_type})")
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
            "rms_norm_eps", "tie_word_embeddings")
    if cfg.is_moe:
        keys += ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                 "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step")
    for k in keys:
        print(f"  {k:34s} {getattr(cfg, k)}")
    if cfg.rope_scaling:
        print(f"  {'rope_scaling':34s} {cfg.rope_scaling.to_hf()}")
    print("parameters")
    print(f"  {'total':34s} {_fmt(counts['total'])}")
    print(f"  {'non-embedding':34s} {_fmt(counts['non_embedding'])}")
    if cfg.is_moe:
        print(f"  {'active per token':34s} {_fmt(counts['active'])}")
        print(f"  {'active non-embedding':34s} {_fmt(counts['active_non_embedding'])}")
    print(f"dtype {cfg.torch_dtype}: weights need {info['weights_bytes'] / 2**30:.2f} GiB; "
          f"KV cache {info['kv_cache_bytes_per_token']:,} bytes per token")
    if disk is not None:
        print(f"on disk: {disk['count']} safetensors file(s), {disk['bytes'] / 2**30:.2f} GiB")
    return 0


def _fmt(n: int) -> str:
    return f"{n:,} ({n / 1e9:.3f}B)"

"""`qwen25 demo`: build a small random Qwen2.5-shaped model, save it, load it, generate.

A smoke test of the install that takes seconds; the speedrun is the real main job.
"""

from __future__ import annotations

import argparse
import time


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", help="model shape (default: small)")
    p.add_argument("--out", default="out/demo", help="where the checkpoint is written")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")


def run(args: argparse.Namespace) -> int:
    import torch

    from qwen25.checkpoint import load_model, save_model
    from qwen25.config import ModelConfig, count_parameters
    from qwen25.model import KVCache, build_model

    cfg = ModelConfig.preset(args.preset)
    print(f"building a random {args.preset} model: {count_parameters(cfg)['total'] / 1e6:.1f}M parameters")
    save_model(build_model(cfg, seed=0), args.out)
    model = load_model(args.out, dtype="float32")
    print(f"saved and reloaded {args.out}")
    prompt = torch.tensor([[9707, 1879, 11]])  # "Hello world," in the Qwen vocabulary
    cache = KVCache(cfg, 1, prompt.shape[1] + args.new_tokens)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(prompt, kv_cache=cache)
        out = []
        for _ in range(args.new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            logits = model(nxt, kv_cache=cache)
    dt = time.perf_counter() - t0
    print(f"greedy continuation ids: {out}")
    print(f"{args.new_tokens / dt:.1f} tokens/s (random weights: the text is noise by design)")
    return 0

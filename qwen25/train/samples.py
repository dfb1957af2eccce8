"""Sample generations during training: a few prompts, continued by the model being trained.

Prompts run one at a time through `qwen25.model.KVCache` (prefill, then one token per
step); sampling draws from a private seeded generator so it never disturbs the training
RNG, and under FSDP every rank runs the same calls in lockstep (the forward is collective).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qwen25.model.kv_cache import KVCache


@torch.no_grad()
def generate_samples(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float = 0.8, seed: int = 0,
                     stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """New token ids for each prompt (temperature 0: greedy); stops at any of `stop_ids`."""
    was_training = model.training
    model.eval()
    cfg = model.config
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt) or [stop_ids[0] if stop_ids else 0]], device=device)
        limit = min(ids.shape[1] + max_new_tokens, cfg.max_position_embeddings)
        cache = KVCache(cfg, 1, limit, dtype=torch.float32, device=device)
        logits = model(ids, kv_cache=cache)[:, -1]
        new: list[int] = []
        while len(new) < limit - ids.shape[1]:
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            token = int(nxt)
            if token in stop_ids:
                break
            new.append(token)
            if len(new) == limit - ids.shape[1]:
                break
            logits = model(nxt, kv_cache=cache)[:, -1]
        outs.append(new)
    model.train(was_training)
    return outs

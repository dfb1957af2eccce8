"""Mixture of experts as in Qwen1.5-MoE / Qwen2-MoE, the design behind Qwen2.5-Turbo/Plus.

Fine-grained experts (many narrow SwiGLU FFNs) with top-k routing, plus a shared expert that
every token passes through, gated by a sigmoid (spec §1.6):

    p = softmax(x W_gate^T) in float32;  w, idx = topk(p, k);  [w /= sum(w) if norm_topk_prob]
    y = sum_j w_j * Expert_{idx_j}(x)  +  sigmoid(x W_sg^T) * SharedExpert(x)

Expert weights are stacked, [E, 2I, h] for gate|up and [E, h, I] for down (the checkpoint
stores one tensor per expert; `checkpoint.py` stacks them). Tokens are sorted by expert and
each expert runs one matmul over its contiguous slice: the Python loop is over experts,
never over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E routed SwiGLU experts with stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, h]; idx, weights [N, k] -> sum_j weights[:, j] * expert_{idx[:, j]}(x)."""
        N, k = idx.shape
        flat = idx.reshape(-1)  # [N*k] expert of each (token, slot)
        order = torch.argsort(flat, stable=True)
        token = order // k  # token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[token]  # [N*k, h], grouped by expert
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            seg = xs[start:start + n]
            gate, up = F.linear(seg, self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
            start += n
        ys = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)


class SparseMoE(nn.Module):
    """Router + routed experts + gated shared expert. Returns (y, router_logits [N, E])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        router_logits = self.gate(x)
        weights, idx = route(router_logits, self.top_k, self.norm_topk_prob)
        y = self.experts(x, idx, weights.to(x.dtype))
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape), router_logits


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the float32 softmax over all experts -> (weights [N, k] fp32, indices [N, k])."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, idx = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, idx


def load_balancing_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], num_experts: int,
                        top_k: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e over all MoE layers.

    f_e: share of (token, slot) assignments routed to expert e (sums to top_k over e);
    P_e: mean router probability of e. Both are averaged over the real tokens of every
    layer (`token_mask` [B, T] or [N], 1 = real token). Minimised by a uniform routing.
    """
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = torch.zeros((), dtype=torch.float32, device=counts.device)
    mask = None if token_mask is None else token_mask.reshape(-1).to(counts.device, torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, idx = torch.topk(probs, top_k, dim=-1)
        m = torch.ones(probs.shape[0], device=counts.device) if mask is None else mask
        counts = counts.scatter_add(0, idx.reshape(-1), m.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * m[:, None]).sum(dim=0)
        rows = rows + m.sum()
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))

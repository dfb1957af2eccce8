"""Mixture of experts as in Qwen1.5-MoE / Qwen2-MoE, the design behind Qwen2.5-Turbo/Plus.

Fine-grained experts (many narrow SwiGLU FFNs) with top-k routing, plus a shared expert that
every token passes through, gated by a sigmoid (spec §1.6):

    p = softmax(x W_gate^T) in float32;  w, idx = topk(p, k);  [w /= sum(w) if norm_topk_prob]
    y = sum_j w_j * Expert_{idx_j}(x)  +  sigmoid(x W_sg^T) * SharedExpert(x)

Expert weights are stacked, [E, 2I, h] for gate|up and [E, h, I] for down (the checkpoint
stores one tensor per expert; `checkpoint.py` stacks them). The (token, slot) assignments
are sorted by expert once, and each of the two projections is then ONE grouped matmul over
the contiguous per-expert segments (`grouped_mm`): torch's grouped matmul kernel on CUDA
in bf16; on CPU the `segment_mm` custom op (one matmul per segment written in place, no
padding, opaque to torch.compile so a compiled block keeps one graph whatever the
routing); elsewhere one padded `bmm` over [E, C, h]. Tokens go to their rows and come back
by gathers whose gradients are gathers too (`_Rows`; no scatter-add), and the k expert
outputs of a token are summed with its router weights inside autograd, so the router
gets its gradient. `grouped_mm(..., backend="loop")` is the per-expert reference the
tests compare against.

Training losses on the router logits: the Switch/Qwen2-MoE load-balancing loss and the
ST-MoE router z-loss (mean squared log-sum-exp of the logits; keeps them small so the
float32 softmax stays well conditioned).
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
    """E routed SwiGLU experts with stacked weights.

    backend: "auto" (grouped kernel if usable, else padded bmm), "grouped", "padded" or
    "loop" (the per-expert reference). All give the same result up to float rounding.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
        self.num_experts, self.intermediate_size, self.backend = num_experts, intermediate_size, backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, h]; idx, weights [N, k] -> sum_j weights[:, j] * expert_{idx[:, j]}(x)."""
        N, k = idx.shape
        flat = idx.reshape(-1)  # [N*k] expert of each (token, slot)
        sorted_experts, order = torch.sort(flat, stable=True)  # order[i]: assignment at sorted row i
        token = order // k  # token of each sorted assignment
        slot_of = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # Assignments per expert from the sorted ids: static shapes (bincount's output size
        # depends on the data, which torch.compile cannot trace), and it stays on the device.
        ends = torch.searchsorted(sorted_experts, torch.arange(self.num_experts, device=flat.device), right=True)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))  # [E]
        xs = _Rows.apply(x, token, slot_of, k)  # [N*k, h] = x[token], grouped by expert
        # Weights are stored [E, out, in] (checkpoint layout); grouped_mm takes [E, in, out].
        gate_up = grouped_mm(xs, self.gate_up_proj.transpose(1, 2), counts, self.backend)
        gate, up = gate_up.chunk(2, dim=-1)
        ys = grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), counts, self.backend)
        ys = _Rows.apply(ys, slot_of, order, 1).view(N, k, -1)  # back to (token, slot) order
        return (ys * weights.unsqueeze(-1).to(x.dtype)).sum(1).to(x.dtype)  # sums in x.dtype (fp32 under autocast)


class _Rows(torch.autograd.Function):
    """x[index] for an `index` whose inverse is known: back_index lists, for each row r of
    x repeated k times ([N*k]: row r's copies at r*k .. r*k+k-1), where that copy went.
    The gradient is then a gather and a sum over the k copies instead of the scatter-add
    (index_put with accumulate) autograd uses for x[index] and `index_add_`, which on CPU
    measured ~10x slower than a gather of the same size."""

    @staticmethod
    def forward(ctx, x, index, back_index, k):
        ctx.save_for_backward(back_index)
        ctx.k = k
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        g = grad[back_index]
        return (g if ctx.k == 1 else g.view(-1, ctx.k, g.shape[-1]).sum(1)), None, None, None


BACKENDS = ("auto", "grouped", "segment", "padded", "loop")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Segment matmul: rows of x [M, in] sorted by group, counts [G] rows per group (sum M),
    w [G, in, out] -> [M, out] with rows of group g multiplied by w[g]. Differentiable in x and w."""
    if torch.is_autocast_enabled(x.device.type):  # what autocast does to any matmul
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    if backend == "auto":
        backend = ("grouped" if _grouped_kernel_fits(x, w) else
                   "segment" if x.device.type == "cpu" else "padded")
    if backend == "grouped":
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # end row of each group
        gmm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10 on
        return gmm(x.contiguous(), w, offs=offsets)
    if backend == "segment":
        offsets = torch.cumsum(counts, 0)
        if not w.is_contiguous() and w.transpose(1, 2).is_contiguous():
            # A transposed view of [G, out, in] weights: pass the stored layout, so that the
            # weight gradient comes out in it too (no copy when it is accumulated).
            return torch.ops.qwen25.segment_mm(x.contiguous(), w.transpose(1, 2), offsets, True)
        return torch.ops.qwen25.segment_mm(x.contiguous(), w.contiguous(), offsets, False)
    if backend == "padded":
        return _padded_mm(x, w, counts)
    if backend == "loop":
        outs, start = [], 0
        for g, n in enumerate(counts.tolist()):
            outs.append(x[start:start + n] @ w[g])
            start += n
        return torch.cat(outs)
    raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")


def _padded_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """One bmm over [G, C, in] where C is the largest group (empty slots are zeros).

    Costs G x C rows instead of M (no waste for balanced routing, which the aux loss aims
    at); one host sync for C, which is what sizes the buffer."""
    G, M = w.shape[0], x.shape[0]
    cap = int(counts.max()) if M else 0
    starts = torch.cumsum(counts, 0) - counts
    group = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=M)
    slot = torch.arange(M, device=x.device) - starts[group]  # row within its group
    flat = group * cap + slot  # where each row sits in the padded [G * C] buffer
    buf = x.new_zeros(G * cap, x.shape[1]).index_copy(0, flat, x)
    out = torch.bmm(buf.view(G, cap, x.shape[1]), w)  # [G, C, out]
    return out.reshape(G * cap, w.shape[2])[flat]


# ---- "segment": one matmul per expert segment, as a custom op ------------------------
# A torch.library op with its own backward: torch.compile treats it as one opaque call
# with a static output shape ([M, out], M = rows in), so a compiled block neither breaks
# its graph on the per-expert row counts nor recompiles when they change, and there is no
# padding (a padded bmm costs G x max-count rows: at initialisation routing is uneven and
# that was ~2x the useful rows). Each segment is written in place into one output buffer,
# so no concatenation or zero-padding either, forward or backward.


# oneDNN, which runs bf16/fp16 matmuls on CPU (AMX where present), compiles a kernel for
# every new shape and caches a bounded number of them; expert segments have a different
# row count every step, so each matmul paid a compilation: measured 0.9 ms instead of
# 0.06 ms for [~512, 256] x [256, 256] in bf16 (fp32 goes to MKL, which has no such cost).
# Cutting a segment into a multiple of _ROW_BLOCK rows and a remainder of fewer leaves
# few distinct shapes, all cached after the first steps.
_ROW_BLOCK = 32


def _row_blocks(start: int, end: int, like: torch.Tensor) -> list[slice]:
    """Rows start:end as the slices to multiply: one slice, or for a reduced-precision CPU
    tensor a multiple of _ROW_BLOCK rows and the remainder (empty parts left out)."""
    if end <= start:
        return []
    if like.device.type != "cpu" or like.dtype in (torch.float32, torch.float64):
        return [slice(start, end)]
    cut = start + (end - start) // _ROW_BLOCK * _ROW_BLOCK
    return [r for r in (slice(start, cut), slice(cut, end)) if r.stop > r.start]


@torch.library.custom_op("qwen25::segment_mm", mutates_args=())
def _segment_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_w: bool) -> torch.Tensor:
    """Rows offsets[g-1]:offsets[g] of x [M, in] times w[g] ([G, in, out]; [G, out, in]
    transposed if trans_w) -> [M, out]."""
    out = x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        wg = w[g].T if trans_w else w[g]
        for rows in _row_blocks(start, end, x):
            torch.mm(x[rows], wg, out=out[rows])
        start = end
    return out


@_segment_mm.register_fake
def _(x, w, offsets, trans_w):
    return x.new_empty(x.shape[0], w.shape[1] if trans_w else w.shape[2])


@torch.library.custom_op("qwen25::segment_outer", mutates_args=())
def _segment_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per segment g: a_g^T @ b_g for a [M, p], b [M, q] -> [G, p, q] (zero for empty
    segments): the weight gradient of `segment_mm`."""
    out = a.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        for i, rows in enumerate(_row_blocks(start, end, a)):
            if i == 0:
                torch.mm(a[rows].T, b[rows], out=out[g])
            else:  # the remainder's rows add to the same sum
                out[g].addmm_(a[rows].T, b[rows])
        start = end
    return out


@_segment_outer.register_fake
def _(a, b, offsets):
    return a.new_empty(offsets.shape[0], a.shape[1], b.shape[1])


def _segment_mm_setup(ctx, inputs, output):
    x, w, offsets, trans_w = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.trans_w = trans_w


def _segment_mm_backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:  # y = x @ W  =>  dx = dy @ W^T
        grad_x = torch.ops.qwen25.segment_mm(grad, w, offsets, not ctx.trans_w)
    if ctx.needs_input_grad[1]:  # dW = x^T dy, stored as dy^T x when W is [G, out, in]
        grad_w = (torch.ops.qwen25.segment_outer(grad, x, offsets) if ctx.trans_w
                  else torch.ops.qwen25.segment_outer(x, grad, offsets))
    return grad_x, grad_w, None, None


_segment_mm.register_autograd(_segment_mm_backward, setup_context=_segment_mm_setup)


# Where "auto" takes torch._grouped_mm. Its CPU kernel exists (and "grouped" uses it) but
# measured slower than the one padded bmm for Qwen-MoE-like shapes (16 experts, top-4,
# fp32, 2 threads: 3.4 s vs 1.7 s forward+backward), so on CPU "auto" means "segment".
_KERNEL_DTYPES = {"cuda": (torch.bfloat16,)}


def _grouped_kernel_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm exists, takes this device/dtype, and its 16-byte stride rule holds."""
    if not (hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")) or x.dtype != w.dtype:
        return False
    if x.dtype not in _KERNEL_DTYPES.get(x.device.type, ()):
        return False
    # torch >= 2.9 runs it on sm80+ (older builds: Hopper only)
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] < (8 if hasattr(F, "grouped_mm") else 9):
        return False
    per16 = 16 // x.element_size()
    return x.shape[1] % per16 == 0 and w.shape[2] % per16 == 0


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
                        top_k: int, token_mask: torch.Tensor | None = None,
                        per_layer: bool = False) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e.

    f_e: share of (token, slot) assignments routed to expert e (sums to top_k over e);
    P_e: mean router probability of e, both over the real tokens (`token_mask` [B, T] or
    [N], 1 = real token). Minimised by a uniform routing, where it equals top_k.
    per_layer False (transformers' Qwen2-MoE loss): f and P pooled over all MoE layers;
    True (Switch Transformer, GShard): the loss of each layer, averaged over the layers.
    The pooled loss can be at its minimum while every layer leaves experts unused, as long
    as the layers favour different experts (`ModelConfig.router_aux_loss_per_layer`).
    """
    device = router_logits[0].device
    mask = None if token_mask is None else token_mask.reshape(-1).to(device, torch.float32)
    layers = []  # per layer: (assignments per expert, summed probabilities, real tokens)
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        _, idx = torch.topk(probs, top_k, dim=-1)
        m = torch.ones(probs.shape[0], device=device) if mask is None else mask
        counts = torch.zeros(num_experts, dtype=torch.float32, device=device).scatter_add(
            0, idx.reshape(-1), m.repeat_interleave(top_k))
        layers.append((counts, (probs * m[:, None]).sum(dim=0), m.sum()))

    def balance(counts, prob_sum, rows):
        return num_experts * torch.sum((counts / rows) * (prob_sum / rows))

    if per_layer:
        return torch.stack([balance(*layer) for layer in layers]).mean()
    return balance(*(sum(parts) for parts in zip(*layers)))


def config_balance_loss(router_logits, cfg: ModelConfig, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`load_balancing_loss` as `cfg` sets it up (experts, top-k, pooled or per layer), unweighted."""
    return load_balancing_loss(router_logits, cfg.num_experts, cfg.num_experts_per_tok, token_mask,
                               cfg.router_aux_loss_per_layer)


def router_z_loss(router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
                  token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens and MoE layers of logsumexp(logits)^2.

    Penalises large router logits (their exponentials dominate float32 softmax round-off)
    without changing which expert wins; the ST-MoE paper weights it by 1e-3.
    `token_mask` as in `load_balancing_loss`."""
    total = torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    rows = torch.zeros((), dtype=torch.float32, device=total.device)
    mask = None if token_mask is None else token_mask.reshape(-1).to(total.device, torch.float32)
    for logits in router_logits:
        z2 = torch.logsumexp(logits.float(), dim=-1).square()
        m = torch.ones_like(z2) if mask is None else mask
        total = total + (z2 * m).sum()
        rows = rows + m.sum()
    return total / rows.clamp(min=1)


def router_loss(router_logits, cfg: ModelConfig, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The weighted router terms a training loss adds for an MoE model:
    router_aux_loss_coef x load balancing + router_z_loss_coef x z-loss."""
    loss = cfg.router_aux_loss_coef * config_balance_loss(router_logits, cfg, token_mask)
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * router_z_loss(router_logits, token_mask)
    return loss


def expert_counts(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Assignments per expert [E] of one layer's router logits [N, E] (top-k of the softmax)."""
    idx = torch.topk(router_logits.float(), top_k, dim=-1).indices  # softmax keeps the order
    return torch.bincount(idx.reshape(-1), minlength=router_logits.shape[-1])


def utilisation_entropy(counts: torch.Tensor) -> float:
    """Entropy (nats) of the share of assignments each expert got; log(E) is perfectly even,
    0 means one expert takes everything. Divide by log(E) for a 0..1 score."""
    p = counts.double() / counts.sum().clamp(min=1)
    return float(-(p[p > 0] * p[p > 0].log()).sum())

"""GPTQ (Frantar et al., 2022): quantize a layer's weight column by column, each rounding
error compensated on the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ||X W^T - X Q^T||^2 (H = 2 X^T X over calibration inputs X).

Steps for one weight W [N, K]:
1. H from calibration inputs; dead inputs (H_kk = 0) get H_kk = 1 and W[:, k] = 0;
2. act-order (optional): visit columns by decreasing H_kk, the most salient first;
3. damping: H += damp * mean(diag H) * I keeps the Cholesky factorisation stable;
4. U = upper Cholesky factor of H^-1; for each column k: q_k = round(w_k) on the group's
   grid, err = (w_k - q_k) / U_kk, and the later columns move by -err * U_k,k+1: ;
   done in blocks of 128 columns with the update to the rest applied once per block.
Group grids (scale, zero point) are computed when the first column of a group is reached,
from the already-updated weights, as the reference implementation does.

`gptq_model` runs it layer by layer: the calibration hidden states pass through layer i
(hooks accumulate each projection's H), its projections are quantized, and the
*quantized* layer's outputs feed layer i + 1, so later layers see the errors of earlier ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from qwen25.model.rope import rotary_tables
from qwen25.quant.modules import QuantLinear, projections
from qwen25.quant.rtn import grid, quantize_with


def hessian(inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """H = 2/n X^T X [K, K] float32 over the rows of all inputs (each [..., K])."""
    k = inputs[0].shape[-1]
    h = torch.zeros(k, k, dtype=torch.float32)
    n = 0
    for x in inputs:
        x = x.reshape(-1, k).float()
        h += x.T @ x
        n += x.shape[0]
    return h * (2.0 / max(n, 1))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, sym: bool,
                  damp: float = 0.01, act_order: bool = False, block: int = 128):
    """GPTQ codes for w [N, K] given H [K, K].

    Returns (codes [N, K] uint8, scale [N, G] float32, zero [N, G] uint8, perm [K] int64 or
    None). With act-order, column j of the codes (and group j // group_size) is input
    column perm[j]; otherwise columns are in input order.
    """
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    per_channel = group_size >= k
    block = max(block // group_size, 1) * group_size if not per_channel else block
    q = torch.zeros(n, k, dtype=torch.uint8)
    scales, zeros = [], []
    if per_channel:
        s, z = grid(w, bits, k, sym)
        scales, zeros = [s], [z]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_channel and col % group_size == 0:
                s, z = grid(w1[:, i:i + group_size], bits, group_size, sym)
                scales.append(s)
                zeros.append(z)
            s, z = scales[-1], zeros[-1]
            qc = quantize_with(w1[:, i:i + 1], s, z, bits, 1)
            q[:, col] = qc[:, 0]
            deq = (qc[:, 0].float() - z[:, 0]) * s[:, 0]
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    scale = torch.cat(scales, dim=1)
    zero = torch.cat(zeros, dim=1).to(torch.uint8)
    return q, scale, zero, perm


@torch.no_grad()
def gptq_model(model, calibration: Sequence[torch.Tensor], bits: int = 4, group_size: int = 128,
               sym: bool = False, damp: float = 0.01, act_order: bool = False,
               progress: Callable[[int, int], None] | None = None):
    """GPTQ-quantize every projection of `model` in place, using token-id tensors [1, T].

    Activations are kept for all calibration samples (n x T x hidden floats) while a layer
    is processed; `progress(layer, n_layers)` is called after each layer.
    """
    if model.config.is_moe:
        raise ValueError("quantizing mixture-of-experts models is not supported yet")
    cfg = model.config
    xs, ropes = [], []
    for ids in calibration:
        ids = ids.reshape(1, -1).to(model.device)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        x = model.model.embed_tokens(ids)
        xs.append(x)
        ropes.append(rotary_tables(cfg, model.rope_inv_freq(positions), model.attention_scaling, positions, x.dtype))
    targets = {}
    for name, parent, attr in projections(model):
        targets.setdefault(int(name.split(".")[2]), []).append((name, parent, attr))
    layers = model.model.layers
    for i, layer in enumerate(layers):
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = [getattr(parent, attr).register_forward_hook(
            lambda mod, inp, out, name=name: seen.setdefault(name, []).append(inp[0].detach()))
            for name, parent, attr in targets.get(i, [])]
        for x, rope in zip(xs, ropes):
            layer(x, rope, None)
        for hook in hooks:
            hook.remove()
        for name, parent, attr in targets.get(i, []):
            lin: nn.Linear = getattr(parent, attr)
            q, s, z, perm = gptq_quantize(lin.weight, hessian(seen.pop(name)), bits,
                                          group_size or lin.in_features, sym, damp, act_order)
            setattr(parent, attr, QuantLinear.from_codes(q, s, z, bits, lin.bias, lin.weight.dtype, perm))
        xs = [layer(x, rope, None)[0] for x, rope in zip(xs, ropes)]
        if progress is not None:
            progress(i + 1, len(layers))
    return model

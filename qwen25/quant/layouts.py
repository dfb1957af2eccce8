"""The GPTQ and AWQ tensor layouts <-> codes, scales and zero points (rtn.py's representation).

GPTQ (AutoGPTQ / transformers / vLLM, `quant_method: "gptq"`), `bits` b in {4, 8}, f = 32 / b
codes per int32, K inputs, N outputs, G groups:
- `qweight` int32 [K / f, N]: word (i, n) holds q[n, i*f + j] in bits [b*j, b*j + b);
- `qzeros`  int32 [G, N / f]: word (g, c) holds zero[c*f + j, g] in bits [b*j, b*j + b),
  minus 1 in the original format (`checkpoint_format: "gptq"`, the one released Qwen2.5
  GPTQ checkpoints use), as stored in "gptq_v2";
- `scales`  float16 [G, N]; `g_idx` int32 [K]: the group of each input column (k // group
  without act-order; any assignment with `desc_act: true`).
AWQ (AutoAWQ "gemm", `quant_method: "awq"`), 4 bits only:
- `qweight` int32 [K, N / 8]: word (k, c) holds q[c*8 + AWQ_ORDER[i], k] in bits [4i, 4i + 4);
- `qzeros`  int32 [G, N / 8]: the zero points, packed in the same order; `scales` float16 [G, N].
Words are signed int32 on disk; all bit work is done in int64 and masked.
"""

from __future__ import annotations

import torch

# AWQ interleaves the 8 output channels of a word so its GEMM kernel can unpack them with
# fewer shuffles: nibble i holds channel AWQ_ORDER[i] of the group of 8.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> [R / f, C] int32, rows f*i + j into bits [b*j, b*j + b) of row i."""
    f = 32 // bits
    r, c = v.shape
    if r % f:
        raise ValueError(f"{r} rows do not pack into int32 words of {f} {bits}-bit codes")
    v = v.to(torch.int64).reshape(r // f, f, c)
    shifts = (torch.arange(f, dtype=torch.int64) * bits)[None, :, None]
    words = (v << shifts).sum(dim=1)
    return _to_int32(words)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_pack_rows`: [R / f, C] int32 -> [R, C] int64 codes."""
    f = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(f, dtype=torch.int64) * bits)[None, :, None]
    v = (w[:, None, :] >> shifts) & (2**bits - 1)
    return v.reshape(-1, words.shape[1])


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# ---- GPTQ --------------------------------------------------------------------------------


def gptq_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
              perm: torch.Tensor | None = None, zero_offset: int = 1) -> dict[str, torch.Tensor]:
    """Codes q [N, K] (stored-column order), scale/zero [N, G] -> qweight, qzeros, scales, g_idx.

    perm (act-order): stored column j is input column perm[j]; GPTQ keeps input order and
    says in g_idx which group each input column belongs to.
    """
    n, k = q.shape
    g_idx = (torch.arange(k) // group_size).to(torch.int32)
    if perm is not None:
        inputs = torch.empty_like(q)
        inputs[:, perm] = q
        q = inputs
        g_idx = torch.empty_like(g_idx).scatter_(0, perm, g_idx)
    stored = zero.to(torch.int64) - zero_offset
    if (stored < 0).any():
        raise ValueError("a zero point of 0 cannot be stored in the GPTQ v1 layout (it keeps "
                         "zero - 1); quantize with qwen25.quant, which keeps zero points >= 1")
    return {"qweight": _pack_rows(q.T, bits), "qzeros": _pack_cols(stored.T, bits),
            "scales": scale.T.contiguous().to(torch.float16), "g_idx": g_idx}


def _pack_cols(v: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] codes -> [R, C / f] int32, columns f*i + j into bits [b*j, b*j + b) of column i."""
    return _pack_rows(v.T.contiguous(), bits).T.contiguous()


def _unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return _unpack_rows(words.T.contiguous(), bits).T.contiguous()


def gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, zero_offset: int = 1):
    """The GPTQ tensors -> (codes [N, K] uint8, scale [N, G] float32, zero [N, G] uint8, perm).

    perm is None when g_idx is the plain k // group_size; otherwise stored columns are the
    input columns sorted by group (perm) so that each group is contiguous. Raises
    ValueError when the shapes or g_idx do not fit `bits` and `group_size`.
    """
    f = 32 // bits
    kf, n = qweight.shape
    k = kf * f
    groups = k // group_size if group_size > 0 else 1
    group_size = group_size if group_size > 0 else k
    if k % group_size or tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // f):
        raise ValueError(f"qweight {list(qweight.shape)} ({k} inputs) with group_size={group_size} "
                         f"needs scales [{groups}, {n}] and qzeros [{groups}, {n // f}], found "
                         f"{list(scales.shape)} and {list(qzeros.shape)}; the group size in "
                         "quantization_config does not match the tensors")
    q = _unpack_rows(qweight, bits).T  # [N, K]
    zero = _unpack_cols(qzeros, bits).T + zero_offset  # [N, G]
    if (zero > 2**bits - 1).any():
        raise ValueError("a stored zero point is outside the code range (a zero of 0 saved in "
                         "the GPTQ v1 layout, which cannot represent it)")
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if tuple(g_idx.shape) != (k,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"g_idx {list(g_idx.shape)} does not assign {k} inputs to {groups} groups")
        if not torch.equal(g_idx, torch.arange(k) // group_size):
            if not torch.equal(torch.bincount(g_idx, minlength=groups), torch.full((groups,), group_size)):
                raise ValueError(f"g_idx gives groups of unequal size (group_size={group_size})")
            perm = torch.argsort(g_idx, stable=True)
            q = q[:, perm]
    return q.to(torch.uint8).contiguous(), scales.T.float().contiguous(), zero.to(torch.uint8).contiguous(), perm


# ---- AWQ ---------------------------------------------------------------------------------


def _awq_interleave(v: torch.Tensor) -> torch.Tensor:
    """[R, C] -> columns reordered so that column 8c + i holds channel 8c + AWQ_ORDER[i]."""
    r, c = v.shape
    order = torch.tensor(AWQ_ORDER)
    return v.reshape(r, c // 8, 8)[:, :, order].reshape(r, c)


def _awq_deinterleave(v: torch.Tensor) -> torch.Tensor:
    r, c = v.shape
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    return v.reshape(r, c // 8, 8)[:, :, inverse].reshape(r, c)


def awq_pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """Codes q [N, K], scale/zero [N, G] -> AWQ qweight [K, N/8], qzeros [G, N/8], scales [G, N]."""
    if q.shape[0] % 8:
        raise ValueError(f"{q.shape[0]} output channels do not pack into AWQ words of 8")
    return {"qweight": _pack_cols(_awq_interleave(q.T), 4),
            "qzeros": _pack_cols(_awq_interleave(zero.T.contiguous()), 4),
            "scales": scale.T.contiguous().to(torch.float16)}


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """AWQ tensors -> (codes [N, K] uint8, scale [N, G] float32, zero [N, G] uint8)."""
    k, n8 = qweight.shape
    n = n8 * 8
    group_size = group_size if group_size > 0 else k
    groups = k // group_size
    if k % group_size or tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n8):
        raise ValueError(f"AWQ qweight {list(qweight.shape)} ({k} inputs) with group_size={group_size} "
                         f"needs scales [{groups}, {n}] and qzeros [{groups}, {n8}], found "
                         f"{list(scales.shape)} and {list(qzeros.shape)}; the group size in "
                         "quantization_config does not match the tensors")
    q = _awq_deinterleave(_unpack_cols(qweight, 4)).T
    zero = _awq_deinterleave(_unpack_cols(qzeros, 4)).T
    return (q.to(torch.uint8).contiguous(), scales.T.float().contiguous(), zero.to(torch.uint8).contiguous())

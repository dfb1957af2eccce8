"""Log-probabilities of given tokens: the one implementation that training, evaluation, the
engine and the server share.

    log p_T(y | x) = z_y / T - logsumexp(z / T)        z: the logits at x, T: temperature

Every caller asks the same question (what does the model think of *these* tokens?) for a
different reason: the engine reports the log p of each token it samples, `/v1/completions`
scores an echoed prompt, the position-perplexity probe sums losses over 32K positions, the
trainers need differentiable log p for DPO / GRPO. All of them get it from here, so they
agree to the last bit on the same logits, and a fix lands everywhere at once.

Numerics: the log-softmax always runs in float32, whatever the logits' dtype (bf16 logits
of 152K entries lose ~3 digits in a bf16 logsumexp). Memory: a float32 copy of the logits
is never made for the whole vocabulary at once when `vocab_chunk` is given (the logsumexp is
combined over column chunks), and `head_logprobs` applies the lm_head to `chunk` positions
at a time, so scoring a long sequence holds O(chunk x vocab) logits, never O(length x vocab).

Temperature is an explicit argument with no default hidden in a caller: 1.0 is the raw model
distribution (what the OpenAI API reports); a sampler at temperature T that wants the log
p of what it drew (GRPO's importance ratios) passes T.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

IGNORE_INDEX = -100  # labels with this value have no target (the PyTorch / HF convention)


def logsumexp_fp32(logits: torch.Tensor, temperature: float = 1.0,
                   vocab_chunk: int | None = None) -> torch.Tensor:
    """logsumexp(logits / temperature) over the last dimension, in float32: [..., V] -> [...].

    vocab_chunk: upcast and reduce this many columns at a time (the partial results are
    combined with one more logsumexp), so bf16 logits never get a full float32 copy.
    """
    V = logits.shape[-1]
    if vocab_chunk is None or vocab_chunk >= V:
        return torch.logsumexp(_scaled(logits, temperature), dim=-1)
    parts = [torch.logsumexp(_scaled(logits[..., i:i + vocab_chunk], temperature), dim=-1)
             for i in range(0, V, vocab_chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, *,
                   lse: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                   vocab_chunk: int | None = None) -> torch.Tensor:
    """log p(targets) under softmax(logits / temperature), float32, differentiable.

    logits [..., V] (any float dtype), targets [...] int64 (already aligned: targets[..., t]
    is the token that logits[..., t, :] predict). Entries equal to `ignore_index` give 0.
    lse: logsumexp_fp32(logits, temperature) when the caller already has it (the C++ decoder
    computes it on the fly), so it is not computed twice.
    """
    mask = targets != ignore_index
    safe = targets.masked_fill(~mask, 0)
    if lse is None:
        lse = logsumexp_fp32(logits, temperature, vocab_chunk)
    chosen = _scaled(logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1), temperature) - lse
    return chosen.masked_fill(~mask, 0.0)


def top_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                 lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row: (log-probabilities [..., k] float32, ids [..., k]),
    best first. Ties keep torch.topk's order."""
    if lse is None:
        lse = logsumexp_fp32(logits, temperature)
    values, ids = logits.topk(k, dim=-1)
    return _scaled(values, temperature) - lse.unsqueeze(-1), ids


@torch.no_grad()
def head_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                  temperature: float = 1.0, top: int = 0, chunk: int = 256):
    """Score `targets` from final hidden states, applying the lm_head `chunk` rows at a time.

    hidden [N, h] (row i predicts targets[i]), head: hidden -> logits (the model's lm_head),
    targets [N]. Returns (logprobs [N] float32, greedy [N] bool: whether the target is the
    argmax, top: (values [N, top], ids [N, top]) or None), all on the CPU. For inference
    (no gradient); memory holds `chunk x vocab` float32 logits at most.
    """
    lps, greedy, top_vals, top_ids = [], [], [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = head(hidden[i:i + chunk]).float()
        tgt = targets[i:i + chunk]
        lse = logsumexp_fp32(logits, temperature)
        lps.append(token_logprobs(logits, tgt, temperature, lse=lse))
        greedy.append(logits.argmax(-1) == tgt)
        if top:
            v, j = top_logprobs(logits, top, temperature, lse)
            top_vals.append(v)
            top_ids.append(j)
    tops = (torch.cat(top_vals).cpu(), torch.cat(top_ids).cpu()) if top else None
    return torch.cat(lps).cpu(), torch.cat(greedy).cpu(), tops


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.float()
    return x if temperature == 1.0 else x / temperature

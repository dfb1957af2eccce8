"""Sampling as pure functions of logits: penalties, temperature, top-k, top-p, min-p.

Order and semantics follow `transformers`' logits processors (the reference the tests
compare against): repetition penalty -> presence/frequency penalties -> temperature ->
top-k -> top-p -> min-p -> sample. Conventions:

- repetition_penalty (HF, multiplicative, CTRL paper): for every token already in the prompt
  or the output, a positive logit is divided by the penalty and a negative one multiplied.
- presence_penalty / frequency_penalty (OpenAI, additive): logit -= presence * [count > 0]
  + frequency * count, where count is how often the token was generated so far (prompt
  tokens do not count, as in the OpenAI API and vLLM).
- temperature 0 (anything <= 1e-5) is greedy: argmax of the penalised logits.
- top_k 0 (or >= vocab) keeps all; like HF, tokens tied with the k-th logit are kept too.
- top_p keeps the smallest prefix of tokens (by descending probability) whose mass reaches
  top_p; top_p = 1 keeps all.
- min_p keeps tokens whose probability is at least min_p times the top token's.

Randomness comes only from the `torch.Generator` passed in: one per sequence, so a seeded
request gives the same tokens whatever else shares its batch. All functions take float32
logits and leave their inputs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwen25.errors import UserError

GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is argmax (dividing would overflow)
DRAW_BLOCK = 1024  # tokens per block of the two-level inverse-CDF draw
TOP_P_CANDIDATES = 1024  # top-p looks at this many best tokens before sorting the whole vocab
MAX_LOGPROBS = 20  # as the OpenAI API
_F32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Defaults: plain sampling at temperature 1, no filters."""

    max_new_tokens: int = 16  # tokens to generate at most (the context limit may stop it earlier)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # in [0, 1]; 0 = off
    repetition_penalty: float = 1.0  # > 0; 1 = off (HF semantics)
    presence_penalty: float = 0.0  # in [-2, 2] (OpenAI semantics)
    frequency_penalty: float = 0.0  # in [-2, 2]
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids; (): none
    seed: int | None = None  # sample i of a request uses seed + i
    logprobs: int = 0  # how many top alternatives to report per token, 0..20
    n: int = 1  # independent samples sharing one prefill
    # Score the prompt as it is prefilled: log p of every prompt token after the first, with
    # this many best alternatives per position (0..20); None: no prompt scoring. With it,
    # max_new_tokens may be 0 (score only: /v1/completions with echo and max_tokens 0).
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_TEMPERATURE

    def validate(self, vocab_size: int) -> None:
        """Raise UserError naming the first bad field and its valid range."""
        def bad(msg: str) -> UserError:
            return UserError(f"invalid sampling parameter: {msg}")

        least = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < least:
            raise bad(f"max_new_tokens={self.max_new_tokens!r} must be an integer >= 1 "
                      "(0 only with prompt_logprobs, to score the prompt)")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise bad(f"prompt_logprobs={self.prompt_logprobs!r} must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad(f"top_p={self.top_p!r} must be in (0, 1]; use 1 to turn it off")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad(f"top_k={self.top_k!r} must be an integer >= 0; use 0 to turn it off")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad(f"min_p={self.min_p!r} must be in [0, 1]; use 0 to turn it off")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty={self.repetition_penalty!r} must be > 0; use 1 to turn it off")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _finite(v) or not -2 <= v <= 2:
                raise bad(f"{name}={v!r} must be in [-2, 2]")
        if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad(f"logprobs={self.logprobs!r} must be an integer in [0, {MAX_LOGPROBS}]")
        if not _is_int(self.n) or self.n < 1:
            raise bad(f"n={self.n!r} must be an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            raise bad(f"seed={self.seed!r} must be an integer or None")
        for t in self.stop_token_ids or ():
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise bad(f"stop_token_ids: {t!r} is outside the vocabulary [0, {vocab_size})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------
# Penalties (batched: logits [..., V])
# --------------------------------------------------------------------------------------


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """HF/CTRL penalty on tokens with seen=True: logit / p if logit > 0 else logit * p.

    seen: bool, same shape as logits. penalty: a float or a tensor broadcasting to logits
    (e.g. [B, 1] for one penalty per row).
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor, presence: float | torch.Tensor,
                               frequency: float | torch.Tensor) -> torch.Tensor:
    """OpenAI penalties: logit - presence * [count > 0] - frequency * count."""
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


# --------------------------------------------------------------------------------------
# Filters over the whole vocabulary (logits [V] or [B, V] -> same, removed = -inf)
# --------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (and any tied with the k-th); k <= 0 or >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of all better tokens
    remove = mass_before >= p
    remove[..., 0] = False  # the top token always stays
    return logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep tokens with probability >= p * (probability of the most likely token)."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, -math.inf)


# --------------------------------------------------------------------------------------
# The fast path for one row: the kept tokens and their probabilities
# --------------------------------------------------------------------------------------


def candidates(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens that survive top-k -> top-p -> min-p for one row, with renormalised probs.

    logits: [V] float32 (already penalised and divided by the temperature).
    Returns (ids [C] int64, probs [C] float32 summing to 1), C >= 1. The same kept set as the
    whole-vocabulary filters above, without sorting 152K logits on every token: top-k and
    top-p work on the best few candidates and only fall back to a full sort when the best
    TOP_P_CANDIDATES do not reach top_p.
    """
    V = logits.shape[-1]
    use_k = 0 < top_k < V
    if use_k:
        kth = logits.topk(top_k).values[-1]
        ids = (logits >= kth).nonzero().squeeze(-1)  # ties with the k-th stay, as in HF
        vals, order = logits[ids].sort(descending=True)
        ids = ids[order]
        lse = torch.logsumexp(vals, dim=-1)  # top-p normalises over what top-k kept
    elif top_p < 1.0:
        vals, ids = logits.topk(min(V, TOP_P_CANDIDATES))  # sorted, best first
        lse = torch.logsumexp(logits, dim=-1)
        if float((vals - lse).exp().sum()) < top_p:  # the nucleus is wider: sort everything
            vals, ids = logits.sort(descending=True)
    else:
        ids = torch.arange(V, device=logits.device)
        vals = logits
    if top_p < 1.0:
        probs = (vals - lse).exp()
        keep = (probs.cumsum(-1) - probs) < top_p  # mass of the better tokens is short of p
        keep[0] = True
        vals, ids = vals[keep], ids[keep]
    probs = vals.softmax(-1)
    if min_p > 0.0:
        keep = probs >= min_p * probs.max()
        ids, probs = ids[keep], probs[keep] / probs[keep].sum()
    return ids, probs


class NonFiniteLogits(UserError):
    """The model produced NaN/inf logits: its weights hold NaN/inf, or the dtype overflowed."""


def sample(ids: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one of `ids` with probabilities `probs` using only `generator`'s randomness.

    Raises NonFiniteLogits when `probs` is not a distribution (NaN from the model's logits)."""
    if ids.numel() == 1:
        return int(ids[0])
    return int(ids[inverse_cdf_draw(probs, generator)])


def inverse_cdf_draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Index i with probability probs[i] / sum(probs), from one uniform of `generator`."""
    u = torch.rand(1, dtype=torch.float64, generator=generator)
    return int(inverse_cdf_draws(probs[None], u)[0])


def inverse_cdf_draws(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Row r's draw: the first index whose cumulative mass exceeds uniforms[r] x the row's total.

    probs [R, V] (non-negative, any scale), uniforms [R] float64 in [0, 1) -> indices [R] int64.
    Two levels: block sums of DRAW_BLOCK tokens, accumulated in float64 across blocks, pick the
    block, then a float64 cumsum inside that block picks the token. The block sums themselves
    are float32: their rounding is relative to one block's mass, so it moves ~1e-7 of
    probability in all, where a single float32 cumsum over the vocabulary rounds every prefix
    near a mass of 1 to its ulp (6e-8), more than many tokens' probabilities. torch.multinomial
    does one sequential pass and took 2.8 ms per token at 152K on this project's 2-core CPU,
    most of a small model's rollout. Each row's result depends on that row alone (bitwise), so
    a sequence draws the same token whatever else is in the batch. Zero-probability entries
    are never drawn (their prefix sum equals the previous one).
    """
    R, n = probs.shape
    full = n // DRAW_BLOCK
    parts = []
    if full:  # a strided view, no copy: [R, full, DRAW_BLOCK]
        parts.append(probs.as_strided((R, full, DRAW_BLOCK), (probs.stride(0), DRAW_BLOCK, 1)).sum(-1))
    if n % DRAW_BLOCK:
        parts.append(probs[:, full * DRAW_BLOCK:].sum(-1, keepdim=True))
    cdf = torch.cat(parts, -1).to(torch.float64).cumsum(-1)  # [R, blocks]
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bool(bad.any()):
        if bool(torch.isfinite(probs[bad]).all()):
            raise ValueError(f"probabilities sum to {total[bad].tolist()}: not a distribution "
                             "(a bug, not the model's numbers)")
        raise NonFiniteLogits(
            "the model produced non-finite logits (NaN or inf), so no token can be sampled: the "
            "checkpoint's weights hold NaN/inf values or the dtype overflowed; check the weights "
            "(re-download or re-save them) or load the model in float32")
    u = (uniforms.to(torch.float64) * total).unsqueeze(-1)  # [R, 1]
    blocks = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)[:, 0].tolist()
    out = []
    for r, b in enumerate(blocks):
        left = u[r] - cdf[r, b - 1] if b else u[r]  # the mass still to cover inside block b
        window = probs[r, b * DRAW_BLOCK:(b + 1) * DRAW_BLOCK]
        inner = window.to(torch.float64).cumsum(0)
        i = min(int(torch.searchsorted(inner, left, right=True)), window.numel() - 1)
        if float(window[i]) <= 0.0:  # u rounded up to a block's end (probability ~1e-16)
            i = int(probs[r].nonzero()[-1, 0]) - b * DRAW_BLOCK
        out.append(b * DRAW_BLOCK + i)
    return torch.tensor(out, dtype=torch.int64)


def plain_sampling(params: SamplingParams) -> bool:
    """Sampling from the whole vocabulary at a temperature: no penalties, no filters. Such
    rows of a decode step are drawn together (`sample_plain_rows`)."""
    return not params.greedy and params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0 and \
        params.repetition_penalty == 1.0 and not params.presence_penalty and not params.frequency_penalty


def sample_plain_rows(logits: torch.Tensor, temperatures: list[float],
                      generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [R, V] float32 for rows whose params are `plain_sampling`:
    softmax(logits / T) drawn with one uniform of each row's own generator."""
    if any(t != 1.0 for t in temperatures):
        logits = logits / torch.tensor(temperatures, dtype=logits.dtype).unsqueeze(-1)
    probs = logits.softmax(-1)
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in generators])
    return inverse_cdf_draws(probs, u).tolist()


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
               seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> int:
    """One token for one sequence: penalties, then greedy argmax or filtered sampling.

    logits [V] float32 (raw model output); seen [V] bool (prompt and output tokens, needed
    when repetition_penalty != 1); counts [V] (output token counts, needed for the OpenAI
    penalties).
    """
    if plain_sampling(params):
        return sample_plain_rows(logits[None], [params.temperature], [generator])[0]
    logits = penalize(logits, params, seen, counts)
    if params.greedy:
        return int(logits.argmax())
    scaled = logits / params.temperature
    if params.repetition_penalty != 1.0:
        # A tiny penalty (1e-39) divides positive logits past float32's range: +inf would make
        # the softmax NaN. Clamping keeps the order (ties aside) and a valid distribution;
        # NaN from the model itself stays NaN and is reported by `sample`.
        scaled = scaled.clamp(-_F32_MAX, _F32_MAX)
    ids, probs = candidates(scaled, params.top_k, params.top_p, params.min_p)
    return sample(ids, probs, generator)


def sampled_logprob(logits: torch.Tensor, token: int, params: SamplingParams, seen: torch.Tensor | None = None,
                    counts: torch.Tensor | None = None) -> float:
    """log p(token) under the distribution `sample_row` drew it from (same arguments, before
    the token is recorded in seen/counts): penalties, temperature, then the top-k / top-p /
    min-p set renormalised. 0.0 for greedy decoding (the argmax has probability 1). This is
    the log-probability an RL trainer needs as the rollout policy's (GRPO's π_old); the raw
    model log-probs an API reports are `token_logprobs` at temperature 1."""
    if params.greedy:
        return 0.0
    logits = penalize(logits, params, seen, counts) / params.temperature
    if params.top_k == 0 and params.top_p >= 1.0 and params.min_p == 0.0:
        return float(logits[token] - torch.logsumexp(logits, dim=-1))
    ids, probs = candidates(logits, params.top_k, params.top_p, params.min_p)
    hit = (ids == token).nonzero()
    return float(probs[hit[0, 0]].log()) if hit.numel() else float("-inf")


def penalize(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
             counts: torch.Tensor | None) -> torch.Tensor:
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and counts is not None:
        logits = presence_frequency_penalty(logits, counts, params.presence_penalty, params.frequency_penalty)
    return logits


"""Log-likelihoods of (context, continuation) pairs, each distinct context computed once.

Multiple-choice evaluation asks for log p(continuation | context) of every choice; the
choices of one question share the context (a 5-shot prompt of hundreds of tokens versus a
choice of a few). lm-eval's `hf` backend recomputes the context for every choice; here a
batch of distinct contexts is prefilled once into a KV cache, each context's cache rows are
copied to its choices, and all continuations of the batch then run in one forward:

    contexts [B, Lmax] (right-padded)  --prefill-->  cache rows, last hidden state per context
    continuations [R, Tmax] (R = choices in the batch, right-padded) on copies of those rows

log p(cont[0]) comes from the context's last position, log p(cont[t]) from the position of
cont[t-1]. Few-shot contexts also share their shots with each other: contexts are batched
in token order and the prefix a batch has in common is prefilled once, its K/V copied to
every context's row before the rest of each context runs (vLLM's prefix caching, within a
batch; `share_prefix=False` turns it off). Log-softmax runs in float32 whatever the model dtype. Results equal a full
forward over context + continuation to float32 rounding (the parity test checks 1e-4
against lm-eval's `hf` backend).

Tokenisation follows lm-eval's causal-LM rule (`encode_pair`): trailing spaces of the
context move to the continuation, and the continuation's tokens are those of the whole
string after the context's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen25.errors import UserError
from qwen25.model.kv_cache import KVCache


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                move_space: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's causal backend splits them.

    move_space=False keeps the context's trailing whitespace where it is: a chat template's
    generation prompt ends with "assistant\n", and that newline belongs to the template,
    not to every choice.
    """
    n_spaces = len(context) - len(context.rstrip()) if move_space else 0
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        raise UserError("an empty context cannot be scored; give the task a prompt")
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


MIN_SHARED_PREFIX = 32  # tokens; below this a separate prefix forward costs more than it saves


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `seqs`, leaving each at least one token of
    its own (the position that predicts what follows must be computed per sequence)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = min(n, _common(seqs[0], s))
    return max(n, 0)


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum of log p over the continuation's tokens, nats
    greedy: bool  # every continuation token is the argmax at its step
    tokens: int  # continuation tokens scored


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _prefix_len(contexts) -> int:
    """The shared prefix worth computing once for these contexts (0 if too short)."""
    p = shared_prefix(contexts)
    return p if p >= MIN_SHARED_PREFIX else 0


def _batches(groups: list[tuple[tuple[int, ...], list[int]]], conts: list[list[int]],
             token_budget: int, max_rows: int, share: bool):
    """Consecutive groups whose tokens stay within the budget: the shared prefix once, each
    context's own part, each choice's continuation (attention over the context not counted)."""
    batch: list = []
    rows = ctx_sum = cont_sum = 0
    p = 0  # common prefix of the batch's contexts (each keeps one token of its own)
    for g in groups:
        ctx, members = g
        t = len(members) * max(len(conts[i]) for i in members)
        joined = 0  # the batch's common prefix if ctx joins it (ctx alone: all but its last token)
        if share:
            joined = min(p, _common(batch[0][0], ctx), len(ctx) - 1) if batch else len(ctx) - 1
        if batch:
            q = joined if joined >= MIN_SHARED_PREFIX else 0
            cost = q + ctx_sum + len(ctx) - (len(batch) + 1) * q + cont_sum + t
            # a context from another family of shots would make the whole batch unshared
            loses_prefix = share and len(batch) > 1 and p >= MIN_SHARED_PREFIX and not q
            if rows + len(members) > max_rows or cost > token_budget or loses_prefix:
                yield batch
                batch, rows, ctx_sum, cont_sum = [], 0, 0, 0
                joined = len(ctx) - 1 if share else 0
        p = joined
        batch.append(g)
        rows += len(members)
        ctx_sum += len(ctx)
        cont_sum += t
    if batch:
        yield batch


@torch.inference_mode()
def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], token_budget: int = 8192,
                   max_rows: int = 64, progress=None, share_prefix: bool = True) -> list[LogLik]:
    """log p(continuation | context) for each (context ids, continuation ids) request.

    Contexts longer than the model's context window lose their oldest tokens (as lm-eval
    truncates from the left). `progress(n)` is called with the number of requests done.
    share_prefix: contexts are batched in token order, and the prefix a batch's contexts
    share (the few-shot examples) is computed once for the batch, not once per context.
    """
    limit = model.config.max_position_embeddings
    reqs = []
    for ctx, cont in requests:
        if not cont:
            raise UserError("a continuation has no tokens; check the task's choices")
        if len(cont) >= limit:
            raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's context of {limit}")
        ctx = list(ctx)[-(limit - len(cont)):]
        if not ctx:
            raise UserError("a context has no tokens")
        reqs.append((tuple(ctx), list(cont)))
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(reqs):
        by_ctx.setdefault(ctx, []).append(i)
    # token order puts contexts with the same shots side by side; otherwise similar lengths
    # batch together (less padding)
    order = (lambda g: g[0]) if share_prefix else (lambda g: -len(g[0]))
    groups = sorted(by_ctx.items(), key=order)
    conts = [c for _, c in reqs]
    out: list[LogLik | None] = [None] * len(reqs)
    for batch in _batches(groups, conts, token_budget, max_rows, share_prefix):
        p = _prefix_len([ctx for ctx, _ in batch]) if share_prefix else 0
        for i, ll in _score_batch(model, batch, conts, p):
            out[i] = ll
        if progress is not None:
            progress(sum(len(m) for _, m in batch))
    return out  # type: ignore[return-value]


def _score_batch(model, batch, conts, p: int = 0):
    """Score one batch; its contexts share their first `p` tokens (0: nothing shared)."""
    device = model.device
    B = len(batch)
    lens = [len(ctx) for ctx, _ in batch]
    members = [i for _, m in batch for i in m]
    row_ctx = [b for b, (_, m) in enumerate(batch) for _ in m]
    tmax = max(len(conts[i]) for i in members)
    L = max(lens)
    cache = KVCache(model.config, B, L + tmax, model.dtype, device)
    if p:  # the shared prefix once, its K/V given to every context's row
        pre = KVCache(model.config, 1, p, model.dtype, device)
        model.hidden_states(torch.tensor([batch[0][0][:p]], device=device), kv_cache=pre)
        for b in range(B):
            cache.copy_from(pre, b)
    ids = torch.zeros(B, L - p, dtype=torch.long)
    for b, (ctx, _) in enumerate(batch):
        ids[b, :len(ctx) - p] = torch.tensor(ctx[p:])
    h, _ = model.hidden_states(ids.to(device), kv_cache=cache)  # right padding: causal is enough
    last = h[torch.arange(B), torch.tensor(lens) - p - 1]  # [B, hidden]
    # Copy each context's rows to its choices; every row continues after its real length.
    sel = torch.tensor(row_ctx, device=device)
    rows = KVCache(model.config, len(members), L + tmax, model.dtype, device)
    for layer in range(len(cache.k)):
        rows.k[layer].copy_(cache.k[layer].index_select(0, sel))
        rows.v[layer].copy_(cache.v[layer].index_select(0, sel))
    rows.lengths = [lens[b] for b in row_ctx]
    cont_ids = torch.zeros(len(members), tmax, dtype=torch.long)
    for r, i in enumerate(members):
        cont_ids[r, :len(conts[i])] = torch.tensor(conts[i])
    h2, _ = model.hidden_states(cont_ids.to(device), kv_cache=rows)  # [R, tmax, hidden]
    # Hidden states that predict each continuation token, flattened over rows.
    preds, targets, spans = [], [], []
    at = 0
    for r, i in enumerate(members):
        n = len(conts[i])
        preds.append(torch.cat([last[row_ctx[r]][None], h2[r, :n - 1]]))
        targets.append(cont_ids[r, :n])
        spans.append((at, at + n))
        at += n
    logp = F.log_softmax(model.lm_head(torch.cat(preds)).float(), dim=-1)
    tgt = torch.cat(targets).to(device)
    tok_lp = logp.gather(-1, tgt[:, None]).squeeze(-1).cpu()
    greedy = (logp.argmax(-1) == tgt).cpu()
    for r, i in enumerate(members):
        a, b = spans[r]
        yield i, LogLik(float(tok_lp[a:b].double().sum()), bool(greedy[a:b].all()), b - a)

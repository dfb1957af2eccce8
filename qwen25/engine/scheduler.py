"""The step-level core: requests in, one token per running sequence per step out.

This is continuous batching in its simplest correct form. A caller (the `Engine`'s own
`generate`/`stream` loops, or the server's scheduler thread) calls `step()` repeatedly;
other threads may `add()` and `cancel()` at any time. Each step

1. applies pending adds and cancels (cancel() outside a step frees the slots at once);
2. decodes one token for every running sequence, in one batched forward;
3. prefills waiting prompts, in arrival order, up to `prefill_chunk` prompt tokens per
   step (a long prompt is split over several steps so running sequences keep streaming;
   the split points depend only on the prompt, so its tokens are the same whatever else
   is queued);
   a request is admitted when it gets a free slot for each of its n samples, its prompt is
   prefilled once into the first slot and copied to the others, and each sample's first
   token is drawn from the prompt's last logits;
   a request with `prompt_logprobs` is scored by the same chunks (each chunk's hidden
   states also go through the lm_head), so scoring a long prompt is interleaved with decode
   steps and a cancel stops it between chunks; with max_new_tokens 0 it takes one slot and
   ends ("length", no tokens) when its last chunk is scored;
4. returns a `StepOutput` for every token produced, with `finish_reason` set on the last
   token of a sample ("stop": a stop token, which is included; "length": max_new_tokens or
   the context limit).

The tokens also accumulate on each `Request` handle (`request.outputs[i]`), so whoever
drives the steps, every caller can read its own results. `step()` is serialised by a lock;
it releases the GIL inside the model, so an HTTP thread stays responsive.
"""

from __future__ import annotations

import itertools
import operator
import secrets
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwen25.engine.runner import Logits, ModelRunner
from qwen25.engine.sampling import SamplingParams, plain_sampling, sample_plain_rows, sample_row, sampled_logprob
from qwen25.errors import UserError
from qwen25.model.kv_cache import KVCache
from qwen25.model.logprobs import logsumexp_fp32, token_logprobs, top_logprobs


@dataclass(frozen=True)
class Score:
    """Log-probabilities of given tokens, each conditioned on everything before it."""

    logprobs: list[float]  # log p(tokens[t] | what precedes it), raw distribution (temperature 1)
    greedy: list[bool]  # whether tokens[t] is the argmax at its step
    top_logprobs: list[list[tuple[int, float]]] | None  # best (id, logprob) pairs per step

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


@dataclass
class Completion:
    """One sample of a request: generated tokens and their log-probabilities.

    logprobs[t] is log p(tokens[t]) under the raw model distribution (before penalties,
    temperature and filters); top_logprobs[t] lists the `params.logprobs` most likely
    (token, logprob) pairs at that step, or is None when none were asked for.
    """

    index: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # log p(tokens[t]) under the distribution it was sampled from (penalties, temperature and
    # filters applied; 0.0 when greedy): the rollout policy's log-probs for RL (GRPO).
    sampled_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"; None while running


class Request:
    """A submitted prompt: the handle `add()` returns. Read `outputs` and `finished`."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int]):
        self.id = next(Request._ids)
        self.prompt = prompt
        self.params = params
        self.stop_ids = stop_ids
        self.outputs = [Completion(i, top_logprobs=[] if params.logprobs else None) for i in range(params.n)]
        self._progress = 0  # prompt tokens prefilled so far
        self._seqs: list[_Seq] = []
        # params.prompt_logprobs: log p of prompt[1:], filled chunk by chunk; `prompt_score`
        # is set once the whole prompt is scored (before the first generated token).
        self.prompt_score: Score | None = None
        self._scored: list[tuple[torch.Tensor, torch.Tensor, tuple | None]] = []

    @property
    def slots_needed(self) -> int:
        """Cache slots this request holds while it runs: one per sample, one to score only."""
        return 1 if self.params.max_new_tokens == 0 else self.params.n

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.outputs)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, prompt_tokens={len(self.prompt)}, n={self.params.n}, finished={self.finished})"


@dataclass(frozen=True)
class StepOutput:
    """One new token of one sample of one request."""

    request: Request
    index: int  # which of the request's n samples
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # set on the sample's last token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Seq:
    """Decoding state of one sample: its cache slot, RNG and penalty bookkeeping."""

    def __init__(self, request: Request, index: int, slot: int, vocab: int):
        p = request.params
        self.request, self.index, self.slot = request, index, slot
        self.out = request.outputs[index]
        seed = p.seed + index if p.seed is not None else secrets.randbits(62)
        self.generator = torch.Generator().manual_seed(seed)
        self.seen = self.counts = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[torch.tensor(request.prompt)] = True
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.int32)
        self.next_input: int | None = None  # the last token, fed at the next decode


class Scheduler:
    def __init__(self, runner: ModelRunner, max_batch_size: int, prefill_chunk: int,
                 default_stop_ids: frozenset[int]):
        self.runner = runner
        self.max_seq_len = runner.cache.max_seq_len
        self.vocab_size = runner.config.vocab_size
        self.prefill_chunk = prefill_chunk
        self.default_stop_ids = default_stop_ids
        self._free = list(range(max_batch_size))
        self._lock = threading.Lock()  # guards _incoming and _cancels
        self._step_lock = threading.Lock()
        self._incoming: deque[Request] = deque()
        self._cancels: list[Request] = []
        self._waiting: deque[Request] = deque()  # admitted in order; the head may be mid-prefill
        self._running: list[_Seq] = []
        self._prefix: tuple[list[int], KVCache] | None = None  # see share_prefix

    # ---- called from any thread -------------------------------------------------------

    def add(self, prompt, params: SamplingParams) -> Request:
        """Validate and queue a request; returns its handle. Raises UserError on bad input."""
        prompt = self._check_prompt(prompt)
        params.validate(self.vocab_size)
        if params.n > self.runner.cache.slots and params.max_new_tokens > 0:
            raise UserError(f"n={params.n} samples need as many cache slots, but the engine has "
                            f"max_batch_size={self.runner.cache.slots}; lower n or raise max_batch_size")
        stop = self.default_stop_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        request = Request(prompt, params, stop)
        with self._lock:
            self._incoming.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request and free its slots: at once when no step is running, else as the
        running step ends. Finished requests are left as they are."""
        with self._lock:
            self._cancels.append(request)
        if self._step_lock.acquire(blocking=False):
            try:
                self._apply_pending()
            finally:
                self._step_lock.release()

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._incoming or self._cancels or self._waiting or self._running)

    def _check_prompt(self, prompt) -> list[int]:
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise UserError("a prompt must be a list of integer token ids; encode text with the "
                            "tokenizer first") from None
        if not ids:
            raise UserError("empty prompt: give at least one token (e.g. the BOS or a chat template)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size}); "
                            "was the prompt encoded with another tokenizer?")
        if len(ids) >= self.max_seq_len:
            raise UserError(f"the prompt has {len(ids)} tokens but the engine's context is "
                            f"max_seq_len={self.max_seq_len}; shorten the prompt or create the "
                            "Engine with a larger max_seq_len")
        return ids

    def share_prefix(self, ids: Sequence[int] | None) -> None:
        """Prefill `ids` once; a later prompt that starts with them (and is longer) copies
        their K/V into its slot and prefills only the rest. None drops the prefix.

        Few-shot evaluation sends hundreds of prompts behind the same shots (GSM8K's 8-shot
        prompt is ~740 of ~800 tokens), so this removes most of the prefill. The prefix is
        computed alone, in the chunks a prompt's own prefill would use, so an answer depends
        only on its prompt and on whether this prefix is set, never on other requests.
        Requests that score their prompt (prompt_logprobs) prefill all of it themselves.
        """
        with self._step_lock:
            if ids is None:
                self._prefix = None
                return
            ids = self._check_prompt(ids)
            self._prefix = (ids, self.runner.prefill_alone(ids, self.prefill_chunk))

    def _reuse_prefix(self, request: Request, slot: int) -> None:
        if self._prefix is None or request.params.prompt_logprobs is not None:
            return
        ids, cache = self._prefix
        if len(request.prompt) > len(ids) and request.prompt[:len(ids)] == ids:
            self.runner.cache.copy_from(cache, slot)
            request._progress = len(ids)

    # ---- the step -------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Advance every running sequence by one token and prefill what fits (see module doc)."""
        with self._step_lock:
            self._apply_pending()
            outputs: list[StepOutput] = []
            if self._running:
                seqs = list(self._running)
                outputs += self._emit(seqs, self.runner.decode([s.slot for s in seqs], [s.next_input for s in seqs]))
            outputs += self._prefill()
            return outputs

    def _apply_pending(self) -> None:
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
            cancels, self._cancels = self._cancels, []
        for request in cancels:
            if request in self._waiting:
                self._waiting.remove(request)
            for seq in request._seqs:
                if seq in self._running:
                    self._running.remove(seq)
                self._release(seq)
            request._seqs = []
            for c in request.outputs:
                if c.finish_reason is None:
                    c.finish_reason = "cancelled"

    def _release(self, seq: _Seq) -> None:
        if seq.slot >= 0:
            self.runner.cache.clear(seq.slot)
            self._free.append(seq.slot)
            self._free.sort()
            seq.slot = -1

    def _prefill(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        budget = self.prefill_chunk
        while budget > 0 and self._waiting:
            request = self._waiting[0]
            if not request._seqs:  # admit: one slot per sample, or wait for slots to free up
                if len(self._free) < request.slots_needed:
                    break
                request._seqs = [_Seq(request, i, self._free.pop(0), self.vocab_size)
                                 for i in range(request.slots_needed)]
                self._reuse_prefix(request, request._seqs[0].slot)
            first = request._seqs[0]
            # Chunk boundaries sit at multiples of prefill_chunk from the prompt's start, never
            # where another prompt happened to leave the budget: a prompt prefilled in other
            # pieces gets (slightly) different K/V values, so its tokens would depend on what
            # else was queued. A piece that does not fit the budget left waits for the next step.
            start = request._progress
            chunk = request.prompt[start:start + self.prefill_chunk - start % self.prefill_chunk]
            if len(chunk) > budget:
                break
            request._progress += len(chunk)
            budget -= len(chunk)
            done = request._progress == len(request.prompt)
            generate = request.params.max_new_tokens > 0
            if request.params.prompt_logprobs is None:
                logits = self.runner.prefill(first.slot, chunk, want_logits=done)
            else:
                # position start + t predicts prompt token start + t + 1 (known even past this chunk)
                targets = request.prompt[start + 1:start + len(chunk) + 1]
                logits, scores = self.runner.prefill_scored(first.slot, chunk, targets, request.params.prompt_logprobs,
                                                            want_logits=done and generate)
                request._scored.append(scores)
                if done:
                    request.prompt_score = _join_scores(request._scored, request.params.prompt_logprobs)
                    request._scored = []
            if not done:
                break  # the budget is spent mid-prompt; continue at the next step
            self._waiting.popleft()
            if not generate:  # scored only: nothing to sample, the slot is free again
                for c in request.outputs:
                    c.finish_reason = "length"
                self._release(first)
                request._seqs = []
                continue
            for seq in request._seqs[1:]:
                self.runner.cache.copy_slot(first.slot, seq.slot)
            seqs = list(request._seqs)
            outputs += self._emit(seqs, Logits(logits[None].expand(len(seqs), -1)))
        return outputs

    def _emit(self, seqs: list[_Seq], out: Logits) -> list[StepOutput]:
        """Sample one token per sequence from logits [len(seqs), vocab], record, retire."""
        logits = out.logits.float().cpu()
        tokens = self._sample(seqs, logits, out.argmax)
        top = max(s.request.params.logprobs for s in seqs)
        # Reported log p are of the raw model distribution (temperature 1, before penalties
        # and filters), as the OpenAI API and vLLM report them.
        lse = out.lse if out.lse is not None else logsumexp_fp32(logits)
        chosen = token_logprobs(logits, torch.tensor(tokens), 1.0, lse=lse).tolist()
        tops = None
        if top:
            values, ids = top_logprobs(logits, top, 1.0, lse)
            tops = (values.tolist(), ids.tolist())
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            p, out = seq.request.params, seq.out
            out.tokens.append(token)
            out.logprobs.append(chosen[i])
            plain_t1 = p.temperature == 1.0 and seq.seen is None and seq.counts is None and \
                p.top_k == 0 and p.top_p >= 1.0 and p.min_p == 0.0
            # Sampled at temperature 1 from the whole vocabulary, the sampled distribution is
            # the raw one; otherwise one more log-softmax of this row (before seen/counts change).
            out.sampled_logprobs.append(chosen[i] if plain_t1 else
                                        sampled_logprob(logits[i], token, p, seq.seen, seq.counts))
            alts = None
            if p.logprobs:
                alts = list(zip(tops[1][i][:p.logprobs], tops[0][i][:p.logprobs]))
                out.top_logprobs.append(alts)
            if seq.seen is not None:
                seq.seen[token] = True
            if seq.counts is not None:
                seq.counts[token] += 1
            reason = None
            if token in seq.request.stop_ids:
                reason = "stop"
            elif len(out.tokens) >= p.max_new_tokens or len(seq.request.prompt) + len(out.tokens) >= self.max_seq_len:
                reason = "length"
            if reason is None:
                seq.next_input = token
                if seq not in self._running:
                    self._running.append(seq)
            else:
                out.finish_reason = reason
                if seq in self._running:
                    self._running.remove(seq)
                self._release(seq)
            outputs.append(StepOutput(seq.request, seq.index, token, chosen[i], alts, reason))
        return outputs

    @staticmethod
    def _sample(seqs: list[_Seq], logits: torch.Tensor, argmax: torch.Tensor | None) -> list[int]:
        tokens: list[int | None] = [None] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.request.params.greedy and s.seen is None and s.counts is None]
        if len(plain) == len(seqs):  # the common all-greedy batch: one argmax, no copies
            return (argmax if argmax is not None else logits.argmax(-1)).tolist()
        if plain:
            for i, t in zip(plain, logits[plain].argmax(-1).tolist()):
                tokens[i] = t
        rows = [i for i, s in enumerate(seqs) if tokens[i] is None and plain_sampling(s.request.params)]
        if rows:  # whole-vocabulary sampling (RL rollouts, most API requests): one batched draw
            drawn = sample_plain_rows(logits if len(rows) == len(seqs) else logits[rows],
                                      [seqs[i].request.params.temperature for i in rows],
                                      [seqs[i].generator for i in rows])
            for i, t in zip(rows, drawn):
                tokens[i] = t
        for i, seq in enumerate(seqs):
            if tokens[i] is None:
                tokens[i] = sample_row(logits[i], seq.request.params, seq.generator, seq.seen, seq.counts)
        return tokens


def _join_scores(parts: list[tuple[torch.Tensor, torch.Tensor, tuple | None]], top: int) -> Score:
    """One Score from the per-chunk (logprobs, greedy, top) of `ModelRunner.prefill_scored`."""
    lps = torch.cat([p[0] for p in parts]).tolist()
    greedy = torch.cat([p[1] for p in parts]).tolist()
    alts = None
    if top:
        values = torch.cat([p[2][0] for p in parts]).tolist()
        ids = torch.cat([p[2][1] for p in parts]).tolist()
        alts = [list(zip(i, v)) for i, v in zip(ids, values)]
    return Score(lps, greedy, alts)

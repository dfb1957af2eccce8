"""Run the model over the slot cache: prefill a chunk of one sequence, decode many.

Two decode paths give the same logits (to the last bit or two of the dtype):
- "fast": the C++ decoder (`fast.py`), one call per step; used on x86 CPUs with AVX-512
  for dense float32/bfloat16 models;
- "torch": the PyTorch model with a `RowsView` of the cache; used everywhere else (GPU,
  MoE, dual chunk attention, fp16, quantized modules, no compiler).
Prefill always runs the PyTorch model (large matmuls, where oneDNN is already efficient)
and computes the lm_head for the last position only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qwen25.engine.fast import FastDecoder, unsupported_reason
from qwen25.model.kv_cache import KVCache
from qwen25.errors import UserError
from qwen25.model.logprobs import head_logprobs


class Logits(NamedTuple):
    """A step's logits [M, vocab] float32, with their log-sum-exp [M] and argmax [M] when the
    C++ decoder computed them along the way (None on the PyTorch path)."""

    logits: torch.Tensor
    lse: torch.Tensor | None = None
    argmax: torch.Tensor | None = None


class ModelRunner:
    """The model plus its KV cache; knows nothing about requests or sampling.

    decode: "auto" (fast when supported), "fast" (error when unsupported), "torch", or
    "portable" (the C++ decoder without AVX-512, for tests on any x86 CPU).
    """

    def __init__(self, model, slots: int, max_seq_len: int, decode: str = "auto", threads: int | None = None):
        if decode not in ("auto", "fast", "torch", "portable"):
            raise UserError(f"decode={decode!r} is not a decode path; use auto, fast, torch or portable")
        self.model = model
        self.config = model.config
        self.cache = KVCache(model.config, slots, max_seq_len, model.dtype, model.device)
        self.fast: FastDecoder | None = None
        self.fast_reason: str | None = None  # why the fast path is off (None when on)
        self._isa = "portable" if decode == "portable" else "avx512"
        self.threads = threads
        if decode == "torch":
            self.fast_reason = "decode='torch' was requested"
        else:
            self.fast_reason = unsupported_reason(model, self._isa)
            if self.fast_reason is None:
                self.fast = FastDecoder(model, self.cache, self._isa, threads)
            elif decode in ("fast", "portable"):
                raise UserError(f"decode={decode!r} is unavailable here ({self.fast_reason}); use decode='auto'")

    @property
    def decode_path(self) -> str:
        return ("fast" if self._isa == "avx512" else "portable") if self.fast is not None else "torch"

    def refresh(self) -> None:
        """Rebind the C++ decoder if the model's parameter tensors were replaced; leave it
        if the model was switched to a config it cannot run (`set_rope` turning on DCA)."""
        if self.model.config is not self.config:
            self.config = self.model.config
            if self.fast is not None:
                self.fast_reason = unsupported_reason(self.model, self._isa)
                if self.fast_reason is not None:
                    self.fast = None
        if self.fast is not None and self.fast.stale():
            self.fast = FastDecoder(self.model, self.cache, self._isa, self.threads)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], want_logits: bool) -> torch.Tensor | None:
        """Append `ids` to the sequence in `slot`; return logits [vocab] float32 of the last
        position when `want_logits` (the final chunk of a prompt), else None."""
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        h, _ = self.model.hidden_states(x, kv_cache=self.cache.rows([slot]))
        if not want_logits:
            return None
        return self.model.lm_head(h[0, -1]).float()

    @torch.inference_mode()
    def prefill_alone(self, ids: list[int], chunk: int) -> KVCache:
        """K/V of `ids` in a one-slot cache of their own, prefilled `chunk` tokens at a time
        (the boundaries a prompt's own prefill would use): a prefix shared by many prompts."""
        cache = KVCache(self.config, 1, len(ids), self.model.dtype, self.model.device)
        for at in range(0, len(ids), chunk):
            x = torch.tensor([ids[at:at + chunk]], dtype=torch.long, device=self.model.device)
            self.model.hidden_states(x, kv_cache=cache.rows([0]))
        return cache

    @torch.inference_mode()
    def prefill_scored(self, slot: int, ids: list[int], targets: list[int], top: int, want_logits: bool):
        """`prefill`, and also score the chunk: position t of `ids` predicts targets[t].

        targets: the prompt tokens that follow each position of this chunk (one fewer than
        `ids` on a prompt's last chunk, whose last position predicts the first generated
        token). Returns (logits [vocab] float32 or None as `prefill`, (logprobs [k] float32,
        greedy [k] bool, top (values [k, top], ids [k, top]) or None)), k = len(targets):
        the same function of the same hidden states as `score`, one chunk at a time.
        """
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        h, _ = self.model.hidden_states(x, kv_cache=self.cache.rows([slot]))
        if targets:
            y = torch.tensor(targets, dtype=torch.long, device=self.model.device)
            scores = head_logprobs(h[0, :len(targets)], self.model.lm_head, y, 1.0, top)
        else:  # a one-token last chunk: nothing of the prompt follows it
            scores = (torch.empty(0), torch.empty(0, dtype=torch.bool),
                      (torch.empty(0, top), torch.empty(0, top, dtype=torch.long)) if top else None)
        logits = self.model.lm_head(h[0, -1]).float() if want_logits else None
        return logits, scores

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> Logits:
        """Feed one token to each slot; return the logits [len(slots), vocab] float32."""
        device = self.model.device
        if self.fast is not None:
            positions = torch.tensor([self.cache.lengths[s] for s in slots])
            out = Logits(*self.fast(torch.tensor(tokens), torch.tensor(slots), positions))
            for s in slots:
                self.cache.lengths[s] += 1
            return out
        x = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        h, _ = self.model.hidden_states(x, kv_cache=self.cache.rows(slots))
        return Logits(self.model.lm_head(h[:, -1]).float())

    @torch.inference_mode()
    def score(self, ids: list[int], start: int, top: int = 0, chunk: int = 256):
        """Log-probabilities of ids[start:] given what precedes each (no cache used).

        Returns (logprobs [n] float32, greedy [n] bool, top (values [n, top], ids [n, top]) or
        None), n = len(ids) - start. The lm_head runs over `chunk` positions at a time, so
        memory stays O(chunk x vocab) for long inputs.
        """
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        h, _ = self.model.hidden_states(x)
        # position t predicts token t + 1; raw distribution (temperature 1), as the API reports
        return head_logprobs(h[0, start - 1:-1], self.model.lm_head, x[0, start:], 1.0, top, chunk)

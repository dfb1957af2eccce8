"""`Engine`: token-level generation with a static KV cache and continuous batching.

    engine = Engine(model, max_batch_size=8, max_seq_len=4096)
    results = engine.generate([[9707, 1879], [40, 1079, 264]], max_new_tokens=32, temperature=0)
    results[0].tokens, results[0].finish_reason        # new ids; "stop" | "length"
    for token in engine.stream([9707, 1879], max_new_tokens=32): ...
    engine.score(prompt_ids, continuation_ids).logprobs # log p of given tokens

Token ids only: stop strings and detokenisation live in `qwen25.engine.text` /
`detokenize.py`, templates and tool calls above the engine (`qwen25.assistant`).
`generate` and `stream` run on the engine's one dispatcher (`dispatch.py`), the loop over the
step-level core (`add` / `step` / `cancel`, see `scheduler.py`) that the server, the text
helpers and evaluation drive too. Prompts of different lengths share a batch and each sequence stops on its own;
the `n` samples of a prompt share one prefill.

A server drives the core from one thread and adds requests from others:

    request = engine.add(prompt_ids, max_new_tokens=256, temperature=0.7, seed=1)  # any thread;
    ...                                                      # UserError for bad input, here
    while running:                                           # the scheduler thread
        if not engine.has_work: wait_for_new_requests()
        for out in engine.step():                            # StepOutput: request, index,
            send(out.request, out.token, out.finish_reason)  # token, logprob, finish_reason
    engine.cancel(request)                                   # client gone: slots freed

Speed on CPU: the prompt is prefilled by the PyTorch model (big matmuls); every decode step
of the whole batch is a single call into C++ kernels (`fast.py`) that stream each weight
once per step. `engine.decode_path` says which path runs ("fast", "portable" or "torch")
and `engine.fast_path_reason` why the fast one is off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from qwen25.engine.dispatch import Dispatcher
from qwen25.engine.hugepages import collapse_in_background
from qwen25.engine.runner import ModelRunner
from qwen25.engine.sampling import SamplingParams
from qwen25.engine.scheduler import Completion, Request, Scheduler, Score, StepOutput
from qwen25.errors import UserError
from qwen25.host_memory import keep_freed_memory

__all__ = ["Engine", "Completion", "Request", "StepOutput", "SamplingParams", "Score", "default_stop_ids"]


def default_stop_ids(model) -> frozenset[int]:
    """The eos ids of `model.generation_config` (set by load_model), else of the config."""
    gen = getattr(model, "generation_config", None) or {}
    eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


class Engine:
    """Generation over a static KV cache of `max_batch_size` slots x `max_seq_len` positions.

    model: a `qwen25` Transformer (from `load_model` or `build_model`), any device/dtype,
      shared, not copied: training can update its weights in place between calls (GRPO).
    max_batch_size: sequences decoded together (a request with n samples takes n slots).
    max_seq_len: prompt + generated tokens per sequence; the cache is allocated up front
      (2 x layers x slots x kv_heads x max_seq_len x head_dim elements of the model dtype).
    prefill_chunk: prompt tokens processed per step at most, so that a long prompt delays
      the tokens of running sequences by one chunk at a time.
    decode: "auto" (C++ kernels when the CPU and model allow, else PyTorch), "fast",
      "torch", or "portable" (the C++ decoder without AVX-512; for tests).
    threads: threads of the C++ decoder (default: torch.get_num_threads() at each step).
    hugepages: on Linux, rebuild the weights and the cache in place as 2 MiB pages on a
      background thread (10-15% faster decoding; see hugepages.py). Values never change.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int = 4096, *,
                 prefill_chunk: int = 512, decode: str = "auto", threads: int | None = None,
                 hugepages: bool = True):
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                        ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"Engine {name}={v!r} must be a positive integer")
        if max_seq_len < 2:
            raise UserError("Engine max_seq_len must be at least 2 (one prompt and one new token)")
        self.model = model  # used as it is: the engine never changes its mode or parameters
        self.config = model.config
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UserError(f"Engine threads={threads!r} must be a positive integer or None")
        self.runner = ModelRunner(model, max_batch_size, max_seq_len, decode, threads)
        self.scheduler = Scheduler(self.runner, max_batch_size, prefill_chunk, default_stop_ids(model))
        self._hugepages = None
        if model.device.type == "cpu":
            keep_freed_memory()  # each decode step allocates the same [batch, vocab] arrays
        if hugepages and model.device.type == "cpu":
            tensors = [*model.parameters(), *self.runner.cache.k, *self.runner.cache.v]
            self._hugepages = collapse_in_background(tensors, keep_alive=self)

    # ---- information ------------------------------------------------------------------

    @property
    def decode_path(self) -> str:
        """"fast" (AVX-512 C++), "portable" (plain C++) or "torch" (the PyTorch model)."""
        return self.runner.decode_path

    @property
    def fast_path_reason(self) -> str | None:
        """Why decoding does not use the C++ kernels (None when it does)."""
        return self.runner.fast_reason

    @property
    def cache_bytes(self) -> int:
        return self.runner.cache.nbytes

    # ---- the step-level core ----------------------------------------------------------

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None, **sampling) -> Request:
        """Queue one prompt; returns its handle. Thread-safe.

        Pass either a `SamplingParams` or its fields as keywords (max_new_tokens, temperature,
        top_p, top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        stop_token_ids, seed, logprobs, n, prompt_logprobs). Bad input raises `UserError` here,
        never later. With prompt_logprobs=k the prompt is scored chunk by chunk as it is
        prefilled (`request.prompt_score`); max_new_tokens=0 then scores without generating.
        """
        if params is None:
            params = make_params(**sampling)
        elif sampling:
            raise TypeError("pass either params or sampling keywords, not both")
        self.runner.refresh()
        return self.scheduler.add(prompt, params)

    def share_prefix(self, prompt: Sequence[int] | None) -> None:
        """Compute the K/V of `prompt` once: later prompts that start with it prefill only
        what follows (few-shot evaluation, a long system prompt). None forgets it. Outputs
        equal a full prefill's to rounding and do not depend on other requests (scheduler.py)."""
        self.runner.refresh()
        self.scheduler.share_prefix(None if prompt is None else list(prompt))

    def step(self) -> list[StepOutput]:
        """Run one engine step (decode all running, prefill what fits); see scheduler.py."""
        return self.scheduler.step()

    def cancel(self, request: Request) -> None:
        """Stop `request`; its unfinished samples end with finish_reason "cancelled"."""
        self.scheduler.cancel(request)

    @property
    def has_work(self) -> bool:
        """Whether `step()` has anything to do (queued, prefilling or running requests)."""
        return self.scheduler.has_work

    # ---- loops over the core -----------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 stop_token_ids: Sequence[int] | None = None, seed: int | None = None, logprobs: int = 0,
                 n: int = 1) -> list[Completion]:
        """Complete every prompt; returns len(prompts) * n results, prompt-major
        (results[i * n + j] is sample j of prompt i). A stop token ends a result and is its
        last token (finish_reason "stop"); otherwise finish_reason is "length"."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or (prompts and not isinstance(prompts[0], (list, tuple))):
            raise UserError("generate takes a list of prompts, each a list of token ids "
                            "(for one prompt, pass [ids])")
        params = make_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             min_p=min_p, repetition_penalty=repetition_penalty,
                             presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                             stop_token_ids=stop_token_ids, seed=seed, logprobs=logprobs, n=n)
        subs = Dispatcher(self).generate(prompts, params)
        return [c for s in subs for c in s.request.outputs]

    def stream(self, prompt: Sequence[int], max_new_tokens: int = 16, **sampling) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are produced (same keywords as
        `generate`, n must be 1). Closing the iterator early cancels the request."""
        if sampling.get("n", 1) != 1:
            raise UserError("stream produces one sample; use add()/step() for n > 1")
        dispatcher = Dispatcher(self)
        sub = dispatcher.submit(prompt, make_params(max_new_tokens=max_new_tokens, **sampling))
        for ev in dispatcher.run([sub]):
            if ev.token is not None:
                yield ev.token

    def score(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int], top_logprobs: int = 0) -> Score:
        """Log-probabilities of `continuation_ids` following `prompt_ids` (one forward, no
        sampling), for loglikelihood evaluation in-process. The forward holds the step lock,
        so running sequences wait for it: where other requests are streaming (the server),
        score with `add(..., prompt_logprobs=k, max_new_tokens=0)`, which is chunked."""
        prompt = self.scheduler._check_prompt(prompt_ids)
        if not continuation_ids:
            raise UserError("score needs at least one continuation token")
        ids = self.scheduler._check_prompt(list(prompt) + list(continuation_ids))
        if not 0 <= top_logprobs <= 20:
            raise UserError(f"top_logprobs={top_logprobs} must be in [0, 20]")
        with self.scheduler._step_lock:  # the model is shared with the step loop
            lps, greedy, tops = self.runner.score(ids, len(prompt), top_logprobs)
        top = None
        if tops is not None:
            top = [list(zip(i, v)) for v, i in zip(tops[0].tolist(), tops[1].tolist())]
        return Score(lps.tolist(), greedy.tolist(), top)


def make_params(**fields) -> SamplingParams:
    """SamplingParams from keyword fields, with stop_token_ids normalised to a tuple."""
    stop = fields.get("stop_token_ids")
    if stop is not None:
        if isinstance(stop, int):
            stop = [stop]
        fields["stop_token_ids"] = tuple(stop)
    return SamplingParams(**fields)

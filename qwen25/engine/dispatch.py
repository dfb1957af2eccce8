"""The one loop that drives the engine for its users: submit, step, route, stop, cancel.

`Engine.generate`, the text helpers (`qwen25.engine.text`), the chat helpers
(`qwen25.assistant`), the HTTP server's engine thread (`qwen25.serve.worker`), the
long-context probes and GRPO rollouts all drive the step-level core (`Engine.add / step /
cancel`) through a `Dispatcher`, so there is one answer to "when is a sample finished, what
is its text, which tokens carry log-probabilities":

    d = Dispatcher(engine, tokenizer)              # tokenizer None: token ids only
    subs = d.generate(prompts, params)             # blocking: many prompts, n samples each
    subs[0].tokens(0), subs[0].logprobs(0), subs[0].text(0), subs[0].finish_reason(0)

    sub = d.submit(prompt_ids, params, stop=["\\n\\n"], tag=anything)   # step-level use
    while d.active:
        for ev in d.step():                        # TextEvent per new token (or end)
            send(ev.submission.tag, ev.index, ev.text, ev.token, ev.finish_reason)
    d.cancel(sub)                                  # client gone: slots freed

Rules (the OpenAI API's and vLLM's):
- A sample ends on a stop token (finish "stop"; the token is the sample's last token, has
  its log-probability, and adds no text), on a stop string (finish "stop"; the text ends
  before the match; the request is cancelled in the engine once all its samples ended), at
  max_new_tokens or the context (finish "length"), or when cancelled ("cancelled"). A
  score-only submission (prompt_logprobs, max_new_tokens 0) ends with "length" and no token
  once `prompt_score` is set.
- Routing reads each submission's `Request` handle, not the step's return value, so the
  outputs are complete whoever called `engine.step()` (two dispatchers may share an engine).

A dispatcher is driven from one thread (the server's engine thread, or the caller's); the
engine's own `add`/`cancel` stay thread-safe for everyone else.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qwen25.engine.detokenize import TextStream
from qwen25.engine.sampling import SamplingParams
from qwen25.engine.scheduler import Request


@dataclass(frozen=True)
class TextEvent:
    """What one sample of one submission produced: a token (or, for "cancelled", nothing)."""

    submission: Submission
    index: int  # which of the submission's n samples
    text: str  # text that may be shown now ("" without a tokenizer, or while held back)
    token: int | None  # the new token id; None when the sample ended without one (cancelled)
    logprob: float | None  # its log p under the raw model distribution
    top_logprobs: list[tuple[int, float]] | None  # the params.logprobs best (id, logprob)
    finish_reason: str | None  # set on the sample's last event: "stop" | "length" | "cancelled"
    stop_token: bool = False  # the token is a stop token: it is in the logprobs, not in the text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Submission:
    """One prompt and its n samples, as submitted to a Dispatcher. Read-only for callers."""

    def __init__(self, request: Request, streams: list[TextStream] | None, tag: Any = None):
        self.request = request
        self.tag = tag  # the caller's: e.g. (job, prompt index) in the server
        self._streams = streams
        n = request.params.n
        self._seen = [0] * n  # tokens of request.outputs[i] already routed
        self._reasons: list[str | None] = [None] * n

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def n(self) -> int:
        return self.request.params.n

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self._reasons)

    @property
    def prompt_score(self):
        """The prompt's `Score` (log p of prompt[1:]) once its last chunk is prefilled, when
        params.prompt_logprobs asked for it; else None."""
        return self.request.prompt_score

    def finish_reason(self, i: int) -> str | None:
        """"stop" (stop token or stop string), "length", "cancelled"; None while running."""
        return self._reasons[i]

    def tokens(self, i: int) -> list[int]:
        """Sample i's generated ids up to where it ended (a final stop token included)."""
        return self.request.outputs[i].tokens[:self._seen[i]]

    def logprobs(self, i: int) -> list[float]:
        """log p of each of `tokens(i)` under the raw model distribution."""
        return self.request.outputs[i].logprobs[:self._seen[i]]

    def sampled_logprobs(self, i: int) -> list[float]:
        """log p of each of `tokens(i)` under the distribution it was sampled from
        (temperature, penalties and filters applied): what an RL trainer's ratio divides by."""
        return self.request.outputs[i].sampled_logprobs[:self._seen[i]]

    def text(self, i: int) -> str:
        """Sample i's text (stop strings and stop tokens excluded); "" without a tokenizer."""
        return self._streams[i].text if self._streams is not None else ""


class Dispatcher:
    """Drives `engine` for a set of submissions (see the module docstring)."""

    def __init__(self, engine, tokenizer=None):
        self.engine = engine
        self.tokenizer = tokenizer
        self._active: list[Submission] = []

    @property
    def active(self) -> int:
        """Submissions not yet finished."""
        return len(self._active)

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop: Sequence[str] = (),
               skip_special_tokens: bool = True, tag: Any = None) -> Submission:
        """Queue one prompt (n = params.n samples). Bad input raises UserError here. Stop
        strings need the tokenizer."""
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a Dispatcher with a tokenizer")
        streams = None
        if self.tokenizer is not None:
            streams = [TextStream(self.tokenizer, stop, skip_special_tokens) for _ in range(params.n)]
        sub = Submission(self.engine.add(prompt, params), streams, tag)
        self._active.append(sub)
        return sub

    def cancel(self, sub: Submission) -> None:
        """Stop `sub`; its unfinished samples end with "cancelled" at the next `step`/`route`."""
        if not sub.request.finished:
            self.engine.cancel(sub.request)

    def step(self) -> list[TextEvent]:
        """One engine step, then the events of every active submission."""
        if self.engine.has_work:
            self.engine.step()
        return self.route()

    def route(self) -> list[TextEvent]:
        """Events for the tokens that arrived since the last call (from any step)."""
        events: list[TextEvent] = []
        for sub in self._active:
            for i in range(sub.n):
                if sub._reasons[i] is None:
                    events += self._route_sample(sub, i)
            if sub.finished and not sub.request.finished:
                self.engine.cancel(sub.request)  # stop strings ended every sample early
        self._active = [s for s in self._active if not s.finished]
        return events

    def _route_sample(self, sub: Submission, i: int) -> list[TextEvent]:
        out = sub.request.outputs[i]
        stream = sub._streams[i] if sub._streams is not None else None
        events = []
        while sub._seen[i] < len(out.tokens):
            t = sub._seen[i]
            sub._seen[i] += 1
            token = out.tokens[t]
            last = sub._seen[i] == len(out.tokens) and out.finish_reason is not None
            reason = out.finish_reason if last else None
            stop_token = reason == "stop" and token in sub.request.stop_ids
            text = ""
            if stream is not None:
                if not stop_token:
                    text = stream.push(token)
                if stream.stopped:
                    reason = "stop"
                if reason is not None:
                    text += stream.finish()
            top = out.top_logprobs[t] if out.top_logprobs is not None else None
            events.append(TextEvent(sub, i, text, token, out.logprobs[t], top, reason, stop_token))
            if reason is not None:
                sub._reasons[i] = reason
                return events
        if out.finish_reason is not None:  # ended without a new token: cancelled, or scored only
            text = stream.finish() if stream is not None else ""
            sub._reasons[i] = out.finish_reason
            events.append(TextEvent(sub, i, text, None, None, None, out.finish_reason))
        return events

    def run(self, subs: Sequence[Submission] | None = None) -> Iterator[TextEvent]:
        """Step until `subs` (default: every active submission) finish, yielding their events.
        Closing the iterator early cancels those still running."""
        subs = list(self._active if subs is None else subs)
        wanted = {id(s) for s in subs}
        try:
            while not all(s.finished for s in subs):
                for ev in self.step():
                    if id(ev.submission) in wanted:
                        yield ev
        finally:
            for s in subs:
                if not s.finished:
                    self.cancel(s)
            self.route()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, window: int | None = None) -> list[Submission]:
        """Run every prompt to the end; returns one Submission per prompt, in order.

        window: at most this many prompts in the engine at once (default: all queued at
        once; the engine admits them as slots free up). A smaller window bounds the memory
        of queued long prompts.
        """
        prompts = list(prompts)
        window = window or len(prompts) or 1
        subs: list[Submission] = []
        try:
            while len(subs) < len(prompts) or not all(s.finished for s in subs):
                while len(subs) < len(prompts) and sum(not s.finished for s in subs) < window:
                    subs.append(self.submit(prompts[len(subs)], params, stop, skip_special_tokens))
                self.step()
        finally:
            for s in subs:
                if not s.finished:
                    self.cancel(s)
            self.route()
        return subs

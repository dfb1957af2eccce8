"""The engine thread: continuous batching between HTTP requests and the step-level engine.

One thread owns the `Engine`. It loops: take new jobs and cancellations, run one
`engine.step()` (decode one token for every running sequence, prefill what fits), turn the
new tokens into text, hand each job its updates, retire finished jobs; it sleeps when
nothing is queued or running. New requests therefore join the running batch between two
decode steps, and the asyncio event loop never runs the model: it only submits jobs and
awaits their updates (`loop.call_soon_threadsafe` into one `asyncio.Queue` per job).

The engine is driven through its one dispatcher (`qwen25.engine.dispatch`), on this thread:
it turns each step's tokens into text, decides when a sample is finished (stop token, stop
string, length) and cancels work a stop string ended, so the token counts never depend on
event-loop timing. A generated stop token is the last entry of a choice's logprobs (as in
vLLM and the OpenAI API) but adds no text: lm-evaluation-harness reads the log-likelihood of
an answer from `token_logprobs[ctxlen:-1]` of a one-token completion, whatever that token is.

A job is one HTTP request: one or more prompts (a completions request may list several),
each decoded into n samples. Its choices are numbered prompt-major (choice = prompt * n +
sample). What a job's queue receives, in order:
- `PromptScores` per prompt when echo logprobs were asked for: the engine scores the prompt
  chunk by chunk as it prefills it (`SamplingParams.prompt_logprobs`), between decode steps
  of the other requests, so a 30K-token scoring request delays running streams by one chunk
  at a time and is cancelled like any other request when its client hangs up; the scores
  arrive before the prompt's first SampleUpdate;
- lists of `SampleUpdate` (new text and tokens of one choice; finish_reason on its last);
- or a single `JobFailed` if the request could not be run, or was aborted (`abort`: the
  server's shutdown timeout passed).

Counting: a job is "waiting" from submission to its first token (queued for a slot or being
prefilled) and "running" from then until every choice has finished. `max_queue` bounds the
waiting prompts; `submit` raises `APIError(429)` beyond it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from qwen25.engine import Engine, SamplingParams
from qwen25.engine.dispatch import Dispatcher, Submission, TextEvent
from qwen25.engine.scheduler import Score
from qwen25.serve.errors import APIError, error_from_exception, queue_full
from qwen25.serve.metrics import Metrics

log = logging.getLogger("qwen25.serve")


@dataclass(frozen=True)
class TokenInfo:
    """One generated token: its id, log-probability and the best alternatives (id, logprob)."""

    id: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass
class SampleUpdate:
    """What one choice produced in one engine step."""

    choice: int
    text: str  # text that is safe to show now ("" while a stop string might be forming)
    tokens: list[TokenInfo]  # new tokens (a final stop token included: it has a logprob, no text)
    finish_reason: str | None = None  # "stop" | "length" on the choice's last update
    completion_tokens: int = 0  # tokens generated for the choice so far (usage)


@dataclass(frozen=True)
class PromptScores:
    """Log-probabilities of a prompt's tokens 1.. (echo); token 0 has none."""

    prompt: int
    score: Score | None  # None for a one-token prompt


@dataclass(frozen=True)
class JobFailed:
    error: APIError


@dataclass
class Job:
    """One HTTP request's engine work. Build it, `EngineWorker.submit` it, read `queue`."""

    prompts: list[list[int]]
    params: SamplingParams  # max_new_tokens 0 means score only (echo with max_tokens 0)
    stop: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # echo: top-k alternatives per prompt token (0: none)
    score_only: bool = False  # echo with max_tokens 0: no generation at all
    # --- set by the worker ---
    id: int = field(default_factory=itertools.count().__next__)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue | None = None
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished: bool = False
    submissions: list[Submission] = field(default_factory=list)  # one per prompt
    _done: list[bool] = field(default_factory=list)
    _scores_sent: list[bool] = field(default_factory=list)  # per prompt: PromptScores sent
    _counts: list[int] = field(default_factory=list)
    _cancelled: bool = False

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.params.n


class EngineWorker:
    """The thread that owns `engine`; see the module docstring."""

    def __init__(self, engine: Engine, tokenizer, metrics: Metrics, max_queue: int = 256):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}  # accepted and unfinished, by job id
        self.dispatcher = Dispatcher(engine, tokenizer)  # used on the engine thread only
        self._stopping = False
        self._abort: APIError | None = None  # set by abort(): fail every job with it
        self._thread: threading.Thread | None = None
        self.fatal: BaseException | None = None  # set if the thread died

    # ---- called from the event loop ------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="qwen25-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread (after the HTTP server has drained)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests; a request is one prompt of a job."""
        with self._cond:
            jobs = list(self._jobs.values()) + list(self._inbox)
        running = sum(len(j.prompts) for j in jobs if j.first_token_at is not None and not j.finished)
        waiting = sum(len(j.prompts) for j in jobs if j.first_token_at is None and not j.finished)
        return running, waiting

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """Queue `job`; its updates arrive on `job.queue`. Raises APIError(429) when full."""
        job.loop, job.queue = loop, asyncio.Queue()
        job.submitted_at = time.perf_counter()
        with self._cond:
            waiting = sum(len(j.prompts) for j in list(self._jobs.values()) + list(self._inbox)
                          if j.first_token_at is None)
            if waiting + len(job.prompts) > self.max_queue:
                raise queue_full(self.max_queue)
            self._inbox.append(job)
            self._cond.notify()

    def abort(self, error: APIError) -> None:
        """Fail every accepted job with `error` (the shutdown timeout passed): each client gets
        it as an error event or error body, and the engine drops the jobs' work."""
        with self._cond:
            self._abort = error
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job` (its client went away); frees its slots at the next step."""
        if job.finished:
            return
        with self._cond:
            self._cancels.append(job)
            self._cond.notify()

    # ---- the engine thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._abort or self._inbox or self._cancels
                               or self.engine.has_work or self.dispatcher.active):
                        self._cond.wait()
                    if self._stopping:
                        break
                    abort, self._abort = self._abort, None
                    if abort is None:
                        inbox, self._inbox = list(self._inbox), deque()
                        cancels, self._cancels = self._cancels, []
                if abort is not None:  # the inbox too: _fail_all takes it
                    self._fail_all(abort)
                    self.dispatcher.route()  # collect the cancellations
                    continue
                for job in inbox:
                    self._start(job)
                for job in cancels:  # after starting: a job may be cancelled before its first step
                    self._cancel(job)
                if self.engine.has_work or self.dispatcher.active:
                    try:
                        self._dispatch(self.dispatcher.step())
                    except Exception as e:  # a bug: fail what is running, keep serving
                        self._fail_all(error_from_exception(e))
                        continue
                self._reap()
        except BaseException as e:  # the thread is dying: make /health say so
            self.fatal = e
            log.critical("the engine thread died", exc_info=e)
            raise
        finally:
            self._fail_all(error_from_exception(self.fatal) if self.fatal is not None else
                           APIError(503, "The server is shutting down; the request was aborted.",
                                    code="shutting_down"))

    def _start(self, job: Job) -> None:
        with self._cond:
            self._jobs[job.id] = job
        job._done = [False] * job.choices
        job._counts = [0] * job.choices
        job._scores_sent = [False] * len(job.prompts)
        try:
            if job.score_only and job.prompt_logprobs is None:  # echo of the prompt only: no work
                job.first_token_at = time.perf_counter()
                self._send(job, [SampleUpdate(c, "", [], "length") for c in range(job.choices)])
                job._done = [True] * job.choices
                return
            params = job.params
            if job.prompt_logprobs is not None:
                params = replace(params, prompt_logprobs=job.prompt_logprobs,
                                 max_new_tokens=0 if job.score_only else params.max_new_tokens)
            for i, prompt in enumerate(job.prompts):
                job.submissions.append(self.dispatcher.submit(prompt, params, job.stop, job.skip_special_tokens,
                                                              tag=(job, i)))
        except Exception as e:  # UserError from the engine: 400; anything else: 500
            self._fail(job, error_from_exception(e))

    def _dispatch(self, events: list[TextEvent]) -> None:
        updates: dict[int, list[SampleUpdate]] = {}
        now = time.perf_counter()
        for ev in events:
            job, p = ev.submission.tag
            c = p * job.params.n + ev.index
            if job._done[c] or ev.finish_reason == "cancelled":
                continue  # cancelled: the client is gone; _reap counts the job as aborted
            if job.prompt_logprobs is not None and not job._scores_sent[p]:
                # sent at once, so it precedes this step's updates (sent below, per job)
                job._scores_sent[p] = True
                score = ev.submission.prompt_score if len(job.prompts[p]) > 1 else None
                self._send(job, PromptScores(p, score))
            if job.first_token_at is None:
                job.first_token_at = now
                self.metrics.observe_first_token(now - job.submitted_at)
            tokens = []
            if ev.token is not None:
                job._counts[c] += 1
                tokens = [TokenInfo(ev.token, ev.logprob, ev.top_logprobs)]
            if ev.finished:
                job._done[c] = True
            updates.setdefault(job.id, []).append(SampleUpdate(c, ev.text, tokens, ev.finish_reason, job._counts[c]))
        for job_id, batch in updates.items():
            self._send(self._jobs[job_id], batch)

    def _reap(self) -> None:
        for job in list(self._jobs.values()):
            if all(job._done):
                self._finish(job, success=True)
            elif job.submissions and all(s.request.finished for s in job.submissions):
                self._finish(job, success=False)  # cancelled (client gone) or failed

    def _finish(self, job: Job, success: bool) -> None:
        job.finished = True
        with self._cond:
            self._jobs.pop(job.id, None)
        if success:
            elapsed = time.perf_counter() - job.submitted_at
            prompt_tokens = sum(len(p) for p in job.prompts)
            self.metrics.observe_finished(elapsed, prompt_tokens, sum(job._counts),
                                          job.first_token_at - job.submitted_at if job.first_token_at else None)

    def _cancel(self, job: Job) -> None:
        if job.finished or job._cancelled:
            return
        job._cancelled = True
        for sub in job.submissions:
            self.dispatcher.cancel(sub)
        self.metrics.count_aborted()
        if not job.submissions:  # never reached the engine (failed, or scored only)
            self._finish(job, success=False)

    def _fail(self, job: Job, error: APIError) -> None:
        for sub in job.submissions:
            self.dispatcher.cancel(sub)
        self._send(job, JobFailed(error))
        self._finish(job, success=False)

    def _fail_all(self, error: APIError) -> None:
        with self._cond:
            jobs = list(self._jobs.values()) + list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            if not job.finished:
                self._fail(job, error)

    def _send(self, job: Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

"""What a task is: examples plus a scorer (nanochat's `tasks/` is the model).

Two kinds of example, one per way of asking a model:

- `MCExample` (multiple choice by log-likelihood): one (context, continuation) pair per
  choice. Most tasks share one context across choices (ARC, MMLU, HellaSwag, PIQA);
  WinoGrande varies the context and keeps the continuation ("partial scoring"). The harness
  scores each distinct context once and shares it between its choices.
- `GenExample` (generation): a base-model prompt (few-shot text) and a chat conversation;
  the task's `score(completion, example)` turns the generated text into metrics.

Scorers are plain functions of (completion text, example) so GRPO rewards and DPO pair
building import them directly; they never need a model.

Metrics follow lm-evaluation-harness: `acc` = argmax of summed log-likelihood, `acc_norm` =
argmax of log-likelihood divided by the choice's length in characters (lm-eval's
`completion_len`, the choice text without the leading delimiter).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwen25.errors import UserError


@dataclass(frozen=True)
class MCExample:
    id: str
    contexts: tuple[str, ...]  # one per choice (the same string for shared-context tasks)
    continuations: tuple[str, ...]  # one per choice, with its leading delimiter (" Paris")
    gold: int  # index of the right choice
    norm_lengths: tuple[int, ...]  # acc_norm denominators: len(choice text), characters
    doc: dict = field(default_factory=dict, repr=False, compare=False)  # the source row


@dataclass(frozen=True)
class GenExample:
    id: str
    prompt: str  # base-model prompt: few-shot text ending where the answer starts
    messages: tuple[dict, ...]  # the same question as a conversation (for --chat)
    target: Any  # what the scorer compares with (a number, a LaTeX answer, tests, ...)
    stop: tuple[str, ...] = ()  # stop strings for base prompts (chat ends at the template's eos)
    max_new_tokens: int = 256
    doc: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Task:
    """A benchmark: how to build its examples and how to score one answer.

    examples(num_fewshot) -> list of examples (deterministic order);
    score(completion, example) -> {metric: value in [0, 1]} for generative tasks;
    metrics: the names reported, primary first.
    """

    name: str
    kind: str  # "mc" | "gen" | "probe"
    metrics: tuple[str, ...]
    load: Callable[[int], list]  # num_fewshot -> examples
    default_fewshot: int = 0
    max_fewshot: int = 0  # shots available in the shipped data
    score: Callable[[str, Any], dict] | None = None  # generative tasks
    samples_default: int = 1  # completions per prompt (pass@k tasks draw more)
    description: str = ""

    def examples(self, num_fewshot: int | None = None) -> list:
        k = self.default_fewshot if num_fewshot is None else num_fewshot
        if not 0 <= k <= self.max_fewshot:
            raise UserError(f"task {self.name} has {self.max_fewshot} few-shot examples in its data; "
                            f"use --num-fewshot between 0 and {self.max_fewshot} (got {k})")
        return self.load(k)


# ---- multiple-choice metrics -----------------------------------------------------------


def mc_metrics(logliks: Sequence[float], example: MCExample) -> dict[str, float]:
    """lm-eval's acc and acc_norm for one item from its per-choice log-likelihoods.
    Ties go to the first choice (numpy argmax), as in lm-eval."""
    if len(logliks) != len(example.continuations):
        raise ValueError("one log-likelihood per choice")
    pred = _argmax(list(logliks))
    pred_norm = _argmax([ll / n for ll, n in zip(logliks, example.norm_lengths)])
    return {"acc": float(pred == example.gold), "acc_norm": float(pred_norm == example.gold)}


def _argmax(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation, ddof=1, over sqrt(n)), as
    lm-eval reports for mean metrics; 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


# ---- few-shot prefixes in the shipped contexts -----------------------------------------


def split_shots(context: str, query: str, boundary: str = r"\n\n") -> list[str]:
    """The few-shot examples that precede `query` at the end of `context`.

    The oe-eval contexts are "shot\\n\\nshot\\n\\n...query"; `boundary` is the regex that
    separates two examples (a lookahead when examples contain blank lines themselves).
    """
    if not context.endswith(query):
        raise ValueError("context does not end with the query")
    prefix = context[: len(context) - len(query)]
    if not prefix:
        return []
    parts = re.split(boundary, prefix.rstrip("\n"))
    return [p for p in parts if p.strip()]


def with_shots(shots: Sequence[str], query: str, k: int, sep: str = "\n\n") -> str:
    """The first k shots, then the query, joined as in the shipped contexts."""
    return "".join(s + sep for s in shots[:k]) + query


def user_message(text: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": text},)

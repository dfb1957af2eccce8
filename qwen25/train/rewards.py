"""Rewards for RL: plain functions `reward(prompt, completion, example) -> float`, by name.

The verifiers are the evaluation tasks' scorers (`qwen25.eval.tasks`), so what GRPO
optimises is exactly what `qwen25 eval run` reports; the reward model (`rm:DIR`) scores the
whole conversation with a trained scalar head. A spec names rewards with optional weights
and the total is their weighted sum:

    "math_answer"                 the synthetic-math / GSM8K answer, strict format (0 or 1)
    "math_answer,format:0.2"      plus 0.2 for stating an answer in the asked format
    "math_answer,rm:runs/rm:0.5"  plus 0.5 x the reward model's score
    "math_latex,solution_f1:0.5"  plus 0.5 x the share of the worked solution's numbers written

A reward that raises or returns a non-finite value does not stop the run: the sample is
dropped from the update and counted (`RewardError` carries why), as a broken verifier on
one odd completion must not cost the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qwen25.errors import UserError
from qwen25.train.solution_reward import solution_f1

RewardFn = Callable[[str, str, Any], float]


def _math_strict(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.math import score_number

    return score_number(completion, example)["exact_match_strict"]


def _math_flexible(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.math import score_number

    return score_number(completion, example)["exact_match_flexible"]


def _format(prompt: str, completion: str, example) -> float:
    """1 when the completion states a final answer the way the prompt asks ("The answer is N.")."""
    from qwen25.eval.tasks.math import strict_number

    return float(strict_number(completion) is not None)


def _latex(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.math import score_math

    return score_math(completion, example)["exact_match_strict"]


def _ifbench(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.ifbench import score_ifbench

    s = score_ifbench(completion, example)
    if not s:  # the sample is dropped and counted, like any reward that cannot judge it
        raise ValueError("an instruction of this prompt needs NLTK data that is not installed")
    return float(s["prompt_strict"])


def _ifeval(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.ifbench import score_ifeval

    return score_ifeval(completion, example.doc)


def _verifier(prompt: str, completion: str, example) -> float:
    """The scorer of the query's own built-in set: instruction prompts earn the IFEval verdict
    plus the stated answer ("So the answer is N."), math prompts the \\boxed{} answer."""
    kind = example.id.split("/", 1)[0]
    if kind == "instructions":
        return _ifeval(prompt, completion, example) + _math_strict(prompt, completion, example)
    if kind == "synth_math_chat":
        return _latex(prompt, completion, example)
    raise ValueError(f"the verifier reward has no scorer for {example.id!r} (use it with --queries chat_mix, "
                     "instructions or synth_math_chat)")


def _answer_format(prompt: str, completion: str, example) -> float:
    """1 when the completion states a final answer in the format of the query's own built-in set,
    right or wrong: a number in the last \\boxed{} for math prompts, "the answer is N" for
    instruction prompts. Weighted next to `verifier` on a mixed set, it keeps each set's format
    rewarded while the model learns the other set's (without it the speedrun's GRPO on
    instruction prompts let the math replies drift to the instruction style)."""
    from qwen25.eval.tasks.math import _as_number, last_boxed, normalize_latex, strict_number

    kind = example.id.split("/", 1)[0]
    if kind == "instructions":
        return float(strict_number(completion) is not None)
    if kind == "synth_math_chat":
        boxed = last_boxed(completion)
        return float(boxed is not None and _as_number(normalize_latex(boxed)) is not None)
    raise ValueError(f"the answer_format reward has no format for {example.id!r} (use it with --queries chat_mix, "
                     "instructions or synth_math_chat)")


def _humaneval(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.code import score_humaneval

    return score_humaneval(completion, example)["pass@1"]


def _mbpp(prompt: str, completion: str, example) -> float:
    from qwen25.eval.tasks.code import score_mbpp

    return score_mbpp(completion, example)["pass@1"]


BUILTIN: dict[str, tuple[RewardFn, str]] = {
    "math_answer": (_math_strict, "final number after 'The answer is' equals the target (0/1)"),
    "math_flexible": (_math_flexible, "last number in the completion equals the target (0/1)"),
    "format": (_format, "an answer is stated as 'The answer is N.' (0/1)"),
    "math_latex": (_latex, "MATH: the last \\boxed{} equals the target (0/1)"),
    "ifbench": (_ifbench, "IFBench instruction checkers, strict prompt-level (0/1)"),
    "ifeval": (_ifeval, "IFEval checkers of the query's constraints (the 'instructions' queries), strict (0/1)"),
    "verifier": (_verifier, "the scorer of the query's own set: instructions 0-2 (IFEval + answer), math 0/1"),
    "answer_format": (_answer_format, "a final answer in the query's own set's format: \\boxed{N} or 'the answer is N' (0/1)"),
    "humaneval": (_humaneval, "HumanEval tests pass in the sandbox (0/1)"),
    "mbpp": (_mbpp, "MBPP asserts pass in the sandbox (0/1)"),
    "solution_f1": (solution_f1, "F1 of the reply's numbers against the worked solution's (0-1, partial credit)"),
}


@dataclass(frozen=True)
class WeightedReward:
    name: str
    weight: float
    fn: RewardFn


class RewardError(Exception):
    """A reward function failed on one sample (the sample is dropped and counted)."""


def parse_reward_spec(spec: str, load_reward_model: Callable[[str], RewardFn] | None = None) -> list[WeightedReward]:
    """'name[:weight],rm:DIR[:weight],...' -> weighted rewards; unknown names are a UserError."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("--reward is empty; name at least one reward, e.g. --reward math_answer "
                        f"(built-in: {', '.join(BUILTIN)}; or rm:DIR for a reward model)")
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.startswith("rm:"):
            path, weight = _split_weight(part[3:], part)
            if not path:
                raise UserError(f"reward {part!r}: give the reward model's folder, e.g. rm:runs/rm/final:0.5")
            if load_reward_model is None:
                raise UserError(f"reward {part!r}: reward-model rewards are not available here")
            out.append(WeightedReward(f"rm:{path}", weight, load_reward_model(path)))
            continue
        name, weight = _split_weight(part, part)
        if name not in BUILTIN:
            raise UserError(f"unknown reward {name!r}; choose from {', '.join(BUILTIN)} or rm:DIR[:weight]")
        out.append(WeightedReward(name, weight, BUILTIN[name][0]))
    if not out:
        raise UserError(f"--reward {spec!r} names no reward")
    return out


def _split_weight(text: str, part: str) -> tuple[str, float]:
    head, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0  # a ':' inside a path, no weight
    if not math.isfinite(weight):
        raise UserError(f"reward {part!r}: the weight must be a finite number")
    return head, weight


def total_reward(rewards: Sequence[WeightedReward], prompt: str, completion: str, example) -> tuple[float, dict]:
    """The weighted sum and each component; raises RewardError if one fails or is not finite."""
    parts = {}
    for r in rewards:
        try:
            value = float(r.fn(prompt, completion, example))
        except Exception as e:  # a verifier bug on one odd completion: drop the sample, go on
            raise RewardError(f"{r.name} raised {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise RewardError(f"{r.name} returned {value}")
        parts[r.name] = value
    return sum(r.weight * parts[r.name] for r in rewards), parts

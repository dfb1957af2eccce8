"""The solution_f1 process reward: number tokens, their F1, and its use as a GRPO reward."""

from __future__ import annotations

import random

import pytest

from qwen25.data import mathgen
from qwen25.train.grpo_queries import query
from qwen25.train.rewards import parse_reward_spec, total_reward
from qwen25.train.solution_reward import number_f1, number_tokens, solution_f1


def _slow_f1(got: list[str], want: list[str]) -> float:
    """F1 by explicit one-to-one matching: each reference token is used at most once."""
    left, common = list(want), 0
    for t in got:
        if t in left:
            left.remove(t)
            common += 1
    if common == 0:
        return 0.0
    p, r = common / len(got), common / len(want)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize("text, tokens", [
    ("Costs $1,200 then 3.50 and 2.0, 15% off", ["1200", "3.5", "2", "15"]),
    ("x + 5x + 2 x 9 = 6x + 18 = 78", ["5x", "2", "9", "6x", "18", "78"]),
    ("version v2 and a12b are words, 7.", ["7"]),
    ("no numbers here", []),
])
def test_number_tokens(text, tokens):
    assert sorted(number_tokens(text).elements()) == sorted(tokens)


def test_f1_matches_explicit_matching_on_random_multisets():
    rng = random.Random(0)
    for _ in range(300):
        got = [str(rng.randint(1, 6)) for _ in range(rng.randint(1, 8))]
        want = [str(rng.randint(1, 6)) for _ in range(rng.randint(1, 8))]
        assert number_f1(" ".join(got), " ".join(want)) == pytest.approx(_slow_f1(got, want), abs=1e-12)


def test_correct_reply_scores_one_and_errors_score_less():
    p = mathgen.problem("train", 4)  # an "ages" problem
    ex = query("synth_math_chat", 4)
    right = f"{p['solution']}\nThe final answer is $\\boxed{{{p['answer']}}}$."
    assert solution_f1("", right, ex) == 1.0
    miscopied = right.replace("2 x 9", "2 x 8", 1)  # one number of the question copied wrong
    assert 0.8 < solution_f1("", miscopied, ex) < 1.0
    assert solution_f1("", right + " 1 2 3 4 5 6 7 8", ex) < solution_f1("", right, ex)  # padding costs precision
    assert solution_f1("", "I do not know.", ex) == 0.0


def test_weighted_with_the_answer_reward():
    ex = query("synth_math_chat", 2)
    p = ex.doc
    wrong_answer = f"{p['solution']}\nThe final answer is $\\boxed{{{p['answer'] + 1}}}$."
    total, parts = total_reward(parse_reward_spec("math_latex,solution_f1:0.5"), "", wrong_answer, ex)
    assert parts["math_latex"] == 0.0 and 0.0 < parts["solution_f1"] < 1.0
    assert total == pytest.approx(0.5 * parts["solution_f1"])


def test_example_without_a_solution_is_a_clear_error():
    ex = query("arithmetic", 0)
    with pytest.raises(ValueError, match="needs a reference worked solution"):
        solution_f1("", "12", ex)

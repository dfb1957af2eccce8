"""Answer extraction and scorers on hand-made answers: what each must keep and reject,
including the known traps (GSM8K commas, units and currency; nested \\boxed{}; MBPP asserts;
pass@k against its definition)."""

from __future__ import annotations

import itertools
import math

import pytest

from qwen25.eval.tasks.base import GenExample, MCExample, mc_metrics, mean_stderr
from qwen25.eval.tasks.code import first_code_block, humaneval_program, mbpp_program, pass_at_k, score_program
from qwen25.eval.tasks.math import last_boxed, normalize_latex, score_math, score_number


def gen(target, **kw) -> GenExample:
    return GenExample(id="t", prompt="", messages=(), target=target, **kw)


@pytest.mark.parametrize("text, target, strict, flexible", [
    ("16 - 3 - 4 = 9 eggs. 9 * 2 = 18. So the answer is 18.", "18", 1, 1),
    ("So the answer is 1,000.", "1000", 1, 1),  # thousands separator
    ("It costs $1,234.50 in total. The answer is $1,234.50.", "1234.5", 1, 1),  # currency, decimals
    ("The answer is 18 dollars.", "18", 1, 1),  # unit after the number
    ("She walks 5km a day, 35km a week. The answer is 35km.", "35", 1, 1),
    ("#### 72", "72", 1, 1),  # GSM8K reference format
    ("The answer is -3.", "-3", 1, 1),
    ("The answer is 18. Then 20 more.", "18", 1, 0),  # flexible takes the last number
    ("9 * 2 = 18", "18", 0, 1),  # no stated answer: strict rejects
    ("The answer is 17.", "18", 0, 0),
    ("The answer is 180.", "18", 0, 0),  # no prefix match
    ("The answer is 1.8", "18", 0, 0),
    ("no numbers here", "18", 0, 0),
])
def test_gsm8k_extraction(text, target, strict, flexible):
    s = score_number(text, gen(target))
    assert (s["exact_match_strict"], s["exact_match_flexible"]) == (strict, flexible)


@pytest.mark.parametrize("text, inner", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),  # last, nested
    ("\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\frac{1}{2}", None),  # cut off: unbalanced
    ("no box", None),
])
def test_last_boxed_keeps_nesting(text, inner):
    assert last_boxed(text) == inner


@pytest.mark.parametrize("answer, target, ok", [
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),  # numeric value
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{90^\\circ}", "90", True),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{10\\text{ cm}}", "10", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{(1,2)}", "12", False),  # a tuple is not a thousands separator
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", False),  # cut off
])
def test_math_strict(answer, target, ok):
    assert score_math(answer, gen(target))["exact_match_strict"] == float(ok)


def test_math_flexible_uses_the_minerva_final_answer_line():
    text = "Final Answer: The final answer is $\\frac{2}{3}$. I hope it is correct."
    s = score_math(text, gen("\\frac{2}{3}"))
    assert s == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert normalize_latex("\\left(3, \\dfrac{\\pi}{2}\\right)") == "(3,\\frac{\\pi}{2})"


def test_mc_metrics_follow_lm_eval():
    ex = MCExample("x", ("q",) * 3, (" a", " bbbbbbbb", " cc"), gold=1, norm_lengths=(1, 8, 2))
    # acc: the largest sum (choice 0); acc_norm: per character (-4/8 beats -1/1 and -2/2)
    assert mc_metrics([-1.0, -4.0, -2.0], ex) == {"acc": 0.0, "acc_norm": 1.0}
    assert mc_metrics([-5.0, -4.0, -6.0], ex) == {"acc": 1.0, "acc_norm": 1.0}
    assert mc_metrics([-1.0, -1.0, -1.0], ex)["acc"] == 0.0  # ties go to the first choice
    vals = [1.0, 0.0, 1.0, 1.0]
    mu = sum(vals) / 4
    assert math.isclose(mean_stderr(vals), math.sqrt(sum((v - mu) ** 2 for v in vals) / 3 / 4))


def test_pass_at_k_equals_its_definition():
    """1 - C(n-c, k)/C(n, k) is the chance that k of n samples drawn without replacement
    include a correct one: count the subsets."""
    for n, c, k in [(5, 0, 1), (5, 1, 1), (5, 2, 3), (10, 3, 5), (4, 4, 2), (6, 1, 6)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), exact, rel_tol=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


HE_DOC = {"prompt": "from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n",
          "entry_point": "add", "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n"}


@pytest.mark.parametrize("completion, ok", [
    ("    return sum(xs)\n", True),
    ("    return sum(xs) + 0\n", True),
    ("    return len(xs)\n", False),  # wrong
    ("    return sum(xs\n", False),  # syntax error
    ("```python\ndef add(xs):\n    return sum(xs)\n```\nThis adds them.", True),  # chat reply, whole function
    ("```python\n    return sum(xs)\n```", True),  # chat reply, body only
    ("    import sys\n    sys.exit(0)\n", False),  # exiting early must not count as passing
    ("    import os\n    os._exit(0)\n", False),
])
def test_humaneval_program(completion, ok):
    prog = humaneval_program(completion, HE_DOC)
    assert score_program(prog)["pass@1"] == float(ok)


MBPP_DOC = {"test_list": ["assert sq(2) == 4", "assert sq(3) == 9", "assert sq(-1) == 1"], "test_setup_code": ""}


@pytest.mark.parametrize("completion, ok", [
    ("def sq(x):\n    return x * x\n", True),
    ("def sq(x):\n    return x * 2\n", False),  # passes the first assert only: every assert counts
    ("def sq(x):\n    return abs(x) * abs(x)\n```\nmore text", True),
    ("def square(x):\n    return x * x\n", False),  # wrong name
    ("def sq(x):\n    assert False\n", False),
])
def test_mbpp_asserts(completion, ok):
    assert score_program(mbpp_program(completion, MBPP_DOC))["pass@1"] == float(ok)


def test_first_code_block():
    assert first_code_block("Sure:\n```python\nx = 1\n```\n```\ny\n```") == "x = 1\n"
    assert first_code_block("plain") == "plain"
    assert first_code_block("def f():\n    return 1\n```\nExplanation") == "def f():\n    return 1\n"
    assert first_code_block("Here you go:\n```\nx = 2\n```") == "x = 2\n"


def test_ifbench_scorer_keeps_and_rejects():
    pytest.importorskip("if_verifiable")
    from qwen25.eval.tasks import get_task
    from qwen25.eval.tasks.ifbench import score_ifbench

    ex = next(e for e in get_task("ifbench").examples() if e.target == ("count:keywords_multiple",))
    kw = ex.doc["kwargs"][0]
    words = [kw[f"keyword{i}"] for i in range(1, 6)]
    times = [1, 2, 3, 5, 7]
    good = " ".join(" ".join([w] * t) for w, t in zip(words, times)) + "."
    bad = " ".join(words) + "."
    assert score_ifbench(good, ex)["prompt_strict"] == 1.0
    s = score_ifbench(bad, ex)
    assert s["prompt_strict"] == 0.0 and s["instruction_loose"] == 0.0


def test_ifbench_leaves_prompts_unscored_when_their_checker_lacks_nltk_data(monkeypatch):
    """A checker that needs NLTK data this machine lacks (LookupError) leaves its prompt
    unscored whatever the response, instead of failing the run or scoring a miss."""
    pytest.importorskip("if_verifiable")
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

    from qwen25.eval.tasks import get_task
    from qwen25.eval.tasks import ifbench

    ex = next(e for e in get_task("ifbench").examples() if e.target == ("count:keywords_multiple",))
    checker = INSTRUCTION_DICT["count:keywords_multiple"]

    def needs_missing_data(self, value):
        raise LookupError("Resource punkt_tab not found.")

    monkeypatch.setattr(checker, "check_following", needs_missing_data)
    ifbench._checkable.cache_clear()
    try:
        assert ifbench.score_ifbench("anything at all", ex) == {}
        assert ifbench.score_ifbench("", ex) == {}  # empty answers too: the same prompts are scored
    finally:
        ifbench._checkable.cache_clear()

"""Built-in query sets for RL, from training splits only, as evaluation-task examples.

GRPO's rewards are the evaluation scorers, so a query is a `GenExample` (chat messages and
a target) exactly like the held-out ones it will be measured on, drawn from data that is
never evaluated:

- "synth_math": the built-in synthetic word problems' *training* families
  (`qwen25.data.mathgen`, split "train"; the held-out split `synth_math` is evaluated on
  uses other families), zero-shot, asking for "The answer is N.";
- "synth_math_chat": the same training families asked as the built-in SFT conversations
  ask them (the bare question; the SFT replies end "The final answer is $\\boxed{N}$",
  which the "math_latex" reward reads), for a model fine-tuned on `qwen25 sft --data builtin`;
- "instructions": built-in instruction-following prompts (a training-family word problem
  plus one or two IFEval constraints, `qwen25.data.sft_builtin.instruction_row`, indices
  past the SFT rows'); the "ifeval" reward checks the constraints, "math_answer" the
  "So the answer is N." the SFT replies end with;
- "chat_mix": "instructions" and "synth_math_chat" queries alternating (the speedrun's GRPO
  mix, so the math answer format is rehearsed while the constraints are learned), scored
  by the "verifier" reward: each query by its own set's scorer;
- "arithmetic": seeded small sums (2..49 + 2..49), differences (10..59 - 2..9) and
  single-digit products, asked the same way: a task a small instruct model sometimes
  solves, so rewards vary within a group. (Measured: SmolLM2-135M-Instruct got 0 of 120
  three-digit sums, differences and two-digit products right, so GRPO had no signal; on
  these it is right 15-33% of the time, mostly not in the asked format.)

Both are pure functions of (name, index): rollouts are reproducible across resumes.
"""

from __future__ import annotations

import random

from qwen25.errors import UserError
from qwen25.eval.tasks.base import GenExample
from qwen25.eval.tasks.math import COT_INSTRUCTION


def _chat(question: str) -> tuple[dict, ...]:
    return ({"role": "user", "content": f"{COT_INSTRUCTION}\n\n{question}"},)


def _synth_math(i: int) -> GenExample:
    from qwen25.data import mathgen

    p = mathgen.problem("train", i)
    return GenExample(id=f"synth_math_train/{i}", prompt=f"Problem: {p['question']}\nSolution:",
                      messages=_chat(p["question"]), target=p["answer"], doc=p)


def _synth_math_chat(i: int) -> GenExample:
    from qwen25.data import mathgen

    p = mathgen.problem("train", i)
    return GenExample(id=f"synth_math_chat/{i}", prompt=f"Problem: {p['question']}\nSolution:",
                      messages=({"role": "user", "content": p["question"]},), target=str(p["answer"]), doc=p)


INSTRUCTIONS_OFFSET = 300_000  # past the SFT rows (100,000 + n) and the pair queries (200,000 + n)


def _instructions(i: int) -> GenExample:
    from qwen25.data import sft_builtin

    row = sft_builtin.instruction_row("train", INSTRUCTIONS_OFFSET + i)
    doc = sft_builtin.ifeval_doc(row)
    return GenExample(id=f"instructions/{i}", prompt=doc["prompt"], messages=({"role": "user", "content": doc["prompt"]},),
                      target=str(row["answer"]), doc=doc)


MIX_MATH_OFFSET = 400_000  # the mix's math queries lie past the SFT rows and the pair queries


def _chat_mix(i: int) -> GenExample:
    return _instructions(i // 2) if i % 2 == 0 else _synth_math_chat(MIX_MATH_OFFSET + i // 2)


def _arithmetic(i: int) -> GenExample:
    r = random.Random(f"arithmetic:{i}")
    op = r.choice("+-*")
    if op == "+":
        a, b = r.randint(2, 49), r.randint(2, 49)
    elif op == "-":
        a, b = r.randint(10, 59), r.randint(2, 9)
    else:
        a, b = r.randint(2, 9), r.randint(2, 9)
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = f"What is {a} {op} {b}?"
    return GenExample(id=f"arithmetic/{i}", prompt=f"Question: {question}\nAnswer:", messages=_chat(question),
                      target=answer, doc={"a": a, "b": b, "op": op})


QUERY_SETS = {"synth_math": _synth_math, "synth_math_chat": _synth_math_chat, "instructions": _instructions,
              "chat_mix": _chat_mix, "arithmetic": _arithmetic}


def query(name: str, i: int) -> GenExample:
    """Query `i` of the built-in set `name`."""
    if name not in QUERY_SETS:
        raise UserError(f"unknown query set {name!r}; choose from {', '.join(QUERY_SETS)}")
    return QUERY_SETS[name](i)


def check_query_set(name: str) -> None:
    if name not in QUERY_SETS:
        raise UserError(f"unknown query set {name!r}; choose from {', '.join(QUERY_SETS)}")

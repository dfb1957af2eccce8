"""A dense, verifiable process reward: how many of the worked solution's numbers a reply writes.

A 0/1 answer reward gives GRPO no signal when every answer of a group is wrong, which is
what a tiny model's math groups mostly are: the speedrun's SFT model writes the solution's
steps in the right form but miscopies a number from the question or miscomputes one step
("In 10 years ... 2 x 10 = 4x + 10"). Scoring the reply's numbers against the reference
worked solution (the synthetic problems carry one, `qwen25.data.mathgen`) gives partial
credit for each number copied or computed right, so answers that are all wrong still differ.

The score is the F1 of the two multisets of number tokens: recall rewards writing the
solution's numbers, precision penalises writing other ones, so neither a shorter reply nor
a reply listing many numbers scores higher than a correct derivation. A token keeps a
trailing variable ("6x") so that "6x" and "6" are different numbers of an equation.
"""

from __future__ import annotations

import re
from collections import Counter

# a number (commas allowed as thousands separators, a decimal part) and an optional
# variable letter right after it, e.g. "1,200", "2.5", "6x"; "$" and "%" are not part of it
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?([a-z])?(?![\w])")


def number_tokens(text: str) -> Counter:
    """The multiset of number tokens of `text`, normalised ("1,200" -> "1200", "2.50" -> "2.5")."""
    out: Counter = Counter()
    for whole, frac, var in _NUMBER.findall(text):
        token = whole.replace(",", "")
        if frac:
            frac = frac.rstrip("0").rstrip(".")
            token += frac
        out[token + (var or "")] += 1
    return out


def number_f1(reply: str, reference: str) -> float:
    """F1 between the reply's and the reference's number multisets (0 when either has none)."""
    got, want = number_tokens(reply), number_tokens(reference)
    common = sum((got & want).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def solution_f1(prompt: str, completion: str, example) -> float:
    """The reward: number F1 of the completion against the example's worked solution followed
    by its final answer (which the replies state once more), so a correct reply scores 1."""
    doc = getattr(example, "doc", None)
    reference = doc.get("solution") if isinstance(doc, dict) else None
    if not isinstance(reference, str) or not number_tokens(reference):
        raise ValueError(f"the solution_f1 reward needs a reference worked solution with numbers; "
                         f"{getattr(example, 'id', '?')!r} has none (use it with --queries synth_math or synth_math_chat)")
    if doc.get("answer") is not None:
        reference = f"{reference} {doc['answer']}"
    return number_f1(completion, reference)

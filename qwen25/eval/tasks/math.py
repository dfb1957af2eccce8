"""Math word problems with chain of thought: GSM8K, MATH-500 and the held-out synthetic math.

Answer extraction, two ways (as lm-eval reports GSM8K):
- strict: only the answer stated in the format the prompt asks for ("The answer is N." for
  GSM8K and the synthetic set; the last `\\boxed{...}` for MATH);
- flexible: the last number in the text (GSM8K, synthetic), or for MATH the last boxed
  answer, else the minerva "final answer is $X$", else the last `$...$` span.

Numbers compare as exact decimals after dropping thousands separators, a currency sign and
a trailing period ("1,000", "$1000.00" and "1000." all equal 1000). MATH answers compare as
normalised LaTeX strings (minerva's normalisation rules, written here), or as numbers when
both sides parse as one. No symbolic algebra: "\\frac{1}{2}" and "0.5" match, "x+1" and
"1+x" do not.

Scorers: `score_number(completion, example)` and `score_math(completion, example)` return
{"exact_match_strict", "exact_match_flexible"} as 0/1 floats.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from qwen25.data import mathgen
from qwen25.eval.tasks import data
from qwen25.eval.tasks.base import GenExample, Task, split_shots, with_shots

GSM8K_FILE = f"{data._TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
MATH500_FILE = f"{data._TASKS}/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"
METRICS = ("exact_match_flexible", "exact_match_strict")

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"


# ---- numbers (GSM8K, synthetic math) ---------------------------------------------------


def parse_number(text: str) -> Decimal | None:
    """'$1,234.50' -> Decimal('1234.50'); None when `text` is not a plain number."""
    t = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    try:
        return Decimal(t)
    except InvalidOperation:
        return None


def strict_number(completion: str) -> str | None:
    """The number after the last "The answer is" (or a GSM8K-style "#### N")."""
    found = re.findall(r"(?:[Tt]he (?:final )?answer is|####)\s*:?\s*(" + _NUMBER + ")", completion)
    return found[-1] if found else None


def flexible_number(completion: str) -> str | None:
    """The last number anywhere in the text."""
    found = re.findall(_NUMBER, completion)
    return found[-1] if found else None


def same_number(a: str | None, b) -> bool:
    if a is None:
        return False
    x, y = parse_number(a), parse_number(str(b))
    return x is not None and y is not None and x == y


def score_number(completion: str, example: GenExample) -> dict[str, float]:
    """GSM8K / synthetic-math scorer: strict and flexible exact match of the final number."""
    return {"exact_match_strict": float(same_number(strict_number(completion), example.target)),
            "exact_match_flexible": float(same_number(flexible_number(completion), example.target))}


# ---- LaTeX answers (MATH) --------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced, nesting kept:
    "\\boxed{\\frac{1}{2}}" -> "\\frac{1}{2}". Also "\\boxed 5" (no braces)."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    i = text.index("{", at) if "{" in text[at:at + 8] else -1
    if i < 0:  # "\boxed 5$"
        m = re.match(r"\\boxed\s+([^\s$]+)", text[at:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: the answer was cut off


_UNITS = ("degrees", "degree", "cm", "centimeters", "meters", "meter", "inches", "inch", "feet",
          "foot", "units", "unit", "dollars", "dollar", "cents", "square", "sq", "mph", "hours",
          "hour", "minutes", "minute", "seconds", "second", "km", "miles", "mile")


def normalize_latex(answer: str) -> str:
    """A canonical string for a final answer (minerva's rules): no spacing commands, no
    \\left/\\right, \\dfrac -> \\frac, \\frac12 -> \\frac{1}{2}, no \\text{} wrappers, units,
    degree signs, dollar signs or trailing periods; "x = 5" -> "5"."""
    s = answer.strip()
    s = re.sub(r"\\text\{\s*(" + "|".join(_UNITS) + r")\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{(.*?)\}", r"\1", s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                     ("\\:", ""), ("\\ ", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+(" + "|".join(_UNITS) + r")\b", "", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d[\d,]*(\.\d+)?", s) and "," in s and re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # thousands separators only (not a tuple "1,2")
    return s


def _as_number(s: str) -> Decimal | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s)
    if m and int(m.group(3)) != 0:
        v = Decimal(m.group(2)) / Decimal(m.group(3))
        return -v if m.group(1) else v
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def same_latex(a: str | None, b: str) -> bool:
    if a is None:
        return False
    x, y = normalize_latex(a), normalize_latex(b)
    if x == y:
        return True
    nx, ny = _as_number(x), _as_number(y)
    return nx is not None and ny is not None and abs(nx - ny) <= Decimal("1e-9") * max(1, abs(ny))


def flexible_latex(completion: str) -> str | None:
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    m = re.findall(r"final answer is\s*\$(.+?)\$", completion)
    if m:
        return m[-1]
    spans = re.findall(r"\$([^$]+)\$", completion)
    return spans[-1] if spans else None


def score_math(completion: str, example: GenExample) -> dict[str, float]:
    """MATH scorer: strict = last \\boxed{}; flexible = boxed, "final answer is $X$", last $..$."""
    return {"exact_match_strict": float(same_latex(last_boxed(completion), example.target)),
            "exact_match_flexible": float(same_latex(flexible_latex(completion), example.target))}


# ---- loaders ---------------------------------------------------------------------------

COT_INSTRUCTION = ("Solve the problem step by step. End your answer with "
                   "\"The answer is N.\" where N is the final number.")


def _chat(instruction: str, shots: list[tuple[str, str]], question: str) -> tuple[dict, ...]:
    msgs = []
    for q, a in shots:
        msgs += [{"role": "user", "content": f"{instruction}\n\n{q}"}, {"role": "assistant", "content": a}]
    return tuple(msgs + [{"role": "user", "content": f"{instruction}\n\n{question}"}])


def _qa_pairs(shots: list[str], q_prefix: str, a_prefix: str) -> list[tuple[str, str]]:
    pairs = []
    for s in shots:
        q, _, a = s.partition(a_prefix)
        pairs.append((q.removeprefix(q_prefix).strip(), a.strip()))
    return pairs


def _gsm8k(k: int) -> list[GenExample]:
    out = []
    for row in data.olmo_docs(GSM8K_FILE):
        doc = row["doc"]
        query = f"Question: {doc['question']}\nAnswer:"
        shots = split_shots(row["context"], query)
        out.append(GenExample(
            id=f"gsm8k/{row['doc_id']}", prompt=with_shots(shots, query, k),
            messages=_chat(COT_INSTRUCTION, _qa_pairs(shots[:k], "Question:", "\nAnswer:"), doc["question"]),
            target=doc["short_answer"], stop=("\n\nQuestion:", "Question:", "\n\n"), max_new_tokens=256,
            doc=doc))
    return out


MATH_INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."


def _math500(k: int) -> list[GenExample]:
    out = []
    for row in data.olmo_docs(MATH500_FILE):
        doc = row["doc"]
        shots = split_shots(row["context"], doc["query"], boundary=r"\n\n(?=Problem:\n)")
        target = last_boxed(doc["solution"]) or doc["answer"]
        out.append(GenExample(
            id=f"math500/{doc['index']}", prompt=with_shots(shots, doc["query"], k),
            messages=_chat(MATH_INSTRUCTION, _qa_pairs(shots[:k], "Problem:", "\n\nSolution:"), doc["problem"]),
            target=target, stop=("\n\nProblem:", "Problem:", "I hope it is correct."), max_new_tokens=512,
            doc=doc))
    return out


SYNTH_HELD_OUT = 500  # held-out synthetic problems evaluated (test families only)


def _synth_text(p: dict) -> tuple[str, str]:
    return f"Problem: {p['question']}\nSolution:", f" {p['solution']}\nThe answer is {p['answer']}."


def _mathgen(k: int) -> list[GenExample]:
    shots = [_synth_text(p) for p in mathgen.problems("train", k)]
    prefix = "".join(q + a + "\n\n" for q, a in shots)
    out = []
    for p in mathgen.problems("test", SYNTH_HELD_OUT):
        q, _ = _synth_text(p)
        out.append(GenExample(
            id=p["id"], prompt=prefix + q,
            messages=_chat(COT_INSTRUCTION, [(s["question"], f"{s['solution']}\nThe answer is {s['answer']}.")
                                             for s in mathgen.problems("train", k)], p["question"]),
            target=str(p["answer"]), stop=("\n\nProblem:", "Problem:", "\n\n"), max_new_tokens=128, doc=p))
    return out


TASKS = [
    Task("gsm8k", "gen", METRICS, _gsm8k, default_fewshot=8, max_fewshot=8, score=score_number,
         description="GSM8K test (1,319), 8-shot chain of thought"),
    Task("math500", "gen", METRICS, _math500, default_fewshot=4, max_fewshot=4, score=score_math,
         description="MATH-500 (minerva prompt, 4-shot)"),
    Task("synth_math", "gen", METRICS, _mathgen, default_fewshot=4, max_fewshot=16, score=score_number,
         description=f"built-in synthetic math, {SYNTH_HELD_OUT} held-out problems (test families)"),
]

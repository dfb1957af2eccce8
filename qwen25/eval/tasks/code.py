"""Code generation: HumanEval (164) and MBPP (500 test problems), pass@k.

A completion is turned into a program (`humaneval_program`, `mbpp_program`) and run by
`qwen25.eval.sandbox.run_python` in its own limited process; it passes when the tests exit
cleanly. pass@k uses the unbiased estimator of Chen et al. (2021):
    pass@k = 1 - C(n - c, k) / C(n, k)
for n samples of which c pass, averaged over problems (computed as a stable product).

Prompts:
- HumanEval, base model: the function signature and docstring; the model writes the body
  (stop at a new top-level statement). Chat: the prompt in a code block, the reply's first
  code block is taken, and the original prompt's imports are prepended.
- MBPP (oe-eval's format): the problem text and one test in a markdown block, then
  "```python\\n"; stop at the end of the block or a new top-level statement. The program
  is the completion, the test set-up code and every assert of `test_list`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence

from qwen25.eval.sandbox import Limits, run_python
from qwen25.eval.tasks import data
from qwen25.eval.tasks.base import GenExample, Task

HUMANEVAL_FILE = f"{data._TASKS}/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"
MBPP_FILE = f"{data._TASKS}/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"
LIMITS = Limits(timeout_s=10, cpu_s=10, memory_mb=1024)
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod (1 - k / i)
        prod *= 1.0 - k / i
    return 1.0 - prod


def first_code_block(text: str) -> str:
    """The code of a completion that holds ``` fences.

    A base-model completion continues a prompt that opened the block, so its first fence
    closes it: the code is what comes before (recognised by code before the fence and no
    language tag after it). Otherwise the body of the first fenced block (language tag
    dropped); `text` itself when there is no fence.
    """
    at = text.find("```")
    if at < 0:
        return text
    before = text[:at]
    tagged = re.match(r"```[a-zA-Z0-9_+-]+\n", text[at:])
    if not tagged and re.search(r"^\s*(def |class |import |from |return |[A-Za-z_]\w* = )", before, flags=re.M):
        return before
    m = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", text, flags=re.S)
    return m.group(1) if m else before


def _imports(prompt: str) -> str:
    return "\n".join(l for l in prompt.splitlines() if re.match(r"\s*(import|from)\s", l))


def humaneval_program(completion: str, doc: dict) -> str:
    """The program that checks one HumanEval completion: a body continuing the prompt, or
    (a reply with a code block) the block, completed with the prompt when it lacks the
    function itself."""
    if "```" in completion:
        code = first_code_block(completion)
        body = code if f"def {doc['entry_point']}" in code else doc["prompt"] + code
        head = _imports(doc["prompt"])
        solution = (head + "\n" + body) if head else body
    else:
        solution = doc["prompt"] + completion
    return f"{solution}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(completion: str, doc: dict) -> str:
    """The program that checks one MBPP completion: its code, set-up, then every assert."""
    code = first_code_block(completion)
    tests = "\n".join(doc["test_list"])
    return f"{code}\n\n{doc.get('test_setup_code') or ''}\n{tests}\n"


def score_program(program: str, limits: Limits = LIMITS) -> dict[str, float]:
    """1.0 when the program runs to its end and exits cleanly. A fresh random marker printed
    as the last statement must be the last line of stdout: a completion that calls
    `sys.exit(0)` / `os._exit(0)` before the tests finish would otherwise pass."""
    marker = "qwen25-done-" + secrets.token_hex(8)
    r = run_python(f"{program}\n\nprint({marker!r}, flush=True)\n", limits)
    lines = r.stdout.rstrip("\n").rsplit("\n", 1)
    return {"pass@1": float(r.passed and lines[-1] == marker)}


def score_humaneval(completion: str, example: GenExample) -> dict[str, float]:
    """1.0 when the completion passes the problem's tests in the sandbox (one sample)."""
    return score_program(humaneval_program(completion, example.doc))


def score_mbpp(completion: str, example: GenExample) -> dict[str, float]:
    return score_program(mbpp_program(completion, example.doc))


def pass_at_ks(passed: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems, for each k not larger than every problem's sample count."""
    out = {}
    for k in ks:
        if passed and all(len(p) >= k for p in passed):
            out[f"pass@{k}"] = sum(pass_at_k(len(p), sum(p), k) for p in passed) / len(passed)
    return out


def _humaneval(k: int) -> list[GenExample]:
    out = []
    for row in data.olmo_docs(HUMANEVAL_FILE):
        doc = row["doc"]
        msg = ("Complete the following Python function. Reply with the whole function in one "
               f"```python code block.\n\n```python\n{doc['prompt']}```")
        out.append(GenExample(id=doc["task_id"], prompt=doc["prompt"],
                              messages=({"role": "user", "content": msg},), target=doc["entry_point"],
                              stop=HUMANEVAL_STOP, max_new_tokens=384, doc=doc))
    return out


def _mbpp(k: int) -> list[GenExample]:
    out = []
    for row in data.olmo_docs(MBPP_FILE):
        doc, req = row["doc"], row["request"]
        msg = (f"{doc['text']} Your code should pass this test:\n{doc['test_list'][0]}\n"
               "Reply with the code in one ```python code block.")
        out.append(GenExample(id=f"mbpp/{doc['task_id']}", prompt=row["context"],
                              messages=({"role": "user", "content": msg},), target=tuple(doc["test_list"]),
                              stop=tuple(req.get("stop_sequences") or ("\n```",)), max_new_tokens=384,
                              doc=doc))
    return out


TASKS = [
    Task("humaneval", "gen", ("pass@1",), _humaneval, score=score_humaneval,
         description="HumanEval (164), run in the sandbox"),
    Task("mbpp", "gen", ("pass@1",), _mbpp, score=score_mbpp,
         description="MBPP test (500), run in the sandbox"),
]

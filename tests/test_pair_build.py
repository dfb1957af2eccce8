"""Verifier-built pairs: the answer judge, pairing passing with failing samples, provenance,
training-split queries only, multiple-choice pairs, and `qwen25 pairs build` end to end on
the real engine (tiny random model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from preference_support import lm_folder, train_small_tokenizer
from qwen25.cli import main
from qwen25.data import mathgen
from qwen25.data.pair_build import (BuildStats, final_number, instruction_queries, mathgen_mc_rows,
                                    mathgen_queries, mc_pair, sampled_pairs)
from qwen25.data.preference import load_pairs


def test_final_number_reads_boxed_then_last_number():
    assert final_number("3 x 4 = 12.\nThe final answer is $\\boxed{12}$.") == 12
    assert final_number("It is 1,250 dollars") == 1250
    assert final_number("first 3 then \\boxed{7} and 9") == 7
    assert final_number("no digits") is None
    p = mathgen.problem("train", 5)
    assert final_number(f"{p['solution']}\nThe final answer is $\\boxed{{{p['answer']}}}$.") == p["answer"]


@dataclass
class _Sample:
    tokens: list = field(default_factory=list)
    finish_reason: str = "stop"


class ScriptedEngine:
    """Stands in for the engine: sample j of query i answers scripts[i][j] (text)."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts, self.calls = tok, scripts, []

    def generate(self, prompts, n=1, **kw):
        self.calls.append((len(prompts), n, kw))
        start = sum(c[0] for c in self.calls[:-1])
        return [_Sample(self.tok.encode(self.scripts[start + i][j]))
                for i in range(len(prompts)) for j in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("pb"))


def test_pairs_join_a_passing_and_a_failing_answer_with_provenance(tok):
    queries = list(mathgen_queries(4, offset=100))
    ans = [q.reference for q in queries]
    scripts = [
        [f"\\boxed{{{ans[0]}}}", f"\\boxed{{{ans[0] + 1}}}", f"\\boxed{{{ans[0]}}}"],  # 2 pass, 1 fail
        [f"\\boxed{{{ans[1]}}}"] * 3,  # all pass: no pair
        ["\\boxed{0.5}", "nothing", "\\boxed{-3}"],  # all fail: no pair
        [f"It is {ans[3] + 2}", f"so {ans[3]}", f"= {ans[3]}"],
    ]
    engine = ScriptedEngine(tok, scripts)
    stats = BuildStats()
    rows = list(sampled_pairs(engine, tok, queries, samples=3, temperature=0.8, top_p=0.9, max_new_tokens=32,
                              seed=4, pairs_per_query=2, source="mathgen", model="m", stats=stats, chunk=3))
    assert [r["provenance"]["query_id"] for r in rows] == [queries[0].id, queries[3].id]
    assert (stats.queries, stats.all_pass, stats.all_fail, stats.pairs) == (4, 1, 1, 2)
    assert stats.passed == 2 + 3 + 0 + 2
    for r, q in zip(rows, (queries[0], queries[3])):
        assert q.judge(r["chosen"][0]["content"]) == 1.0 and q.judge(r["rejected"][0]["content"]) == 0.0
        assert r["prompt"] == q.messages
        prov = r["provenance"]
        assert prov["reference"] == q.reference and prov["sampling"]["temperature"] == 0.8
        assert prov["pass_rate"] == pytest.approx(2 / 3)
    assert engine.calls[0][1] == 3 and engine.calls[0][2]["seed"] == 4  # n samples, seeded


def test_queries_come_from_the_training_split_only():
    test_questions = {p["question"] for p in mathgen.problems("test", 200)}
    qs = list(mathgen_queries(50, offset=100_000))
    assert all(q.id.startswith("math-train-") for q in qs)
    assert not test_questions & {q.messages[0]["content"] for q in qs}
    rows = list(mathgen_mc_rows(20, 100_000, seed=0))
    assert all(r["id"].startswith("math-train-") for r in rows)


def test_instruction_queries_are_judged_by_the_ifeval_checkers():
    """The judge of an instruction prompt is if-verifiable's IFEval verdict (the reference
    library, called here directly): the built-in reply passes, the same reply with its
    constraints undone fails; prompts lie past the SFT rows' indices."""
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    from qwen25.data.sft_builtin import instruction_row

    qs = list(instruction_queries(40, offset=100_000))
    assert all(int(q.id.rsplit("-", 1)[1]) >= 200_000 for q in qs)
    verdicts = []
    for q in qs:
        i = int(q.id.rsplit("-", 1)[1])
        row = instruction_row("train", i)
        good = row["messages"][1]["content"]
        p = mathgen.problem("train", i)
        plain = f"{p['solution']}, So The Answer Is {p['answer']}."  # capitals, a comma, no wrapper/ending
        for text in (good, plain):
            _, ref = evaluate_instructions(text, row["instruction_id_list"], row["kwargs"], q.messages[0]["content"],
                                           INSTRUCTION_DICT)
            assert q.judge(text) == float(ref.binary_strict)
            verdicts.append(q.judge(text))
        assert q.judge(good) == 1.0
    assert 0 in verdicts  # the plain reply breaks constraints


def test_multiple_choice_pairs_are_correct_vs_distractor():
    row = {"id": "q1", "question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}
    p = mc_pair(row, seed=0)
    assert "(B) 4" in p["chosen"][0]["content"]
    assert p["rejected"][0]["content"] != p["chosen"][0]["content"]
    assert p["provenance"]["gold"] == "B" and p["provenance"]["distractor"] in "AC"
    for r in mathgen_mc_rows(10, 0, seed=1):
        assert len(set(r["choices"])) == 4 and mathgen.problem("train", int(r["id"].rsplit("-", 1)[1]))["answer"] \
            == int(r["choices"][r["answer"]])


def test_cli_build_on_the_real_engine_writes_loadable_pairs(tok, tmp_path):
    sft = lm_folder(tmp_path, tok, 0)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "Sky colour?", "choices": ["green", "blue"], "answer": "B"}) + "\n")
    out = tmp_path / "pairs.jsonl"
    code = main(["pairs", "build", "--model", str(sft), "--tasks", "mathgen", "instructions", "mathgen-mc", str(mc),
                 "--queries", "3", "--samples", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    stats = json.loads((tmp_path / "pairs.jsonl.stats.json").read_text())
    assert stats["queries"] == 6 and stats["samples"] == 12
    assert {k: v[1] for k, v in stats["sampled_by_source"].items()} == {"mathgen": 6, "instructions": 6}
    assert stats["by_source"]["mathgen-mc"] == 3 and stats["by_source"][str(mc)] == 1
    pairs, pstats = load_pairs(out, tok)
    assert len(pairs) == stats["pairs"] and not pstats.dropped
    assert all("provenance" in p.meta for p in pairs)
    assert main(["pairs", "build", "--model", str(sft), "--tasks", "gsm8k", "--out", str(out)]) == 2

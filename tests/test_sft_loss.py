"""The SFT loss is transformers' cross entropy over exactly the assistant tokens, in every layout.

Reference: `Qwen2ForCausalLM` (transformers) on the same weights, and a loss mask built
independently of `qwen25.chat`: transformers' own `apply_chat_template` renders the
conversation prefix by prefix, and the tokens an assistant message adds (after the
generation prompt, up to and including its `<|im_end|>`, not the newline after it) are
the targets. Tolerance: 1e-5 relative in float32. Padded, packed and padding-free batches
of the same conversations give that loss too, and the same gradients (1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import sft_support as S
from qwen25.checkpoint import load_model
from qwen25.data.chat import encode_example, shifted_labels
from qwen25.data.chat_batches import layout
from qwen25.train.sft import sft_loss

transformers = pytest.importorskip("transformers")


def _ids(out) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _hf_messages(messages):
    """OpenAI tool calls carry arguments as a JSON string; HF templates expect the object."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{"type": "function", "function": {
                "name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        out.append(m)
    return out


def reference_mask(hf_tok, messages, tools, last_only=False) -> tuple[list[int], list[int]]:
    """(ids, mask) from transformers' template rendered prefix by prefix."""
    messages = _hf_messages(messages)
    render = lambda msgs, gen=False: _ids(hf_tok.apply_chat_template(  # noqa: E731
        msgs, tools=tools, add_generation_prompt=gen, tokenize=True))
    full = render(messages)
    mask = [0] * len(full)
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    for k in turns[-1:] if last_only else turns:
        start = len(render(messages[:k], gen=True))
        upto = render(messages[:k + 1])
        assert full[:len(upto)] == upto, "the template is not prefix-stable here"
        end = len(upto) - 1  # drop the newline after <|im_end|>
        assert upto[end - 1] == im_end
        mask[start:end] = [1] * (end - start)
    return full, mask


@pytest.fixture(scope="module")
def setup():
    tok = S.tokenizer()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(S.tokenizer_dir()))
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(S.model_dir()), torch_dtype=torch.float32).eval()
    ours = load_model(S.model_dir(), dtype=torch.float32).eval()
    return tok, hf_tok, hf, ours


def _reference_loss(hf, hf_tok, rows, last_only=False) -> tuple[float, int]:
    total, count = 0.0, 0
    for row in rows:
        ids, mask = reference_mask(hf_tok, row["messages"], row.get("tools"), last_only)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].float()
        target = torch.tensor(ids[1:])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        total += F.cross_entropy(logits[:-1][keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total, count


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_mask_equals_the_prefix_by_prefix_reference(setup, train_on):
    tok, hf_tok, _, _ = setup
    for row in S.conversations():
        ex = encode_example(tok, row, train_on)
        ids, mask = reference_mask(hf_tok, row["messages"], row.get("tools"), last_only=train_on == "last")
        assert list(ex.ids) == ids
        assert list(ex.labels) == shifted_labels(ids, mask)


@pytest.mark.parametrize("how", ["pad", "pack", "padding_free"])
def test_batch_loss_equals_transformers_cross_entropy(setup, how):
    tok, hf_tok, hf, ours = setup
    rows = S.conversations()[:6]
    examples = [encode_example(tok, r) for r in rows]
    ref_sum, ref_count = _reference_loss(hf, hf_tok, rows)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in layout(examples, how, micro_batch=2, seq_len=1200):
            ce, n = sft_loss(ours, batch, ours.config)
            total, count = total + ce.item(), count + int(n)
    assert count == ref_count
    assert total / count == pytest.approx(ref_sum / ref_count, rel=1e-5)


def test_packed_and_padding_free_gradients_equal_one_conversation_per_row(setup):
    tok, _, _, _ = setup
    examples = [encode_example(tok, r) for r in S.conversations()[:5]]
    grads = {}
    for how in ("pad", "pack", "padding_free"):
        model = load_model(S.model_dir(), dtype=torch.float32).train()
        total = torch.zeros(())
        n = 0
        for batch in layout(examples, how, micro_batch=1 if how == "pad" else 2, seq_len=1200):
            ce, c = sft_loss(model, batch, model.config)
            total, n = total + ce, n + int(c)
        (total / n).backward()
        grads[how] = {k: p.grad.clone() for k, p in model.named_parameters()}
    for how in ("pack", "padding_free"):
        for k, g in grads["pad"].items():
            torch.testing.assert_close(grads[how][k], g, rtol=1e-5, atol=1e-6, msg=f"{how}: {k}")


def test_packed_rows_never_attend_across_conversations(setup):
    """Each conversation of a packed row has the logits it has alone (positions restart, no
    attention across the boundary); 1e-5 absolute (SDPA sums over rows of another length),
    where attending to the neighbour would move them by ~1e-1."""
    tok, _, _, ours = setup
    a, b = (encode_example(tok, r) for r in S.conversations()[:2])
    row = layout([a, b], "pack", micro_batch=1, seq_len=2000)[0]
    assert row["input_ids"].shape == (1, len(a) + len(b))
    with torch.no_grad():
        packed = ours(row["input_ids"], positions=row["position_ids"], attention_mask=row["attention_mask"])[0]
        alone_a = ours(torch.tensor([a.ids]))[0]
        alone_b = ours(torch.tensor([b.ids]))[0]
        leaky = ours(row["input_ids"])[0]  # the same row with plain causal attention
    torch.testing.assert_close(packed[:len(a)], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[len(a):], alone_b, rtol=0, atol=1e-5)
    assert (leaky[len(a):] - alone_b).abs().max() > 1e-2  # the check would see a leak

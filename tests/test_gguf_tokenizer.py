"""GGUF tokenizers: ids equal transformers' own GGUF tokenizer (SmolLM2, the `smollm`
pre-tokenizer) on 2,000+ strings, exactly; the pre-tokenizer table; unknown values are errors.

The strings: 1,200 hypothesis-generated ones (any Unicode, plus a whitespace/digit/code
alphabet), and ~900 fixed ones: stdlib source code, stdlib docstrings (English prose), CJK,
emoji (ZWJ sequences, flags, skin tones), whitespace runs, digits, the control tokens' text.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen25.formats.gguf_file import GGUFError


def _fixed_strings() -> list[str]:
    import argparse
    import collections
    import email.message
    import json as json_mod
    import textwrap as tw

    out: list[str] = []
    for mod in (json_mod, tw, collections, argparse):
        src = inspect.getsource(mod)
        lines = src.splitlines(keepends=True)
        out += ["".join(lines[i:i + 6]) for i in range(0, min(len(lines), 1200), 6)]  # code
    for obj in (argparse, collections, email.message, json_mod, tw, inspect):
        doc = inspect.getdoc(obj) or ""
        out += [p for p in doc.split("\n\n") if p.strip()][:40]  # prose
    out += [
        "日本語のテキストと漢字、ひらがな、カタカナ。", "中文文本：你好，世界！这是一个测试。", "한국어 문장입니다.",
        "混合 mixed 文本 with English と日本語", "Ünïcödé àccents: café, naïve, Straße, Ærøskøbing",
        "Русский текст, и ещё немного.", "العربية من اليمين إلى اليسار", "עברית", "ελληνικά γράμματα",
        "😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🏳️‍🌈", "emoji🙂inside😉words", "⌘⌥⇧ ∑∫√∞ ≠≤≥ ← → ↑ ↓",
        "   leading", "trailing   ", "\t\ttabs\tand\tmore\t", "\n\n\nnewlines\n\n", "\r\nwindows\r\nlines",
        " " * 17, "\t" * 9, "\n" * 12, " \n \n\t \u00a0 \u3000 x", "a" * 300, "ab" * 150,
        "1234567890", "3.14159265358979", "1,000,000 and 2025-12-02T09:00Z", "0x7fff_ffff",
        "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "<repo_name>x<file_sep>y",
        "print('hello')  # comment", "if (a && b || !c) { return x->y[0]; }", "$ ls -la | grep '.py'",
        "SELECT * FROM t WHERE x = 'y';", "https://example.com/a/b?c=d&e=f#g", "user@example.com",
        "don't won't it's I'm we're they've you'll he'd", "DON'T WON'T IT'S", "",
    ]
    for w in (" ", "  ", "\t", "\n", " \n"):  # whitespace runs between words
        out += [w.join(["alpha", "beta", "gamma", "12", "δ", "🙂"]) * k for k in (1, 3)]
    return out


FIXED = _fixed_strings()
TEXT = st.text(max_size=80)
CODEY = st.text(alphabet=st.sampled_from(list(" \t\n\r0123456789abcXYZ_(){}[]<>:;'\".,!?#=+-*/\\|@$%^&~`é日🙂")),
                max_size=60)


def _check(ours, hf, s: str) -> None:
    ids = ours.encode(s, allow_special=True)  # HF matches added tokens in text too
    assert ids == hf(s, add_special_tokens=False).input_ids, repr(s)
    assert ours.decode(ids) == hf.decode(ids), repr(s)


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
def test_fixed_strings_equal_transformers(smollm2_tokenizer, smollm2_hf_tokenizer):
    assert len(FIXED) >= 800
    for s in FIXED:
        _check(smollm2_tokenizer, smollm2_hf_tokenizer, s)


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
@settings(max_examples=1200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(TEXT, CODEY))
def test_generated_strings_equal_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, s):
    _check(smollm2_tokenizer, smollm2_hf_tokenizer, s)


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
def test_special_ids_and_template(smollm2_tokenizer, smollm2_hf_tokenizer):
    ours, hf = smollm2_tokenizer, smollm2_hf_tokenizer
    assert (ours.eos_token, ours.bos_token, ours.pad_token) == (hf.eos_token, hf.bos_token, hf.pad_token)
    assert (ours.eos_token_id, ours.bos_token_id) == (hf.eos_token_id, hf.bos_token_id) == (2, 1)
    assert len(ours) == len(hf) == 49152
    assert ours.chat_template == hf.chat_template
    assert 2 in ours.stop_token_ids
    # control tokens are special (dropped by skip_special_tokens), as in transformers
    ids = ours.encode("<|im_start|>hi<|im_end|>", allow_special=True)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "hi"


def test_pre_tokenizer_table_builds_in_hf_tokenizers():
    """Every entry is a valid tokenizers pipeline; the regexes split as documented."""
    from tokenizers import Tokenizer

    from qwen25.tokenizer.gguf import PRE_TOKENIZERS

    def pieces(pre: dict, text: str) -> list[str]:
        data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                "normalizer": None, "pre_tokenizer": pre, "post_processor": None, "decoder": None,
                "model": {"type": "BPE", "vocab": {}, "merges": []}}
        return [p for p, _ in Tokenizer.from_str(json.dumps(data)).pre_tokenizer.pre_tokenize_str(text)]

    assert set(PRE_TOKENIZERS) >= {"gpt2", "smollm", "qwen2", "llama-bpe"}
    # smollm: digits one by one; gpt2 keeps a digit run; llama-bpe groups digits in threes
    assert pieces(PRE_TOKENIZERS["smollm"], "ab 1234") == ["ab", "Ġ", "1", "2", "3", "4"]
    assert pieces(PRE_TOKENIZERS["gpt2"], "ab 1234") == ["ab", "Ġ1234"]
    assert pieces(PRE_TOKENIZERS["llama-bpe"], "ab 1234") == ["ab", "Ġ", "123", "4"]
    assert pieces(PRE_TOKENIZERS["qwen2"], "ab 1234") == ["ab", "Ġ", "1", "2", "3", "4"]


def test_gguf_without_a_known_pre_is_an_error(tmp_path):
    from gguf_writer import write_vocab_only

    from qwen25.tokenizer.gguf import load_gguf_tokenizer

    path = write_vocab_only(tmp_path / "v.gguf", pre="tekken")
    with pytest.raises(GGUFError, match="tokenizer.ggml.pre='tekken' is not a pre-tokenizer"):
        load_gguf_tokenizer(path)
    path = write_vocab_only(tmp_path / "sp.gguf", model="llama")
    with pytest.raises(GGUFError, match="tokenizer.ggml.model='llama'"):
        load_gguf_tokenizer(path)


def test_small_gguf_vocab_encodes_like_transformers(tmp_path):
    """A synthetic gpt2-pre vocabulary: ids and decode equal transformers' GGUF tokenizer."""
    from gguf_writer import write_vocab_only
    from transformers import AutoTokenizer

    from qwen25.tokenizer.gguf import load_gguf_tokenizer

    path = write_vocab_only(tmp_path / "v.gguf", pre="gpt2")
    ours = load_gguf_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="v.gguf")
    for s in ("hello world", "hello  world\n\n", "ab ab ab", "héllo 🙂", textwrap.dedent(" x\n  y")):
        _check(ours, hf, s)

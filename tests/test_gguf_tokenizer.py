r"""GGUF tokenizers: ids equal transformers' own GGUF tokenizer (SmolLM2, the `smollm`
pre-tokenizer) on 2,000+ strings, exactly; the pre-tokenizer table; unknown values are errors.

One known gap in the reference: transformers has no entry for `tokenizer.ggml.pre = "smollm"`
and falls back to GPT-2's split, while SmolLM2's own tokenizer.json (and llama.cpp's
"smollm" regex, chosen to reproduce it) first cuts every numeric character (`\p{N}`, which
includes "¼" and "²") on its own. We follow the model's tokenizer. So every string is
checked against transformers' GGUF tokenizer with SmolLM2's published pre-tokenizer
(Digits(individual_digits) + ByteLevel) put in, and strings without numeric characters,
where the two splits agree, against transformers' GGUF tokenizer exactly as it is.

The strings: 1,200 hypothesis-generated ones (any Unicode, plus a whitespace/digit/code
alphabet), and ~900 fixed ones: stdlib source code, stdlib docstrings (English prose), CJK,
emoji (ZWJ sequences, flags, skin tones), whitespace runs, digits, the control tokens' text.
"""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import regex
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
    for mod in (json_mod, tw, collections, argparse, inspect):
        src = inspect.getsource(mod)
        lines = src.splitlines(keepends=True)
        out += ["".join(lines[i:i + 4]) for i in range(0, min(len(lines), 1200), 4)]  # code
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
        "1234567890", "3.14159265358979", "½ cup, ¼ tsp, x² + y³, ① ② ③, Ⅻ, ٣٤٥", "1,000,000 and 2025-12-02T09:00Z", "0x7fff_ffff",
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


_NUMERIC = regex.compile(r"\p{N}")


def _check(ours, hf, s: str, reference=None) -> None:
    """ours vs `reference` (a tokenizers.Tokenizer) when given, and vs the transformers
    tokenizer `hf` itself wherever its split is not known to differ."""
    ids = ours.encode(s, allow_special=True)  # HF matches added tokens in text too
    if reference is not None:
        assert ids == reference.encode(s, add_special_tokens=False).ids, repr(s)
    if reference is None or not _NUMERIC.search(s):
        assert ids == hf(s, add_special_tokens=False).input_ids, repr(s)
    assert ours.decode(ids) == hf.decode(ids), repr(s)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_hf_tokenizer):
    """transformers' GGUF tokenizer (vocabulary, merges, added tokens as it reads them) with
    the pre-tokenizer of SmolLM2's published tokenizer.json."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_str(smollm2_hf_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
def test_fixed_strings_equal_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, smollm2_reference):
    assert len(FIXED) >= 800
    for s in FIXED:
        _check(smollm2_tokenizer, smollm2_hf_tokenizer, s, smollm2_reference)


@pytest.mark.real
@pytest.mark.xdist_group("smollm2")
@settings(max_examples=1200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(TEXT, CODEY))
def test_generated_strings_equal_transformers(smollm2_tokenizer, smollm2_hf_tokenizer, smollm2_reference, s):
    _check(smollm2_tokenizer, smollm2_hf_tokenizer, s, smollm2_reference)


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


def _write_qwen_vocab(path):
    import gguf

    from qwen25.formats import gguf_names as names
    from qwen25.tokenizer import qwen
    from qwen25.tokenizer.hf import _builtin_vocab_and_merges

    vocab, merges = _builtin_vocab_and_merges()
    tokens = sorted(vocab, key=vocab.__getitem__) + [t for t, _ in qwen.CONTROL_TOKENS]
    types = [names.TOKEN_NORMAL] * qwen.NUM_REGULAR + [names.TOKEN_CONTROL] * len(qwen.CONTROL_TOKENS)
    merge_strs = [f"{a} {b}" for a, b in merges]
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merge_strs)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template(qwen.chat_template())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
def test_qwen2_gguf_with_the_builtin_vocab_takes_the_fast_path(tmp_path):
    """A qwen2 file holding exactly Qwen2's vocabulary -> the built-in tokenizer (tiktoken);
    ids equal transformers' GGUF tokenizer on NFC text (llama.cpp and transformers apply no
    NFC to GGUF vocabularies; Qwen's own tokenizer.json does)."""
    from transformers import AutoTokenizer

    from qwen25.tokenizer.bpe import TiktokenEngine
    from qwen25.tokenizer.gguf import load_gguf_tokenizer

    path = _write_qwen_vocab(tmp_path / "qwen.gguf")
    ours = load_gguf_tokenizer(path)
    assert isinstance(ours._engine, TiktokenEngine)
    assert ours.eos_token == "<|im_end|>" and ours.chat_template is not None
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="qwen.gguf")
    for s in FIXED[::4]:
        _check(ours, hf, s)
    # one merge short of Qwen2's: not the built-in vocabulary (checked on the parsed lists)
    from qwen25.formats.gguf_file import open_gguf
    from qwen25.tokenizer.gguf import _is_qwen2_vocab

    g = open_gguf(path)
    tokens, merges = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.merges")
    assert _is_qwen2_vocab(tokens, merges) and not _is_qwen2_vocab(tokens, merges[:-1])

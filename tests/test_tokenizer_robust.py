"""Hostile input: megabyte runs, lone surrogates, bytes. Encode or fail clearly, never crash.

Plain tiktoken panics (an uncatchable-by-`Exception` PanicException) on ~1M blank
characters; our engine cuts such runs out (engine._long_blank_runs). Its ids are checked
against tiktoken with the canonical regex on runs long enough to take that path but short
enough for tiktoken (16k-60k characters). The timeouts only catch hangs.
"""

from __future__ import annotations

import random
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer_support import builtin, hf_plain, tiktoken_reference

from qwen25.errors import UserError
from qwen25.tokenizer.bpe import _BLANK, _SAMPLE, _long_blank_runs

MB = 1_000_000
pytestmark = pytest.mark.timeout(300)


def reference(text: str) -> list[int]:
    return tiktoken_reference().encode_ordinary(text)  # NFC-stable inputs only


@pytest.mark.parametrize("char", [" ", "\t", "\u3000", "\xa0", "a", "^", "\n", "7", "'", "é", "\r\n"])
def test_one_megabyte_of_one_character(char):
    tok = builtin()
    text = char * (MB // len(char.encode("utf-8")))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    short = char * (3 * _SAMPLE)  # long enough for the guard, short enough for tiktoken
    assert tok.encode(short) == reference(short)
    assert tok.encode("x" + short + "y") == reference("x" + short + "y")


def test_one_megabyte_of_mixed_blanks_and_around_words():
    tok = builtin()
    for unit in [" \t", "\t \u3000", " \xa0 "]:
        text = "word" + unit * (MB // 4) + "!next\n"
        assert tok.decode(tok.encode(text)) == text
        short = "word" + unit * _SAMPLE + "!next\n"
        assert tok.encode(short) == reference(short)


def test_one_megabyte_of_cjk_and_emoji():
    rng = random.Random(0)
    pool = [chr(c) for c in [*range(0x4E00, 0x9FFF), *range(0x1F300, 0x1F64F)]]
    text = "".join(rng.choice(pool) for _ in range(MB // 4))
    tok = builtin()
    ids = tok.encode(text)
    assert ids == reference(text)
    assert tok.decode(ids) == text
    emoji_run = "😀" * (MB // 4)
    assert tok.decode(tok.encode(emoji_run)) == emoji_run


BLANK_CASES = [
    " " * 40_000,                                  # whole text
    "abc" + " " * 40_000,                          # at the end
    " " * 40_000 + "abc",                          # before a word: last blank joins it
    "x" + " " * 40_000 + "1",                      # before a digit
    "x" + " " * 40_000 + "!",                      # before punctuation (" !" piece)
    "x" + "\t" * 40_000 + "!",                     # tab before punctuation ("\t" alone)
    "x" + " " * 40_000 + "\n y",                   # followed by a newline: left to the regex
    "x\n" + " " * 40_000 + "y",                    # after a newline
    "x!\n\n" + " " * 40_000 + "y",                 # after punctuation that eats newlines
    "a" + " \t\u3000\xa0" * 10_000 + "b",          # mixed blank characters
    ("p" + " " * 20_000) * 3 + "q",                # several runs
    "x" + " " * (2 * _SAMPLE) + "y",               # exactly at the detection bound
    "x" + " " * (2 * _SAMPLE - 1) + "y",
    " " * _SAMPLE + "z" + " " * (3 * _SAMPLE),
]


@pytest.mark.parametrize("text", BLANK_CASES, ids=range(len(BLANK_CASES)))
def test_long_blank_runs_encode_exactly_like_the_regex(text):
    assert builtin().encode(text) == reference(text)


def test_the_cases_above_do_take_the_long_run_path():
    # Otherwise the exactness checks above would only be testing plain tiktoken.
    found = [len(_long_blank_runs(t)) for t in BLANK_CASES]
    assert found == [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 3, 1, 1, 2]  # shorter runs may be found too


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.one_of(
    st.sampled_from(["a", "1", "!", "\n", "\r\n", "é", "你", " x", "'s", "\t"]),
    st.tuples(st.sampled_from([" ", "\t", "\u3000", " \t"]),
              st.integers(_SAMPLE, 3 * _SAMPLE)).map(lambda t: t[0] * t[1]),
), min_size=1, max_size=6).map("".join))
def test_hypothesis_long_blank_runs(text):
    assert builtin().encode(text) == reference(text)


def test_long_blank_run_matches_hf_tokenizers_too():
    text = "def f():\n" + " " * (3 * _SAMPLE) + "return 1"
    assert builtin().encode(text) == hf_plain().encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", ["\ud800", "ok\udfffok", "é\udc80", "<|im_end|>\ud83d"])
def test_lone_surrogates_are_a_clear_error(text):
    tok = builtin()
    for call in (lambda: tok.encode(text), lambda: tok.encode(text, allow_special=True),
                 lambda: tok.encode_batch(["fine", text], num_threads=2)):
        with pytest.raises(UserError, match="lone surrogate U\\+D[89A-F]"):
            call()


def test_bytes_input_is_a_clear_error():
    with pytest.raises(UserError, match="must be str"):
        builtin().encode(b"\xff\xfe invalid utf-8")


def test_decoding_invalid_utf8_replaces_never_raises():
    tok = builtin()
    # 0xFF alone and a truncated 3-byte sequence, as single byte tokens.
    ids = [tok.token_to_id("ÿ"), tok.token_to_id("ä"), tok.token_to_id("½"), tok.token_to_id("a")]
    assert tok.decode(ids) == b"\xff\xe4\xbda".decode("utf-8", errors="replace")
    assert tok.decode([10**9, -1, 151_700, 9707]) == "Hello"  # unknown ids drop, as in HF


def test_blank_set_is_unicode_white_space_without_newlines():
    # `\s` in tiktoken's regex engine is Unicode White_Space; the guard must know the same set.
    import regex

    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    white = set(regex.findall(r"\p{White_Space}", everything))
    assert set(_BLANK) == white - {"\r", "\n"}
    for ch in white - {"\r", "\n"}:  # and each one behaves as a blank in the guarded path
        text = "x" + ch * (2 * _SAMPLE + 5) + "y"
        assert builtin().encode(text) == reference(unicodedata.normalize("NFC", text))

"""Tool-call parsing: vs a hermes-style reference, round trips through the template, and
streaming == non-streaming for every way of cutting the text into deltas."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen25.chat import (ContentDelta, ToolCallDelta, ToolCallDone, ToolCallFailed, ToolCallStreamParser,
                         parse_tool_calls, render)


def hermes_reference(text: str):
    """vLLM's hermes parser, restated (reliability.md §1.6): all blocks must be valid JSON,
    content is the text before the first tag (None if empty)."""
    matches = re.findall(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", text, re.DOTALL)
    try:
        calls = [json.loads(a or b) for a, b in matches]
    except json.JSONDecodeError:
        return text, []
    if not calls:
        return text, []
    content = text[:text.find("<tool_call>")]
    return content or None, [{"name": c["name"], "arguments": c["arguments"]} for c in calls]


WELL_FORMED = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"a": 1, "b": true, "c": null}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"x": [1, 2, {"y": "z"}]}}\n</tool_call>\n<tool_call>\n'
    '{"name": "g", "arguments": {"q": "東京 \\"quoted\\" </tool"}}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"n": 7355608}}\n</tool_call>',
    '<tool_call>{"name":"compact","arguments":{}}</tool_call>',
    'Hi <tool_call>\n{"name": "unterminated", "arguments": {"k": "v"}}\n',
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_well_formed_output_matches_the_hermes_reference(text):
    content, calls = parse_tool_calls(text)
    ref_content, ref_calls = hermes_reference(text)
    assert calls == ref_calls
    assert content == (ref_content.rstrip() or None if ref_content else None)
    assert isinstance(calls[0]["arguments"]["n"], int) if "7355608" in text else True


def test_plain_text_is_returned_unchanged():
    for text in ["", "Hello", "  spaced  \n", "a <tool_call b", "</tool_call> only"]:
        assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>',   # trailing comma
    "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",         # single quotes
    '<tool_call>\n{"arguments": {}}\n</tool_call>',                       # no name
    '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',           # empty name
    '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',      # arguments not an object
    '<tool_call>\n["f", {}]\n</tool_call>',
    "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",                   # deep nesting
    "<tool_call></tool_call>",
])
def test_malformed_blocks_are_kept_as_text(text):
    assert parse_tool_calls(text) == (text, [])


def test_valid_and_malformed_blocks_mixed():
    good = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    bad = "<tool_call>\n{oops}\n</tool_call>"
    content, calls = parse_tool_calls("Intro.\n" + good + "\n" + bad + "\nOutro.")
    assert calls == [{"name": "f", "arguments": {"a": 1}}]
    assert content == "Intro.\n" + bad + "\nOutro."


def test_string_and_missing_arguments():
    text = ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
            '<tool_call>\n{"name": "g"}\n</tool_call>')
    assert parse_tool_calls(text) == (None, [{"name": "f", "arguments": {"a": 1}},
                                             {"name": "g", "arguments": {}}])


# ---- round trip through the template -----------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
CALL = st.fixed_dictionaries({"name": st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True),
                              "arguments": st.dictionaries(st.text(max_size=8), JSON, max_size=4)})
CONTENT = st.text(max_size=40).filter(lambda s: "<tool_call>" not in s and "</tool_call>" not in s)


def _reply(content, calls) -> str:
    """The assistant reply as the model was trained to write it (template text after
    "<|im_start|>assistant\\n", without <|im_end|>)."""
    rendered = render([{"role": "user", "content": "q"},
                       {"role": "assistant", "content": content, "tool_calls": calls}])
    return rendered.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(CONTENT, st.lists(CALL, min_size=1, max_size=3))
def test_render_then_parse_round_trips(content, calls):
    text = _reply(content, calls)
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert parsed_calls == calls
    assert parsed_content == (content.rstrip() if content.strip() else None)


# ---- streaming ----------------------------------------------------------------------------
def stream(text: str, cuts: list[int]):
    parser = ToolCallStreamParser()
    events = []
    pos = 0
    for cut in sorted(set(c % (len(text) + 1) for c in cuts)) + [len(text)]:
        events += parser.feed(text[pos:cut])
        pos = cut
    return events + parser.finish()


def check_stream(text: str, cuts: list[int]) -> None:
    events = stream(text, cuts)
    content, calls = parse_tool_calls(text)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == (content or "")
    assert all(e.text for e in events if isinstance(e, ContentDelta))
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert [{"name": e.name, "arguments": e.arguments} for e in done] == calls
    assert [e.index for e in done] == list(range(len(calls)))
    # Early deltas: the name first, then argument fragments that add up to the arguments.
    failed_at = {e.index for e in events if isinstance(e, ToolCallFailed)}
    for e in done:
        deltas = [d for d in events if isinstance(d, ToolCallDelta) and d.index == e.index]
        if e.index in failed_at or not deltas:
            continue
        assert deltas[0].name == e.name and deltas[0].arguments == ""
        assert all(d.name is None for d in deltas[1:])
        joined = "".join(d.arguments for d in deltas)
        if joined:
            assert json.loads(joined) == e.arguments


@settings(max_examples=400, deadline=None, derandomize=True)
@given(CONTENT, st.lists(CALL, max_size=3), st.lists(st.integers(0, 10_000), max_size=12))
def test_streaming_equals_parsing_for_template_replies(content, calls, cuts):
    check_stream(_reply(content, calls) if calls else content, cuts)


MESSY = WELL_FORMED + [
    "Intro.\n<tool_call>\n{bad}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n  tail  ",
    "  \n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"s\": \"}{][\"}}\n</tool_call>\n\n",
    "<tool_call>\n{\"arguments\": {\"a\": 1}, \"name\": \"args_first\"}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 2}\"}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}} trailing junk\n</tool_call>",
    "a <tool_ca b <tool_call c </tool_call> d",
    "text <tool_call>\n{\"name\": \"cut\", \"argu",
]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(MESSY), st.lists(st.integers(0, 10_000), max_size=20))
def test_streaming_equals_parsing_for_messy_output(text, cuts):
    check_stream(text, cuts)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["<tool_call>", "</tool_call>", "\n", " ", "{", "}", '"name"', ":",
                                 '"f"', ",", '"arguments"', "[", "]", "x", "é", '"', "\\"]), max_size=30).map("".join),
       st.lists(st.integers(0, 1000), max_size=8))
def test_garbage_never_raises_and_streams_consistently(text, cuts):
    check_stream(text, cuts)


def test_character_by_character_stream_of_two_calls():
    text = _reply("Checking both.", [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}])
    events = stream(text, list(range(len(text))))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "ContentDelta" and kinds.count("ToolCallDone") == 2
    assert events[-1] == ToolCallDone(1, "b", {})

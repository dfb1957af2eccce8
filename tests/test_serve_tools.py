"""Tool calls: Qwen's <tool_call> blocks <-> OpenAI tool_calls, streamed and not.

1. The conversion layer on 24 model-output fixtures, each streamed split at every character
   boundary (and character by character): the same content and the same calls as the
   non-streamed parse. Expected calls of the well-formed fixtures are written out (vLLM's
   hermes semantics: JSON arguments re-serialised, integers and booleans kept, an
   unterminated last block still parsed, a malformed block left as content).
2. Rendering: OpenAI-style assistant tool calls (arguments as a JSON *string*) and tool
   results give the ids that transformers' own chat template gives for the same conversation
   with arguments as objects (what the model was trained on).
3. A scripted model (its greedy output is fixed text, see serve_support) served for real:
   auto, none, required, a named function, parallel_tool_calls=false, stream == non-stream.
"""

import json

import httpx
import pytest

from qwen25 import load_tokenizer
from qwen25.serve.openai_tools import ToolCallStream, parse_reply
from serve_support import Server, scripted_checkpoint

W = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3, "metric": true}}'
T = '{"name": "get_time", "arguments": {"zone": "CET"}}'
WEATHER = ("get_weather", {"city": "Paris", "days": 3, "metric": True})
TIME = ("get_time", {"zone": "CET"})
FIXTURES = [  # (model output, expected calls or None when only content-equivalence is checked)
    (f"<tool_call>\n{W}\n</tool_call>", [WEATHER]),
    (f"Let me check.\n<tool_call>\n{W}\n</tool_call>", [WEATHER]),
    (f"<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>", [WEATHER, TIME]),
    (f"<tool_call>\n{W}", [WEATHER]),  # cut by max_tokens after the JSON: still a call
    (f"<tool_call>\n{W}\n</tool_call>\nDone.", [WEATHER]),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "a \\"quoted\\" }{ brace"}}\n</tool_call>',
     [("f", {"s": 'a "quoted" }{ brace'})]),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "日本語 🚀 ünï"}}\n</tool_call>', [("f", {"s": "日本語 🚀 ünï"})]),
    ('<tool_call>\n{"name": "f", "arguments": {"nested": {"a": [1, {"b": null}]}}}\n</tool_call>',
     [("f", {"nested": {"a": [1, {"b": None}]}})]),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>', [("f", {"x": 1})]),
    ('<tool_call>\n{"name": "f"}\n</tool_call>', [("f", {})]),
    ('<tool_call>{"name":"f","arguments":{"id":7355608,"inserted":true}}</tool_call>',
     [("f", {"id": 7355608, "inserted": True})]),
    ("no tools here", []),
    ("", []),
    ("<tool_call>\nnot json\n</tool_call>", []),
    ("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": }\n</tool_call>", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ("<tool_call", []),
    ("text with </tool_call> but no opening", []),
    (f"<tool_call>\nbroken\n</tool_call>\n<tool_call>\n{T}\n</tool_call>", [TIME]),
    (f"  leading spaces  \n\n<tool_call>\n{T}\n</tool_call>  \n", [TIME]),
    (f"<tool_call>\n{T}\n</tool_call><tool_call>\n{W}\n</tool_call>", [TIME, WEATHER]),
    ('<tool_call>\n{"name": "f", "arguments": {"s": "</tool_call>"}}\n</tool_call>', None),
    ("<<tool_call>>\n{}\n<</tool_call>>", None),
    (f"Answer: <tool_call>\n{W}\n</tool_call> and <tool_call>\n{{\"name\": 5}}\n</tool_call>", None),
]


def streamed(pieces: list[str], prefix: str = "", parallel: bool = True):
    parser = ToolCallStream(prefix, parallel)
    out = []
    for i, piece in enumerate(pieces):
        out += parser.feed(piece)
    out += parser.finish()
    content = "".join(p for p in out if isinstance(p, str))
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in out if not isinstance(c, str)]
    return content, calls


@pytest.mark.parametrize("text,expected", FIXTURES)
def test_streamed_tool_calls_equal_parsed_ones_at_every_split(text, expected):
    content, calls = parse_reply(text)
    parsed = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
    if expected is not None:
        assert parsed == expected
        if expected:
            assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        else:
            assert content == text  # no valid call: the text comes back unchanged
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        assert streamed(pieces) == (content or "", parsed), pieces


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = FIXTURES[2][0]
    content, calls = parse_reply(text, parallel=False)
    assert [c.function.name for c in calls] == ["get_weather"]
    assert streamed(list(text), parallel=False) == (content or "", [WEATHER])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2.5")


CHAT_TEXT = ("Let me check.\n<tool_call>\n" + W + "\n</tool_call>\n<tool_call>\n" + T + "\n</tool_call>")
NAMED_PREFIX = '<tool_call>\n{"name": "get_weather", "arguments": '
NAMED_TAIL = '{"city": "Berlin"}}\n</tool_call>'
REQUIRED_TAIL = W + "\n</tool_call>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"},
                                               "metric": {"type": "boolean"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
             "zone": {"type": "string"}}}}}]
MESSAGES = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tok):
    """A model whose greedy replies are: CHAT_TEXT to a chat prompt, NAMED_TAIL after the
    named-function prefix, REQUIRED_TAIL after the required prefix."""
    prompt = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)
    replies = [(prompt, CHAT_TEXT), (prompt + tok.encode(NAMED_PREFIX, allow_special=True), NAMED_TAIL),
               (prompt + tok.encode("<tool_call>\n", allow_special=True), REQUIRED_TAIL)]
    path = scripted_checkpoint(tmp_path_factory.mktemp("scripted"), replies)
    with Server(path, max_seq_len=1024) as server:
        yield server


def call_tuples(message):
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def stream_message(client, **body):
    content, calls, reasons = "", {}, []
    for chunk in client.chat.completions.create(**body, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = entry["id"] or d.id
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    return content, [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)], reasons, calls


def test_auto_tool_calls_from_a_served_model(scripted):
    client = scripted.client()
    body = dict(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=200)
    r = client.chat.completions.create(**body)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert call_tuples(choice.message) == [WEATHER, TIME]
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    content, calls, reasons, raw = stream_message(client, **body)
    assert (content, calls, reasons) == ("Let me check.", [WEATHER, TIME], ["tool_calls"])
    assert all(raw[i]["id"] and raw[i]["id"].startswith("call_") for i in raw)
    # tool_choice none: the same reply is plain content
    r = client.chat.completions.create(**body, tool_choice="none")
    assert r.choices[0].message.content == CHAT_TEXT and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"
    # parallel_tool_calls false: the first call only
    r = client.chat.completions.create(**body, parallel_tool_calls=False)
    assert call_tuples(r.choices[0].message) == [WEATHER]
    content, calls, reasons, _ = stream_message(client, **body, parallel_tool_calls=False)
    assert calls == [WEATHER] and reasons == ["tool_calls"]


def test_a_named_function_is_forced(scripted, tok):
    client = scripted.client()
    body = dict(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=50,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**body)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert call_tuples(r.choices[0].message) == [("get_weather", {"city": "Berlin"})]
    base = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(base) + len(tok.encode(NAMED_PREFIX, allow_special=True))
    content, calls, reasons, _ = stream_message(client, **body)
    assert (content, calls, reasons) == ("", [("get_weather", {"city": "Berlin"})], ["tool_calls"])


def test_required_starts_the_reply_with_a_call(scripted, tok):
    body = dict(model="tiny", messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=200, tool_choice="required")
    r = scripted.client().chat.completions.create(**body)
    base = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(base) + 2  # "<tool_call>", "\n"
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "tool_calls"
    assert call_tuples(r.choices[0].message) == [WEATHER]
    content, calls, reasons, _ = stream_message(scripted.client(), **body)
    assert (content, calls, reasons) == ("", [WEATHER], ["tool_calls"])


def test_assistant_tool_calls_render_like_the_official_template(scripted, tok):
    """OpenAI sends arguments as a JSON string; the prompt must hold the object, exactly as
    transformers renders the Qwen2.5 template for a conversation with object arguments."""
    from transformers import AutoTokenizer

    openai_messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.dumps(WEATHER[1])}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    ]
    trained_form = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": WEATHER[1]}},
            {"type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": "12:00"},
    ]
    hf = AutoTokenizer.from_pretrained(scripted.path)
    for tools in (TOOLS, None):
        want = list(hf.apply_chat_template(trained_form, tools=tools, add_generation_prompt=True, tokenize=True,
                                           return_dict=False))
        got = httpx.post(scripted.url + "/tokenize", json={"messages": openai_messages, "tools": tools}).json()
        assert got["tokens"] == want
    r = scripted.client().chat.completions.create(model="tiny", messages=openai_messages, tools=TOOLS,
                                                  max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == len(hf.apply_chat_template(trained_form, tools=TOOLS, add_generation_prompt=True,
                                                               tokenize=True, return_dict=False))

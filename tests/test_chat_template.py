"""Chat rendering and ids vs the official Qwen2.5-Instruct template run by transformers.

Reference: `transformers.AutoTokenizer` on our exported folder, whose tokenizer_config.json
carries the official Jinja template (qwen25/assets/qwen2.5-instruct.jinja); transformers
renders it in its own sandboxed Jinja environment and tokenises the text itself.
Text must be byte-identical; ids identical for benign conversations.
"""

from __future__ import annotations

import json

import pytest
from test_tokenizer_support import auto_tokenizer, builtin, exported_dir

from qwen25 import chat
from qwen25.chat import ChatError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. 東京"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}}}
BARE = {"name": "calc", "description": "Evaluate", "parameters": {"type": "object", "properties": {}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


U = {"role": "user", "content": "What's the weather in Paris?"}
CALL_PARIS = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Paris")]}
RESULT = {"role": "tool", "content": json.dumps({"temp": 21, "sky": "clear"})}

# (messages, tools, add_generation_prompt)
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], None, True),
    ([{"role": "user", "content": "Hi"}], None, False),
    ([{"role": "system", "content": "You are a cat."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Meow"}], None, False),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}], None, True),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
      {"role": "user", "content": "e"}], None, True),
    ([{"role": "user", "content": "first"}, {"role": "system", "content": "late system"},
      {"role": "user", "content": "second"}], None, True),
    ([{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}], None, False),
    ([{"role": "user", "content": "你好，世界！こんにちは 🌍 emoji 👨‍👩‍👧 and é vs e\u0301"}], None, True),
    ([{"role": "user", "content": "  leading and trailing spaces \n\n"}], None, True),
    ([{"role": "user", "content": "\nstarts with newline"},
      {"role": "assistant", "content": "\n\nanswer starting with blank lines"}], None, False),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}], None, True),
    ([{"role": "user", "content": "code:\n```python\ndef f(x):\n    return x ** 2\n```"},
      {"role": "assistant", "content": "Sure:\n\tindented\r\nwindows line"}], None, False),
    ([U], [WEATHER], True),
    ([U], [WEATHER, SEARCH], True),
    ([{"role": "system", "content": "You are a weather bot."}, U], [WEATHER], True),
    ([{"role": "system", "content": "Be brief.\n\nCurrent Date: 2024-09-30"}, U], [WEATHER, SEARCH, BARE], False),
    ([U, CALL_PARIS], [WEATHER], False),
    ([U, CALL_PARIS, RESULT], [WEATHER], True),
    ([U, {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", city="Paris")]},
      RESULT], [WEATHER], True),
    ([U, {"role": "assistant", "content": None, "tool_calls": [call("get_weather", city="Paris"),
                                                              call("get_weather", city="Lyon", unit="celsius")]},
      RESULT, {"role": "tool", "content": "{\"temp\": 25}"}], [WEATHER], True),
    ([U, {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="A"),
                                                            call("search", q="x", n=3),
                                                            call("get_weather", city="B")]},
      {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "tool", "content": "3"},
      {"role": "assistant", "content": "Done: 1, 2, 3."}], [WEATHER, SEARCH], False),
    ([U, CALL_PARIS, RESULT, {"role": "assistant", "content": "It is 21 °C and clear."},
      {"role": "user", "content": "And tomorrow?"}], [WEATHER], True),
    ([U, {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
      RESULT], [WEATHER], True),  # tool call without the "function" wrapper
    ([U, {"role": "assistant", "content": "",
          "tool_calls": [call("search", q="naïve 東京 \"quotes\" \\ back", n=0, flag=True, none=None,
                              nested={"list": [1, 2.5, "x"], "obj": {}})]}], [SEARCH], False),
    ([{"role": "tool", "content": "orphan tool result first"}, {"role": "user", "content": "hm"}], None, True),
    ([U, CALL_PARIS, RESULT, {"role": "user", "content": "thanks"}], None, True),  # no tools list
    ([{"role": "user", "content": "x" * 3000}], None, True),
    ([{"role": "user", "content": "Ünïcödé ☃ \u00a0 \u3000 tabs\tand\x0bvertical"}], [BARE], True),
    ([{"role": "user", "content": "multi\nline\n\n\nuser"}, {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok2"}], [WEATHER], False),
    ([{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [call("calc")]},
      {"role": "tool", "content": ""}], [BARE], True),
    ([{"role": "user", "content": "tool content with json"},
      {"role": "assistant", "content": "", "tool_calls": [call("search", q="a")]},
      {"role": "tool", "content": "{\n  \"pretty\": [1, 2]\n}"}], [SEARCH], False),
    ([{"role": "user", "content": "1234567890 digits, 'll 've 're contractions"}], None, False),
]


@pytest.mark.parametrize("messages,tools,gen", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_rendering_equals_the_official_template(messages, tools, gen):
    expected = auto_tokenizer().apply_chat_template(messages, tools=tools, add_generation_prompt=gen,
                                                    tokenize=False)
    assert chat.render(messages, tools, gen) == expected
    assert builtin().apply_chat_template(messages, tools, gen, tokenize=False) == expected
    ids = auto_tokenizer().apply_chat_template(messages, tools=tools, add_generation_prompt=gen,
                                               tokenize=True, return_dict=False)
    assert builtin().apply_chat_template(messages, tools, gen) == list(ids)


def test_enough_conversations_of_each_kind():
    assert len(CONVERSATIONS) >= 30
    kinds = {"tools": any(t for _, t, _ in CONVERSATIONS),
             "no_gen_prompt": any(not g for _, _, g in CONVERSATIONS),
             "tool_calls_with_content": any(m.get("tool_calls") and m.get("content")
                                            for ms, _, _ in CONVERSATIONS for m in ms),
             "consecutive_tool_results": any(a["role"] == b["role"] == "tool"
                                             for ms, _, _ in CONVERSATIONS for a, b in zip(ms, ms[1:]))}
    assert all(kinds.values()), kinds


def test_spec_rendered_example():
    # qwen25-spec.md §2.4, "Tools + parallel tool calls + tool responses + generation prompt".
    tool = {"type": "function", "function": {"name": "get_t", "description": "Get temp", "parameters": {
        "type": "object", "properties": {"loc": {"type": "string"}}, "required": ["loc"]}}}
    messages = [{"role": "user", "content": "Temp in SF?"},
                {"role": "assistant", "content": "", "tool_calls": [call("get_t", loc="SF"), call("get_t", loc="LA")]},
                {"role": "tool", "content": '{"t": 26}'}, {"role": "tool", "content": '{"t": 30}'}]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n"
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_t", "description": "Get temp", "parameters": '
        '{"type": "object", "properties": {"loc": {"type": "string"}}, "required": ["loc"]}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nTemp in SF?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_t", "arguments": {"loc": "SF"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_t", "arguments": {"loc": "LA"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n{\"t\": 26}\n</tool_response>\n<tool_response>\n"
        "{\"t\": 30}\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert chat.render(messages, [tool], add_generation_prompt=True) == expected


def test_openai_style_string_arguments_render_as_objects():
    as_string = [U, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]}]
    as_object = [U, {"role": "assistant", "content": "", "tool_calls": [
        call("get_weather", city="Paris", unit="celsius")]}]
    expected = auto_tokenizer().apply_chat_template(as_object, tools=[WEATHER], tokenize=False)
    assert chat.render(as_string, [WEATHER]) == expected
    # A string that is not JSON is kept, rendered as the official template would.
    odd = [U, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}]
    assert chat.render(odd) == auto_tokenizer().apply_chat_template(odd, tokenize=False)


def test_content_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    assert chat.render(parts) == chat.render([{"role": "user", "content": "Hello there"}])


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "only text content"),
    ([{"role": "user", "content": "x", "tool_calls": [call("f")]}], "only assistant"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}], "function name"),
    (["not a dict"], "must be an object"),
])
def test_bad_conversations_are_one_line_errors(messages, match):
    with pytest.raises(ChatError, match=match):
        builtin().apply_chat_template(messages)


# ---- checkpoints with their own template ------------------------------------------------
CUSTOM = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
          "{% if tools %}{{ tools | tojson }}{% endif %}{{ eos_token }}")


@pytest.fixture(scope="module")
def custom_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (folder / name).write_bytes((exported_dir() / name).read_bytes())
    config = json.loads((exported_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = CUSTOM
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_custom_template_renders_like_transformers(custom_folder):
    from transformers import AutoTokenizer

    from qwen25.tokenizer import load_tokenizer

    ours, hf = load_tokenizer(custom_folder), AutoTokenizer.from_pretrained(str(custom_folder))
    assert not chat.uses_builtin_template(ours)
    for messages, tools, gen in CONVERSATIONS[:12] + [([U], [{"name": "ünï", "x": [1, "é"]}], True)]:
        if any(m.get("tool_calls") for m in messages):
            continue
        expected = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(messages, tools, gen, tokenize=False) == expected
        ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, return_dict=False)
        assert ours.apply_chat_template(messages, tools, gen) == list(ids)


def test_custom_template_runs_in_the_sandbox(custom_folder):
    from qwen25.tokenizer import load_tokenizer

    tok = load_tokenizer(custom_folder)
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ messages.append(1) }}",
                 "{{ raise_exception('nope') }}", "{% for %}"):
        tok.chat_template = evil
        with pytest.raises(ChatError):
            tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)

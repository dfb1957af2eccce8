"""The text layer: incremental detokenisation, stop strings, completions and chat.

References: `Tokenizer.decode` of all ids for the streamed text, and an explicit
str.find cut for stop strings (the OpenAI/vLLM rule: the text ends before the first match).
"""

import pytest
import torch

from qwen25 import Engine, build_model, load_tokenizer
from qwen25.config import ModelConfig
from qwen25.engine.scheduler import Request
from qwen25.engine.sampling import SamplingParams
from qwen25.assistant import chat, chat_result
from qwen25.engine.text import TextStream, complete, sampling_defaults, stream_complete
from qwen25.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def engine():
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()  # the real vocabulary size
    return Engine(model, max_batch_size=2, max_seq_len=128)


def reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


TEXTS = ["Hello, world! Stopping here: END and more", "naïve café — 世界 ☃ 👩‍👩‍👧 ok", "aaab aab ab b"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stops", [[], ["END"], ["界 ☃"], ["ab b", "aab"], ["zzz", "o"], ["\n"]])
def test_text_stream_equals_decode_cut_at_the_first_stop(tok, text, stops):
    ids = tok.encode(text)
    ts = TextStream(tok, stops)
    shown = ""
    for i in ids:
        piece = ts.push(i)
        assert "\ufffd" not in piece  # never half a character
        shown += piece
        if ts.stopped:
            break
    shown += ts.finish()
    expected, stopped = reference_cut(tok.decode(ids), stops)
    assert shown == expected == ts.text and ts.stopped == stopped


def test_text_stream_holds_back_a_possible_stop_string(tok):
    ts = TextStream(tok, ["STOP"])
    out = "".join(ts.push(i) for i in tok.encode("abc ST"))
    assert not out.endswith("ST")  # could be the start of STOP
    assert out + ts.finish() == "abc ST"  # generation ended: nothing was a stop after all


def test_special_tokens_are_hidden(tok):
    ids = tok.encode("hi<|im_end|>", allow_special=True)
    ts = TextStream(tok)
    assert "".join(ts.push(i) for i in ids) + ts.finish() == "hi"


def test_complete_stops_at_a_stop_string_and_frees_the_engine(tok, engine):
    free = complete(engine, tok, ["The answer is"], max_new_tokens=24, temperature=0, stop_token_ids=[])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    cut = complete(engine, tok, ["The answer is"], max_new_tokens=24, temperature=0, stop_token_ids=[],
                   stop=[stop])[0]
    assert cut.text == free.text[:free.text.find(stop)] and cut.finish_reason == "stop"
    assert len(cut.token_ids) < 24 and not engine.has_work  # cancelled early
    streamed = list(stream_complete(engine, tok, tok.encode("The answer is"), max_new_tokens=24, temperature=0,
                                    stop_token_ids=[], stop=[stop]))
    assert "".join(streamed[:-1]) == cut.text and streamed[-1].finish_reason == "stop"


def test_chat_returns_an_assistant_message(tok, engine):
    messages = [{"role": "user", "content": "Hi!"}]
    result = chat(engine, tok, messages, max_new_tokens=6, temperature=0, stop_token_ids=[])
    assert result.message["role"] == "assistant" and result.finish_reason == "length"
    assert result.message["content"] == result.text
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert result.usage == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}


def test_tool_calls_are_parsed_into_the_message(tok):
    reply = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    request = Request([1, 2, 3], SamplingParams(), frozenset())
    stream = TextStream(tok)
    for i in tok.encode(reply) + [tok.token_to_id("<|im_end|>")]:
        request.outputs[0].tokens.append(i)
        stream.push(i)
    stream.finish()
    request.outputs[0].finish_reason = "stop"
    result = chat_result(request, stream.text, "stop", parse_tools=True)
    assert result.finish_reason == "tool_calls"
    assert result.message == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def test_sampling_defaults_follow_generation_config():
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    model.generation_config = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                               "repetition_penalty": 1.05, "eos_token_id": [151645, 151643]}
    assert sampling_defaults(model) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    model.generation_config = {"do_sample": False, "temperature": 0.7}
    assert sampling_defaults(model) == {"temperature": 0.0}


def test_bad_stop_strings(tok):
    with pytest.raises(UserError, match="stop strings"):
        TextStream(tok, [""])

"""Tokenizer folders a user can break (issue 21 item 13): every mutation is one-line error.

A small byte-level folder (256 byte tokens, two merges, two control tokens) is written, one
file is mutated, and `load_tokenizer` must raise `TokenizerFileError` (a UserError) naming
the file and the problem, never a TypeError/KeyError traceback. Chat templates supplied
with a folder are rendered under a step and size budget, so a hostile template ends in a
`ChatError` instead of hanging the process.
"""

from __future__ import annotations

import json
import resource

import pytest

from qwen25.chat.template import ChatError, render_jinja
from qwen25.tokenizer import TokenizerFileError, load_tokenizer
from qwen25.tokenizer.bytelevel import token_to_str
from qwen25.tokenizer.core import AddedToken
from qwen25.tokenizer.hf import build_tokenizer_json


def _folder(tmp_path):
    vocab = {token_to_str(bytes([i])): i for i in range(256)}
    vocab[token_to_str(b"he")] = 256
    vocab[token_to_str(b"hel")] = 257
    merges = [(token_to_str(b"h"), token_to_str(b"e")), (token_to_str(b"he"), token_to_str(b"l"))]
    added = [AddedToken(258, "<|im_start|>", True), AddedToken(259, "<|im_end|>", True)]
    data = build_tokenizer_json(vocab, merges, added)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    config = {"eos_token": "<|im_end|>", "chat_template": "{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def test_the_small_folder_loads(tmp_path):
    tok = load_tokenizer(_folder(tmp_path))
    assert tok.encode("hello") == [257, ord("l"), ord("o")]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def _edit_json(path, fn):
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(fn(data)), encoding="utf-8")


def _set_added(tokens):
    return lambda d: d | {"added_tokens": tokens}


def _set_vocab(key, value):
    def fn(d):
        d["model"]["vocab"][key] = value
        return d
    return fn


def _set_merges(merges):
    def fn(d):
        d["model"]["merges"] = merges
        return d
    return fn


H = token_to_str(b"h")
MUTATIONS = {
    "tokenizer_json_list": ("tokenizer.json", lambda d: [], "tokenizer.json: expected a JSON object"),
    "tokenizer_json_null": ("tokenizer.json", lambda d: None, "tokenizer.json: expected a JSON object"),
    "model_not_object": ("tokenizer.json", lambda d: d | {"model": 5}, "'model' must be an object"),
    "added_no_id": ("tokenizer.json", _set_added([{"content": "<x>"}]), "added_tokens\\[0\\]: needs an integer 'id'"),
    "added_id_str": ("tokenizer.json", _set_added([{"id": "x", "content": "<x>"}]), "added_tokens\\[0\\]: needs an integer 'id'"),
    "added_no_content": ("tokenizer.json", _set_added([{"id": 300}]), "added_tokens\\[0\\]: needs a string 'content'"),
    "added_negative": ("tokenizer.json", _set_added([{"id": -3, "content": "<x>"}]), "added_tokens\\[0\\]: id -3"),
    "added_not_list": ("tokenizer.json", lambda d: d | {"added_tokens": {"a": 1}}, "added_tokens must be a list"),
    "vocab_value_str": ("tokenizer.json", _set_vocab(H, "x"), "vocab.*'x'"),
    "vocab_value_negative": ("tokenizer.json", _set_vocab(H, -1), "vocab.*-1"),
    "vocab_value_huge": ("tokenizer.json", _set_vocab(H, 10**12), "vocab.*ids must be 0..n-1"),
    "vocab_not_object": ("tokenizer.json", lambda d: (d["model"].update(vocab=[1]) or d), "vocab must be an object"),
    "merges_not_list": ("tokenizer.json", _set_merges(5), "merges must be a list"),
    "merges_bad_entry": ("tokenizer.json", _set_merges([5]), "merges\\[0\\]"),
    "merges_one_part": ("tokenizer.json", _set_merges(["abc"]), "merges\\[0\\]"),
    "merges_unknown_token": ("tokenizer.json", _set_merges([["zz", "qq"]]), "tokenizer.json"),
    "config_list": ("tokenizer_config.json", lambda d: [], "tokenizer_config.json: expected a JSON object"),
    "config_eos_int": ("tokenizer_config.json", lambda d: d | {"eos_token": 5}, "eos_token"),
    "config_template_int": ("tokenizer_config.json", lambda d: d | {"chat_template": 5}, "chat_template"),
    "config_max_length_str": ("tokenizer_config.json", lambda d: d | {"model_max_length": "x"}, "model_max_length"),
    "config_added_decoder_bad": ("tokenizer_config.json", lambda d: d | {"added_tokens_decoder": []}, "added_tokens_decoder"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutated_tokenizer_files_are_one_line_errors(tmp_path, name):
    file, fn, needle = MUTATIONS[name]
    folder = _folder(tmp_path)
    _edit_json(folder / file, fn)
    with pytest.raises(TokenizerFileError, match=needle) as e:
        load_tokenizer(folder)
    assert "\n" not in str(e.value)


def test_files_that_are_directories_or_loops(tmp_path):
    folder = _folder(tmp_path)
    (folder / "chat_template.jinja").mkdir()
    with pytest.raises(TokenizerFileError, match="chat_template.jinja: cannot be read"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").rmdir()
    (folder / "chat_template.jinja").symlink_to("chat_template.jinja")
    with pytest.raises(TokenizerFileError, match="chat_template.jinja: cannot be read"):
        load_tokenizer(folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").mkdir()
    with pytest.raises(TokenizerFileError, match="tokenizer_config.json"):
        load_tokenizer(folder)


def test_slow_files_with_bad_added_tokens_decoder(tmp_path):
    vocab = {token_to_str(bytes([i])): i for i in range(256)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"x": {"content": "<a>"}}}), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="added_tokens_decoder"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}), encoding="utf-8")
    (tmp_path / "vocab.json").write_text("[]", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="vocab.json"):
        load_tokenizer(tmp_path)


# ---- chat templates: bounded in steps, output size and recursion ---------------------------

MSGS = [{"role": "user", "content": "hi"}]
HOSTILE = {
    "huge_range": "{% for i in range(10**7) %}x{% endfor %}",
    "nested_loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "string_loops": "{% set s = 'x' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "huge_string": "{{ 'x' * 10**9 }}",
    "huge_power": "{{ 7 ** 999999 }}",
    "huge_output": "{% for i in range(99999) %}{{ 'y' * 99999 }}{% endfor %}",
    "huge_list": "{{ [0] * 10**9 }}",
    "center": "{{ 'x' | center(10**9) }}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_end_in_a_chat_error(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ChatError, match="chat template") as e:
        render_jinja(HOSTILE[name], MSGS)
    assert "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB


def test_hostile_template_from_a_folder_through_the_tokenizer(tmp_path):
    folder = _folder(tmp_path)
    (folder / "chat_template.jinja").write_text(HOSTILE["recursive_macro"], encoding="utf-8")
    tok = load_tokenizer(folder)
    with pytest.raises(ChatError, match="chat template"):
        tok.apply_chat_template(MSGS)


def test_the_official_template_still_renders_within_the_budget():
    from importlib.resources import files

    from qwen25.chat.template import render

    source = files("qwen25.assets").joinpath("qwen2.5-instruct.jinja").read_text(encoding="utf-8")
    msgs = [{"role": "user", "content": f"question {i}"} if i % 2 == 0 else
            {"role": "assistant", "content": f"answer {i}"} for i in range(400)]
    assert render_jinja(source, msgs, add_generation_prompt=True) == render(msgs, add_generation_prompt=True)

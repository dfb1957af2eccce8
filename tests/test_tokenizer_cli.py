"""`qwen25 tokenizer encode|decode|export` (train is in test_tokenizer_train.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from test_tokenizer_support import hf_full, hf_plain

from qwen25.cli import main
from qwen25.tokenizer import load_tokenizer

TEXT = "Hello world <|im_end|> 你好"


def run(argv, capsys, stdin: bytes | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = main(["tokenizer", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_encode_argument_and_stdin(capsys, monkeypatch):
    plain = hf_plain().encode(TEXT, add_special_tokens=False).ids
    code, out, _ = run(["encode", TEXT], capsys)
    assert code == 0 and [int(x) for x in out.split()] == plain
    code, out, _ = run(["encode", "--allow-special", "--json", TEXT], capsys)
    assert json.loads(out) == hf_full().encode(TEXT, add_special_tokens=False).ids
    code, out, _ = run(["encode"], capsys, stdin=TEXT.encode("utf-8"), monkeypatch=monkeypatch)
    assert [int(x) for x in out.split()] == plain  # stdin is encoded verbatim


def test_decode_formats(capsys, monkeypatch):
    ids = hf_full().encode(TEXT, add_special_tokens=False).ids
    for argv in (["decode", *map(str, ids)], ["decode", ",".join(map(str, ids))], ["decode", json.dumps(ids)]):
        code, out, _ = run(argv, capsys)
        assert code == 0 and out == TEXT + "\n"
    code, out, _ = run(["decode", "--skip-special-tokens"], capsys,
                       stdin=" ".join(map(str, ids)).encode(), monkeypatch=monkeypatch)
    assert out == TEXT.replace("<|im_end|>", "") + "\n"


def test_export_writes_a_loadable_folder(tmp_path, capsys):
    code, out, _ = run(["export", str(tmp_path / "tok")], capsys)
    assert code == 0
    assert sorted(p.rsplit("/", 1)[1] for p in out.split()) == \
           ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert load_tokenizer(tmp_path / "tok").encode(TEXT) == load_tokenizer("qwen2.5").encode(TEXT)


@pytest.mark.parametrize("argv,stdin,message", [
    (["decode", "12", "x"], None, "ids must be integers"),
    (["decode", "[1, 2"], None, "not a JSON list"),
    (["encode"], b"\xff\xfe\x00", "not valid UTF-8"),
    (["encode", "--tokenizer", "/no/such/folder", "x"], None, "not found"),
])
def test_user_mistakes_exit_2_with_one_line(argv, stdin, message, capsys, monkeypatch):
    code, _, err = run(argv, capsys, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1

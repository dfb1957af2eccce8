"""Bad SFT input: clear one-line messages, bad rows counted with line numbers, exit 2 when fatal.

Each case is real input a user could give; the CLI runs in-process (`qwen25.cli.main`).
Tolerated problems (a few malformed lines, over-long conversations) are skipped, counted
and named; more than `--max-bad-fraction` malformed rows, nothing left to train on, a
missing model or data file, or a tokenizer without chat tokens stop before training.
"""

from __future__ import annotations

import json
import shutil

import pytest

import sft_support as S
from qwen25.cli import main
from qwen25.data.chat import load_examples, read_jsonl

GOOD = S.conversations()


def _sft(tmp_path, capsys, *extra):
    code = main(["sft", "--profile", "tiny", "--model", str(S.model_dir()), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--steps", "1", "--batch-size", "2", *extra])
    return code, capsys.readouterr().err


def test_malformed_lines_are_counted_with_line_numbers(tmp_path):
    rows = [*GOOD[:8], "{not json", {"messages": [{"role": "robot", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{city: Oslo"}}]}]}]
    path = S.write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(read_jsonl(path), S.tokenizer(), 4096, max_bad_fraction=0.5)
    assert len(examples) == 8 and report.rows == 12
    reasons = dict(report.bad)
    assert "not valid JSON" in reasons["d.jsonl:9"]
    assert "unknown role 'robot'" in reasons["d.jsonl:10"]
    assert "no assistant turn" in reasons["d.jsonl:11"]
    assert "arguments are not valid JSON" in reasons["d.jsonl:12"]


def test_too_many_malformed_lines_stop_before_training(tmp_path, capsys):
    path = S.write_jsonl(tmp_path / "d.jsonl", [*GOOD[:6], "{", "[1, 2]", "oops"])
    code, err = _sft(tmp_path, capsys, "--data", str(path))
    assert code == 2
    assert "3 of 9 rows are malformed" in err and "d.jsonl:7" in err and "--max-bad-fraction" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_conversations_longer_than_seq_len_are_dropped_and_counted(tmp_path):
    path = S.write_jsonl(tmp_path / "d.jsonl", GOOD[:6])
    lengths = [len(e) for e in load_examples(read_jsonl(path), S.tokenizer(), 10_000)[0]]
    limit = sorted(lengths)[3]
    examples, report = load_examples(read_jsonl(path), S.tokenizer(), limit)
    assert len(examples) == sum(n <= limit for n in lengths)
    assert len(report.too_long) == sum(n > limit for n in lengths)
    assert "longer than the sequence length dropped" in report.summary()


def test_nothing_left_to_train_on_is_fatal(tmp_path, capsys):
    path = S.write_jsonl(tmp_path / "d.jsonl", GOOD[:4])
    code, err = _sft(tmp_path, capsys, "--data", str(path), "--seq-len", "16")
    assert code == 2 and "no example left to train on" in err


def test_tokenizer_without_chat_tokens_is_rejected(tmp_path, capsys):
    plain = tmp_path / "plain-tok"
    shutil.copytree(S.tokenizer_dir(), plain)
    data = json.loads((plain / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] == "<|endoftext|>"]
    (plain / "tokenizer.json").write_text(json.dumps(data))
    conf = json.loads((plain / "tokenizer_config.json").read_text())
    conf["added_tokens_decoder"] = {k: v for k, v in conf.get("added_tokens_decoder", {}).items()
                                    if v["content"] == "<|endoftext|>"}
    conf.pop("chat_template", None)
    conf["eos_token"] = "<|endoftext|>"
    (plain / "tokenizer_config.json").write_text(json.dumps(conf))
    path = S.write_jsonl(tmp_path / "d.jsonl", GOOD[:4])
    code, err = _sft(tmp_path, capsys, "--data", str(path), "--tokenizer", str(plain))
    assert code == 2 and "no chat template tokens" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--data", "missing.jsonl", "not found"),
    ("--model", "no/such/folder", "not a checkpoint folder"),
    ("--layout", "zigzag", "layout='zigzag'"),
    ("--train-on", "first", "train_on='first'"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, flag, value, message):
    path = S.write_jsonl(tmp_path / "d.jsonl", GOOD[:4])
    args = ["--data", str(path), flag, str(tmp_path / value) if flag == "--data" else value]
    code, err = _sft(tmp_path, capsys, *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

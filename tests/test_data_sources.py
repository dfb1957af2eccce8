"""Ingest (jsonl, gzip, parquet, text, code folders), bad input, and the config dataclasses."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen25.data import config as C
from qwen25.data.sources import SourceStats, chunk_text, read_source
from qwen25.errors import UserError


def _read(src, strict=False):
    skips: Counter = Counter()
    stats = SourceStats()
    docs = list(read_source(src, lambda reason, s, i: skips.update([reason]), stats, strict))
    return docs, skips, stats


def test_jsonl_plain_and_gzip_with_bad_lines(tmp_path):
    rows = [json.dumps({"text": f"document {i}", "id": f"d{i}"}) for i in range(5)]
    lines = rows[:2] + ["{not json", json.dumps({"body": "no text field"}), json.dumps({"text": 7}),
                        "", json.dumps(["a list"])] + rows[2:]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(rows))  # no trailing newline: the last line still counts
    docs, skips, stats = _read(C.SourceConfig("web", str(tmp_path), id_field="id", domain="web"))
    assert [d.text for d in docs] == [f"document {i}" for i in range(5)] * 2
    assert docs[0].id == "web:d0" and docs[0].domain == "web" and docs[0].kind == "text"
    assert skips == Counter({"invalid_json": 1, "missing_text_field": 3})
    # Files are counted and hashed as they lie on disk (compressed bytes for .gz).
    assert stats.files == 2
    assert stats.bytes == sum((tmp_path / n).stat().st_size for n in ("a.jsonl", "b.jsonl.gz"))


def test_parquet_streams_rows_and_counts_nulls(tmp_path):
    table = pa.table({"content": ["alpha", None, "gamma"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    docs, skips, _ = _read(C.SourceConfig("pq", str(tmp_path / "x.parquet"), text_field="content"))
    assert [d.text for d in docs] == ["alpha", "gamma"] and skips == Counter({"missing_text_field": 1})
    docs, skips, _ = _read(C.SourceConfig("pq", str(tmp_path / "x.parquet")))  # no "text" column
    assert docs == [] and skips == Counter({"missing_text_field": 3})
    with pytest.raises(UserError, match="no column 'text'"):
        _read(C.SourceConfig("pq", str(tmp_path / "x.parquet")), strict=True)


def test_code_folder_languages_text_chunks_and_ignored_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pkg" / "lib.rs").write_text("fn main() {}\n")
    (tmp_path / "pkg" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "notes.txt").write_text("para one\n\npara two\n\npara three")
    (tmp_path / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    docs, skips, stats = _read(C.SourceConfig("code", str(tmp_path), chunk_chars=10))
    by_id = {d.id: d for d in docs}
    assert by_id["code:pkg/m.py"].kind == "code" and by_id["code:pkg/m.py"].lang == "python"
    assert by_id["code:pkg/lib.rs"].lang == "rust"
    assert [by_id[f"code:notes.txt#{i}"].text for i in range(3)] == ["para one", "para two", "para three"]
    assert skips == Counter({"not_utf8": 1}) and stats.files_ignored == 1


def test_unreadable_file_is_counted_or_raised(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    (tmp_path / "ok.jsonl").write_text(good)
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress((good * 3).encode())[:-12])  # truncated
    docs, skips, _ = _read(C.SourceConfig("s", str(tmp_path)))
    assert skips["unreadable_file"] == 1 and [d.text for d in docs].count("fine") >= 1
    with pytest.raises(UserError, match="cannot read"):
        _read(C.SourceConfig("s", str(tmp_path)), strict=True)
    if os.geteuid() != 0:  # root reads anything; the permission case only means something otherwise
        p = tmp_path / "ok.jsonl"
        p.chmod(0)
        _, skips, _ = _read(C.SourceConfig("s", str(p)))
        assert skips["unreadable_file"] == 1


def test_missing_path_and_strict_json_errors(tmp_path):
    with pytest.raises(UserError, match="no readable files"):
        _read(C.SourceConfig("s", str(tmp_path / "nope")))
    (tmp_path / "a.jsonl").write_text("{bad\n")
    with pytest.raises(UserError, match="line 1: invalid json"):
        _read(C.SourceConfig("s", str(tmp_path / "a.jsonl")), strict=True)


@given(st.lists(st.text("ab \n", max_size=30), max_size=12), st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_chunk_text_keeps_every_paragraph(paras, size):
    text = "\n\n".join(paras)
    chunks = chunk_text(text, size)
    assert chunks  # at least one piece, even for empty text (the pipeline counts it "empty")
    kept = [p for c in chunks for p in c.split("\n\n")]
    assert [p for p in kept if p.strip()] == [p for p in text.split("\n\n") if p.strip()]


# ---- config ----------------------------------------------------------------------------------

def test_config_round_trip_and_unknown_keys():
    cfg = C.DataConfig(sources=(C.SourceConfig("a", "x", domain="web"),), mix=C.MixConfig(weights={"web": 1.0}))
    assert C.from_dict(C.DataConfig, json.loads(json.dumps(C.to_dict(cfg)))) == cfg
    with pytest.raises(UserError, match=r"dedup\.treshold"):
        C.from_dict(C.DataConfig, {"dedup": {"treshold": 0.5}})
    with pytest.raises(UserError, match=r"sources\[0\]\.colour"):
        C.from_dict(C.DataConfig, {"sources": [{"name": "a", "path": "x", "colour": 1}]})
    with pytest.raises(UserError, match="must be of type int"):
        C.from_dict(C.DataConfig, {"shard_tokens": "big"})
    with pytest.raises(UserError, match="missing config key"):
        C.from_dict(C.DataConfig, {"sources": [{"name": "a"}]})


def test_config_validation_errors():
    src = (C.SourceConfig("a", "x", domain="web"),)
    with pytest.raises(UserError, match="unknown domain"):
        C.DataConfig(sources=src, mix=C.MixConfig(weights={"news": 1.0}))
    with pytest.raises(UserError, match="unique"):
        C.DataConfig(sources=src * 2)
    with pytest.raises(UserError, match="unknown source"):
        C.DataConfig(sources=src, quality=C.QualityConfig("perplexity", "m", max_perplexity={"b": 3.0}))


def test_every_config_field_has_a_comment():
    for cls in (C.DataConfig, C.SourceConfig, C.FilterConfig, C.QualityConfig, C.DedupConfig,
                C.EvalSetConfig, C.DecontamConfig, C.MixConfig):
        comments = C.field_comments(cls)
        assert all(comments.get(f.name) for f in dataclasses.fields(cls)), cls.__name__


def test_override_parses_json_values():
    data: dict = {}
    C.apply_override(data, "dedup.threshold=0.8")
    C.apply_override(data, "out=runs/x")
    C.apply_override(data, "mix.weights={\"a\": 1}")
    assert data == {"dedup": {"threshold": 0.8}, "out": "runs/x", "mix": {"weights": {"a": 1}}}

"""The long-context demo: its training rows, its loss, and one short end-to-end run.

References: the answer span of a training row is located in the decoded text (the key
stated by the needle); the weighted loss against `F.cross_entropy` per token times the
weights (fp32, rtol 1e-5); the report's tables against the numbers in results.json.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_
from qwen25 import build_model, load_model
from qwen25.config import ModelConfig
from qwen25.eval.filler import filler_pool
from qwen25.recipes.longctx_demo import DemoConfig, _corpus, _training_row, run_demo, weighted_lm_loss
from qwen25.tokenizer.train import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-tok")
    _corpus(root / "corpus.txt", seed=0)
    return train_tokenizer([root / "corpus.txt"], 512, root / "tok", show_progress=False)


def test_training_rows_mark_the_answer(tok):
    pool = filler_pool(tok, "generated", min_tokens=5000, seed=1)
    rng = random.Random(0)
    for _ in range(20):
        row, span = _training_row(tok, pool, 128, rng, tok.eos_token_id)
        assert len(row) == 129
        labels = row[1:]
        answer = tok.decode(labels[span.start:span.stop])
        prompt = tok.decode(row[:span.start + 1])
        key = re.search(r"The pass key is (\d{5})\.", prompt).group(1)
        assert answer == " " + key
        assert prompt.endswith("What is the pass key? The pass key is")
        assert labels[span.stop] == tok.eos_token_id


def test_weighted_loss_equals_weighted_cross_entropy():
    cfg = ModelConfig.preset("tiny").replace(vocab_size=97)
    model = randomize_(build_model(cfg, seed=0), seed=0, std=0.2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 21), generator=g)
    weights = torch.rand(3, 20, generator=g) * 5
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "weights": weights}
    loss, count, aux = weighted_lm_loss(model, batch)
    ref = (F.cross_entropy(model(ids[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none") * weights).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert int(count) == 60 and aux is None
    loss.backward()  # the trainer differentiates it
    assert model.model.embed_tokens.weight.grad is not None


def test_demo_end_to_end_writes_a_consistent_report(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo"), seq_len=96, steps=3, batch_size=2, trials=1,
                     depths=(0.5,), ppl_sequences=1)
    result = run_demo(cfg, progress=False)
    out = tmp_path / "demo"
    for name in ("report.md", "results.json", "accuracy.png", "loss_by_position.png", "metrics.jsonl",
                 "loss.png", "model/config.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    assert list(data["modes"]) == ["plain", "yarn", "dca", "yarn+dca"]
    assert data["modes"]["yarn+dca"]["rope_scaling"] == "yarn:4" and data["modes"]["yarn+dca"]["dca"] == "96:12"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    report = (out / "report.md").read_text()
    assert report.strip() == result["markdown"].strip()
    for mode, r in data["modes"].items():
        assert set(r["exact"]) == {"96", "192", "384"}
        row = "| " + mode + " | " + " | ".join(f"{100 * r['exact'][n]:.0f}" for n in ("96", "192", "384")) + " |"
        assert row in report
    model = load_model(out / "model")
    assert model.config.max_position_embeddings == 96 and model.config.rope_scaling is None

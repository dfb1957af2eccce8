"""`qwen25 speedrun --profile smoke`: the whole pipeline on built-in data, end to end.

Built-in corpus (Shakespeare) -> trained BPE tokenizer -> real shards and `PackedLoader` ->
two-stage pretraining -> report. The model must learn: its held-out Shakespeare loss has to
be well below the unigram entropy of those held-out tokens (the best a model that ignores
context can do), computed here from the shards themselves. A second invocation must find
the run complete and report the same numbers.
"""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from qwen25.checkpoint import load_model
from qwen25.cli import main
from qwen25.data.manifest import load_manifest, select_shards
from qwen25.data.shards import read_tokens
from qwen25.tokenizer import load_tokenizer


def _unigram_entropy(tokens: np.ndarray) -> float:
    counts = Counter(tokens.tolist())
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.slow
def test_smoke_speedrun_learns_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["speedrun", "--profile", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Held-out Shakespeare" in printed and f"qwen25 chat {out / 'final'}" in printed

    summary = json.loads((out / "summary.json").read_text())
    held_out = summary["eval"]["shakespeare"]["loss"]
    manifest = load_manifest(out / "data" / "manifest.json")
    val = np.concatenate([read_tokens(out / "data" / s["path"])
                          for s in select_shards(manifest, "val", sources=["shakespeare"])])
    unigram = _unigram_entropy(val)
    assert held_out < 0.9 * unigram, f"held-out {held_out:.3f} nats/token vs unigram {unigram:.3f}"

    report = (out / "report.md").read_text()
    assert f"{summary['eval']['shakespeare']['bpb']:.3f} bits per byte" in report
    timings = json.loads((out / "timings.json").read_text())
    assert {"fetch", "tokenizer", "data", "pretrain", "report"} <= set(timings)
    for png in ("loss.png", "bpb.png", "lr.png"):
        assert (out / "plots" / png).exists()

    # the exported model is a chat-ready folder: weights, the long stage's RoPE base, tokenizer
    final = out / "final"
    model = load_model(final, dtype=torch.float32)
    tok = load_tokenizer(str(final))
    assert model.config.rope_theta == 1e6 and model.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.encode("ROMEO:")])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)
    assert summary["samples"] and summary["samples"][0]["prompt"] == "ROMEO:"

    # re-running finds every phase done and reports the same result
    steps = summary["step"]
    assert main(["speedrun", "--profile", "smoke", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["step"] == steps and again["resumed_from"] == steps
    assert again["eval"]["shakespeare"]["loss"] == pytest.approx(held_out, rel=1e-6)

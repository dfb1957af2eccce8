"""`qwen25 speedrun --profile smoke`: the whole recipe on built-in data, end to end.

Built-in corpus (Shakespeare) -> trained BPE tokenizer -> real shards and `PackedLoader` ->
two-stage pretraining -> SFT -> pairs -> DPO -> reward model -> GRPO -> report card. The
base model must learn: its held-out Shakespeare loss has to be well below the unigram
entropy of those held-out tokens (the best a model that ignores context can do), computed
here from the shards themselves. Every stage's checkpoint must load in transformers (the
reference), the card must have a row per stage, and a second invocation must find the run
complete (no stage trains again) and report the same numbers.
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
    assert {"fetch", "tokenizer", "data", "pretrain", "sft", "pairs", "dpo", "rm", "grpo", "evaluate",
            "report"} <= set(timings)
    for png in ("loss.png", "bpb.png", "lr.png"):
        assert (out / "plots" / png).exists()

    # the pretrained model: weights, the long stage's RoPE base, tokenizer
    base = out / "base"
    model = load_model(base, dtype=torch.float32)
    tok = load_tokenizer(str(base))
    assert model.config.rope_theta == 1e6 and model.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.encode("ROMEO:")])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)
    assert summary["samples"] and summary["samples"][0]["prompt"] == "ROMEO:"

    # every stage's checkpoint loads in transformers and gives our logits (fp32, 1e-4)
    transformers = pytest.importorskip("transformers")
    chat_ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                                     add_generation_prompt=True)])
    for folder in (base, out / "sft" / "final", out / "dpo" / "final", out / "grpo" / "final", out / "final"):
        ours = load_model(folder, dtype=torch.float32)(chat_ids)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(ref(chat_ids).logits, ours, atol=1e-4, rtol=1e-4)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(out / "rm" / "final")
    with torch.no_grad():
        assert rm(chat_ids).logits.shape == (1, 1)
    torch.testing.assert_close(load_model(out / "final", dtype=torch.float32)(chat_ids),
                               load_model(out / "grpo" / "final", dtype=torch.float32)(chat_ids), atol=0, rtol=0)

    # the report card: a row per stage, every metric measured
    card = json.loads((out / "card.json").read_text())
    assert {"base", "sft", "dpo", "grpo"} <= set(card)
    for stage in ("base", "sft", "dpo", "grpo"):
        assert f"| {stage} |" in report
        for metric in ("math_seen", "math_new", "format", "ifeval", "bpb", "rm_score"):
            assert card[stage][metric] is not None, (stage, metric)
    assert "## Post-training: the report card" in report and f"qwen25 chat {out / 'final'}" in report

    # re-running finds every phase done: nothing trains again, the same numbers
    steps = summary["step"]
    stage_steps = {s: json.loads((out / s / "summary.json").read_text())["step"] for s in ("sft", "dpo", "rm", "grpo")}
    mtimes = {s: (out / s / "final" / "model.safetensors").stat().st_mtime for s in ("sft", "dpo", "grpo")}
    assert main(["speedrun", "--profile", "smoke", "--out", str(out)]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["step"] == steps
    assert again["eval"]["shakespeare"]["loss"] == pytest.approx(held_out, rel=1e-6)
    assert {s: json.loads((out / s / "summary.json").read_text())["step"] for s in stage_steps} == stage_steps
    assert {s: (out / s / "final" / "model.safetensors").stat().st_mtime for s in mtimes} == mtimes
    assert json.loads((out / "card.json").read_text()) == card

    # interrupted inside a stage (its final/ and summary not yet written): the re-run resumes
    # that stage from its newest checkpoint instead of training it again
    import shutil

    shutil.rmtree(out / "grpo" / "final")
    (out / "grpo" / "summary.json").unlink()
    assert main(["speedrun", "--profile", "smoke", "--out", str(out)]) == 0
    resumed = json.loads((out / "grpo" / "summary.json").read_text())
    assert resumed["resumed_from"] == stage_steps["grpo"] and resumed["step"] == stage_steps["grpo"]


def test_card_entries_measured_on_other_weights_are_recomputed():
    from qwen25.recipes.speedrun import stale_stages

    weights = {"base": "a", "sft": "b", "dpo": "c", "grpo": "d"}
    card = {s: {"weights": h, "ifeval": 0.5} for s, h in weights.items()} | {"_meta": {"reward_model": "r"}}
    assert stale_stages(card, weights, "r") == []
    assert stale_stages(card, {**weights, "grpo": "d2"}, "r") == ["grpo"]  # GRPO retrained
    assert stale_stages({k: v for k, v in card.items() if k != "dpo"}, weights, "r") == ["dpo"]
    assert stale_stages(card, weights, "r2") == ["base", "sft", "dpo", "grpo"]  # every row's RM score
    old = {s: {"ifeval": 0.5} for s in weights} | {"_meta": {}}  # a card written before fingerprints
    assert stale_stages(old, weights, "r") == list(weights)

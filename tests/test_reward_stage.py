"""The reward-model stage: trains on pairs, exports a folder transformers scores identically,
`qwen25 reward score` writes scores, kill -9 + re-run is bitwise equal, and it learns a
preference (held-out ranking accuracy against its own before-training baseline)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preference_support import lm_folder, records, train_small_tokenizer, write_pairs
from qwen25.cli import main
from qwen25.data.preference import conversation_ids
from qwen25.train.reward import RewardConfig, reward_train
from qwen25.train.reward_model import load_reward_model, pad_batch, score_batches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-stage")
    tok = train_small_tokenizer(root)
    return {"root": root, "tok": tok, "sft": lm_folder(root, tok, 0), "pairs": write_pairs(root / "pairs.jsonl", 22)}


def _cfg(env, out, **kw) -> RewardConfig:
    base = dict(model=str(env["sft"]), data=str(env["pairs"]), out=str(out), batch_size=4, micro_batch=2,
                lr=1e-3, eval_fraction=0.1, checkpoint_every=2, eval_every=2, threads=1, max_length=128)
    return RewardConfig(**(base | kw))




def test_trains_exports_an_hf_folder_and_scores_from_the_cli(env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = env["root"] / "run"
    summary = reward_train(_cfg(env, out, center=0.01))
    assert summary["step"] == 5 and summary["data"]["dropped"]["identical"] == 1
    assert [r["step"] for r in records(out, "pairs")] == [1, 2, 3, 4, 5]
    final = Path(summary["final"])
    ours = load_reward_model(final)
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    rows = [json.loads(x) for x in env["pairs"].read_text().splitlines()[:6]]
    seqs = [conversation_ids(env["tok"], {"prompt": r["prompt"], "completion": r[side]})
            for r in rows for side in ("chosen", "rejected")]
    ids, mask = pad_batch(seqs, env["tok"].pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(torch.tensor(score_batches(ours, seqs, 5)), theirs, rtol=1e-5, atol=1e-5)

    data = tmp_path / "convs.jsonl"
    convs = [{"messages": r["prompt"] + r["chosen"]} for r in rows] + [{"messages": []}]
    data.write_text("\n".join(json.dumps(c) for c in convs) + "\n")
    assert main(["reward", "score", "--model", str(final), "--data", str(data), "--out", str(tmp_path / "s.jsonl"),
                 "--batch-size", "4"]) == 0
    scored = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(scored) == len(rows)
    assert [r["score"] for r in scored] == pytest.approx(theirs[0::2].tolist(), abs=1e-5)  # the chosen sides


def test_score_errors_are_one_line(env, tmp_path, capsys):
    assert main(["reward", "score", "--model", str(env["sft"]), "--data", str(env["pairs"]),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not a reward model" in capsys.readouterr().err


def _format_pairs(path: Path, n: int) -> Path:
    """chosen answers in the house format ("The answer is N."), rejected ones bare: a
    preference a reward model must learn from the text alone (chance accuracy: 0.5)."""
    rnd = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 9), rnd.randint(1, 9)
        prompt = [{"role": "user", "content": f"What is {a}+{b}?"}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"{a + b} i think"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_learns_to_rank_held_out_pairs_well_above_chance(env):
    pairs = _format_pairs(env["root"] / "format.jsonl", 80)
    summary = reward_train(_cfg(env, env["root"] / "learn", data=str(pairs), epochs=2, batch_size=8,
                                micro_batch=8, eval_fraction=0.25, lr=3e-3, warmup_steps=2, eval_every=100))
    before, after = summary["eval_before"]["rewards/accuracies"], summary["eval"]["rewards/accuracies"]
    assert after >= 0.9 and after > before + 0.3, (before, after)


def _start(config: Path) -> subprocess.Popen:
    envv = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "qwen25", "reward", "train", "--config", str(config)], env=envv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill9_then_rerun_gives_bitwise_equal_losses(env):
    def config(name):
        path = env["root"] / f"{name}.json"
        path.write_text(json.dumps(_cfg(env, env["root"] / name, checkpoint_every=1).__dict__))
        return path

    proc = _start(config("ref"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    reference = records(env["root"] / "ref", "train")
    cfg, out = config("killed"), env["root"] / "killed"
    for target in (2, 4):
        proc = _start(cfg)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").exists() and any(r["step"] >= target for r in records(out, "train")):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = _start(cfg)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    got = records(out, "train")
    assert [r["step"] for r in got] == [r["step"] for r in reference] == [1, 2, 3, 4, 5]
    for a, b in zip(reference, got):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    wa = load_file(str(env["root"] / "ref" / "final" / "model.safetensors"))
    wb = load_file(str(out / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

"""The DPO stage on the run harness: reference log-probs stored once and equal to a live
reference model, per-step pair metrics, bad input counted, kill -9 + re-run bitwise equal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preference_support import lm_folder, records, train_small_tokenizer, write_pairs
from qwen25.checkpoint import load_model
from qwen25.data.preference import collate_pairs, load_pairs
from qwen25.errors import UserError
from qwen25.train.dpo import REF_FILE, DPOConfig, dpo
from qwen25.train.dpo_loss import pair_logprobs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-stage")
    tok = train_small_tokenizer(root)
    return {"root": root, "tok": tok, "sft": lm_folder(root, tok, 0), "other": lm_folder(root, tok, 1),
            "pairs": write_pairs(root / "pairs.jsonl", 22)}


def _cfg(env, out, **kw) -> DPOConfig:
    base = dict(model=str(env["sft"]), data=str(env["pairs"]), out=str(out), batch_size=4, micro_batch=2,
                lr=1e-3, beta=0.5, eval_fraction=0.1, checkpoint_every=2, eval_every=2, threads=1,
                max_length=128)
    return DPOConfig(**(base | kw))




def test_reference_is_precomputed_once_and_equals_a_live_reference(env):
    out = env["root"] / "run"
    summary = dpo(_cfg(env, out, ref_model=str(env["other"])))
    # 22 good rows -> 2 held out, 20 train -> 5 steps of 4 pairs; the 4 bad rows are counted.
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["kept"] == 22 and stats["rows"] == 26
    assert stats["dropped"] == {"identical": 1, "empty": 1, "malformed": 2}
    assert summary["step"] == 5
    stored = load_file(str(out / REF_FILE))
    live = load_model(env["other"])
    pairs, _ = load_pairs(env["pairs"], env["tok"], max_length=128)
    with torch.no_grad():
        for i in (0, 7, 21):  # one pair at a time: no padding, another batch shape
            lp = pair_logprobs(live, collate_pairs([pairs[i]], env["tok"].pad_token_id))
            assert float(stored["ref_chosen"][i]) == pytest.approx(float(lp.chosen), abs=1e-5)
            assert float(stored["ref_rejected"][i]) == pytest.approx(float(lp.rejected), abs=1e-5)
    steps = records(out, "pairs")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen"} <= steps[0].keys()
    evals = records(out, "eval")
    assert evals and "rewards/accuracies" in evals[-1]
    assert load_model(out / "final").config.vocab_size == len(env["tok"])
    # Re-running the finished run neither recomputes the reference nor trains again.
    mtime = (out / REF_FILE).stat().st_mtime_ns
    again = dpo(_cfg(env, out, ref_model=str(env["other"])))
    assert again["step"] == 5 and (out / REF_FILE).stat().st_mtime_ns == mtime


def test_a_reference_with_another_vocabulary_is_refused(env):
    tok = env["tok"]
    other = lm_folder(env["root"] / "big", tok, 2, vocab_size=len(tok) + 64)
    with pytest.raises(UserError, match="vocabulary"):
        dpo(_cfg(env, env["root"] / "refused", ref_model=str(other)))
    assert not (env["root"] / "refused" / "checkpoints").exists()


def test_bad_settings_are_one_line_errors(env):
    with pytest.raises(UserError, match="loss"):
        dpo(_cfg(env, env["root"] / "bad", loss="kto"))
    with pytest.raises(UserError, match="larger than"):
        dpo(_cfg(env, env["root"] / "bad", batch_size=64))


def _start(config: Path) -> subprocess.Popen:
    envv = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "qwen25", "dpo", "--config", str(config)], env=envv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill9_then_rerun_gives_bitwise_equal_losses(env):
    def config(name, **kw):
        cfg = json.loads(json.dumps(_cfg(env, env["root"] / name, checkpoint_every=1, **kw).__dict__))
        path = env["root"] / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return path

    # The merging optimizer: the most state to restore (moments, tau_ref, seeded DARE masks).
    for name, kw in (("ref-merge", {"optimizer": "merging", "merge_base": str(env["other"]),
                                    "merge_keep": 0.5, "merge_alpha": 0.01}),):
        ref_cfg = config(name, **kw)
        proc = _start(ref_cfg)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
        reference = records(env["root"] / name, "train")
        assert [r["step"] for r in reference] == [1, 2, 3, 4, 5]

        killed = name.replace("ref", "killed")
        cfg = config(killed, **kw)
        out = env["root"] / killed
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
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
        for a, b in zip(reference, got):
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (name, a["step"])
        pa, pb = records(env["root"] / name, "pairs"), records(out, "pairs")
        assert [r["rewards/margins"] for r in pa] == [r["rewards/margins"] for r in pb]
        wa = load_file(str(env["root"] / name / "final" / "model.safetensors"))
        wb = load_file(str(out / "final" / "model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _format_judge_pass_rate(model_dir: Path, tok, n: int = 16) -> float:
    """Share of held-out queries (numbers outside the training range) whose greedy answer
    passes the task's judge: the house format "The answer is ..."."""
    import random

    from qwen25.engine import Engine

    eng = Engine(load_model(model_dir), max_batch_size=8, max_seq_len=96, hugepages=False)
    rnd = random.Random(5)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {rnd.randint(10, 19)}+"
                                         f"{rnd.randint(10, 19)}?"}], add_generation_prompt=True) for _ in range(n)]
    stop = [tok.token_to_id("<|im_end|>")]
    outs = eng.generate(prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=stop)
    return sum(tok.decode([t for t in o.tokens if t not in stop]).startswith("The answer is") for o in outs) / n


def test_dpo_raises_the_held_out_pass_rate_of_the_task_its_pairs_came_from(env):
    """Pairs judged by a format check (chosen passes, rejected fails); DPO from a model that
    never passes must make greedy answers to unseen queries pass, and rank held-out pairs."""
    from test_reward_stage import _format_pairs

    pairs = _format_pairs(env["root"] / "format.jsonl", 80)
    before = _format_judge_pass_rate(env["sft"], env["tok"])
    out = env["root"] / "learn"
    summary = dpo(_cfg(env, out, data=str(pairs), epochs=3, batch_size=8, micro_batch=8, lr=3e-3, beta=0.1,
                       eval_fraction=0.25, warmup_steps=2, eval_every=100, checkpoint_every=100))
    after = _format_judge_pass_rate(out / "final", env["tok"])
    assert before == 0.0 and after >= 0.8, (before, after)
    assert summary["eval"]["rewards/accuracies"] >= 0.9

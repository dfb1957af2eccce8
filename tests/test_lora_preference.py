"""LoRA in the two preference stages (DPO, reward model), with SFT's adapter files.

References: `peft.PeftModel.from_pretrained` on transformers' `Qwen2ForCausalLM` (DPO) and
`Qwen2ForSequenceClassification` (reward model) of the unchanged base, and an
uninterrupted run of the same config for kill -9 + resume. Tolerances: logits and scores
1e-5 (float32, CPU); resumed losses, gradient norms and adapter weights bitwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from preference_support import lm_folder, records, train_small_tokenizer, write_pairs
from qwen25.checkpoint import load_model
from qwen25.cli import main
from qwen25.data.preference import conversation_ids
from qwen25.errors import UserError
from qwen25.train import lora
from qwen25.train.dpo import DPOConfig, dpo
from qwen25.train.reward import RewardConfig, reward_train
from qwen25.train.reward_model import RewardModel, pad_batch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS, lr=2e-2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-pref")
    tok = train_small_tokenizer(root)
    return {"root": root, "tok": tok, "sft": lm_folder(root, tok, 0), "pairs": write_pairs(root / "pairs.jsonl", 22)}


def _common(env, out) -> dict:
    return dict(model=str(env["sft"]), data=str(env["pairs"]), out=str(out), batch_size=4, micro_batch=2,
                eval_fraction=0.1, checkpoint_every=2, eval_every=2, threads=1, max_length=128)


def _dpo_cfg(env, out, **kw) -> DPOConfig:
    return DPOConfig(**(_common(env, out) | {"beta": 0.5} | LORA | kw))


def _rm_cfg(env, out, **kw) -> RewardConfig:
    return RewardConfig(**(_common(env, out) | LORA | kw))




def _last_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step_*"))[-1]


def _assert_base_unchanged(ckpt: Path, start: Path) -> None:
    got, want = load_model(ckpt).state_dict(), load_model(start).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _ids(env) -> list[list[int]]:
    rows = [json.loads(x) for x in env["pairs"].read_text().splitlines()[:3]]
    seqs = [conversation_ids(env["tok"], {"prompt": r["prompt"], "completion": r["chosen"]}) for r in rows]
    return seqs


# --------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------


def test_dpo_lora_adapter_loads_in_peft_and_only_the_adapter_trains(env):
    out = env["root"] / "dpo"
    summary = dpo(_dpo_cfg(env, out, merge=True))
    assert summary["step"] == 5 and summary["lora"] and summary["final"] == str(out / "final")
    _assert_base_unchanged(_last_checkpoint(out), env["sft"])  # the base weights never moved
    adapter = out / "adapter"
    assert json.loads((adapter / lora.ADAPTER_CONFIG).read_text())["r"] == 4

    ours = load_model(env["sft"], dtype=torch.float32).eval()
    lora.add_lora(ours, 4, 8.0, targets=TARGETS)
    lora.load_adapter(ours, adapter)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(env["sft"]), dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, str(adapter)).eval()
    ids = torch.tensor([_ids(env)[0]])
    with torch.no_grad():
        got, expected = ours(ids), ref(ids).logits
        plain = load_model(env["sft"], dtype=torch.float32).eval()(ids)
        merged = load_model(out / "final", dtype=torch.float32).eval()(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, got, rtol=1e-5, atol=1e-5)  # --merge folds the same adapter in
    assert (got - plain).abs().max() > 1e-3  # training moved the adapter off the identity
    assert (out / "final" / "tokenizer.json").exists()


def _start(args: list[str], config: Path) -> subprocess.Popen:
    envv = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "qwen25", *args, "--config", str(config)], env=envv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after_step(args: list[str], cfg, out: Path, step: int) -> None:
    """Start the run in a subprocess and kill -9 it once step `step` is logged."""
    path = out.with_suffix(".json")
    path.write_text(json.dumps(json.loads(json.dumps(cfg.__dict__))))
    proc = _start(args, path)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(out, "train")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() != 0, "the run ended before the kill; the test proved nothing"


def _assert_same_run(a: Path, b: Path, weights: str) -> None:
    ra, rb = records(a, "train"), records(b, "train")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4, 5]
    for x, y in zip(ra, rb):
        assert (x["loss"], x["grad_norm"]) == (y["loss"], y["grad_norm"]), x["step"]
    assert json.loads((b / "summary.json").read_text())["resumed_from"] is not None
    wa, wb = load_file(str(a / weights)), load_file(str(b / weights))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_dpo_lora_kill9_then_resume_is_bitwise_equal(env):
    kw = {"checkpoint_every": 1, "lora_dropout": 0.1}  # dropout: the RNG state must come back too
    dpo(_dpo_cfg(env, env["root"] / "dpo-ref", **kw))
    out = env["root"] / "dpo-killed"
    cfg = _dpo_cfg(env, out, **kw)
    _kill_after_step(["dpo"], cfg, out, 2)
    dpo(cfg)
    _assert_same_run(env["root"] / "dpo-ref", out, "adapter/adapter_model.safetensors")
    pa, pb = records(env["root"] / "dpo-ref", "pairs"), records(out, "pairs")
    assert [r["rewards/margins"] for r in pa] == [r["rewards/margins"] for r in pb]


# --------------------------------------------------------------------------------------
# Reward model
# --------------------------------------------------------------------------------------


def test_reward_lora_final_is_a_sequence_classifier_scoring_like_ours(env):
    from qwen25.train.reward_score import load_reward_scorer

    out = env["root"] / "rm"
    summary = reward_train(_rm_cfg(env, out))
    assert summary["step"] == 5 and summary["final"] == str(out / "final")
    _assert_base_unchanged(_last_checkpoint(out), env["sft"])
    rows = [json.loads(x) for x in env["pairs"].read_text().splitlines()[:4]]
    seqs = [conversation_ids(env["tok"], {"prompt": r["prompt"], "completion": r[side]})
            for r in rows for side in ("chosen", "rejected")]
    pad = env["tok"].pad_token_id
    ids, mask = pad_batch(seqs, pad)

    hf = transformers.Qwen2ForSequenceClassification.from_pretrained(str(out / "final"), dtype=torch.float32)
    score = load_reward_scorer(str(out / "final"))
    ours = torch.tensor([score("", r[side][0]["content"], SimpleNamespace(messages=r["prompt"]))
                         for r in rows for side in ("chosen", "rejected")])
    # The PEFT adapter (task SEQ_CLS, head saved in full) on the untouched base gives the same.
    base = transformers.Qwen2ForSequenceClassification.from_pretrained(str(env["sft"]), num_labels=1,
                                                                        pad_token_id=pad, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        theirs = hf.eval()(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        via_peft = adapted(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_peft, theirs, rtol=1e-5, atol=1e-5)
    head = load_file(str(out / "adapter" / lora.ADAPTER_WEIGHTS))[lora.head_key("score")]
    assert torch.equal(head, load_file(str(out / "final" / "model.safetensors"))["score.weight"])
    fresh = RewardModel(load_model(env["sft"]), pad)
    fresh.init_head(0)  # the head the run started from (seed 0): it must have trained too
    assert not torch.allclose(head, fresh.score.weight.detach(), atol=1e-4)


@pytest.mark.slow
def test_reward_lora_kill9_then_resume_is_bitwise_equal(env):
    kw = {"checkpoint_every": 1, "lora_dropout": 0.1}
    reward_train(_rm_cfg(env, env["root"] / "rm-ref", **kw))
    out = env["root"] / "rm-killed"
    cfg = _rm_cfg(env, out, **kw)
    _kill_after_step(["reward", "train"], cfg, out, 2)
    reward_train(cfg)
    _assert_same_run(env["root"] / "rm-ref", out, "final/model.safetensors")
    _assert_same_run(env["root"] / "rm-ref", out, "adapter/adapter_model.safetensors")


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"lora_rank": -1}, "lora_rank=-1 must be a whole number"),
    ({"lora_rank": 2.5}, "lora_rank=2.5 must be a whole number"),
    ({"lora_rank": 0, "merge": True}, "--merge needs LoRA"),
    ({"lora_targets": ("lm_head",)}, "not linear layers"),
    ({"lora_alpha": 0.0}, "lora_alpha"),
    ({"optimizer": "merging"}, "merging works on full weights"),
])
def test_bad_dpo_lora_settings_are_one_line_errors(env, kw, match):
    with pytest.raises(UserError, match=match) as e:
        dpo(_dpo_cfg(env, env["root"] / "bad", **kw))
    assert "\n" not in str(e.value)
    assert not (env["root"] / "bad").exists()  # refused before the run folder is made


def test_bad_reward_lora_settings_are_one_line_errors(env):
    with pytest.raises(UserError, match="lora_rank=-3 must be a whole number"):
        reward_train(_rm_cfg(env, env["root"] / "bad-rm", lora_rank=-3))
    with pytest.raises(UserError, match="lora_dropout"):
        reward_train(_rm_cfg(env, env["root"] / "bad-rm", lora_dropout=1.0))


@pytest.mark.parametrize("flags", [["--lora-rank", "-2"], ["--set", "lora_rank=1.5"],
                                   ["--lora-rank", "0", "--merge"]])
def test_cli_lora_rank_errors_exit_2_with_one_line(env, capsys, flags):
    common = ["--model", str(env["sft"]), "--data", str(env["pairs"]), "--out", str(env["root"] / "cli")]
    for verb in (["dpo"], ["reward", "train"]):
        if verb != ["dpo"] and "--merge" in flags:
            continue  # the reward model always merges into final/; it has no --merge flag
        assert main([*verb, *common, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "lora_rank" in err or "--merge" in err
        assert len(err.splitlines()) == 1, err


def test_a_non_integer_lora_rank_flag_is_refused_by_the_parser(env, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--model", str(env["sft"]), "--data", str(env["pairs"]), "--out", "x", "--lora-rank", "1.5"])
    assert e.value.code == 2 and "invalid int value: '1.5'" in capsys.readouterr().err

"""The GRPO stage: rollout log-probs agree with the trainer's, the engine samples with the
trained weights, exact resume, rewards that fail, bad configs. The math itself is checked
against the formulas in test_grpo_loss.py.

The model is tiny and its vocabulary small (a 400-token BPE trained here with the Qwen
control tokens and chat template; `grpo_support.py`), so a GRPO step takes a fraction of a
second on a CPU. LoRA and DDP: test_grpo_lora.py, test_grpo_distributed.py.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from grpo_support import build_chat_checkpoint, parity
from qwen25 import Engine, load_model, load_tokenizer
from qwen25.engine import SamplingParams
from qwen25.engine.dispatch import Dispatcher
from qwen25.errors import UserError
from qwen25.model.logprobs import token_logprobs
from qwen25.train import rewards as rewards_mod
from qwen25.train.grpo import GRPOObjective, grpo, micro_batches, rollout
from qwen25.train.grpo_config import GRPOConfig, validate
from qwen25.train.grpo_queries import query
from qwen25.train.loop import train_step
from qwen25.train.optim import build_optimizer
from qwen25.train.parallel import init_world


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model with a small trained chat tokenizer, saved as an HF folder."""
    return build_chat_checkpoint(tmp_path_factory.mktemp("grpo"))


@pytest.fixture
def parity_reward(monkeypatch):
    monkeypatch.setitem(rewards_mod.BUILTIN, "parity", (parity, "test reward"))


def _cfg(ck: Path, out: Path, **kw) -> GRPOConfig:
    base = dict(model=str(ck), out=str(out), reward="parity", group_size=4, queries_per_step=2, rollouts=2, mu=2,
                max_new_tokens=10, micro_batch=4, eval_queries=0, lr=3e-3, checkpoint_every=1, eval_every=0,
                max_batch_size=8)
    return GRPOConfig(**{**base, **kw})


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_rollout_logprobs_equal_the_trainers(chat_checkpoint, parity_reward, temperature):
    """π_old from the engine (the distribution it sampled from) vs the trainer's recomputed
    log-probs at the same temperature: mean |ρ − 1| <= 1e-4 in fp32 (decode runs in the C++
    kernels or the PyTorch model; the trainer runs the PyTorch model on the whole sequence)."""
    cfg = _cfg(chat_checkpoint, Path("unused"), temperature=temperature, max_new_tokens=16)
    model = load_model(chat_checkpoint, dtype=torch.float32)
    tok = load_tokenizer(chat_checkpoint)
    d = Dispatcher(Engine(model, max_batch_size=8, max_seq_len=512, hugepages=False), tok)
    ro = rollout(cfg, 0, d, tok, rewards_mod.parse_reward_spec("parity"), tok.stop_token_ids)
    assert len(ro["samples"]) == cfg.group_size * cfg.queries_per_step
    devs, n = 0.0, 0
    with torch.no_grad():
        for b in micro_batches(ro["samples"], 4):
            logp = token_logprobs(model(b["input_ids"]).float(), b["targets"], temperature)
            dev = ((logp - b["old_logp"]).exp() - 1).abs() * b["mask"]
            devs, n = devs + float(dev.sum()), n + float(b["mask"].sum())
    assert n > 0
    assert devs / n <= 1e-4


def test_engine_samples_with_the_trained_weights(chat_checkpoint, parity_reward):
    """After an optimizer step the same Engine (built once, sharing the model's tensors)
    decodes exactly like a fresh engine on a copy of the updated weights."""
    cfg = _cfg(chat_checkpoint, Path("unused"))
    model = load_model(chat_checkpoint, dtype=torch.float32).train()
    tok = load_tokenizer(chat_checkpoint)
    engine = Engine(model, max_batch_size=8, max_seq_len=512, hugepages=False)
    d = Dispatcher(engine, tok)
    ro = rollout(cfg, 0, d, tok, rewards_mod.parse_reward_spec("parity"), tok.stop_token_ids)
    prompt = ro["samples"][0]["prompt"]
    before = engine.generate([prompt], max_new_tokens=12, temperature=0)[0].tokens
    opt = build_optimizer(model, 0.05, weight_decay=0.0)
    train_step(model, opt, micro_batches(ro["samples"], 4), GRPOObjective(cfg), lr=0.05, world=init_world("cpu"))
    after = engine.generate([prompt], max_new_tokens=12, temperature=0)[0].tokens
    fresh = Engine(copy.deepcopy(model).eval(), max_batch_size=1, max_seq_len=512, decode="torch", hugepages=False)
    assert after == fresh.generate([prompt], max_new_tokens=12, temperature=0)[0].tokens
    assert after != before  # the step changed what the model says (else the test shows nothing)


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


@pytest.mark.slow
def test_resume_between_updates_is_bitwise(chat_checkpoint, parity_reward, tmp_path):
    """Paused after step 3 (between the two updates of rollout 1) and resumed: the same
    per-step losses, bit for bit, as one uninterrupted run (fp32, CPU)."""
    whole = tmp_path / "whole"
    grpo(_cfg(chat_checkpoint, whole, rollouts=3))
    split = tmp_path / "split"
    first = grpo(_cfg(chat_checkpoint, split, rollouts=3, stop_after_step=3))
    assert first.get("paused") == 3
    from qwen25.train.checkpointing import latest_checkpoint

    paused = latest_checkpoint(split / "checkpoints")
    assert paused.step == 3 and paused.state["data"][0]["rollout"]["index"] == 1  # the half-used rollout is kept
    grpo(_cfg(chat_checkpoint, split, rollouts=3))
    a, b = _losses(whole), _losses(split)
    assert len(a) == 6 and a == b
    assert any(x != 0.0 for x in a)
    records = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    firsts = [r["first_update_ratio_dev"] for r in records if "first_update_ratio_dev" in r]
    assert len(firsts) == 3 and max(firsts) <= 1e-4
    assert (whole / "final" / "config.json").exists() and (whole / "plots").is_dir()


def test_a_failing_reward_drops_the_sample_and_the_run_goes_on(chat_checkpoint, monkeypatch, tmp_path):
    calls = {"n": 0}

    def flaky(prompt, completion, example):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise ValueError("verifier bug")
        return math.nan if calls["n"] % 5 == 0 else float(len(completion) % 2)

    monkeypatch.setitem(rewards_mod.BUILTIN, "flaky", (flaky, "test"))
    out = tmp_path / "run"
    summary = grpo(_cfg(chat_checkpoint, out, reward="flaky", rollouts=1, mu=1, order="random"))
    assert summary["step"] == 1
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"rollout"' in x][0]
    assert rec["reward_failed"] > 0 and rec["answers"] == 8 - rec["reward_failed"]


@pytest.mark.parametrize("change, match", [
    ({"group_size": 1}, "at least 2 answers"),
    ({"reward": "no_such_reward"}, "unknown reward"),
    ({"reward": ""}, "--reward is empty"),
    ({"aggregation": "mean"}, "aggregation"),
    ({"order": "sorted"}, "order"),
    ({"temperature": 0.0}, "temperature"),
    ({"mu": 0}, "mu"),
    ({"eps_low": 1.5}, "eps_low"),
    ({"queries": "gsm8k"}, "unknown query set"),
    ({"group_size": 16, "max_batch_size": 8}, "max_batch_size"),
    ({"lora_rank": -1}, "lora_rank"),
    ({"merge": True}, "--merge needs LoRA"),
])
def test_bad_config_is_one_line(chat_checkpoint, tmp_path, change, match):
    with pytest.raises(UserError, match=match) as e:
        grpo(_cfg(chat_checkpoint, tmp_path / "x", **change))
    assert "\n" not in str(e.value)


def test_queries_per_step_must_divide_by_the_processes(chat_checkpoint):
    """Each process rolls out an equal share of a step's queries (the run under torchrun:
    test_grpo_distributed.py)."""
    cfg = _cfg(chat_checkpoint, Path("unused"), queries_per_step=3)
    validate(cfg, world_size=1)
    validate(cfg, world_size=3)
    with pytest.raises(UserError, match="queries_per_step=3 is not divisible by the 2 processes") as e:
        validate(cfg, world_size=2)
    assert "\n" not in str(e.value)


def test_queries_come_from_training_splits_only():
    from qwen25.eval.tasks import get_task

    held_out = {ex.messages[-1]["content"] for ex in get_task("synth_math").examples(0)}
    train = {query("synth_math", i).messages[-1]["content"] for i in range(500)}
    assert not held_out & train
    assert query("arithmetic", 3) == query("arithmetic", 3)  # pure function of the index


def test_reward_spec_weights_and_sum():
    rs = rewards_mod.parse_reward_spec("math_answer,format:0.25")
    assert [(r.name, r.weight) for r in rs] == [("math_answer", 1.0), ("format", 0.25)]
    from qwen25.eval.tasks.base import GenExample

    ex = GenExample(id="x", prompt="", messages=(), target=12)
    total, parts = rewards_mod.total_reward(rs, "", "3 x 4 = 12. The answer is 12.", ex)
    assert parts == {"math_answer": 1.0, "format": 1.0} and total == 1.25
    total, parts = rewards_mod.total_reward(rs, "", "It is 13.", ex)
    assert total == 0.0
    with pytest.raises(UserError, match="rm:"):
        rewards_mod.parse_reward_spec("rm:")


@pytest.fixture(scope="module")
def reward_folder(chat_checkpoint, tmp_path_factory) -> Path:
    """A reward model on the tiny chat model (random head, scaled so scores differ)."""
    from qwen25.train.reward_model import RewardModel, save_reward_model

    tok = load_tokenizer(chat_checkpoint)
    rm = RewardModel(load_model(chat_checkpoint, dtype=torch.float32), pad_token_id=tok.pad_token_id)
    rm.init_head(seed=1)
    with torch.no_grad():
        rm.score.weight.mul_(50)
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_reward_model(rm, out)
    for f in chat_checkpoint.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def test_reward_model_reward_equals_transformers_on_the_rendered_conversation(chat_checkpoint, reward_folder):
    """rm:DIR scores (query turns + the completion as the assistant's turn) exactly as
    transformers' sequence classifier scores the chat-template rendering of that conversation."""
    from transformers import AutoModelForSequenceClassification

    from qwen25.train.reward_score import load_reward_scorer

    tok = load_tokenizer(chat_checkpoint)
    hf = AutoModelForSequenceClassification.from_pretrained(reward_folder).eval()
    rm = rewards_mod.parse_reward_spec(f"rm:{reward_folder}:0.5", load_reward_model=load_reward_scorer)
    ex = query("synth_math_chat", 3)
    scores = []
    for completion in ("The answer is 5.", "Ben has 3 apples.\nThe final answer is $\\boxed{12}$.", ""):
        total, parts = rewards_mod.total_reward(rm, "", completion, ex)
        msgs = list(ex.messages) + [{"role": "assistant", "content": completion}]
        ids = tok.apply_chat_template(msgs)
        end = len(ids) - ids[::-1].index(tok.token_to_id("<|im_end|>"))  # through the reply's <|im_end|>
        with torch.no_grad():
            ref = float(hf(input_ids=torch.tensor([ids[:end]])).logits[0, 0])
        assert parts[f"rm:{reward_folder}"] == pytest.approx(ref, abs=1e-4)
        assert total == pytest.approx(0.5 * ref, abs=1e-4)
        scores.append(ref)
    assert abs(scores[0] - scores[1]) > 1e-3  # the reply matters (an empty one is scored too)


def test_grpo_runs_with_verifier_plus_reward_model(chat_checkpoint, reward_folder, tmp_path):
    cfg = _cfg(chat_checkpoint, tmp_path / "run", queries="synth_math_chat", reward=f"math_latex,rm:{reward_folder}:0.5",
               rollouts=1, mu=1)
    summary = grpo(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    roll = [r for r in rec if r.get("kind") == "rollout"]
    assert summary["step"] == 1 and roll and roll[0]["reward_failed"] == 0
    assert roll[0]["reward_std"] > 0  # the reward model separates answers that all miss the verifier


def test_a_missing_reward_model_folder_is_one_line(chat_checkpoint, tmp_path):
    with pytest.raises(UserError, match="rm:.*not a folder"):
        grpo(_cfg(chat_checkpoint, tmp_path / "run", reward=f"math_latex,rm:{tmp_path / 'nope'}"))


def test_instruction_queries_and_the_ifeval_reward():
    """'instructions' queries carry their constraints; the ifeval reward is the IFEval
    checkers' strict verdict and math_answer reads the reply's "So the answer is N."."""
    from qwen25.data.sft_builtin import instruction_row
    from qwen25.train.grpo_queries import INSTRUCTIONS_OFFSET

    rewards = rewards_mod.parse_reward_spec("ifeval,math_answer:0.5")
    for i in range(10):
        ex = query("instructions", i)
        row = instruction_row("train", INSTRUCTIONS_OFFSET + i)
        assert ex.messages[0]["content"] == row["messages"][0]["content"]
        total, parts = rewards_mod.total_reward(rewards, "", row["messages"][1]["content"], ex)
        assert parts == {"ifeval": 1.0, "math_answer": 1.0} and total == 1.5
        wrong = rewards_mod.total_reward(rewards, "", "NO, The Answer Is 0.", ex)[1]
        assert wrong["ifeval"] == 0.0 and wrong["math_answer"] == float(str(ex.target) == "0")


def test_chat_mix_alternates_instruction_and_math_queries_each_scored_by_its_own_verifier():
    from qwen25.eval.tasks.ifbench import score_ifeval
    from qwen25.eval.tasks.math import score_math, score_number

    rewards = rewards_mod.parse_reward_spec("verifier")
    kinds = [query("chat_mix", i).id.split("/")[0] for i in range(6)]
    assert kinds == ["instructions", "synth_math_chat"] * 3
    replies = ["So the answer is {t}.", "\\boxed{{{t}}}", "nothing", "\"so the answer is {t}.\""]
    for i in range(8):
        ex = query("chat_mix", i)
        for r in replies:
            text = r.format(t=ex.target)
            got = rewards_mod.total_reward(rewards, "", text, ex)[0]
            if ex.id.startswith("instructions/"):  # reference: the two scorers called directly
                want = score_ifeval(text, ex.doc) + score_number(text, ex)["exact_match_strict"]
            else:
                want = score_math(text, ex)["exact_match_strict"]
            assert got == want, (ex.id, text)
    with pytest.raises(rewards_mod.RewardError, match="no scorer"):
        rewards_mod.total_reward(rewards, "", "x", query("arithmetic", 0))


def test_answer_format_rewards_each_sets_format_right_or_wrong():
    rewards = rewards_mod.parse_reward_spec("answer_format")
    score = lambda text, ex: rewards_mod.total_reward(rewards, "", text, ex)[0]  # noqa: E731
    inst, math = query("chat_mix", 0), query("chat_mix", 1)
    assert score("So the answer is 7.", inst) == 1.0 and score("So the answer is 7.", math) == 0.0
    assert score("x = 3.\nThe final answer is $\\boxed{12}$.", math) == 1.0
    assert score("The final answer is $\\boxed{\\frac{1}{2}}$", math) == 1.0  # a number, written in LaTeX
    assert score("\\boxed{x}", math) == 0.0 and score("The answer is 12", math) == 0.0
    assert score("\\boxed{12}", inst) == 0.0
    with pytest.raises(rewards_mod.RewardError, match="no format"):
        score("x", query("arithmetic", 0))


def test_instruction_verifier_is_a_function_of_the_text():
    # english_lowercase asks langdetect, which samples at random: unseeded, "\boxed{576}" came
    # out English on some calls and Somali on others, so the same completion earned 0 or 1.
    from qwen25.eval.tasks.ifbench import score_ifeval

    doc = {"instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}], "prompt": "answer in lowercase"}
    for text in ("\\boxed{576}", "so the answer is 576.", "ok 12"):
        assert len({score_ifeval(text, doc) for _ in range(100)}) == 1, text

"""GRPO with LoRA: only the adapters train, the engine samples from the adapted policy, the
reference is the base with the adapters off, and the output is SFT's PEFT adapter folder.

References: the adapted model's own forward (the engine's merged view must give its logits
to 2e-4 absolute in float32, on logits of size ~10 whose own float32-vs-float64 error is
~5e-5 in this random model, and its sampled tokens' log-probs to mean |ρ − 1| <= 1e-4, while
the base model, or the view before `refresh()`, is > 1e-2 away, so the checks can fail); a separately loaded base model (the
disabled adapters and the checkpoint's frozen weights must equal it bit for bit);
`peft.PeftModel.from_pretrained` on transformers' `Qwen2ForCausalLM` for the saved adapter
(logits to 1e-5); an uninterrupted run for a run resumed between the updates of a rollout
(losses and adapter bitwise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_support import build_chat_checkpoint, parity
from qwen25 import Engine, load_model, load_tokenizer
from qwen25.engine.dispatch import Dispatcher
from qwen25.model.logprobs import token_logprobs
from qwen25.train import lora
from qwen25.train import rewards as rewards_mod
from qwen25.train.checkpointing import latest_checkpoint
from qwen25.train.grpo import GRPOObjective, grpo, micro_batches, rollout
from qwen25.train.grpo_config import GRPOConfig
from qwen25.train.loop import train_step
from qwen25.train.optim import build_optimizer
from qwen25.train.parallel import init_world

LORA = dict(lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> Path:
    return build_chat_checkpoint(tmp_path_factory.mktemp("grpo-lora"))


@pytest.fixture
def parity_reward(monkeypatch):
    monkeypatch.setitem(rewards_mod.BUILTIN, "parity", (parity, "test reward"))


def _cfg(ck: Path, out: Path, **kw) -> GRPOConfig:
    base = dict(model=str(ck), out=str(out), reward="parity", group_size=4, queries_per_step=2, rollouts=2, mu=1,
                max_new_tokens=10, micro_batch=4, eval_queries=0, lr=2e-2, checkpoint_every=1, eval_every=0,
                max_batch_size=8, **LORA)
    return GRPOConfig(**{**base, **kw})


def _answer_logp(model, samples, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the sampled tokens under `model`, the engine's) over all answer tokens."""
    mine, engine = [], []
    with torch.no_grad():
        for b in micro_batches(samples, 4):
            m = b["mask"].bool()
            mine.append(token_logprobs(model(b["input_ids"]).float(), b["targets"], temperature)[m])
            engine.append(b["old_logp"][m])
    return torch.cat(mine), torch.cat(engine)


def test_engine_samples_from_the_adapter_after_a_step(chat_checkpoint, parity_reward):
    cfg = _cfg(chat_checkpoint, Path("unused"))
    model = load_model(chat_checkpoint, dtype=torch.float32)
    lora.apply(model, cfg, base=chat_checkpoint)
    model.train()
    tok = load_tokenizer(chat_checkpoint)
    view = lora.MergedView(model)
    engine = Engine(view.model, max_batch_size=8, max_seq_len=512, hugepages=False)
    d = Dispatcher(engine, tok)
    rewards = rewards_mod.parse_reward_spec("parity")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    ro = rollout(cfg, 0, d, tok, rewards, tok.stop_token_ids)
    opt = build_optimizer(model, 0.05, weight_decay=0.0)
    train_step(model, opt, micro_batches(ro["samples"], 4), GRPOObjective(cfg), lr=0.05, world=init_world("cpu"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)  # the base is frozen, bit for bit

    stale = rollout(cfg, 1, d, tok, rewards, tok.stop_token_ids)  # before the re-merge: the old policy
    view.refresh()
    ids = torch.tensor([ro["samples"][0]["prompt"] + ro["samples"][0]["tokens"]])
    with torch.no_grad():
        torch.testing.assert_close(view.model(ids), model(ids), rtol=0, atol=2e-4)
        with lora.adapters_disabled(model):
            assert (model(ids) - view.model(ids)).abs().max() > 1e-2  # the step moved the policy

    fresh = rollout(cfg, 1, d, tok, rewards, tok.stop_token_ids)  # prefill + decode on the merged view
    mine, eng = _answer_logp(model, fresh["samples"])
    assert float(((mine - eng).exp() - 1).abs().mean()) <= 1e-4
    mine, eng = _answer_logp(model, stale["samples"])
    assert float((mine - eng).abs().max()) > 1e-2  # without refresh() the engine lags a step


def test_adapters_disabled_is_the_base_model(chat_checkpoint):
    model = load_model(chat_checkpoint, dtype=torch.float32)
    lora.add_lora(model, 4, 8.0, targets=lora.LORA_TARGETS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = load_model(chat_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        with lora.adapters_disabled(model):
            off = model(ids)
        on = model(ids)
        assert torch.equal(off, base(ids))
        assert (on - off).abs().max() > 1e-2
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())


def test_lora_run_trains_the_adapter_only_and_writes_a_peft_folder(chat_checkpoint, parity_reward, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    summary = grpo(_cfg(chat_checkpoint, out, beta=0.05, merge=True))
    assert summary["step"] == 2 and summary["lora"] and summary["final"] == str(out / "final")

    ckpt = latest_checkpoint(out / "checkpoints")
    got, want = load_model(ckpt.path).state_dict(), load_model(chat_checkpoint).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    adapter = load_file(str(out / "adapter" / lora.ADAPTER_WEIGHTS))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())

    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in records if r.get("kind") == "grpo_update"]
    assert [r["step"] for r in updates] == [1, 2]
    assert updates[0]["kl"] == 0.0 and updates[1]["kl"] > 0  # B = 0: policy = reference, then not
    assert max(r["first_update_ratio_dev"] for r in updates) <= 1e-4  # merged engine vs adapted trainer

    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    ours = load_model(chat_checkpoint, dtype=torch.float32).eval()
    lora.add_lora(ours, 4, 8.0, targets=lora.LORA_TARGETS)
    lora.load_adapter(ours, out / "adapter")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(chat_checkpoint), torch_dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(hf, str(out / "adapter")).eval()
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_model(out / "final")(ids), expected, rtol=1e-5, atol=1e-5)
        assert (load_model(chat_checkpoint)(ids) - expected).abs().max() > 1e-3  # the adapter matters


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "train"]


def test_lora_resume_between_updates_is_bitwise(chat_checkpoint, parity_reward, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    grpo(_cfg(chat_checkpoint, whole, mu=2))
    assert grpo(_cfg(chat_checkpoint, split, mu=2, stop_after_step=3)).get("paused") == 3
    grpo(_cfg(chat_checkpoint, split, mu=2))
    a, b = _losses(whole), _losses(split)
    assert len(a) == 4 and a == b and any(x != 0.0 for x in a)
    wa = load_file(str(whole / "adapter" / lora.ADAPTER_WEIGHTS))
    wb = load_file(str(split / "adapter" / lora.ADAPTER_WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lora_shortcut_flag():
    from qwen25.cli import grpo as cli
    from qwen25.cli.config_args import apply_lora_shortcut, config_from_args

    p = argparse.ArgumentParser()
    cli.configure(p)
    for argv, rank in ((["--lora"], 16), (["--lora", "--lora-rank", "4"], 4), ([], 0)):
        args = p.parse_args(["--model", "m", *argv])
        assert apply_lora_shortcut(config_from_args(GRPOConfig, args), args).lora_rank == rank

"""Chosen and rejected behind one copy of the prompt (`collate_shared_prompt`) score and
train like the two padded rows of `collate_pairs`: the same scores and gradients on a
random model (fp32, 1e-5), and the same per-step losses through the reward stage."""

from __future__ import annotations

import random

import pytest
import torch

from preference_support import lm_folder, records, train_small_tokenizer, write_pairs
from qwen25.config import ModelConfig
from qwen25.data.preference import PreferencePair, collate_pairs, collate_shared_prompt
from qwen25.model.model import build_model
from qwen25.train.dpo_loss import bradley_terry_loss
from qwen25.train.reward import RewardConfig, reward_train
from qwen25.train.reward_model import RewardModel, pair_scores


def _pairs(seed: int, n: int, vocab: int) -> list[PreferencePair]:
    r = random.Random(seed)
    tok = lambda k: [r.randrange(1, vocab) for _ in range(k)]  # noqa: E731
    out = []
    for i in range(n):
        c, j = tok(r.randint(1, 12)), tok(1 if i == 0 else r.randint(1, 12))  # a one-token response too
        out.append(PreferencePair(tok(r.randint(1, 20)), c, j, [1] * len(c), [1] * len(j)))
    return out


def _model(seed=0):
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=128)
    rm = RewardModel(build_model(cfg, dtype=torch.float32, seed=seed), pad_token_id=0)
    rm.init_head(seed)
    with torch.no_grad():
        rm.score.weight.mul_(50)  # scores of order one, so a wrong mask shows
    return rm


def _grads(rm, batch):
    rm.zero_grad()
    rw, rl = pair_scores(rm, batch)
    bradley_terry_loss(rw, rl).sum().backward()
    return rw.detach(), rl.detach(), {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prompt_scores_and_gradients_equal_two_padded_rows(seed):
    rm = _model(seed)
    pairs = _pairs(seed, 6, 300)
    a_w, a_l, a_g = _grads(rm, collate_pairs(pairs, 0))
    b_w, b_l, b_g = _grads(rm, collate_shared_prompt(pairs, 0))
    assert torch.allclose(a_w, b_w, atol=1e-5) and torch.allclose(a_l, b_l, atol=1e-5)
    assert (a_w - a_l).abs().max() > 1e-2  # the pairs really score differently
    for name, g in a_g.items():
        assert torch.allclose(g, b_g[name], atol=1e-5, rtol=1e-4), name


def test_rejected_tokens_never_see_chosen_tokens():
    p = PreferencePair([5, 6, 7], [8, 9], [10, 11, 12], [1, 1], [1, 1, 1])
    b = collate_shared_prompt([p, PreferencePair([5], [6], [7], [1], [1])], 0)
    mask = b["attention_mask"][0, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert not mask[5:, 3:5].any() and mask[5:, :3].all()  # rejected: the prompt, not chosen
    assert b["chosen_last"].tolist() == [4, 1] and b["rejected_last"].tolist() == [7, 2]
    assert not b["attention_mask"][1, 0, :3, 3:].any()  # the short row's pads are never keys


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-shared")
    tok = train_small_tokenizer(root)
    return {"root": root, "sft": lm_folder(root, tok, 0), "pairs": write_pairs(root / "pairs.jsonl", 22)}


def test_reward_stage_losses_equal_with_and_without_the_shared_prompt(env):
    runs = {}
    for shared in (True, False):
        out = env["root"] / f"shared-{shared}"
        reward_train(RewardConfig(model=str(env["sft"]), data=str(env["pairs"]), out=str(out), batch_size=4,
                                  micro_batch=2, lr=1e-3, eval_fraction=0.1, checkpoint_every=100, eval_every=2,
                                  threads=1, max_length=128, shared_prompt=shared))
        runs[shared] = list(zip(records(out, "train"), records(out, "pairs")))
    assert len(runs[True]) == len(runs[False]) == 5
    for (ta, pa), (tb, pb) in zip(runs[True], runs[False]):
        assert abs(ta["loss"] - tb["loss"]) < 1e-5 and abs(ta["grad_norm"] - tb["grad_norm"]) < 1e-5
        assert abs(pa["rewards/margins"] - pb["rewards/margins"]) < 1e-5

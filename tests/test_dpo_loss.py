"""DPO losses and metrics against TRL's DPOTrainer (its own collator and `_compute_loss`), on the
same tiny Qwen2 policy/reference pair and the same preference pairs, and the pair tokenisation
against TRL's. Tolerance 1e-5 (fp32 CPU)."""

from __future__ import annotations

import pytest
import torch

from preference_support import save_hf_lm, train_small_tokenizer
from qwen25.data.preference import collate_pairs, encode_pair
from qwen25.errors import UserError
from qwen25.train.dpo_loss import PairLogps, bradley_terry_loss, dpo_loss, pair_logprobs, preference_metrics

pytest.importorskip("trl")

ROWS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, I think."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "chosen": [{"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "assistant", "content": "Seven"}]},
    {"prompt": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "again, louder"}],
     "chosen": [{"role": "assistant", "content": "HI!"}],
     "rejected": [{"role": "assistant", "content": "\nhi again"}]},
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris is the capital of France."}],
     "rejected": [{"role": "assistant", "content": "Lyon"}]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from qwen25.checkpoint import load_model

    root = tmp_path_factory.mktemp("dpo")
    tok = train_small_tokenizer(root)
    hf = {name: save_hf_lm(root / name, len(tok), seed) for name, seed in (("policy", 0), ("ref", 6))}
    ours = {name: load_model(root / name) for name in hf}
    return {"tok": tok, "hf_tok": AutoTokenizer.from_pretrained(root / "tok"), "hf": hf,
            "ours": ours, "root": root}


def _trl_trainer(setup, loss_type, beta, label_smoothing=0.0):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(setup["root"] / f"trl-{loss_type}"), beta=beta, loss_type=[loss_type],
                     label_smoothing=label_smoothing, report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(ROWS), bf16=False)
    return DPOTrainer(model=setup["hf"]["policy"], ref_model=setup["hf"]["ref"], args=args,
                      train_dataset=Dataset.from_list(ROWS), processing_class=setup["hf_tok"])


def _ours(setup, loss_type, beta, label_smoothing=0.0):
    pairs = [encode_pair(setup["tok"], r) for r in ROWS]
    batch = collate_pairs(pairs, pad_id=setup["tok"].pad_token_id)
    policy, ref = setup["ours"]["policy"], setup["ours"]["ref"]
    policy.zero_grad()
    logps = pair_logprobs(policy, batch)
    with torch.no_grad():
        ref_logps = pair_logprobs(ref, batch)
    out = dpo_loss(logps, ref_logps.chosen, ref_logps.rejected, beta=beta, loss_type=loss_type,
                   label_smoothing=label_smoothing)
    loss = out.losses.sum() / len(pairs)
    loss.backward()
    metrics = {k: float(v) / len(pairs) for k, v in preference_metrics(out.chosen_rewards, out.rejected_rewards).items()}
    return pairs, float(loss), metrics, {n: p.grad.clone() for n, p in policy.named_parameters()}


@pytest.mark.parametrize("loss_type,beta,ls", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0),
                                               ("hinge", 2.0, 0.0), ("robust", 0.1, 0.2)])
def test_loss_metrics_and_gradient_equal_trl(setup, loss_type, beta, ls):
    trainer = _trl_trainer(setup, loss_type, beta, ls)
    pairs, loss, metrics, grads = _ours(setup, loss_type, beta, ls)
    # TRL's collator and loss on our token ids (its own tokenisation is compared below).
    inputs = trainer.data_collator([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                                     "rejected_ids": p.rejected_ids} for p in pairs])
    trainer.model.train()
    trainer.model.zero_grad()
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert loss == pytest.approx(float(trl_loss), abs=1e-5, rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[key] == pytest.approx(logged[key], abs=1e-5), key
    assert 0 < logged["rewards/accuracies"] < 1  # the pairs disagree, so the metric is informative
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_pair_tokens_equal_trl_except_at_the_boundaries(setup):
    """Two deliberate differences from TRL. (1) TRL keeps the template's newline after the
    final <|im_end|> as a response token; we cut it (the model never generates it). (2) When a
    reply starts with a newline, BPE merges it with the generation prompt's; TRL then cuts the
    prompt short (the two sides' prompts are its common prefix), we keep the prompt's exact
    tokens and re-encode the reply after it, as the model would generate it. Same text always."""
    trainer = _trl_trainer(setup, "sigmoid", 0.1)
    tok = setup["tok"]
    newline = tok.encode("\n")
    for i, row in enumerate(ROWS):
        ours = encode_pair(tok, row)
        theirs = trainer.train_dataset[i]
        for side in ("chosen", "rejected"):
            mine = ours.prompt_ids + getattr(ours, f"{side}_ids") + newline
            assert tok.decode(mine) == tok.decode(theirs["prompt_ids"] + theirs[f"{side}_ids"])
        assert ours.prompt_ids == tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
        if i == 2:  # the reply "\nhi again"
            assert theirs["prompt_ids"] == ours.prompt_ids[:-1]
            assert ours.rejected_ids[:2] == newline + tok.encode("hi")
        else:
            assert ours.prompt_ids == theirs["prompt_ids"]
            assert ours.chosen_ids + newline == theirs["chosen_ids"]
            assert ours.rejected_ids + newline == theirs["rejected_ids"]
        assert ours.chosen_mask == [1] * len(ours.chosen_ids)


def test_bradley_terry_equals_trl_reward_trainer_formula():
    """TRL RewardTrainer: -logsigmoid(r_w - r_l - margin).mean() + c * mean((r_w + r_l)^2)."""
    g = torch.Generator().manual_seed(0)
    rw, rl, m = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g)
    want = -torch.nn.functional.logsigmoid(rw - rl - m).mean() + 0.01 * ((rw + rl) ** 2).mean()
    got = bradley_terry_loss(rw, rl, margin=m, center=0.01).mean()
    assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_bad_dpo_arguments_are_user_errors():
    x = torch.zeros(2)
    lp = PairLogps(x, x, torch.ones(2), torch.ones(2))
    with pytest.raises(UserError, match="unknown"):
        dpo_loss(lp, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(UserError, match="beta"):
        dpo_loss(lp, x, x, beta=0.0)
    with pytest.raises(UserError, match="label smoothing"):
        dpo_loss(lp, x, x, beta=0.1, loss_type="hinge", label_smoothing=0.1)

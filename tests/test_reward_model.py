"""Reward model: scores equal transformers' Qwen2ForSequenceClassification loaded from our saved
folder, with left and right padding and batch sizes 1 and 8 (1e-5, fp32 CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from preference_support import save_hf_lm
from qwen25.checkpoint import load_model
from qwen25.errors import UserError
from qwen25.train.reward_model import (RewardModel, load_reward_model, pad_batch, save_reward_model,
                                       score_batches)

VOCAB, PAD = 300, 299


def _sequences(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g).tolist()
    return [torch.randint(0, PAD, (L,), generator=g).tolist() for L in lengths]  # never the pad id


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    save_hf_lm(root / "lm", VOCAB, seed=0, tie_word_embeddings=False)
    rm = RewardModel(load_model(root / "lm"), pad_token_id=PAD)
    rm.init_head(seed=1)
    with torch.no_grad():
        rm.score.weight.mul_(50)  # scores of order 1, so a wrong position cannot hide in 1e-5
    save_reward_model(rm, root / "rm")
    return root, rm


def _hf_scores(hf, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # HF would shift left-padded rows' RoPE
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1).float()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_scores_equal_transformers_on_our_saved_folder(folders, side, batch_size):
    from transformers import AutoModelForSequenceClassification

    root, rm = folders
    hf = AutoModelForSequenceClassification.from_pretrained(root / "rm").eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification"
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    seqs = _sequences()
    ours, theirs = [], []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_batch(seqs[start:start + batch_size], PAD, side)
        with torch.no_grad():
            ours.append(rm(ids, mask))
        theirs.append(_hf_scores(hf, ids, mask))
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    alone = torch.stack([_hf_scores(hf, *pad_batch([s], PAD)) for s in seqs]).squeeze(-1)
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-5)  # padding changes nothing
    assert float(ours.std()) > 0.1


def test_load_reward_model_round_trip_and_batched_scoring(folders):
    root, rm = folders
    back = load_reward_model(root / "rm")
    seqs = _sequences(11, seed=3)
    one = score_batches(back, seqs, batch_size=1)
    many = score_batches(back, seqs, batch_size=8)
    with torch.no_grad():
        direct = [float(rm(torch.tensor([s]))) for s in seqs]
    assert one == pytest.approx(direct, abs=1e-5)
    assert many == pytest.approx(direct, abs=1e-5)


def test_pad_equal_to_eos_still_reads_the_last_real_token(folders):
    """trl#2778: with pad = the sequences' final token, HF's pad-id search lands on the wrong
    position; the attention mask does not."""
    root, rm = folders
    seqs = [s + [PAD] for s in _sequences(4, seed=5)]  # each ends with the 'pad' id, as with pad = eos
    ids, mask = pad_batch(seqs, PAD, "right")
    with torch.no_grad():
        batched = rm(ids, mask)
        alone = torch.cat([rm(torch.tensor([s])) for s in seqs])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_a_language_model_folder_is_not_a_reward_model(folders):
    root, _ = folders
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(root / "lm")
    cfg = json.loads((root / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForSequenceClassification"]

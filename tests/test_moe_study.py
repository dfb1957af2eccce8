"""Dense vs MoE study: matched shapes (counted by `count_parameters`), a trained MoE with the
load-balancing loss keeps every expert in use, the study writes its table and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qwen25.config import ModelConfig, count_parameters
from qwen25.errors import UserError
from qwen25.train.moe_study import StudyConfig, run_study, study_configs
from train_fakes import fake_factory, write_fake_manifest


def test_study_shapes_match_active_and_total_ffn_parameters():
    dense = ModelConfig.preset("tiny")  # intermediate 176
    shapes = study_configs(dense, num_experts=8, top_k=2, shared_fraction=0.5)
    moe, total = shapes["moe"], shapes["dense-total"]
    assert moe.moe_intermediate_size == 44 and moe.shared_expert_intermediate_size == 88
    n = {k: count_parameters(v) for k, v in shapes.items()}
    h, L, E = dense.hidden_size, dense.num_hidden_layers, 8
    router = L * (h * E + h)  # router + shared-expert gate: the only extra weights per token
    assert n["moe"]["active_non_embedding"] - n["dense-active"]["active_non_embedding"] == router
    assert n["moe"]["non_embedding"] - n["dense-total"]["non_embedding"] == router


def test_expert_count_that_does_not_divide_is_a_one_line_error():
    with pytest.raises(UserError, match="not divisible by top_k=3") as e:
        study_configs(ModelConfig.preset("tiny"), num_experts=8, top_k=3)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="top_k=9"):
        study_configs(ModelConfig.preset("tiny"), num_experts=8, top_k=9)


@pytest.mark.slow
def test_study_trains_three_models_and_the_moe_uses_every_expert(tmp_path):
    """Tiny models on a synthetic token stream, aux loss 0.01: on held-out tokens every expert
    of every layer gets assignments and the utilisation entropy stays near log E (we require
    >= 0.9 log E; a collapsed router gives far less)."""
    rng = np.random.default_rng(7)
    toks = np.cumsum(rng.integers(1, 5, 40000)) % 80
    manifest = write_fake_manifest(tmp_path / "data", toks[:36000], toks[36000:])
    cfg = StudyConfig(out=str(tmp_path / "study"), data=str(manifest), model="tiny",
                      model_overrides={"vocab_size": 80}, num_experts=8, top_k=2, tokens=24 * 512,
                      seq_len=32, batch_tokens=512, micro_batch=8, lr=3e-3, eval_tokens=2048)
    res = run_study(cfg, loader_factory=fake_factory, say=lambda s: None)
    assert set(res["models"]) == {"dense-active", "moe", "dense-total"}
    for m in res["models"].values():
        assert m["tokens"] == 24 * 512 and math.isfinite(m["held_out_loss"]) and m["held_out_loss"] < math.log(80)
    moe = res["models"]["moe"]
    assert moe["flops_per_token"] == pytest.approx(res["models"]["dense-active"]["flops_per_token"], rel=0.02)
    u = res["utilisation"]
    counts = np.array(u["counts"])
    assert counts.shape == (2, 8) and (counts > 0).all() and u["unused_experts"] == 0
    assert min(u["entropy"]) >= 0.9 * math.log(8)
    out = tmp_path / "study"
    assert {"loss_vs_flops.png", "loss_vs_time.png", "expert_utilisation.png"} <= {p.name for p in (out / "plots").glob("*.png")}
    assert "| moe |" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())["utilisation"]["unused_experts"] == 0

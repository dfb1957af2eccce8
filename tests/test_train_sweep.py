"""`qwen25 sweep`: the grid runs through pretraining, the fit lands in law.json, and
`qwen25 pretrain --lr auto --batch auto --law FILE` uses it; bad grids are one-line errors.

References: every run folder is a normal pretraining run (its summary and final model);
law.json's law equals a refit of sweep.jsonl with `scaling` (independent of the sweep's
bookkeeping); the auto values equal the law evaluated at N (counted from the shape by
`count_parameters`) and D (stage tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qwen25.cli.pretrain import configure as configure_pretrain
from qwen25.cli.pretrain import pretrain_config
from qwen25.config import ModelConfig, count_parameters
from qwen25.errors import UserError
from qwen25.train import scaling
from qwen25.train.sweep import SweepConfig, check, grid, resolve_auto, size_overrides, sweep
from train_fakes import fake_factory, write_fake_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    rng = np.random.default_rng(5)
    toks = np.cumsum(rng.integers(1, 5, 30000)) % 80
    return str(write_fake_manifest(tmp_path_factory.mktemp("data"), toks[:27000], toks[27000:]))


def _cfg(tmp_path, manifest, **kw):
    base = dict(out=str(tmp_path / "sweep"), data=manifest, model="tiny", sizes=("32x1", "64x1"),
                tokens=(1024, 2048), lr=(1e-3, 1e-2, 1e-1), batch=(256,), seq_len=16, micro_batch=8,
                eval_tokens=512, base={"model_overrides": {"vocab_size": 80}, "peak_flops": 1e12})
    return SweepConfig(**{**base, **kw})


@pytest.mark.slow
def test_sweep_runs_the_grid_fits_saves_and_pretrain_auto_reads_the_law(tmp_path, manifest):
    cfg = _cfg(tmp_path, manifest)
    said = []
    result = sweep(cfg, loader_factory=fake_factory, say=said.append)
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(np.isfinite(r["loss"]) for r in rows)
    for r in rows:  # each point is a complete pretraining run folder
        run = out / "runs" / r["name"]
        assert (run / "final" / "config.json").is_file() and (run / "metrics.jsonl").is_file()
        assert r["tokens"] == r["D"]
    # N counted from the shape of each size
    n64 = count_parameters(ModelConfig.preset("tiny").replace(vocab_size=80, **size_overrides("64x1", ModelConfig.preset("tiny"))))
    assert {r["N"] for r in rows if r["size"] == "64x1"} == {n64["active_non_embedding"]}

    # law.json holds exactly the refit of the rows
    laws = scaling.load_laws(out / "law.json")
    refit = scaling.fit_power_law(scaling.sweep_optima(rows), [o["lr"] for o in scaling.sweep_optima(rows)],
                                  ("N", "D"), "lr")
    assert laws["lr"] == refit == result["lr"]
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"lr_curves.png", "lr_law.png", "batch_law.png"}

    # a second call finds every run finished and trains nothing
    said.clear()
    sweep(cfg, loader_factory=fake_factory, say=said.append)
    assert said[0] == "sweep: 12 runs, 12 already done"

    # qwen25 pretrain --lr auto --batch auto --law law.json
    import argparse

    p = argparse.ArgumentParser()
    configure_pretrain(p)
    args = p.parse_args(["--lr", "auto", "--batch", "auto", "--law", str(out / "law.json"), "--data", manifest,
                         "--model", "tiny", "--seq-len", "16", "--micro-batch", "2",
                         "--set", "model_overrides.hidden_size=64", "--set", "model_overrides.num_hidden_layers=1",
                         "--set", "stages.0.steps=0", "--set", "stages.0.tokens=3000"])
    pcfg = pretrain_config(args)
    N = count_parameters(ModelConfig.preset("tiny").replace(hidden_size=64, num_hidden_layers=1))["active_non_embedding"]
    assert pcfg.lr == pytest.approx(laws["lr"](N=N, D=3000))
    unit = 16 * 2
    assert pcfg.batch_tokens % unit == 0 and abs(pcfg.batch_tokens - laws["batch"](N=N, D=3000)) <= unit / 2
    assert pcfg.stages[0].tokens == 3000


def test_auto_converts_step_stages_to_tokens_and_needs_a_law(tmp_path):
    from qwen25.train.config import PretrainConfig, Stage

    lr = scaling.fit_power_law([{"D": d} for d in (1e5, 2e5, 4e5)], [3e-3, 2e-3, 1.5e-3], ("D",), "lr")
    batch = scaling.fit_power_law([{"D": d} for d in (1e5, 2e5, 4e5)], [2048, 4096, 8192], ("D",), "batch")
    path = scaling.save_laws(tmp_path / "law.json", lr, batch, None)
    cfg = PretrainConfig(model="tiny", seq_len=64, micro_batch=2, batch_tokens=1024, data="x",
                         stages=(Stage("main", steps=200),))
    new, note = resolve_auto(cfg, str(path), True, True)
    assert new.stages[0].tokens == 200 * 1024 and new.stages[0].steps == 0  # D is kept
    assert new.lr == pytest.approx(lr(D=204800)) and new.batch_tokens % 128 == 0
    assert "N=" in note
    with pytest.raises(UserError, match="need --law FILE"):
        resolve_auto(cfg, None, True, False)


@pytest.mark.parametrize("kw,match", [
    (dict(sizes=("64x1",), tokens=(1024,), lr=(1e-3,), batch=(256,)), "one point"),
    (dict(sizes=("64x1",), tokens=(1024,)), "one size and one token count"),
    (dict(sizes=("32x1", "64x1"), tokens=(1024,)), "needs at least 3 .* gives 2"),
    (dict(sizes=("64x2", "33x1")), "multiple of 32"),
    (dict(batch=(250,)), "not multiples of seq_len"),
    (dict(lr=()), "--lr is empty"),
    (dict(base={"lr": 1.0}), "sweep-owned"),
    (dict(base={"nope": 1.0}), "unknown"),
])
def test_bad_grids_are_one_line_errors_before_any_run(tmp_path, manifest, kw, match):
    with pytest.raises(UserError, match=match) as e:
        grid(_cfg(tmp_path, manifest, **kw))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "sweep").exists()


def test_cli_one_point_grid_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen25", "sweep", "--data", "x", "--sizes", "64x2",
                        "--tokens", "1000", "--lr", "1e-3", "--batch", "128"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "one point" in r.stderr


def test_grid_names_and_shapes():
    cfg = SweepConfig(data="x", sizes=("64x2", "tiny"), tokens=(4096, 8192), lr=(1e-3, 3e-3), batch=(512,),
                      seq_len=64, micro_batch=4)
    check(cfg)
    pts = grid(cfg)
    assert [p.name for p in pts][:2] == ["64x2-D4096-lr0.001-B512", "64x2-D4096-lr0.003-B512"]
    assert pts[0].config.micro_batch == 4 and pts[0].config.batch_tokens == 512
    assert pts[0].config.model_overrides["num_attention_heads"] == 2
    assert pts[4].config.model_overrides["hidden_size"] == ModelConfig.preset("tiny").hidden_size


def test_a_diverged_run_counts_as_infinite_loss_and_the_fit_goes_on(tmp_path, manifest):
    from qwen25.train.sweep import DIVERGED, _result, fit_sweep

    cfg = _cfg(tmp_path, manifest, sizes=("32x1", "64x1", "96x1"), tokens=(1024,), lr=(1e-3, 3e-3, 1e-2, 1e-1))
    pts = grid(cfg)
    (tmp_path / "sweep" / "runs" / pts[3].name).mkdir(parents=True)
    (tmp_path / "sweep" / "runs" / pts[3].name / DIVERGED).write_text("{}")
    assert _result(pts[3])["loss"] == float("inf") and _result(pts[0]) is None
    # rows as the sweep would collect them: lr 1e-1 diverged everywhere, a bowl elsewhere
    rows = [{"N": p.N, "D": p.D, "lr": p.lr, "batch": p.batch,
             "loss": float("inf") if p.lr == 1e-1 else 3 + (np.log10(p.lr) + 2.3) ** 2 + 1e4 / p.N} for p in pts]
    res = fit_sweep(rows)
    assert len(res["optima"]) == 3 and all(1e-3 < o["lr"] < 1e-2 for o in res["optima"])
    assert "unbracketed" not in res["notes"]

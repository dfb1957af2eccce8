"""`qwen25 sweep --search halving --eta E`: successive halving of each cell's (lr, batch)
candidates, then the same fits as the grid.

References: the pure rules are checked on hand-made losses whose answer is read off by eye
(ties, infinities, NaN, eta larger than the candidates, one candidate); the end-to-end
sweep is checked against the run folders it leaves (each rung's survivors are the best
losses of the rung before, as read back from those folders; the tokens trained are summed
from each folder's summary.json) and against the grid's own configs (the tokens a full grid
over the same candidates would train), and law.json against a refit of the last rung's rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from qwen25.errors import UserError
from qwen25.train import scaling
from qwen25.train.halving import check_halving, rung_budgets, rung_sizes, survivors
from qwen25.train.pretrain import total_tokens
from qwen25.train.sweep import SweepConfig, fit_sweep, grid, sweep
from train_fakes import fake_factory, write_fake_manifest

INF, NAN = math.inf, math.nan


# --------------------------------------------------------------------------------------
# The pure rules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,eta,sizes", [
    (9, 3, [9, 3, 1]),
    (10, 3, [10, 3, 1]),  # 10 // 3 = 3 survive
    (4, 3, [4, 1]),
    (4, 2, [4, 2, 1]),
    (5, 2, [5, 2, 1]),
    (2, 2, [2, 1]),
    (3, 5, [3, 1]),  # eta larger than the candidates: one cut straight to the winner
    (2, 9, [2, 1]),
])
def test_rung_sizes_cut_by_eta_down_to_one_winner(n, eta, sizes):
    assert rung_sizes(n, eta) == sizes


def test_rung_budgets_grow_by_eta_and_end_at_the_full_budget():
    assert rung_budgets(900, 3, 3) == [100, 300, 900]
    assert rung_budgets(1000, 3, 3) == [111, 333, 1000]  # rounded, the last exact
    assert rung_budgets(1000, 5, 2) == [200, 1000]
    assert rung_budgets(7, 4, 3) == [1, 2, 7]  # never zero tokens
    assert rung_budgets(5000, 3, 1) == [5000]


@pytest.mark.parametrize("losses,keep,expected", [
    ([3.0, 1.0, 2.0, 0.5], 2, [1, 3]),  # the two lowest, returned in candidate order
    ([3.0, 1.0, 2.0, 0.5], 1, [3]),
    ([1.0, 1.0, 1.0], 1, [0]),  # ties keep the candidate listed first
    ([2.0, 1.0, 1.0, 1.0], 2, [1, 2]),
    ([INF, 2.0, NAN, 1.0], 2, [1, 3]),  # diverged (inf) and NaN are worse than any finite loss
    ([INF, 2.0, NAN, 1.0], 3, [0, 1, 3]),  # ...and tie among themselves by position
    ([INF, INF], 1, [0]),  # every run diverged: still a deterministic cut
    ([-INF, 5.0], 1, [1]),  # a non-finite loss is never "the best"
    ([4.0, 3.0], 5, [0, 1]),  # keep more than there are: all survive
    ([5.0], 1, [0]),  # one candidate
    ([5.0, 4.0], 0, []),
])
def test_survivors_are_the_lowest_losses(losses, keep, expected):
    assert survivors(losses, keep) == expected


@pytest.mark.parametrize("n,eta,match", [
    (4, 1, "eta must be an integer >= 2"),
    (4, 0, "eta must be an integer >= 2"),
    (4, 2.5, "eta must be an integer >= 2"),
    (4, True, "eta must be an integer >= 2"),
    (1, 3, "at least 2 .* candidates"),
    (0, 3, "at least 2 .* candidates"),
])
def test_bad_halving_is_a_one_line_error(n, eta, match):
    with pytest.raises(UserError, match=match) as e:
        check_halving(n, eta)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=match):
        rung_sizes(n, eta)


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    rng = np.random.default_rng(5)
    toks = np.cumsum(rng.integers(1, 5, 30000)) % 80
    return str(write_fake_manifest(tmp_path_factory.mktemp("data"), toks[:27000], toks[27000:]))


def _cfg(tmp_path, manifest, **kw):
    base = dict(out=str(tmp_path / "sweep"), data=manifest, model="tiny", sizes=("32x1", "64x1"),
                tokens=(1024, 2048), lr=(3e-3, 3e-2), batch=(128, 256), seq_len=16, micro_batch=8,
                eval_tokens=512, base={"model_overrides": {"vocab_size": 80}, "peak_flops": 1e12},
                search="halving", eta=2)
    return SweepConfig(**{**base, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(eta=1), "eta must be an integer >= 2"),
    (dict(lr=(1e-3,), batch=(256,)), "at least 2 .* candidates .* gives 1"),
    (dict(lr=(1e-3, 1e-3), batch=(256,)), "gives 1"),  # a repeated value is one candidate
])
def test_bad_halving_sweeps_are_refused_before_any_run(tmp_path, manifest, kw, match):
    with pytest.raises(UserError, match=match):
        sweep(_cfg(tmp_path, manifest, **kw), loader_factory=fake_factory, say=lambda s: None)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flags,match", [
    (["--eta", "1"], "eta"),
    (["--lr", "1e-3"], "at least 2"),
])
def test_cli_bad_halving_exits_2_with_one_line(flags, match):
    args = {"--sizes": ["32x1", "64x1"], "--tokens": ["1000", "2000"], "--lr": ["1e-3", "1e-2"],
            "--batch": ["128"], "--eta": ["3"]}
    args.update({flags[0]: flags[1:]})
    cmd = [sys.executable, "-m", "qwen25", "sweep", "--data", "x", "--search", "halving"]
    for k, v in args.items():
        cmd += [k, *v]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr


def _rows(cells, lrs, losses_at):
    """Hand-made halving rows: rung 0 every lr, rung 1 the single winner `losses_at` picks."""
    rows = []
    for N, D in cells:
        first = [{"N": N, "D": D // 2, "cell_D": D, "lr": lr, "batch": 256, "loss": losses_at(N, lr) + 0.5,
                  "rung": 0, "rungs": 2} for lr in lrs]
        best = min(first, key=lambda r: r["loss"])
        rows += first + [{**best, "D": D, "loss": best["loss"] - 0.5, "rung": 1}]
    return rows


def test_halving_rows_fit_on_the_last_rung_and_flag_winners_on_the_grid_edge():
    cells = [(n, d) for n in (1e4, 3e4, 1e5) for d in (1e3, 2e3)]
    lrs = (1e-3, 3e-3, 1e-2, 3e-2)
    inside = fit_sweep(_rows(cells, lrs, lambda N, lr: (math.log10(lr) + 2) ** 2 + 1e3 / N))
    assert [(o["N"], o["D"], o["lr"]) for o in inside["optima"]] == [(n, d, 1e-2) for n, d in cells]
    assert "unbracketed" not in inside["notes"]
    # the same fit as the grid's on the winners alone
    winners = [r for r in _rows(cells, lrs, lambda N, lr: (math.log10(lr) + 2) ** 2 + 1e3 / N) if r["rung"] == 1]
    assert inside["optima"] == scaling.sweep_optima(winners)
    edge = fit_sweep(_rows(cells, lrs, lambda N, lr: -math.log10(lr)))  # the largest lr always wins
    assert all(o["lr"] == 3e-2 and not o["bracketed"] for o in edge["optima"])
    assert "unbracketed" in edge["notes"]


@pytest.mark.slow
def test_halving_sweep_trains_fewer_tokens_than_the_grid_and_writes_the_law(tmp_path, manifest):
    cfg = _cfg(tmp_path, manifest)
    said = []
    result = sweep(cfg, loader_factory=fake_factory, say=said.append)
    out = tmp_path / "sweep"
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert all(r["search"] == "halving" and r["rungs"] == 3 for r in rows)

    # 4 candidates, eta 2: 4 runs at D/4, the best 2 at D/2, the best 1 at D, per cell
    for size in cfg.sizes:
        for D in cfg.tokens:
            cell = [r for r in rows if r["size"] == size and r["cell_D"] == D]
            by_rung = [[r for r in cell if r["rung"] == k] for k in range(3)]
            assert [len(b) for b in by_rung] == [4, 2, 1]
            assert [{r["D"] for r in b} for b in by_rung] == [{D // 4}, {D // 2}, {D}]
            for k in (0, 1):  # survivors: the lowest losses of the rung before, read from its folders
                losses = {(r["lr"], r["batch"]): json.loads((out / "runs" / r["name"] / "summary.json")
                                                            .read_text())["eval"]["all"]["loss"] for r in by_rung[k]}
                best = sorted(losses, key=losses.get)[:len(by_rung[k + 1])]
                assert {(r["lr"], r["batch"]) for r in by_rung[k + 1]} == set(best)

    # tokens trained, summed over the run folders, against the full grid over the same candidates
    grid_points = grid(dataclasses.replace(cfg, search="grid"))
    grid_tokens = sum(total_tokens(p.config) for p in grid_points)
    folders = sorted((out / "runs").iterdir())
    halving_tokens = sum(json.loads((f / "summary.json").read_text())["tokens"] for f in folders)
    assert {f.name for f in folders} == {r["name"] for r in rows}
    # rung 0 of D=2048 (512 tokens) is rung 1 of D=1024: the same run, trained once
    assert len(folders) < len(rows)
    assert halving_tokens < 0.8 * grid_tokens, (halving_tokens, grid_tokens)
    # the last rung's run is the grid's own run of that point (same folder, same tokens)
    by_name = {p.name: p for p in grid_points}
    for r in rows:
        if r["rung"] == 2:
            assert r["tokens"] == total_tokens(by_name[r["name"]].config)
            assert (out / "runs" / r["name"] / "final" / "config.json").is_file()

    # law.json holds exactly the grid's fit of the winners
    laws = scaling.load_laws(out / "law.json")
    optima = scaling.sweep_optima([r for r in rows if r["rung"] == 2])
    assert laws["lr"] == scaling.fit_power_law(optima, [o["lr"] for o in optima], ("N", "D"), "lr") == result["lr"]
    assert laws["batch"] is not None
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"halving.png", "lr_law.png", "batch_law.png"}

    # a second call finds every rung finished and trains nothing
    said.clear()
    sweep(cfg, loader_factory=fake_factory, say=said.append)
    assert [s for s in said if s.startswith("halving rung")] == [
        "halving rung 1/3: 4 candidate(s) per cell, 16 runs, 16 already done",
        "halving rung 2/3: 2 candidate(s) per cell, 8 runs, 8 already done",
        "halving rung 3/3: 1 candidate(s) per cell, 4 runs, 4 already done"]
    assert not any(s.startswith("[") for s in said)
    print(f"tokens trained: halving {halving_tokens}, grid {grid_tokens}; {len(folders)} run folders")

"""Scaling-law fits: recover known laws from synthetic sweeps (with noise), errors, law files.

The synthetic surfaces use published constants: Step Law's optimal LR 1.79 N^-0.713 D^0.307
and batch 0.58 D^0.571 (arXiv 2503.04715), Chinchilla's loss 1.69 + 406.4/N^0.34 + 410.7/D^0.28.
"Stated errors": an estimate must lie within 3 of its standard errors of the truth (and
within a stated absolute bound, so a huge error bar cannot pass); scipy is the reference
for the t quantile and for the nonlinear fit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from qwen25.errors import UserError
from qwen25.train.scaling import (FitError, fit_loss_law, fit_power_law, load_laws, optimum_1d,
                                  save_laws, sweep_optima, t_quantile)


def lr_star(N, D):
    return 1.79 * N ** -0.713 * D ** 0.307


def batch_star(D):
    return 0.58 * D ** 0.571


def chinchilla(N, D):
    return 1.69 + 406.4 / N ** 0.34 + 410.7 / D ** 0.28


def _se(law, i):
    return math.sqrt(law.cov[i][i])


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for dof in (1, 2, 5, 30):
        for level in (0.9, 0.95):
            assert t_quantile(level, dof) == pytest.approx(stats.t.ppf(0.5 + level / 2, dof), rel=1e-5)


def test_power_law_recovers_step_laws_lr_law_from_noisy_points():
    rng = np.random.default_rng(0)
    pts = [{"N": N, "D": D} for N in np.geomspace(1e7, 1e9, 5) for D in np.geomspace(1e9, 1e11, 4)]
    y = [lr_star(p["N"], p["D"]) * math.exp(rng.normal(0, 0.05)) for p in pts]
    law = fit_power_law(pts, y, ("N", "D"), "lr")
    for i, (got, want) in enumerate([(law.log_coef, math.log(1.79)), (law.exponents[0], -0.713),
                                     (law.exponents[1], 0.307)]):
        assert abs(got - want) <= 3 * _se(law, i)
    assert abs(law.exponents[0] + 0.713) < 0.03 and abs(law.exponents[1] - 0.307) < 0.04
    lo, hi = law.interval(N=1e8, D=1e10)
    assert lo < lr_star(1e8, 1e10) < hi
    assert law.residual_std == pytest.approx(0.05, rel=0.4)


def test_power_law_intervals_cover_the_truth_at_their_level():
    """Calibration: over 400 noisy 8-point sweeps the 95% interval of the exponent holds
    the true exponent 95% of the time (binomial sd ~1.1%: accept 91-98.5%)."""
    rng = np.random.default_rng(1)
    D = np.geomspace(1e8, 1e11, 8)
    pts = [{"D": d} for d in D]
    hits = 0
    for _ in range(400):
        y = batch_star(D) * np.exp(rng.normal(0, 0.1, size=D.size))
        _, lo, hi = fit_power_law(pts, y, ("D",), "batch").parameter_intervals(0.95)["D"]
        hits += lo <= 0.571 <= hi
    assert 0.91 <= hits / 400 <= 0.985


def test_loss_law_recovers_chinchilla_constants_and_agrees_with_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(2)
    pts = [{"N": N, "D": D} for N in np.geomspace(1e7, 1e10, 6) for D in np.geomspace(1e9, 1e12, 6)]
    L = [chinchilla(p["N"], p["D"]) * math.exp(rng.normal(0, 0.003)) for p in pts]
    law = fit_loss_law(pts, L)
    ci = law.parameter_intervals(0.997)  # ~3 sigma
    for name, want in [("E", 1.69), ("alpha_N", 0.34), ("alpha_D", 0.28), ("A_N", 406.4), ("A_D", 410.7)]:
        est, lo, hi = ci[name]
        assert lo <= want <= hi, (name, est, lo, hi)
    assert abs(law.alpha[0] - 0.34) < 0.05 and abs(law.alpha[1] - 0.28) < 0.05

    # The same objective (log residuals) fitted by scipy from our solution's neighbourhood.
    logN = np.log([p["N"] for p in pts])
    logD = np.log([p["D"] for p in pts])

    def model(_, E, la, a, lb, b):
        return np.log(E + np.exp(la - a * logN) + np.exp(lb - b * logD))

    start = [law.E * 1.05, law.log_A[0] + 0.2, law.alpha[0] * 1.05, law.log_A[1] - 0.2, law.alpha[1] * 0.95]
    popt, pcov = optimize.curve_fit(model, None, np.log(L), p0=start, maxfev=20000)
    ours = [law.E, law.log_A[0], law.alpha[0], law.log_A[1], law.alpha[1]]
    np.testing.assert_allclose(ours, popt, rtol=2e-3)
    np.testing.assert_allclose(np.sqrt(np.diag(law.cov)), np.sqrt(np.diag(pcov)), rtol=2e-2)


def test_sweep_optima_then_fits_recover_the_laws_behind_a_synthetic_sweep():
    """A full grid (N x D x lr x batch) from a surface whose minimum over lr and batch is
    Step Law's; parabolic optima + power-law fits give back its exponents."""
    rng = np.random.default_rng(3)
    runs = []
    for N in np.geomspace(1e7, 1e9, 4):
        for D in np.geomspace(1e9, 1e11, 4):
            for lr in np.geomspace(1e-4, 0.2, 12):
                for B in np.geomspace(2e4, 4e6, 9):
                    loss = (chinchilla(N, D) + 0.04 * math.log(lr / lr_star(N, D)) ** 2
                            + 0.02 * math.log(B / batch_star(D)) ** 2) * math.exp(rng.normal(0, 1e-4))
                    runs.append({"N": N, "D": D, "lr": lr, "batch": B, "loss": loss})
    optima = sweep_optima(runs)
    assert len(optima) == 16 and all(o["bracketed"] for o in optima)
    lr_law = fit_power_law(optima, [o["lr"] for o in optima], ("N", "D"), "lr")
    b_law = fit_power_law(optima, [o["batch"] for o in optima], ("D",), "batch")
    assert lr_law.exponents == pytest.approx((-0.713, 0.307), abs=0.03)
    assert b_law.exponents[0] == pytest.approx(0.571, abs=0.03)
    assert b_law.coef == pytest.approx(0.58, rel=0.5)


def test_optimum_1d_interpolates_and_flags_an_unbracketed_grid():
    xs = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    f = [(math.log(x / 7e-4)) ** 2 for x in xs]
    x, _, ok = optimum_1d(xs, f)
    assert ok and x == pytest.approx(7e-4, rel=1e-6)
    x, _, ok = optimum_1d(xs, [5, 4, 3, 2, 1])
    assert not ok and x == 1e-2
    x, _, ok = optimum_1d(xs, [float("nan"), 2, 1.5, 3, float("inf")])  # diverged runs lose
    assert ok and 3e-4 < x < 3e-3
    with pytest.raises(FitError, match="diverged"):
        optimum_1d(xs, [float("nan")] * 5)


def test_too_few_or_degenerate_points_are_one_line_errors():
    with pytest.raises(FitError, match="needs at least 4 points.*got 2") as e:
        fit_power_law([{"N": 1e6, "D": 1e9}, {"N": 2e6, "D": 2e9}], [1e-3, 2e-3], ("N", "D"), "lr")
    assert "\n" not in str(e.value)
    with pytest.raises(FitError, match="needs at least 3 points.*got 1"):
        fit_power_law([{"D": 1e9}], [1e5], ("D",), "batch")
    with pytest.raises(FitError, match="needs at least 6 points"):
        fit_loss_law([{"N": 1e6 * i, "D": 1e9} for i in range(1, 5)], [3, 2.9, 2.8, 2.7])
    with pytest.raises(FitError, match="one value"):  # N never changes: its exponent is unknown
        fit_power_law([{"N": 1e6, "D": d} for d in (1e8, 1e9, 1e10, 1e11)], [1, 2, 3, 4], ("N", "D"), "lr")


def test_law_file_round_trips_and_rejects_other_files(tmp_path):
    pts = [{"N": N, "D": 1e9 * N / 1e6} for N in (1e6, 3e6, 1e7, 3e7)]
    lr = fit_power_law(pts, [1e-3, 8e-4, 5e-4, 4e-4], ("N",), "lr")
    path = save_laws(tmp_path / "law.json", lr, None, None, optima=pts)
    back = load_laws(path)
    assert back["lr"] == lr and back["batch"] is None and back["loss"] is None
    assert back["lr"](N=5e6) == pytest.approx(lr(N=5e6))
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a qwen25 scaling-law file"):
        load_laws(tmp_path / "other.json")
    with pytest.raises(UserError, match="not found"):
        load_laws(tmp_path / "missing.json")


def test_intervals_of_a_poorly_determined_law_are_infinite_not_an_overflow():
    """A real 2-core sweep (9 cells, a 5-parameter loss law) gave a log-amplitude standard
    error so large that exp() of the interval's upper bound overflowed, and the sweep died
    with a traceback after writing its law file; the bound is now inf, and `describe`
    prints it."""
    from qwen25.train.scaling import LossLaw, PowerLaw
    from qwen25.train.sweep import describe

    big = 1e6  # variance of log A: the bound is exp(log A + q * 1000), past a float
    loss = LossLaw(("N",), 2.0, (math.log(50.0),), (0.3,), ((0.01, 0, 0), (0, big, 0), (0, 0, 0.01)), 3, 0.01)
    ci = loss.parameter_intervals()
    assert ci["A_N"][0] == pytest.approx(50.0) and ci["A_N"][2] == math.inf and ci["A_N"][1] == 0.0
    lr = PowerLaw("lr", ("N",), math.log(1e-3), (-0.5,), ((big, 0), (0, 0.01)), 4, 0.1)
    assert lr.parameter_intervals()["coef"][2] == math.inf and lr.interval(N=1e6)[1] == math.inf
    text = describe({"lr": lr, "batch": None, "loss": loss, "notes": {}})
    assert "inf" in text and "lr = 0.001" in text


def test_optima_on_one_grid_value_print_undetermined_not_a_zero_width_interval():
    """A real sweep's first 48 runs put every cell's lr optimum on the grid's low edge; the exact
    fit through equal values has zero residual, and the interval printed was "-0.000 [-0.000,
    +0.000]", a certainty the grid cannot give. The law is now said to be undetermined."""
    from qwen25.train.sweep import describe, fit_sweep

    rows = []
    for N in (1e5, 6e5, 3e6):
        for D in (5e4, 5e5, 5e6):
            for lr in (1e-3, 3e-3, 1e-2):  # loss rises with lr everywhere: the optimum is 1e-3 in each cell
                for B in (128, 512, 2048):
                    loss = chinchilla(N, D) + 0.1 * math.log(lr / 1e-3) + 0.02 * math.log(B / batch_star(D)) ** 2
                    rows.append({"N": N, "D": D, "lr": lr, "batch": B, "loss": loss})
    result = fit_sweep(rows)
    assert {o["lr"] for o in result["optima"]} == {1e-3}
    assert "lr" in result["notes"] and "undetermined" in result["notes"]["lr"]
    assert "batch" not in result["notes"]  # batch optima vary across D: its interval is printed
    text = describe(result)
    lr_line = next(line for line in text.splitlines() if line.startswith("lr ="))
    assert "undetermined" in lr_line and "[" not in lr_line
    assert "[" in next(line for line in text.splitlines() if line.startswith("batch ="))

"""Hyper-parameter scaling laws as pure functions: find optima, fit laws, predict, save, load.

The report picks learning rate and batch size from laws fitted on its own sweeps (spec §3.2)
but publishes no formula. Public fits use these forms, which this module fits:

    optimal LR      eta(N, D) = c * N^a * D^b        (Step Law: 1.79 N^-0.713 D^0.307)
    optimal batch   B(D)      = c * D^g  (tokens)    (Step Law: 0.58 D^0.571)
    final loss      L(N, D)   = E + A / N^alpha + B / D^beta   (Chinchilla's form)

N is the active non-embedding parameter count, D the training tokens. A power law is a
straight line in log space, fitted by ordinary least squares (numpy); the loss law is
nonlinear and fitted by Levenberg-Marquardt on the log residuals (relative errors), started
from a grid over the exponents. Confidence intervals come from the covariance
s^2 (J^T J)^-1 of the fit (J the Jacobian in log space, s^2 the residual variance) with a
Student-t quantile: they assume the log residuals are independent and equally noisy, and
say nothing about whether the functional form is right.

`sweep_optima` turns a grid of runs (N, D, lr, batch -> final loss) into one optimum per
(N, D): a parabola in log(lr) through the best grid point and its two neighbours (the loss
near its minimum is quadratic in log lr), the same for batch size over each batch's best
loss. An optimum on the edge of the grid is flagged: the grid did not bracket it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen25.errors import UserError

LAW_FORMAT = "qwen25-scaling-law/1"
VARIABLES = {"N": "active non-embedding parameters", "D": "training tokens"}


class FitError(UserError):
    """Too few or degenerate points for the requested fit."""


# --------------------------------------------------------------------------------------
# Statistics helpers
# --------------------------------------------------------------------------------------


def t_quantile(level: float, dof: int) -> float:
    """Two-sided Student-t quantile: P(|T| <= q) = level for `dof` degrees of freedom.

    Integrates the density (Simpson on a grid) and bisects; accurate to ~1e-6, enough for
    interval widths. Avoids a scipy dependency for one number."""
    if not 0 < level < 1 or dof < 1:
        raise ValueError("level must be in (0, 1) and dof >= 1")
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)

    def mass(q: float) -> float:  # P(0 <= T <= q)
        t = np.linspace(0.0, q, 4001)
        f = np.exp(log_norm - (dof + 1) / 2 * np.log1p(t * t / dof))
        h = q / 4000
        return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    lo, hi = 0.0, 1.0
    while mass(hi) < level / 2:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < level / 2 else (lo, mid)
    return (lo + hi) / 2


def _exp(x: float) -> float:
    """exp that says inf where a poorly determined fit's interval bound overflows a float
    (math.exp raises OverflowError past ~709)."""
    return math.exp(x) if x < 709.0 or math.isnan(x) else math.inf


def _covariance(J: np.ndarray, resid: np.ndarray, what: str) -> tuple[np.ndarray, float]:
    """(s^2 (J^T J)^-1, s) for a least-squares fit with Jacobian J [n, p]."""
    n, p = J.shape
    if np.linalg.matrix_rank(J) < p:
        raise FitError(f"{what}: the points do not determine every parameter (a variable takes one "
                       "value, or two move together); widen the sweep grid")
    s2 = float(resid @ resid) / (n - p)
    return s2 * np.linalg.inv(J.T @ J), math.sqrt(s2)


def _need_points(n: int, p: int, what: str) -> None:
    if n < p + 1:
        raise FitError(f"{what} has {p} parameters and needs at least {p + 1} points (one more for "
                       f"its error estimate), got {n}; add sizes or token counts to the sweep grid")


# --------------------------------------------------------------------------------------
# Power laws y = c * prod_v x_v^a_v
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLaw:
    """y = exp(log_coef) * prod_v x_v^exponents[v], with the fit's covariance in log space."""

    target: str  # what y is: "lr" or "batch" (tokens)
    variables: tuple[str, ...]  # names of the x_v, e.g. ("N", "D")
    log_coef: float
    exponents: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]  # covariance of (log_coef, *exponents)
    dof: int  # residual degrees of freedom (points - parameters)
    residual_std: float  # std of the log residuals

    @property
    def coef(self) -> float:
        return math.exp(self.log_coef)

    def _row(self, x: Mapping[str, float]) -> np.ndarray:
        missing = [v for v in self.variables if v not in x]
        if missing:
            raise UserError(f"the {self.target} law needs {', '.join(missing)} to predict")
        return np.array([1.0] + [math.log(float(x[v])) for v in self.variables])

    def __call__(self, **x: float) -> float:
        row = self._row(x)
        return float(math.exp(row @ np.array((self.log_coef, *self.exponents))))

    def interval(self, level: float = 0.95, **x: float) -> tuple[float, float]:
        """Confidence interval of the fitted law's value at x (not of a new run's optimum)."""
        row = self._row(x)
        se = math.sqrt(float(row @ np.array(self.cov) @ row))
        mid = math.log(self(**x))
        q = t_quantile(level, self.dof)
        return _exp(mid - q * se), _exp(mid + q * se)

    def parameter_intervals(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """{"coef": (estimate, lo, hi), "N": (exponent, lo, hi), ...}."""
        q = t_quantile(level, self.dof)
        se = np.sqrt(np.diag(np.array(self.cov)))
        out = {"coef": (self.coef, _exp(self.log_coef - q * se[0]), _exp(self.log_coef + q * se[0]))}
        for i, v in enumerate(self.variables):
            a = self.exponents[i]
            out[v] = (a, a - q * se[i + 1], a + q * se[i + 1])
        return out

    def formula(self) -> str:
        terms = " * ".join(f"{v}^{a:+.3f}" for v, a in zip(self.variables, self.exponents))
        return f"{self.target} = {self.coef:.4g} * {terms}"


def fit_power_law(points: Sequence[Mapping[str, float]], y: Sequence[float], variables: Sequence[str],
                  target: str) -> PowerLaw:
    """Least squares of log y on (1, log x_v): the power law through `points`."""
    what = f"the fit {target} = c * " + " * ".join(f"{v}^a" for v in variables)
    variables = tuple(variables)
    _need_points(len(points), len(variables) + 1, what)
    try:
        X = np.array([[1.0] + [math.log(float(p[v])) for v in variables] for p in points])
        Y = np.log(np.asarray(y, dtype=float))
    except (KeyError, ValueError) as e:
        raise FitError(f"{what}: every point needs positive {', '.join(variables)} and {target} ({e})") from None
    if not np.all(np.isfinite(X)) or not np.all(np.isfinite(Y)):
        raise FitError(f"{what}: values must be positive and finite")
    theta, *_ = np.linalg.lstsq(X, Y, rcond=None)
    resid = Y - X @ theta
    cov, s = _covariance(X, resid, what)
    return PowerLaw(target, variables, float(theta[0]), tuple(float(a) for a in theta[1:]),
                    tuple(tuple(float(c) for c in row) for row in cov), len(points) - X.shape[1], s)


# --------------------------------------------------------------------------------------
# Loss law L = E + sum_v A_v / x_v^alpha_v
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossLaw:
    """L = E + sum_v exp(log_A[v]) * x_v^-alpha[v]; covariance of (E, log_A_1, alpha_1, ...)."""

    variables: tuple[str, ...]
    E: float  # irreducible loss (nats/token)
    log_A: tuple[float, ...]
    alpha: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]
    dof: int
    residual_std: float  # std of the log residuals (relative error of the fit)

    def __call__(self, **x: float) -> float:
        return self.E + sum(math.exp(la) * float(x[v]) ** -a for v, la, a in zip(self.variables, self.log_A, self.alpha))

    def parameter_intervals(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        q = t_quantile(level, self.dof)
        se = np.sqrt(np.diag(np.array(self.cov)))
        out = {"E": (self.E, self.E - q * se[0], self.E + q * se[0])}
        for i, v in enumerate(self.variables):
            la, a = self.log_A[i], self.alpha[i]
            sa, sb = se[1 + 2 * i], se[2 + 2 * i]
            out[f"A_{v}"] = (_exp(la), _exp(la - q * sa), _exp(la + q * sa))
            out[f"alpha_{v}"] = (a, a - q * sb, a + q * sb)
        return out

    def formula(self) -> str:
        terms = " + ".join(f"{math.exp(la):.4g}/{v}^{a:.3f}" for v, la, a in zip(self.variables, self.log_A, self.alpha))
        return f"L = {self.E:.4g} + {terms}"


def _loss_model(theta: np.ndarray, logx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted L [n] and dL/dtheta [n, p] for theta = (E, logA_1, alpha_1, ...)."""
    n, k = logx.shape
    L = np.full(n, theta[0])
    dL = np.zeros((n, 1 + 2 * k))
    dL[:, 0] = 1.0
    for v in range(k):
        term = np.exp(theta[1 + 2 * v] - theta[2 + 2 * v] * logx[:, v])
        L = L + term
        dL[:, 1 + 2 * v] = term
        dL[:, 2 + 2 * v] = -term * logx[:, v]
    return L, dL


def fit_loss_law(points: Sequence[Mapping[str, float]], losses: Sequence[float],
                 variables: Sequence[str] = ("N", "D"), iterations: int = 200) -> LossLaw:
    """Fit L = E + sum_v A_v / x_v^alpha_v by Levenberg-Marquardt on log residuals."""
    variables = tuple(variables)
    what = "the fit L = E + " + " + ".join(f"A_{v}/{v}^alpha_{v}" for v in variables)
    p = 1 + 2 * len(variables)
    _need_points(len(points), p, what)
    logx = np.array([[math.log(float(pt[v])) for v in variables] for pt in points])
    y = np.asarray(losses, dtype=float)
    if not np.all(y > 0) or not np.all(np.isfinite(logx)):
        raise FitError(f"{what}: losses and {', '.join(variables)} must be positive")
    logy = np.log(y)

    # Start: for exponents on a grid, E and A_v enter linearly (non-negative least squares
    # by clipping is enough for a start); keep the best.
    grid = np.linspace(0.05, 1.5, 30)
    best = None
    for alphas in np.array(np.meshgrid(*[grid] * len(variables))).reshape(len(variables), -1).T:
        basis = np.column_stack([np.ones(len(y))] + [np.exp(-a * logx[:, v]) for v, a in enumerate(alphas)])
        coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
        coef[1:] = np.maximum(coef[1:], 1e-12)
        pred = basis @ coef
        if np.all(pred > 0):
            err = float(np.sum((np.log(pred) - logy) ** 2))
            if best is None or err < best[0]:
                theta = [coef[0]] + [x for v, a in enumerate(alphas) for x in (math.log(coef[1 + v]), a)]
                best = (err, np.array(theta))
    if best is None:
        raise FitError(f"{what}: no starting point fits positive losses; check the runs' losses")
    theta = best[1]

    def cost(th):
        L, _ = _loss_model(th, logx)
        return float(np.sum((np.log(L) - logy) ** 2)) if np.all(L > 0) else math.inf

    lam, c = 1e-3, cost(theta)
    for _ in range(iterations):
        L, dL = _loss_model(theta, logx)
        r, J = np.log(L) - logy, dL / L[:, None]
        A = J.T @ J
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -J.T @ r)
        new = theta + step
        c_new = cost(new)
        if c_new < c:
            theta, lam = new, lam / 3
            done = c - c_new < 1e-14 * max(c, 1e-30)
            c = c_new
            if done:
                break
        else:
            lam *= 4
            if lam > 1e12:
                break
    L, dL = _loss_model(theta, logx)
    cov, s = _covariance(dL / L[:, None], np.log(L) - logy, what)
    return LossLaw(variables, float(theta[0]), tuple(float(theta[1 + 2 * v]) for v in range(len(variables))),
                   tuple(float(theta[2 + 2 * v]) for v in range(len(variables))),
                   tuple(tuple(float(x) for x in row) for row in cov), len(points) - p, s)


# --------------------------------------------------------------------------------------
# From a sweep grid to optima
# --------------------------------------------------------------------------------------


def optimum_1d(xs: Sequence[float], losses: Sequence[float]) -> tuple[float, float, bool]:
    """(x*, loss at x*, bracketed) of a loss over a grid of x, interpolated in log x.

    A parabola through the best point and its neighbours; at an edge of the grid, or when
    the three points do not curve upwards, the best grid point itself (bracketed=False at
    an edge). Non-finite losses (diverged runs) count as worse than any finite one."""
    order = np.argsort(xs)
    raw = np.asarray(xs, dtype=float)[order]
    x = np.log(raw)
    y = np.asarray(losses, dtype=float)[order]
    y = np.where(np.isfinite(y), y, np.inf)
    i = int(np.argmin(y))
    if not np.isfinite(y[i]):
        raise FitError("every run of this group diverged; lower the learning-rate grid")
    if i == 0 or i == len(x) - 1:
        return float(raw[i]), float(y[i]), len(x) == 1
    a, b, c = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2) if np.all(np.isfinite(y[i - 1:i + 2])) else (0, 0, 0)
    if a <= 0:
        return float(raw[i]), float(y[i]), True
    xo = float(np.clip(-b / (2 * a), x[i - 1], x[i + 1]))
    return math.exp(xo), float(a * xo * xo + b * xo + c), True


def sweep_optima(runs: Sequence[Mapping[str, float]]) -> list[dict]:
    """Runs {"N", "D", "lr", "batch", "loss"} -> one {"N", "D", "lr", "batch", "loss",
    "bracketed"} per (N, D): the best batch over each batch's best learning rate."""
    groups: dict[tuple[float, float], list[Mapping[str, float]]] = {}
    for r in runs:
        groups.setdefault((float(r["N"]), float(r["D"])), []).append(r)
    out = []
    for (N, D), rs in sorted(groups.items()):
        per_batch = {}
        for B in sorted({float(r["batch"]) for r in rs}):
            sub = [r for r in rs if float(r["batch"]) == B]
            per_batch[B] = optimum_1d([r["lr"] for r in sub], [r["loss"] for r in sub])
        batches = sorted(per_batch)
        finite = [b for b in batches if math.isfinite(per_batch[b][1])]
        B_opt, loss, b_ok = optimum_1d(finite, [per_batch[b][1] for b in finite])
        nearest = min(finite, key=lambda b: abs(math.log(b / B_opt)))
        lr_opt, _, lr_ok = per_batch[nearest]
        out.append({"N": N, "D": D, "lr": lr_opt, "batch": B_opt, "loss": loss,
                    "bracketed": bool(lr_ok and (b_ok or len(batches) == 1))})
    return out


# --------------------------------------------------------------------------------------
# The law file `qwen25 pretrain --lr auto --batch auto --law FILE` reads
# --------------------------------------------------------------------------------------


def law_to_dict(law: PowerLaw | LossLaw) -> dict:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in law.__dict__.items()}
    d["cov"] = [list(r) for r in law.cov]
    d["formula"] = law.formula()
    return d


def law_from_dict(d: Mapping, kind: type) -> PowerLaw | LossLaw:
    d = {k: v for k, v in d.items() if k != "formula"}
    d = {k: (tuple(tuple(r) for r in v) if k == "cov" else tuple(v) if isinstance(v, list) else v)
         for k, v in d.items()}
    return kind(**d)


def save_laws(path: str | Path, lr: PowerLaw | None, batch: PowerLaw | None, loss: LossLaw | None,
              optima: Sequence[Mapping] = (), notes: Mapping | None = None) -> Path:
    """Write the fitted laws (JSON, atomic rename) with the points they came from."""
    path = Path(path)
    doc = {"format": LAW_FORMAT, "variables": VARIABLES, "batch_unit": "tokens",
           "lr": law_to_dict(lr) if lr else None, "batch": law_to_dict(batch) if batch else None,
           "loss": law_to_dict(loss) if loss else None, "optima": list(optima), "notes": dict(notes or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def load_laws(path: str | Path) -> dict[str, PowerLaw | LossLaw | None]:
    """{"lr": PowerLaw | None, "batch": PowerLaw | None, "loss": LossLaw | None} from a law file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"law file {p} not found; write one with `qwen25 sweep ... --out DIR` (DIR/law.json)")
    try:
        doc = json.loads(p.read_text())
        if doc.get("format") != LAW_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {LAW_FORMAT!r}")
        return {"lr": doc["lr"] and law_from_dict(doc["lr"], PowerLaw),
                "batch": doc["batch"] and law_from_dict(doc["batch"], PowerLaw),
                "loss": doc["loss"] and law_from_dict(doc["loss"], LossLaw)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"law file {p} is not a qwen25 scaling-law file ({e}); re-run `qwen25 sweep`") from None

"""Successive halving as pure functions: how many candidates each rung keeps, the tokens
each rung trains, and which candidates survive a rung.

A (size, tokens) cell of a sweep has n (lr, batch) candidates and a token budget D. Rung 0
trains all n at D / eta^K tokens; each later rung keeps the best 1/eta of the one before
(at least one) and trains them at eta times the tokens, so the last rung K trains a single
winner at the full budget D. K is the number of cuts needed to reach one candidate:

    n = 9, eta = 3:  9 runs at D/9 -> 3 at D/3 -> 1 at D      (3 D of training, grid: 9 D)
    n = 4, eta = 3:  4 runs at D/3 -> 1 at D                  (2.33 D, grid: 4 D)

Every rung trains the same number of candidate-tokens (about n D / eta^K), so the search
costs about (K + 1) n D / eta^K against the grid's n D.

Loss rules (the same as the grid's optimum search): lower is better; a diverged run
(infinite or NaN loss) is worse than any finite one; ties keep the candidate listed first,
so a re-run of the same sweep cuts the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from qwen25.errors import UserError


def check_halving(candidates: int, eta: int) -> None:
    """One-line errors for a halving search that cannot cut anything."""
    if isinstance(eta, bool) or not isinstance(eta, int) or eta < 2:
        raise UserError(f"eta={eta!r}: successive halving keeps the best 1/eta of each rung, so eta "
                        "must be an integer >= 2 (e.g. --eta 3)")
    if candidates < 2:
        raise UserError(f"the halving search needs at least 2 (lr, batch) candidates per (size, tokens) "
                        f"cell, the sweep gives {candidates}; give more --lr or --batch values, or use "
                        "--search grid")


def rung_sizes(candidates: int, eta: int) -> list[int]:
    """Candidates trained at each rung, first to last: [n, n // eta, ..., 1] (at least one each)."""
    check_halving(candidates, eta)
    sizes = [candidates]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // eta))
    return sizes


def rung_budgets(tokens: int, eta: int, rungs: int) -> list[int]:
    """Training tokens of each rung: tokens / eta^(rungs - 1 - r), the last exactly `tokens`.
    Rounded to whole tokens (the run rounds up to whole steps of its batch)."""
    return [max(1, round(tokens / eta ** (rungs - 1 - r))) for r in range(rungs)]


def survivors(losses: Sequence[float], keep: int) -> list[int]:
    """Indices (ascending) of the `keep` lowest losses; NaN and inf rank last, ties by index."""
    ranked = sorted(range(len(losses)), key=lambda i: (_badness(losses[i]), i))
    return sorted(ranked[:max(0, keep)])


def _badness(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf

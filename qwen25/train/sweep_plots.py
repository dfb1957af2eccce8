"""PNG plots of a sweep (loss against learning rate per (N, D); each fitted law with its optima
and 95% band; a halving search's rungs) and of the dense-vs-MoE study (loss against training
FLOPs and wall time; expert utilisation per layer). Drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(rows: list[dict], result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """lr_curves.png, lr_law.png, batch_law.png and (when fitted) loss_law.png in out_dir."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    optima = result["optima"]
    # Loss against lr, one line per (N, D) at that group's batch nearest the optimum.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in optima:
        group = [r for r in rows if r["N"] == o["N"] and r["D"] == o["D"]]
        B = min({r["batch"] for r in group}, key=lambda b: abs(math.log(b / o["batch"])))
        pts = sorted((r["lr"], r["loss"]) for r in group if r["batch"] == B and math.isfinite(r["loss"]))
        if pts:
            line, = ax.plot(*zip(*pts), marker="o", ms=3, label=f"N={o['N']:.3g} D={o['D']:.3g} B={B}")
            ax.plot([o["lr"]], [o["loss"]], marker="*", ms=11, color=line.get_color())
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final held-out loss (nats/token)",
           title="loss vs learning rate (star: interpolated optimum)")
    ax.legend(fontsize=7)
    save(fig, "lr_curves.png")

    for key, ylabel in (("lr", "optimal learning rate"), ("batch", "optimal batch (tokens)")):
        law = result[key]
        if law is not None:
            save(_law_figure(plt, law, optima, [o[key] for o in optima], ylabel, log_y=True), f"{key}_law.png")
    if result.get("loss") is not None:
        law = result["loss"]
        save(_law_figure(plt, law, optima, [o["loss"] for o in optima], "best loss (nats/token)", log_y=False),
             "loss_law.png")
    return written


def plot_halving(rows: list[dict], path: str | Path) -> Path:
    """A halving search: one panel per (size, tokens) cell, each candidate's final loss
    against the tokens of the rungs it reached (a line ends where the candidate was cut)."""
    plt = _plt()
    cells = sorted({(r["N"], r["cell_D"]) for r in rows})
    cols = min(3, len(cells))
    fig, axes = plt.subplots(-(-len(cells) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(cells) // cols)),
                             squeeze=False)
    for ax, (N, D) in zip(axes.flat, cells):
        runs: dict[tuple[float, int], list[tuple[int, float]]] = {}
        for r in rows:
            if r["N"] == N and r["cell_D"] == D and math.isfinite(r["loss"]):
                runs.setdefault((r["lr"], r["batch"]), []).append((r["D"], r["loss"]))
        for (lr, B), pts in sorted(runs.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", ms=3, label=f"lr {lr:g} B {B}")
        ax.set(xscale="log", xlabel="tokens of the rung", ylabel="final held-out loss",
               title=f"N={N:.3g} D={D:.3g}")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # log minor labels collide on a short range
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _law_figure(plt, law, optima, ys, ylabel, log_y):
    """The law against its first variable, one line per value of the second, optima as dots."""
    var = law.variables[0]
    other = law.variables[1] if len(law.variables) > 1 else None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = sorted({o[other] for o in optima}) if other else [None]
    for g in groups:
        sel = [(o[var], y) for o, y in zip(optima, ys) if other is None or o[other] == g]
        xs = np.geomspace(min(x for x, _ in sel), max(x for x, _ in sel), 50)
        point = (lambda x: {var: x, other: g}) if other else (lambda x: {var: x})
        label = f"{other}={g:.3g}" if other else "fit"
        line, = ax.plot(xs, [law(**point(x)) for x in xs], label=label)
        if hasattr(law, "interval"):
            band = [law.interval(0.95, **point(x)) for x in xs]
            ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], alpha=0.15, color=line.get_color())
        ax.plot(*zip(*sel), "o", color=line.get_color())
    ax.set(xscale="log", yscale="log" if log_y else "linear", xlabel=f"{var}", ylabel=ylabel,
           title=law.formula())
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    return fig


def plot_study(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """loss_vs_flops.png, loss_vs_time.png and expert_utilisation.png in out_dir."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, xlabel, name in (("flops", "training FLOPs", "loss_vs_flops.png"),
                              ("seconds", "training wall time (s)", "loss_vs_time.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for model, m in results["models"].items():
            c = m["curves"]
            ax.plot(c[key], _smooth(c["loss"]), label=f"{model} (held-out {m['held_out_loss']:.3f})")
        ax.set(xscale="log", xlabel=xlabel, ylabel="train loss (nats/token, smoothed)",
               title=f"dense vs MoE: loss against {xlabel}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)
    counts = np.array(results["utilisation"]["counts"], dtype=float)
    share = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    fig, ax = plt.subplots(figsize=(6.5, 0.6 + 0.5 * len(share) + 2))
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="MoE layer", title="share of held-out assignments per expert "
           f"(even = {1 / share.shape[1]:.3f})")
    fig.colorbar(im, ax=ax)
    ent = results["utilisation"]["entropy"]
    ax.set_yticks(range(len(ent)), [f"{i}: H={e:.2f}" for i, e in enumerate(ent)])
    fig.tight_layout()
    fig.savefig(out / "expert_utilisation.png", dpi=110)
    plt.close(fig)
    written.append(out / "expert_utilisation.png")
    return written


def _smooth(ys: list[float], window: int = 9) -> list[float]:
    """Trailing mean over `window` steps (single-step losses are noisy)."""
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out

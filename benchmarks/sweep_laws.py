"""A finished `qwen25 sweep` next to the published hyper-parameter laws.

Reads OUT/sweep.jsonl of a sweep, re-derives the optima per (N, D) with the sweep's own
rule (`qwen25.train.sweep.fit_sweep`) and prints, with 95% intervals:

  - our lr(N, D) and batch(D) laws beside Step Law's (Li et al. 2025, "Predictable Scale":
    lr = 1.79 N^-0.713 D^0.307, batch = 0.58 D^0.571 tokens, N non-embedding parameters);
  - our optima refitted in DeepSeek LLM's form, lr and batch as powers of the compute
    C = 6 N D (DeepSeek: lr = 0.3118 C^-0.125, batch = 0.2920 C^0.3271 tokens; its C counts
    non-embedding FLOPs per token x tokens, of which 6 N is the matmul part);
  - each (N, D) optimum beside what the two published laws predict there.

    python benchmarks/sweep_laws.py runs/sweep-cpu           # --json for one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen25.train import scaling  # noqa: E402
from qwen25.train.sweep import fit_sweep  # noqa: E402

STEP_LAW = {"lr": (1.79, {"N": -0.713, "D": 0.307}), "batch": (0.58, {"D": 0.571})}
DEEPSEEK = {"lr": (0.3118, {"C": -0.125}), "batch": (0.2920, {"C": 0.3271})}


def predict(law: tuple[float, dict[str, float]], **x: float) -> float:
    coef, exps = law
    out = coef
    for v, a in exps.items():
        out *= x[v] ** a
    return out


def exponents(law: scaling.PowerLaw) -> dict[str, list[float]]:
    return {k: [round(v, 4) for v in t] for k, t in law.parameter_intervals().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a sweep folder (holds sweep.jsonl)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    path = Path(args.sweep) / "sweep.jsonl"
    if not path.exists():
        sys.exit(f"{path} not found: run `qwen25 sweep --out {args.sweep} ...` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fit = fit_sweep(rows)
    optima = fit["optima"]
    for o in optima:
        o["C"] = 6 * o["N"] * o["D"]
    ours_c = {t: scaling.fit_power_law(optima, [o[t] for o in optima], ["C"], t) for t in ("lr", "batch")}
    result = {
        "runs": len(rows), "cells": len(optima),
        "ours_lr_ND": exponents(fit["lr"]), "ours_batch_D": exponents(fit["batch"]),
        "ours_lr_C": exponents(ours_c["lr"]), "ours_batch_C": exponents(ours_c["batch"]),
        "loss_law": fit["loss"].formula() if fit["loss"] else None,
        "optima": [{"N": o["N"], "D": o["D"], "lr": o["lr"], "batch": o["batch"], "loss": round(o["loss"], 4),
                    "bracketed": o["bracketed"],
                    "step_law_lr": predict(STEP_LAW["lr"], **o), "step_law_batch": predict(STEP_LAW["batch"], **o),
                    "deepseek_lr": predict(DEEPSEEK["lr"], **o), "deepseek_batch": predict(DEEPSEEK["batch"], **o)}
                   for o in optima],
        "notes": fit["notes"],
    }
    if args.json:
        print(json.dumps(result))
        return

    def row(name, est):
        return f"| {name} | " + " | ".join(est) + " |"

    def iv(t):
        return f"{t[0]:+.3f} [{t[1]:+.3f}, {t[2]:+.3f}]"

    lr, b = result["ours_lr_ND"], result["ours_batch_D"]
    lc, bc = result["ours_lr_C"], result["ours_batch_C"]
    print(f"{len(rows)} runs, {len(optima)} (N, D) cells; exponents with 95% intervals\n")
    print("| law | lr: N exponent | lr: D exponent | batch: D exponent |")
    print("| --- | --- | --- | --- |")
    print(row("ours (this sweep)", [iv(lr["N"]), iv(lr["D"]), iv(b["D"])]))
    print(row("Step Law", ["-0.713", "+0.307", "+0.571"]))
    print()
    print("| law | lr: C exponent | batch: C exponent |")
    print("| --- | --- | --- |")
    print(row("ours, refitted on C = 6ND", [iv(lc["C"]), iv(bc["C"])]))
    print(row("DeepSeek LLM", ["-0.125", "+0.327"]))
    print()
    print("| N | D | our lr* | Step Law lr | DeepSeek lr | our batch* | Step Law batch | DeepSeek batch | loss |")
    print("| --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for o in result["optima"]:
        mark = "" if o["bracketed"] else " (edge)"
        print(f"| {o['N']:.3g} | {o['D']:.3g} | {o['lr']:.3g}{mark} | {o['step_law_lr']:.3g} | "
              f"{o['deepseek_lr']:.3g} | {o['batch']:.0f} | {o['step_law_batch']:.0f} | "
              f"{o['deepseek_batch']:.0f} | {o['loss']} |")
    if result["loss_law"]:
        print(f"\nloss law: {result['loss_law']}")
    for k, v in result["notes"].items():
        print(f"note ({k}): {v}")


if __name__ == "__main__":
    main()

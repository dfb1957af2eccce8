"""`qwen25 sweep --data MANIFEST --sizes 64x2 128x2 --tokens ... --lr ... --batch ...`: fit scaling laws.

Runs a grid of short pretraining runs (each a normal resumable run folder under
OUT/runs/), finds the best learning rate and batch size per (model size, tokens), fits
lr(N, D), batch(D) and loss L(N, D) with 95% intervals, and writes OUT/law.json for
`qwen25 pretrain --lr auto --batch auto --law OUT/law.json`. Re-running continues.
`--search halving --eta 3` replaces the full (lr, batch) grid of each (size, tokens) by
successive halving: short runs of every candidate, the best 1/eta continued on eta x the
tokens, one winner at the full budget.
Under `torchrun --nproc_per_node G -m qwen25 sweep ...` each GPU takes its share of runs.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.sweep import SweepConfig

    add_config_arguments(p, SweepConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.sweep import SweepConfig, sweep

    cfg = config_from_args(SweepConfig, args)
    result = sweep(cfg)
    if result:
        print(f"laws: {cfg.out}/law.json; plots: {cfg.out}/plots/")
    return 0

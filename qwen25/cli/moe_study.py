"""`qwen25 moe-study --data MANIFEST [--num-experts 8 --top-k 2 --tokens ...]`: dense vs MoE.

Trains a dense model, an MoE with the same active FFN width (fine-grained routed experts
plus a shared expert) and a dense model with the MoE's total FFN width on the same data
and budget, then writes OUT/study.md (table), OUT/study.json and OUT/plots/ (loss against
training FLOPs and wall time, expert utilisation). Re-running continues.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.moe_study import StudyConfig

    add_config_arguments(p, StudyConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.moe_study import StudyConfig, run_study

    cfg = config_from_args(StudyConfig, args)
    run_study(cfg)
    print(f"table: {cfg.out}/study.md; plots: {cfg.out}/plots/")
    return 0

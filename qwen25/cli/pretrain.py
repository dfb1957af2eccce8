"""`qwen25 pretrain --config FILE [flags] [--set key=value ...]`: pretrain a Qwen2.5-shaped model.

Every field of `PretrainConfig` is a flag (see `--help`); nested ones (stages, model
overrides) go through the config file or `--set stages.1.rope_theta=1e6`. Runs the same on
one process or under `torchrun --nproc_per_node N -m qwen25 pretrain ...`; re-running the
same command resumes from the newest complete checkpoint in `--out`.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.config import PretrainConfig

    add_config_arguments(p, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.config import PretrainConfig
    from qwen25.train.pretrain import pretrain

    cfg = config_from_args(PretrainConfig, args)
    summary = pretrain(cfg)
    if summary.get("interrupted") or "final" not in summary:
        return 0
    print(f"done: {summary['step']} steps, {summary['tokens']:,} tokens; model in {summary['final']}")
    return 0

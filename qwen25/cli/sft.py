"""`qwen25 sft --model M --data FILE|builtin --out DIR [--lora-rank R ...] [--profile tiny]`.

Every field of `SFTConfig` is a flag (see `--help`). `--profile report` (the default) uses
the report's SFT settings for real checkpoints; `--profile tiny` suits the speedrun's small
models; flags and `--config` override either. Re-running the same command resumes from the
newest complete checkpoint in `--out`; `torchrun --nproc_per_node N -m qwen25 sft ...`
spreads the batch over N processes.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, add_lora_shortcut, apply_lora_shortcut, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.sft_config import PROFILES, SFTConfig

    p.add_argument("--profile", choices=sorted(PROFILES), default="report",
                   help="defaults to start from: 'report' (spec §5.1, real checkpoints) or 'tiny' (small CPU models)")
    add_lora_shortcut(p)
    add_config_arguments(p, SFTConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.sft import sft
    from qwen25.train.sft_config import SFTConfig, profile_defaults

    cfg = apply_lora_shortcut(config_from_args(SFTConfig, args, defaults=profile_defaults(args.profile)), args)
    summary = sft(cfg)
    if summary.get("interrupted") or "final" not in summary:
        return 0
    held = (summary.get("eval") or {}).get("held-out", {})
    loss = f", held-out loss {held['loss']:.4f}" if held else ""
    print(f"done: {summary['step']} steps, {summary['tokens']:,} assistant tokens{loss}; model in {summary['final']}")
    return 0

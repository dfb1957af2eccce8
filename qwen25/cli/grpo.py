"""`qwen25 grpo --model SFT_DIR --reward math_answer [--lora-rank R ...] [flags]`: online RL with GRPO.

Every field of `GRPOConfig` is a flag (see `--help`). Re-running the same command resumes
from the newest complete checkpoint in `--out`. With `--lora-rank R` (or `--lora`) only
LoRA adapters train and DIR/adapter is a PEFT adapter for the base model (`--merge` also
writes the merged model to DIR/final), as in `qwen25 sft`. `torchrun --nproc_per_node N -m
qwen25 grpo ...` splits each rollout's queries over N processes (DDP) with the result of one.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, add_lora_shortcut, apply_lora_shortcut, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.grpo_config import GRPOConfig

    add_lora_shortcut(p)
    add_config_arguments(p, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.grpo import grpo
    from qwen25.train.grpo_config import GRPOConfig

    summary = grpo(apply_lora_shortcut(config_from_args(GRPOConfig, args), args))
    if summary.get("interrupted") or "final" not in summary:
        return 0
    ev, start = summary.get("eval") or {}, summary.get("eval_start") or {}
    line = f"done: {summary['step']} steps; model in {summary['final']}"
    if ev and start:
        line += (f"; held-out synthetic math (strict) {start['heldout_strict']:.3f} -> {ev['heldout_strict']:.3f}")
    print(line)
    return 0

"""`qwen25 dpo --model SFT_DIR --data pairs.jsonl --out DIR [flags]`: DPO on preference pairs.

Every field of `DPOConfig` is a flag (see `--help`). The reference model's log-probs are
computed once and stored in DIR; re-running the same command resumes from the newest
checkpoint. The trained policy is written to DIR/final; with `--lora-rank R` only LoRA
adapters train and DIR/adapter is a PEFT adapter for the base model (`--merge` also writes
the merged model to DIR/final), as in `qwen25 sft`.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.dpo import DPOConfig

    add_config_arguments(p, DPOConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.train.dpo import DPOConfig, dpo

    summary = dpo(config_from_args(DPOConfig, args))
    if summary.get("interrupted") or "final" not in summary:
        return 0
    ev = summary.get("eval") or {}
    acc = f"; held-out reward accuracy {ev['rewards/accuracies']:.3f}" if "rewards/accuracies" in ev else ""
    print(f"done: {summary['step']} steps{acc}; model in {summary['final']}")
    return 0

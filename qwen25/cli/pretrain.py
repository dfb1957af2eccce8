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


def _run_pretrain(cfg):
    from qwen25.train.pretrain import pretrain

    return pretrain(cfg)


def _last_logged_step(out: str) -> int:
    """The last training step metrics.jsonl recorded (0 when none)."""
    import json
    from pathlib import Path

    step = 0
    try:
        for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("kind") == "train":
                step = max(step, int(rec.get("step", 0)))
    except OSError:
        pass
    return step


def run(args: argparse.Namespace) -> int:
    from qwen25.errors import UserError
    from qwen25.train.config import PretrainConfig
    from qwen25.train.loop import TrainingDiverged

    cfg = config_from_args(PretrainConfig, args)
    try:
        summary = _run_pretrain(cfg)
    except TrainingDiverged as e:
        # The guard aborts inside a step; the steps before it (skipped ones too) are logged.
        raise UserError(f"training diverged at step {_last_logged_step(cfg.out) + 1} (lr {cfg.lr:g}): "
                        f"{e}") from None
    if summary.get("interrupted") or "final" not in summary:
        return 0
    print(f"done: {summary['step']} steps, {summary['tokens']:,} tokens; model in {summary['final']}")
    return 0

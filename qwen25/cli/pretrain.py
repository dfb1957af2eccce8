"""`qwen25 pretrain --config FILE [flags] [--set key=value ...]`: pretrain a Qwen2.5-shaped model.

Every field of `PretrainConfig` is a flag (see `--help`); nested ones (stages, model
overrides) go through the config file or `--set stages.1.rope_theta=1e6`. Runs the same on
one process or under `torchrun --nproc_per_node N -m qwen25 pretrain ...`; re-running the
same command resumes from the newest complete checkpoint in `--out`.
`--lr auto` / `--batch-tokens auto` (`--batch auto`) take the values from the scaling laws
in `--law FILE` (written by `qwen25 sweep`) at this run's model size and token count.
"""

from __future__ import annotations

import argparse
import os

from qwen25.cli.config_args import add_config_arguments, config_from_args

AUTO_FIELDS = ("lr", "batch_tokens")  # flags that accept "auto" (resolved from --law)


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.config import PretrainConfig

    add_config_arguments(p, PretrainConfig)
    for action in p._actions:  # let the numeric flags also take the word "auto"
        if action.dest in AUTO_FIELDS:
            action.type = _or_auto(action.type)
    p.add_argument("--law", metavar="FILE", default=None,
                   help="scaling-law file (law.json from `qwen25 sweep`) read by --lr auto / --batch-tokens auto")


def _or_auto(tp):
    def parse(text: str):
        return "auto" if text == "auto" else tp(text)
    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def pretrain_config(args: argparse.Namespace):
    """The PretrainConfig the flags describe, with any "auto" resolved from --law."""
    from qwen25.train.config import PretrainConfig

    auto = [k for k in AUTO_FIELDS if getattr(args, k, None) == "auto"]
    for k in auto:
        delattr(args, k)
    cfg = config_from_args(PretrainConfig, args)
    if auto:
        from qwen25.train.sweep import resolve_auto

        cfg, note = resolve_auto(cfg, args.law, "lr" in auto, "batch_tokens" in auto,
                                 world_size=int(os.environ.get("WORLD_SIZE", "1")))
        print(note, flush=True)
    return cfg


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
    from qwen25.train.loop import TrainingDiverged

    cfg = pretrain_config(args)
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

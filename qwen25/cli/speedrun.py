"""`qwen25 speedrun [--profile cpu|gpu|smoke] [--out DIR]`: the whole recipe on built-in data.

Fetch the corpora, train a tokenizer, prepare shards, pretrain through both stages (short
context, then long context with the RoPE base raised), then SFT, preference pairs, DPO, a
reward model and GRPO, evaluate every stage and write OUT/report.md with the report card.
Re-running the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help="cpu (about 45 minutes on 2 cores), gpu (one GPU, more tokens) or smoke "
                   "(every stage in about two minutes)")
    p.add_argument("--out", default="runs/speedrun", help="the run's folder (default: runs/speedrun)")
    p.add_argument("--started-at", type=float, default=None,
                   help="UNIX time the set-up began (the Makefile passes it so the report can count it)")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="scale every stage's steps (e.g. 0.05 for a quick smoke run)")


def run(args: argparse.Namespace) -> int:
    from qwen25.recipes.speedrun import speedrun

    try:
        report = speedrun(args.out, args.profile, args.started_at, args.steps_scale)
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to continue from {args.out}")
        return 130
    print(report.read_text().split("\n## Time")[0].strip())
    print(f"\nreport: {report}\nchat with the result:\n  qwen25 chat {report.parent / 'final'}")
    return 0

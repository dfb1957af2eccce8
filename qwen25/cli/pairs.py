"""`qwen25 pairs build --model SFT_DIR --tasks mathgen --samples K --out pairs.jsonl`.

Samples K answers per training-split query with the engine, judges them (answer checks),
and writes {prompt, chosen, rejected, provenance} rows for `qwen25 dpo` / `qwen25 reward
train`; multiple-choice sources (mathgen-mc, or a jsonl of {question, choices, answer})
give correct-vs-distractor pairs. Every field of `BuildConfig` is a flag.
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.data.pair_build import BuildConfig

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_config_arguments(sub.add_parser("build", help="sample, judge and pair answers"), BuildConfig)


def run(args: argparse.Namespace) -> int:
    from qwen25.data.pair_build import BuildConfig, build

    cfg = config_from_args(BuildConfig, args)
    s = build(cfg)
    rate = f"{s['pass_rate']:.2f}" if s["pass_rate"] is not None else "n/a"
    print(f"{s['pairs']} pairs into {cfg.out} ({s['queries']} sampled queries, pass rate {rate}, "
          f"{s['all_pass']} all-pass and {s['all_fail']} all-fail queries without a pair)")
    return 0

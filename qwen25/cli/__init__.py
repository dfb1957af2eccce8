"""`qwen25 <verb>`: one command line for the whole system.

Each verb lives in its own module `qwen25.cli.<module>` with two functions:
`configure(parser)` adds its arguments and `run(args) -> int` does the work. Modules are
imported only when their verb runs, so `qwen25 --help` is instant.

User mistakes (`qwen25.errors.UserError`) print one line, `error: ...`, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from qwen25.errors import UserError

# verb -> (module under qwen25.cli, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "print a checkpoint's config, parameter counts and memory"),
    "demo": ("demo", "build a small random model, save, load and generate from it"),
    "generate": ("generate", "stream a completion (or a chat reply) for one prompt"),
    "chat": ("chat", "interactive terminal chat with a checkpoint"),
    "tokenizer": ("tokenizer", "encode, decode, train or export a byte-level BPE tokenizer"),
    "data": ("data", "pretraining data: fetch built-in corpora, prepare shards, stats"),
    "pretrain": ("pretrain", "pretrain a model on token shards (stages, resume, torchrun)"),
    "sft": ("sft", "supervised fine-tuning on chat data, full or LoRA (packing, resume, torchrun)"),
    "grpo": ("grpo", "online RL with GRPO: engine rollouts, verifier / reward-model rewards, variance-ordered queries"),
    "eval": ("eval", "benchmarks and report cards (run, compare); long-context probes (passkey, needle, ppl)"),
    "sweep": ("sweep", "hyper-parameter sweep of short runs: fit LR, batch and loss scaling laws"),
    "moe-study": ("moe_study", "dense vs MoE at matched active and total parameters: loss vs FLOPs and time"),
    "speedrun": ("speedrun", "the whole recipe on built-in data: tokenizer, shards, pretraining, report"),
    "dpo": ("dpo", "DPO on preference pairs (sigmoid/IPO/hinge/robust; Online Merging Optimizer)"),
    "reward": ("reward", "reward model: train on preference pairs (Bradley-Terry), score conversations"),
    "pairs": ("pairs", "build preference pairs: sample answers, judge them with task scorers"),
    "serve": ("serve", "OpenAI-compatible HTTP server with continuous batching"),
    "convert": ("convert", "a GGUF file (llama.cpp) as an HF checkpoint folder"),
    "quantize": ("quantize", "weight-only int8/int4 (RTN or GPTQ) into a GPTQ-layout folder"),
    "export": ("export", "write a checkpoint in another format: `export gguf MODEL OUT.gguf --type q8_0`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen25", description="Qwen2.5, end to end.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"qwen25: error: unknown verb {argv[0]!r}; choose one of {', '.join(VERBS)}",
                  file=sys.stderr)
            return 2
        top.print_help()
        return 0
    verb = argv[0]
    module = import_module(f"qwen25.cli.{VERBS[verb][0]}")
    parser = argparse.ArgumentParser(prog=f"qwen25 {verb}", description=VERBS[verb][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])  # argparse itself exits 2 on bad flags
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"qwen25 {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen25 {verb}: interrupted", file=sys.stderr)
        return 130

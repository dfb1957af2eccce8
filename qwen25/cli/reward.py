"""`qwen25 reward train|score`: train a reward model on pairs, or score conversations with one.

    qwen25 reward train --model SFT_DIR --data pairs.jsonl --out DIR [flags]
    qwen25 reward score --model DIR/final --data convs.jsonl --out scores.jsonl [--batch-size 8]

`train` takes every field of `RewardConfig` as a flag and resumes when re-run; with
`--lora-rank R` the decoder trains LoRA adapters (the head in full), DIR/adapter is the PEFT
adapter and DIR/final the merged sequence classifier. `score` reads
rows of `{"messages": [...]}` or `{"prompt", "completion"}` and writes each row back with a
`"score"`; rows it cannot read are counted and skipped (their line numbers are printed).
"""

from __future__ import annotations

import argparse

from qwen25.cli.config_args import add_config_arguments, config_from_args


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.train.reward import RewardConfig

    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="Bradley-Terry training on preference pairs (resumable)")
    add_config_arguments(train, RewardConfig)
    score = sub.add_parser("score", help="score conversations in batches (jsonl in, jsonl out)")
    score.add_argument("--model", required=True, help="reward-model folder (qwen25 reward train's final/)")
    score.add_argument("--data", required=True, help="jsonl of {messages} or {prompt, completion} rows")
    score.add_argument("--out", required=True, help="jsonl written: each input row plus its score")
    score.add_argument("--tokenizer", default=None, help="tokenizer folder or 'qwen2.5' (default: the model's)")
    score.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    score.add_argument("--max-length", type=int, default=4096, help="longer rows are skipped (default: 4096)")
    score.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        from qwen25.train.reward import RewardConfig, reward_train

        summary = reward_train(config_from_args(RewardConfig, args))
        if summary.get("interrupted") or "final" not in summary:
            return 0
        ev, before = summary.get("eval") or {}, summary.get("eval_before") or {}
        acc = ""
        if "rewards/accuracies" in ev:
            acc = f"; held-out ranking accuracy {ev['rewards/accuracies']:.3f}"
            if "rewards/accuracies" in before:
                acc += f" (before training {before['rewards/accuracies']:.3f})"
        print(f"done: {summary['step']} steps{acc}; reward model in {summary['final']}")
        return 0
    from qwen25.train.reward_score import score_file

    stats = score_file(args.model, args.data, args.out, tokenizer=args.tokenizer, batch_size=args.batch_size,
                       max_length=args.max_length, device=args.device)
    print(f"scored {stats['scored']} of {stats['rows']} rows into {args.out}"
          + (f"; skipped {stats['skipped']} (first: {stats['first_skip']})" if stats["skipped"] else ""))
    return 0

"""`qwen25 eval passkey | needle | ppl | longctx-demo`: long-context evaluation.

  qwen25 eval passkey MODEL --lengths 4096 8192 16384 --rope-scaling yarn:4 --dca 32768:2048
  qwen25 eval needle MODEL --lengths 8192 32768 --depths 0 0.5 1 --distractors 3
  qwen25 eval ppl MODEL --length 32768 --text shakespeare
  qwen25 eval longctx-demo --out runs/longctx-demo

passkey/needle write <task>.json (every probe), <task>.md (accuracy by depth x length) and a
heat map per scoring; ppl writes ppl.json/.md/.png. The markdown table is also printed.
`--rope-scaling` / `--dca` extend the model's context exactly as for `qwen25 generate`;
lengths beyond the (extended) context are allowed, to see where a model breaks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwen25.cli.config_args import add_config_arguments, config_from_args
from qwen25.cli.args import add_model_args, load_model_and_tokenizer


def _model_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, max_seq_len=False)  # probes size their engine to the longest probe
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def configure(p: argparse.ArgumentParser) -> None:
    from qwen25.eval.longctx import ProbeConfig
    from qwen25.recipes.longctx_demo import DemoConfig
    from qwen25.eval.position_ppl import PplConfig

    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for task, text in (("passkey", "passkey retrieval at lengths x depths"),
                       ("needle", "needle-in-a-haystack (key-value facts in prose) at lengths x depths")):
        s = sub.add_parser(task, help=text, description=text)
        _model_args(s)
        add_config_arguments(s, ProbeConfig)
    s = sub.add_parser("ppl", help="next-token loss against position on held-out text")
    _model_args(s)
    add_config_arguments(s, PplConfig)
    s = sub.add_parser("longctx-demo", help="train a small model at length L, probe it at L, 2L, 4L "
                                            "with plain RoPE, YaRN, DCA and YaRN + DCA")
    add_config_arguments(s, DemoConfig)
    from qwen25.cli import eval_run  # benchmarks: `qwen25 eval run | compare`

    eval_run.add_commands(sub)


def _load(args: argparse.Namespace):
    """(model, tokenizer, context limit, title) with the context overrides applied."""
    model, tokenizer, limit = load_model_and_tokenizer(args)
    parts = [Path(args.model).name or str(args.model)]
    if args.rope_scaling:
        parts.append(f"rope {args.rope_scaling}")
    if args.dca:
        parts.append(f"dca {args.dca}")
    return model, tokenizer, limit, ", ".join(parts)


def run(args: argparse.Namespace) -> int:
    if args.command in ("run", "compare"):
        from qwen25.cli import eval_run

        return eval_run.run(args)
    if args.command == "longctx-demo":
        from qwen25.recipes.longctx_demo import DemoConfig, run_demo

        result = run_demo(config_from_args(DemoConfig, args))
        print(result["markdown"])
        return 0
    if args.command == "ppl":
        from qwen25.eval.position_ppl import PplConfig, evaluate_ppl, markdown_bins, write_ppl_report

        cfg = config_from_args(PplConfig, args)
        cfg.validate()
        model, tokenizer, limit, title = _load(args)
        _note_limit(limit, [cfg.length])
        result = evaluate_ppl(model, tokenizer, cfg, progress=not args.quiet)
        paths = write_ppl_report(result, cfg.out, title, trained=limit)
        print(markdown_bins({"loss (nats)": result["bins"]}, f"next-token loss per position: {title}"))
    else:
        from qwen25.eval.longctx import ProbeConfig, evaluate_retrieval, write_report

        cfg = config_from_args(ProbeConfig, args)
        cfg.validate(args.command)
        model, tokenizer, limit, title = _load(args)
        _note_limit(limit, cfg.lengths)
        result = evaluate_retrieval(model, tokenizer, args.command, cfg, progress=not args.quiet)
        paths = write_report(result, cfg.out, args.command, title)
        print(Path(paths[1]).read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


def _note_limit(limit: int, lengths) -> None:
    over = [n for n in lengths if n > limit]
    if over:
        print(f"note: lengths {over} exceed the model's context of {limit} tokens; they test "
              "extrapolation (extend it with --rope-scaling / --dca)", file=sys.stderr)

"""`qwen25 eval run | compare`: benchmarks with a report card, and runs side by side.

  qwen25 eval run MODEL --tasks mmlu,arc_challenge,gsm8k --limit 200 [--num-fewshot K] [--chat]
  qwen25 eval run --server http://localhost:8000 --tasks gsm8k --chat
  qwen25 eval compare runs/base runs/sft runs/dpo --out runs/compare

MODEL is a checkpoint folder (or a .gguf file where the loader reads it); `--server`
evaluates an OpenAI-compatible endpoint instead (completions with echo + logprobs for
multiple choice, chat completions with --chat). Writes results.json, samples/<task>.jsonl
and report.md + scores.png into --out.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from qwen25.errors import UserError


def configure_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint folder or .gguf (omit with --server)")
    p.add_argument("--tasks", required=True, help="comma-separated task names: mmlu, arc_challenge, arc_easy, "
                   "hellaswag, piqa, winogrande, gsm8k, math500, synth_math, humaneval, mbpp, ifbench, "
                   "bpb, passkey, needle")
    p.add_argument("--limit", type=int, help="first N examples of each task (default: all)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--chat", action="store_true", help="prompt through the chat template (instruct models)")
    p.add_argument("--samples", type=int, default=1, help="completions per generative prompt (pass@k)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens per answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated at once / server concurrency")
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--train-data", action="append", default=[], metavar="PATH",
                   help="training texts (jsonl/txt/folder/manifest.json) for the contamination column; repeatable")
    p.add_argument("--server", help="base URL of an OpenAI-compatible server (instead of MODEL)")
    p.add_argument("--server-model", help="model name to request from the server (default: its first)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's); with --server, only "
                                       "needed for --chat multiple-choice scoring")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as saved)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="results.json files or the folders holding them")
    p.add_argument("--names", help="comma-separated column names (default: the folder names)")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md and compare.png")


def add_commands(sub) -> None:
    """The hook cli/eval.py calls: adds `run` and `compare` to `qwen25 eval`."""
    configure_run(sub.add_parser("run", help="benchmarks (MMLU, ARC, GSM8K, HumanEval, ...) with a report card"))
    configure_compare(sub.add_parser("compare", help="several results side by side"))


def model_sha256(path: str) -> str:
    """sha256 over the weight files (name and content), sorted: identifies the weights."""
    from qwen25.files import sha256_file

    p = Path(path)
    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.suffix in (".safetensors", ".gguf"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name} {sha256_file(f)}\n".encode())
    return h.hexdigest()


def _backend(args):
    from qwen25.eval.backends import LocalBackend, ServerBackend

    if args.server:
        if args.model:
            raise UserError("give either MODEL or --server, not both")
        tok = None
        if args.tokenizer:
            from qwen25.tokenizer import load_tokenizer

            tok = load_tokenizer(args.tokenizer)
        b = ServerBackend(args.server, args.server_model, tok, concurrency=args.batch_size)
        return b, {"path": args.server, "name": b.model, "sha256": None, "backend": "server"}
    if not args.model:
        raise UserError("give a MODEL folder (or .gguf), or --server URL")
    import argparse as _ap

    from qwen25.cli.generate import load_model_and_tokenizer

    ns = _ap.Namespace(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, rope_scaling=None, dca=None)
    model, tokenizer, _ = load_model_and_tokenizer(ns)
    info = {"path": str(args.model), "name": Path(args.model).name, "sha256": model_sha256(args.model),
            "backend": "local", "dtype": str(model.dtype).removeprefix("torch.")}
    return LocalBackend(model, tokenizer, batch_size=args.batch_size), info


def run_run(args) -> int:
    from qwen25.eval.harness import EvalConfig, run_eval

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    cfg = EvalConfig(tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot, chat=args.chat,
                     samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, out=args.out, train_data=tuple(args.train_data))
    cfg.validate()  # bad task names and limits fail before the model loads
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    backend, info = _backend(args)
    if cfg.chat:
        backend.check_chat()
    results = run_eval(backend, cfg, info, progress=not args.quiet)
    from qwen25.eval.report import markdown

    print(markdown(results), end="")
    print(f"wrote {Path(args.out) / 'results.json'}, report.md, samples/", file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from qwen25.eval.harness import load_results
    from qwen25.eval.report import compare

    results = [load_results(r) for r in args.runs]
    names = args.names.split(",") if args.names else [Path(r).name or str(r) for r in args.runs]
    if len(names) != len(results):
        raise UserError(f"--names has {len(names)} names for {len(results)} runs")
    text, paths = compare(results, names, args.out)
    print(text, end="")
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0


def run(args) -> int:
    return run_run(args) if args.command == "run" else run_compare(args)

"""`qwen25 generate MODEL --prompt TEXT`: stream a completion (or, with --chat, a reply).

Sampling defaults come from the checkpoint's generation_config.json (Qwen2.5-Instruct:
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05); every flag overrides one.
The text goes to stdout as it is generated; a one-line summary goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from qwen25.cli.args import add_model_args, add_sampling_args, load_for_generation, sampling_from_args


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through "
                                                      "the chat template and print the reply")
    p.add_argument("--system", help="system message (with --chat; default: the template's)")
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    from qwen25.assistant import stream_chat
    from qwen25.engine.text import stream_complete

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer, engine = load_for_generation(args)
    sampling = sampling_from_args(args, model)
    t0 = time.perf_counter()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        pieces = stream_chat(engine, tokenizer, messages, stop=args.stop, **sampling)
    else:
        pieces = stream_complete(engine, tokenizer, tokenizer.encode(prompt), stop=args.stop, **sampling)
    result = None
    for piece in pieces:
        if isinstance(piece, str):
            sys.stdout.write(piece)
            sys.stdout.flush()
        else:
            result = piece
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    n = result.usage["completion_tokens"] if args.chat else len(result.token_ids)
    print(f"[{n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tok/s incl. prefill), "
          f"finish: {result.finish_reason}, decode: {engine.decode_path}]", file=sys.stderr)
    return 0

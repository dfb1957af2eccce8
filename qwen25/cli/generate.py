"""`qwen25 generate MODEL --prompt TEXT`: stream a completion (or, with --chat, a reply).

Sampling defaults come from the checkpoint's generation_config.json (Qwen2.5-Instruct:
temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05); every flag overrides one.
The text goes to stdout as it is generated; a one-line summary goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (HF layout: config.json, *.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer folder, or 'qwen2.5' for the built-in vocabulary "
                                       "(default: the model folder)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as saved; default)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + reply tokens the KV cache holds (default: min(8192, the model's context))")
    add_context_args(p)


def add_context_args(p: argparse.ArgumentParser) -> None:
    """--rope-scaling / --dca: extend the context at inference (qwen25.model.context)."""
    g = p.add_argument_group("long context (default: as the checkpoint's config.json says)")
    g.add_argument("--rope-scaling", metavar="TYPE:FACTOR",
                   help="RoPE scaling over the trained length: yarn:4 (Qwen2.5's 4x), linear:F, "
                        "dynamic:F, or none to drop the checkpoint's own")
    g.add_argument("--dca", metavar="CHUNK:LOCAL[:ORIGINAL]",
                   help="dual chunk attention: chunk size (the trained context), local window, and "
                        "optionally the length past which attention is sharpened (the 1M models); "
                        "none drops the checkpoint's own")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate at most (default 512)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float, help="1 = off (HF semantics)")
    g.add_argument("--presence-penalty", type=float, help="OpenAI semantics, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, help="OpenAI semantics, in [-2, 2]")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed")


def sampling_from_args(args: argparse.Namespace, model) -> dict:
    """The model's recommended sampling, overridden by the flags given on the command line."""
    from qwen25.engine.text import sampling_defaults

    sampling = {"max_new_tokens": 512} | sampling_defaults(model)
    for name in SAMPLING_FLAGS:
        value = getattr(args, name)
        if value is not None:
            sampling[name] = value
    return sampling


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, context limit) for the verbs that run a checkpoint: the model with
    --rope-scaling / --dca applied, and its tokenizer (or --tokenizer); bad input raises
    UserError."""
    from qwen25.checkpoint import load_model
    from qwen25.errors import UserError
    from qwen25.model.context import extend_context
    from qwen25.tokenizer import load_tokenizer

    model = load_model(args.model, dtype=args.dtype)
    limit = extend_context(model, args.rope_scaling, args.dca)
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except UserError as e:
        if args.tokenizer:
            raise
        raise UserError(f"{e} (a folder without tokenizer files can use --tokenizer qwen2.5)") from None
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; pass the matching --tokenizer")
    return model, tokenizer, limit


def load_for_generation(args: argparse.Namespace, max_batch_size: int = 1):
    """(model, tokenizer, engine) for the CLI verbs; bad paths raise UserError."""
    # Weights in 2 MiB pages from the start (decoding streams them; see engine/hugepages.py).
    # torch reads this once, at its first large allocation: before the model is loaded.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from qwen25.engine import Engine
    from qwen25.errors import UserError

    model, tokenizer, limit = load_model_and_tokenizer(args)
    if args.max_seq_len is not None and args.max_seq_len > limit:
        raise UserError(f"--max-seq-len {args.max_seq_len} is longer than the model's context of "
                        f"{limit} tokens; extend it with --rope-scaling yarn:FACTOR and/or --dca "
                        "CHUNK:LOCAL, or lower --max-seq-len")
    max_seq_len = args.max_seq_len or min(8192, limit)
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    return model, tokenizer, engine


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through "
                                                      "the chat template and print the reply")
    p.add_argument("--system", help="system message (with --chat; default: the template's)")
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    from qwen25.engine.text import stream_chat, stream_complete

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

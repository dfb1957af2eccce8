"""`qwen25 serve MODEL`: an OpenAI-compatible HTTP server with continuous batching.

    qwen25 serve ./Qwen2.5-0.5B-Instruct --port 8000 --api-key sk-local
    curl localhost:8000/v1/chat/completions -H 'Authorization: Bearer sk-local' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Requests that leave sampling fields out get the checkpoint's generation_config.json
(Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05).
The context a request may use (prompt + max_tokens) is --max-model-len; by default the
model's whole context (x the YaRN factor with --rope-scaling), unless the KV cache for
--max-batch-size sequences of that length would take more than a quarter of the memory,
in which case it is cut to fit and the startup line says so. Longer requests get a 400
`context_length_exceeded`, never a silent truncation.

SIGTERM (or Ctrl-C): stop accepting, finish what is running (--shutdown-timeout), exit 0.
"""

from __future__ import annotations

import argparse
import os
import sys

from qwen25.cli.args import add_model_args, build_engine

DEFAULT_BATCH = 16
CACHE_MEMORY_SHARE = 0.25  # the default context keeps the KV cache under this share of RAM


def configure(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--max-model-len", dest="max_seq_len", type=int, default=None,
                   help="same as --max-seq-len (vLLM's name); serve's default: the whole context when its KV cache fits a quarter of RAM")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on /v1 routes (repeatable; also $QWEN25_API_KEY)")
    g.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    g.add_argument("--max-batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"sequences decoded together; n samples take n (default {DEFAULT_BATCH})")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before new ones get 429 (default 256)")
    g.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step, so long prompts do not stall streams (default 512)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads of the decoder (default: all)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM (default 30)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def kv_bytes_per_token(cfg, dtype_bytes: int) -> int:
    """K and V of one token over all layers."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def default_context(limit: int, per_token: int, slots: int, memory: int) -> int:
    """The whole context when `slots` sequences of it fit CACHE_MEMORY_SHARE of `memory`,
    else the longest multiple of 1024 that does (at least 1024)."""
    budget = CACHE_MEMORY_SHARE * memory
    if limit * per_token * slots <= budget:
        return limit
    return min(limit, max(1024, int(budget // (per_token * slots)) // 1024 * 1024))


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def serve_engine(args: argparse.Namespace):
    """(model, tokenizer, engine) of the server: the context rules of every verb
    (`engine_context`), with a default sized to the memory (`default_context`)."""
    def default(model, limit: int) -> int:
        per_token = kv_bytes_per_token(model.config, model.dtype.itemsize)
        return default_context(limit, per_token, args.max_batch_size, _memory_bytes())

    return build_engine(args, args.max_batch_size, default, "--max-model-len",
                        prefill_chunk=args.prefill_chunk, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from qwen25.errors import UserError
    from qwen25.model.context import context_limit
    from qwen25.serve import ServerConfig, ServerState, run as serve

    for name in ("max_batch_size", "max_queue", "prefill_chunk", "port"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
    model, tokenizer, engine = serve_engine(args)
    context = engine.max_seq_len
    keys = tuple(args.api_key) or ((os.environ["QWEN25_API_KEY"],) if os.environ.get("QWEN25_API_KEY") else ())
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    config = ServerConfig(served_model_name=name, model_path=str(args.model), api_keys=keys,
                          max_queue=args.max_queue)
    state = ServerState(engine, tokenizer, config)
    limit = context_limit(model.config)
    note = ""
    if args.max_seq_len is None and context < limit:
        note = f" (cut from {limit} to fit memory; set --max-model-len)"
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 | batch {args.max_batch_size}, context "
          f"{context}{note}, KV cache {engine.cache_bytes / 2**30:.2f} GiB, decode {engine.decode_path}"
          f"{', API key required' if keys else ''}", file=sys.stderr, flush=True)
    serve(state, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
    return 0

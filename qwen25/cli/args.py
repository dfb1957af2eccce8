"""What the verbs that run a checkpoint share: its flags, loading it, and building its engine.

`generate`, `chat`, `serve` and `eval` each import this module (never each other):

- `add_model_args(p)`: MODEL, --tokenizer, --dtype, --device, --max-seq-len and the
  long-context overrides (`add_context_args`: --rope-scaling, --dca);
- `add_sampling_args(p)`: one flag per field of `SamplingParams` that a person sets
  (generated from the dataclass and its field comments, so a new field gets its flag) plus
  --stop; `sampling_from_args(args, model)` lays them over the checkpoint's
  generation_config.json;
- `load_model_and_tokenizer(args)`: (model with the overrides applied, tokenizer, the
  model's context limit), with one-line errors for a bad device, path or tokenizer;
- `build_engine(args, ...)`: the Engine whose context is `engine_context(...)`, the one
  rule for how long a sequence may be (see qwen25.model.context).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

# SamplingParams fields that are not command-line choices: stop ids come from the model,
# logprobs and n are for API clients.
_NOT_FLAGS = ("stop_token_ids", "logprobs", "n")
DEFAULT_MAX_NEW_TOKENS = 512  # the CLI's reply length when generation_config sets none
DEFAULT_CONTEXT = 8192  # generate/chat: the KV cache's positions unless --max-seq-len says otherwise


def add_model_args(p: argparse.ArgumentParser, max_seq_len: bool = True) -> None:
    p.add_argument("model", help="checkpoint folder (HF layout: config.json, *.safetensors)")
    p.add_argument("--tokenizer", help="tokenizer folder, or 'qwen2.5' for the built-in vocabulary "
                                       "(default: the model folder)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (as saved; default)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, mps")
    if max_seq_len:
        p.add_argument("--max-seq-len", type=int, default=None,
                       help=f"prompt + reply tokens the KV cache holds (default: min({DEFAULT_CONTEXT}, "
                            "the model's context))")
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


def sampling_flags() -> list[tuple[str, type, str]]:
    """(field, type, help) for every SamplingParams field a person sets on the command line."""
    import typing

    from qwen25.cli.config_args import _strip_optional, field_comments
    from qwen25.engine.sampling import SamplingParams

    comments = field_comments(SamplingParams)
    hints = typing.get_type_hints(SamplingParams)
    out = []
    for f in dataclasses.fields(SamplingParams):
        if f.name not in _NOT_FLAGS:
            tp, _ = _strip_optional(hints[f.name])
            out.append((f.name, tp, comments.get(f.name, "")))
    return out


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the model's generation_config.json)")
    for name, tp, help_text in sampling_flags():
        if name == "max_new_tokens":
            help_text += f" (default {DEFAULT_MAX_NEW_TOKENS})"
        g.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, default=None, help=help_text)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_from_args(args: argparse.Namespace, model) -> dict:
    """The model's recommended sampling, overridden by the flags given on the command line."""
    from qwen25.engine.text import sampling_defaults

    sampling = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS} | sampling_defaults(model)
    for name, _, _ in sampling_flags():
        value = getattr(args, name)
        if value is not None:
            sampling[name] = value
    return sampling


def check_device(spec: str):
    """The torch.device for --device; UserError when it does not exist on this machine."""
    import torch

    from qwen25.errors import UserError

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA GPU (or torch was built without "
                            "CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here; "
                            "use cuda:0 .. cuda:N-1")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {spec}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {spec!r}: use cpu, cuda, cuda:N or mps")
    return device


def load_model_and_tokenizer(args: argparse.Namespace):
    """(model, tokenizer, context limit) for the verbs that run a checkpoint: the model on
    --device with --rope-scaling / --dca applied, and its tokenizer (or --tokenizer); bad
    input raises UserError."""
    from qwen25.checkpoint import load_model
    from qwen25.errors import UserError
    from qwen25.model.context import extend_context
    from qwen25.tokenizer import load_tokenizer

    device = check_device(getattr(args, "device", "cpu"))
    model = load_model(args.model, dtype=args.dtype, device=device)
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


def build_engine(args: argparse.Namespace, max_batch_size: int = 1, default=None, flag: str = "--max-seq-len",
                 **engine_options):
    """(model, tokenizer, engine) for a verb: the model as `load_model_and_tokenizer` gives
    it, and an Engine of `engine_context(limit, args.max_seq_len, default)` positions.

    default: the context when the flag is not given: None (min(DEFAULT_CONTEXT, limit)), a
    number, or a function (model, limit) -> number (serve sizes it to the memory).
    """
    # Weights in 2 MiB pages from the start (decoding streams them; see engine/hugepages.py).
    # torch reads this once, at its first large allocation: before the model is loaded.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from qwen25.engine import Engine
    from qwen25.model.context import engine_context

    model, tokenizer, limit = load_model_and_tokenizer(args)
    if default is None:
        default = DEFAULT_CONTEXT
    elif callable(default):
        default = default(model, limit)
    context = engine_context(limit, args.max_seq_len, default, flag)
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=context, **engine_options)
    return model, tokenizer, engine


def load_for_generation(args: argparse.Namespace, max_batch_size: int = 1):
    """(model, tokenizer, engine) for generate and chat; bad input raises UserError."""
    return build_engine(args, max_batch_size)

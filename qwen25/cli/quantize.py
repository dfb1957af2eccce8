"""`qwen25 quantize MODEL --method int8|int4|gptq-int4|gptq-int8 --out DIR`: weight-only
quantization of a float checkpoint into a GPTQ-layout folder (config.json with
`quantization_config`) that this package, transformers and vLLM load.

int8 / int4 round to nearest (no data needed); gptq-* run GPTQ on calibration text
(--calibration files, default the built-in Shakespeare corpus) tokenized with the model's
tokenizer. The tokenizer is saved beside the weights.
"""

from __future__ import annotations

import argparse
import sys
import time

METHODS = {"int8": (8, False), "int4": (4, False), "gptq-int4": (4, True), "gptq-int8": (8, True)}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float checkpoint folder (HF layout)")
    p.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="int8: symmetric per channel; int4: asymmetric per group; gptq-*: GPTQ")
    p.add_argument("--out", required=True, help="output folder (GPTQ layout)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (int4 default 128; int8 default: per output channel)")
    p.add_argument("--format", default="gptq", choices=("gptq", "awq"),
                   help="tensor layout to write (awq: 4-bit only)")
    p.add_argument("--tokenizer", help="tokenizer folder or 'qwen2.5' (default: the model folder)")
    p.add_argument("--dtype", default="auto", help="dtype of the float parts: float32, bfloat16, auto")
    g = p.add_argument_group("GPTQ calibration")
    g.add_argument("--calibration", nargs="*", default=None,
                   help="text/jsonl/parquet files or globs (default: built-in Shakespeare corpus)")
    g.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of its mean diagonal")
    g.add_argument("--act-order", action="store_true", help="quantize columns by decreasing activation size")


def run(args: argparse.Namespace) -> int:
    import torch

    from qwen25.checkpoint import load_model
    from qwen25.errors import UserError
    from qwen25.quant.checkpoint import save_quantized
    from qwen25.quant.gptq import gptq_model
    from qwen25.quant.modules import quantize_model
    from qwen25.tokenizer import load_tokenizer

    bits, use_gptq = METHODS[args.method]
    group = args.group_size or (None if bits == 8 else 128)
    if args.format == "awq" and (bits != 4 or args.act_order):
        raise UserError("--format awq holds 4-bit weights without --act-order; use --format gptq")
    model = load_model(args.model, dtype=args.dtype)
    for lin in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj):
        if group is not None and lin.in_features % group:
            raise UserError(f"--group-size {group} does not divide the {lin.in_features} inputs of "
                            "this model's layers; use 32, 64 or 128")
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except UserError:
        if use_gptq or args.tokenizer:
            raise
        tokenizer = None  # RTN needs no text; the folder just gets no tokenizer files
    start = time.time()
    with torch.no_grad():
        if use_gptq:
            from qwen25.data.calibration import calibration_windows

            windows = calibration_windows(tokenizer, args.calibration, args.samples, args.seq_len,
                                          tokenizer.eos_token_id)
            print(f"GPTQ on {len(windows)} windows x {windows[0].shape[1]} tokens", file=sys.stderr)

            def progress(i: int, n: int) -> None:
                print(f"\rlayer {i}/{n} ({time.time() - start:.0f} s)", end="", file=sys.stderr, flush=True)

            gptq_model(model, windows, bits=bits, group_size=group or 0, sym=bits == 8, damp=args.damp,
                       act_order=args.act_order, progress=progress)
            print(file=sys.stderr)
        else:
            quantize_model(model, bits, group)
    save_quantized(model, args.out, method=args.format)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({args.method}, group {group or 'per channel'}, {time.time() - start:.1f} s)",
          file=sys.stderr)
    return 0

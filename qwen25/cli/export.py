"""`qwen25 export gguf MODEL OUT.gguf --type f16|bf16|q8_0|q4_0|q4_1`: one GGUF file that
llama.cpp (and this package) loads, with the tokenizer and chat template inside.

MODEL is a checkpoint folder (float, or GPTQ/AWQ: dequantised first). Tensor types follow
llama.cpp's rules (qwen25/formats/gguf_export.py); the summary says where one fell back.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="target", metavar="FORMAT", required=True)
    g = sub.add_parser("gguf", help="a GGUF file for llama.cpp")
    g.add_argument("model", help="checkpoint folder (HF layout)")
    g.add_argument("out", help="output .gguf file")
    g.add_argument("--type", default="f16", help="f32, f16, bf16, q8_0, q4_0 or q4_1 (default f16)")
    g.add_argument("--tokenizer", help="tokenizer folder or 'qwen2.5' (default: the model folder)")
    g.add_argument("--pre", help="llama.cpp pre-tokenizer name (default: detected, e.g. qwen2)")
    g.add_argument("--name", default=None, help="general.name in the file (default: the folder name)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen25.checkpoint import load_model
    from qwen25.formats.gguf_export import TYPES, GGUFExportError, export_gguf
    from qwen25.quant.modules import float_state_dict
    from qwen25.tokenizer import load_tokenizer

    if args.type not in TYPES:  # before loading anything
        export_gguf(None, {}, None, args.out, args.type)  # raises the one-line error
    if Path(args.out).is_dir():
        raise GGUFExportError(f"{args.out} is a folder; give the path of the .gguf file to write")
    start = time.time()
    model = load_model(args.model, dtype="float32")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    report = export_gguf(model.config, float_state_dict(model), tokenizer, args.out, args.type,
                         name=args.name or Path(args.model).resolve().name, pre=args.pre,
                         tokenizer_folder=args.tokenizer or args.model)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(Counter(report.types.values()).items()))
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out}: {size:.1f} MiB, tensors {counts} ({time.time() - start:.1f} s)", file=sys.stderr)
    return 0

"""`qwen25 convert MODEL.gguf OUT_DIR`: a GGUF file (llama.cpp) as an HF checkpoint folder.

The folder holds config.json, model.safetensors, generation_config.json and the tokenizer
files (tokenizer.json, tokenizer_config.json with the chat template): transformers, vLLM and
`qwen25` load it. Weights are dequantised (see qwen25/formats/gguf_import.py); the folder is
written only after the whole file has been read and checked.
"""

from __future__ import annotations

import argparse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", help="a .gguf model file (architectures qwen2, qwen2moe, llama)")
    p.add_argument("out", help="folder to write the HF checkpoint into (created if needed)")
    p.add_argument("--dtype", default="float32",
                   help="float32 (the dequantised values exactly; default), bfloat16 or float16")


def run(args: argparse.Namespace) -> int:
    import sys
    import time

    from qwen25.formats.gguf_import import convert_gguf

    t0 = time.perf_counter()
    folder = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0

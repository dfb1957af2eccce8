"""Prefill throughput of our model vs transformers on the same weights (issue 2).

Both models get the Qwen2.5-0.5B shape (random weights, copied from ours into
`Qwen2ForCausalLM`), the same dtype and a 512-token prompt; runs alternate and the median
is reported. Goal: ratio (ours / transformers tokens/s) >= 1.0.

    python benchmarks/model_forward.py [--preset 0.5B] [--seq 512] [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import alternate, table  # noqa: E402

import qwen25  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5B")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()

    from transformers import Qwen2ForCausalLM

    cfg = qwen25.ModelConfig.preset(args.preset)
    ids = torch.randint(0, 151643, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"{args.preset} prefill, batch {args.batch} x {args.seq} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours = qwen25.build_model(cfg, dtype=dtype, seed=0).eval()
        hf = Qwen2ForCausalLM._from_config(_hf_config(cfg), dtype=dtype).eval()
        hf.load_state_dict(ours.state_dict(), strict=False)  # same keys; tied head re-tied by HF
        with torch.inference_mode():
            assert torch.allclose(ours(ids[:, :8]).float(), hf(ids[:, :8]).logits.float(), atol=5e-2)
            t = alternate({"ours": lambda: ours(ids), "transformers": lambda: hf(ids).logits},
                          rounds=args.rounds)
        ntok = args.batch * args.seq
        rows.append({"dtype": dtype_name, "ours tok/s": f"{ntok / t['ours']:.0f}",
                     "transformers tok/s": f"{ntok / t['transformers']:.0f}",
                     "ratio": f"{t['transformers'] / t['ours']:.2f}x"})
        del ours, hf
    print(table(rows, ["dtype", "ours tok/s", "transformers tok/s", "ratio"]))


def _hf_config(cfg):
    from transformers import AutoConfig

    return AutoConfig.for_model(**cfg.to_hf())


if __name__ == "__main__":
    main()

"""Peak memory of `load_model` relative to the size of the weights (issue 2).

Writes a random checkpoint shaped like Qwen2.5-0.5B in bf16, then loads it in a fresh
process and reports the growth of peak RSS (VmHWM) over the process's footprint after
`import torch`, divided by the bytes of the weights in the requested dtype, after every
weight has been read once (a loader that maps the file lazily pays for its pages then).
Goal: < 1.5x.
transformers' `from_pretrained` is measured the same way for comparison.

    python benchmarks/load_memory.py [--preset 0.5B] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, torch
import qwen25

def hwm():  # peak RSS of this process image (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

base = hwm()
path, dtype, which = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
if which == "ours":
    model = qwen25.load_model(path, dtype=dtype)
else:
    from transformers import AutoModelForCausalLM
    base = hwm()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
# Touch every weight: a loader that maps the file lazily must pay for its pages too.
with torch.no_grad():
    checksum = sum(float(p.sum()) for p in model.parameters())
peak = hwm()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_growth": peak - base, "weights": weights}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5B")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    import torch

    import qwen25

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        model = qwen25.build_model(qwen25.ModelConfig.preset(args.preset), dtype=torch.bfloat16, seed=0)
        qwen25.save_model(model, path)
        del model
        print(f"{args.preset} checkpoint in bf16 on disk, loaded as {args.dtype}")
        for which in ("ours", "transformers"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.dtype, which],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {which:13s} peak RSS growth {r['peak_growth'] / 2**20:7.0f} MiB = "
                  f"{r['peak_growth'] / r['weights']:.2f}x the weights ({r['weights'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()

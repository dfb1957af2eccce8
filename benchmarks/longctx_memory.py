"""Peak memory and time of a dual-chunk-attention prefill of a long prompt (issue 8).

A Qwen2.5-0.5B-shaped model (random weights) prefills `--tokens` tokens (default 32,768)
with DCA, in chunks of `--prefill-chunk` tokens through a KVCache, and computes the logits
of the last position only (all 32K x 151,936 logits would be 20 GB in float32). Each
measurement runs in a fresh process, whose peak RSS (VmHWM in /proc/self/status) is read
before the model is built and after the prefill.

The bound: peak RSS growth <= weights + KV cache + ACTIVATION_BOUND (1 GiB). What DCA
promises is that attention memory grows with its tile (512 x 512 scores per KV head group),
never with the sequence squared (a 32K x 32K float32 score matrix per head would be 4 GiB),
and chunked prefill keeps MLP activations at chunk x intermediate_size. The printout gives
the growth, its parts, the margin to the bound, and prefill throughput.

    python benchmarks/longctx_memory.py [--tokens 32768] [--dtype bfloat16]
        [--dca 16384:1024] [--rope-scaling yarn:4] [--prefill-chunk 2048]

The default DCA (chunk 16,384, local 1,024) puts a 32K prompt over three chunks, so all
three attention ranges (intra, successive, inter) run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ACTIVATION_BOUND = 1 << 30  # bytes allowed above weights + KV cache

CHILD = r"""
import json, sys, time, torch
import qwen25
from qwen25.model.context import extend_context
from qwen25.model.kv_cache import KVCache

def hwm():  # peak RSS of this process image (VmHWM resets at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"] or torch.get_num_threads())
base = hwm()
dtype = getattr(torch, args["dtype"])
cfg = qwen25.ModelConfig.preset(args["preset"])
model = qwen25.build_model(cfg, dtype=dtype, seed=0).eval()
limit = extend_context(model, args["rope_scaling"], args["dca"])
T = args["tokens"]
cache = KVCache(model.config, 1, T, dtype=dtype)
for t in cache.k + cache.v:  # touch the cache pages: zeros may be lazily mapped
    t.fill_(0)
ids = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
ready = hwm()
t0 = time.perf_counter()
with torch.inference_mode():
    for a in range(0, T, args["chunk"]):
        h, _ = model.hidden_states(ids[:, a:a + args["chunk"]], kv_cache=cache)
        print(f"  prefilled {min(a + args['chunk'], T)}/{T} tokens ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    logits = model.lm_head(h[:, -1]).float()
seconds = time.perf_counter() - t0
assert torch.isfinite(logits).all()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
print(json.dumps({"base": base, "ready": ready, "peak": hwm(), "weights": weights, "kv": kv,
                  "seconds": seconds, "context_limit": limit, "threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="0.5B")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--dca", default="16384:1024", help="CHUNK:LOCAL[:ORIGINAL]")
    ap.add_argument("--rope-scaling", default=None, help="e.g. yarn:4 (default: none)")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    spec = {"preset": args.preset, "tokens": args.tokens, "dtype": args.dtype, "dca": args.dca,
            "rope_scaling": args.rope_scaling, "chunk": args.prefill_chunk, "threads": args.threads}
    print(f"{args.preset} shape, random weights in {args.dtype}; DCA {args.dca}"
          f"{', rope ' + args.rope_scaling if args.rope_scaling else ''}; prefill of {args.tokens} tokens "
          f"in chunks of {args.prefill_chunk}, last-position logits only", flush=True)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                         text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2 ** 20
    growth = r["peak"] - r["base"]
    activations = growth - r["weights"] - r["kv"]
    bound = r["weights"] + r["kv"] + ACTIVATION_BOUND
    print(f"  weights            {r['weights'] / mib:8.0f} MiB")
    print(f"  KV cache           {r['kv'] / mib:8.0f} MiB  ({args.tokens} positions)")
    print(f"  ready to prefill   {(r['ready'] - r['base']) / mib:8.0f} MiB  (peak RSS growth after building)")
    print(f"  peak after prefill {growth / mib:8.0f} MiB  = weights + KV cache + {activations / mib:.0f} MiB")
    print(f"  bound              {bound / mib:8.0f} MiB  = weights + KV cache + {ACTIVATION_BOUND / mib:.0f} MiB"
          f"  -> {'within' if growth <= bound else 'EXCEEDED'} ({100 * growth / bound:.0f}% of it)")
    print(f"  prefill time       {r['seconds']:8.1f} s     ({args.tokens / r['seconds']:.0f} tokens/s on "
          f"{r['threads']} threads)")
    print(f"  (all-position logits would need {args.tokens * 151936 * 4 / 2 ** 30:.0f} GiB in float32)")


if __name__ == "__main__":
    main()

"""Generation speed of our Engine vs transformers `generate` on the same weights (issue 4).

Both get the same weights (random, shaped like Qwen2.5-0.5B by default, or a real
checkpoint folder with --model) in the same dtype, greedy decoding, no early stop. Runs
alternate (ours, transformers, ours, ...) and medians are reported, so drifts in machine
speed hit both alike. Per dtype it prints:

- decode tok/s at batch 1 and batch 8 (64-token prompts): batch / median duration of a
  decode step (prefill excluded; each step timed as it happens, transformers' through a
  logits processor that records when the logits of each step arrive), and the ratio;
- prefill tok/s (time to the first token of a 64- and a 512-token prompt);
- the memory-bandwidth roofline: bytes a batch-1 decode step must read (every weight the
  step multiplies by, the lm_head included, plus the KV cache) / the read bandwidth (best
  of our AVX-512 streaming read and torch's sum over 1 GiB), probed between the decode runs
  of every round because the bandwidth here drifts by 2x within minutes;
  "% roofline" = median over rounds of tok/s x bytes per token / that round's bandwidth;
- peak memory of a batch-8 run in a fresh subprocess, as a multiple of weights + KV cache.

Goals (issue 4): bf16 batch-1 decode >= 2.0x transformers, fp32 >= 1.6x; >= 70% of the
roofline at bf16; batch-8 aggregate >= 4x our batch 1; prefill >= 1.0x; peak <= 1.2x.

    python benchmarks/engine.py [--model PATH] [--dtypes bfloat16 float32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

import qwen25  # noqa: E402
from qwen25.engine import kernels  # noqa: E402

PROMPT_LEN, BATCH = 64, 8


# ---- models ------------------------------------------------------------------------------

def build_pair(args, dtype):
    """(ours, transformers) with identical weights in `dtype`."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    if args.model:
        ours = qwen25.load_model(args.model, dtype=dtype)
        hf = Qwen2ForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        return ours, hf
    cfg = qwen25.ModelConfig.preset(args.preset)
    ours = qwen25.build_model(cfg, dtype=dtype, seed=0).eval()
    hf = Qwen2ForCausalLM._from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)  # same names; a tied head is re-tied
    return ours, hf


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(0, min(vocab, 151643), (batch, length), generator=g).tolist()


class _StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_generate(hf, batch_prompts, n) -> tuple[float, list[float]]:
    """transformers' greedy generate -> (time to the first token, durations of the other steps)."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(batch_prompts)
    clock = _StepClock()
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    t = clock.times
    return t[0] - t0, [b - a for a, b in zip(t, t[1:])]


def our_generate(engine, batch_prompts, n) -> tuple[float, list[float]]:
    """The loop `Engine.generate` runs, timed per step -> (time to the first token, the
    durations of the decode steps)."""
    t0 = time.perf_counter()
    requests = [engine.add(p, max_new_tokens=n, temperature=0, stop_token_ids=[]) for p in batch_prompts]
    times = []
    while not all(r.finished for r in requests):
        engine.step()
        times.append(time.perf_counter())
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])]


# ---- measurements ------------------------------------------------------------------------

def bandwidth_gbs(nbytes: int = 1 << 30, repeat: int = 4) -> float:
    """Best read bandwidth (GB/s) of torch's sum and of our AVX-512 streaming read."""
    x = torch.ones(nbytes // 4)
    best = 0.0
    lib = kernels.load()
    for _ in range(repeat):
        t = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
        if lib is not None:
            t = time.perf_counter()
            lib.q25_read_sum(x.data_ptr(), x.numel(), torch.get_num_threads())
            best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def decode_bytes_per_step(model, context: int) -> int:
    """Bytes one batch-1 decode step reads: every weight it multiplies by + the KV cache."""
    cfg = model.config
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    if not cfg.tie_word_embeddings:  # the embedding lookup reads one row, not the matrix
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * model.dtype.itemsize
    return total + kv


def decode_rates(ours, hf, engine, batch: int, n: int, rounds: int) -> dict[str, float]:
    """Aggregate decode tok/s for ours and transformers: batch / median step time over all
    decode steps of `rounds` alternating runs (a median of ~n x rounds steps shrugs off
    other processes' bursts), the read bandwidth ("bw", GB/s) probed after each of our runs,
    and per round our step rate over that round's bandwidth ("ours_per_bw"): the
    bandwidth here drifts 2x within minutes, so the roofline uses the adjacent probe.
    """
    ps = prompts(batch, PROMPT_LEN, ours.config.vocab_size)
    our_generate(engine, ps, 4)  # warm-up: allocations, oneDNN kernel choice, page faults
    hf_generate(hf, ps, 4)
    steps = {"ours": [], "hf": []}
    per_bw = {"ours": [], "hf": []}
    bws = []
    for _ in range(rounds):
        _, mine = our_generate(engine, ps, n)
        bws.append(bandwidth_gbs(repeat=2))
        _, theirs = hf_generate(hf, ps, n)
        for who, s_ in (("ours", mine), ("hf", theirs)):
            steps[who] += s_
            per_bw[who].append(batch / statistics.median(s_) / bws[-1])
    out = {who: batch / statistics.median(v) for who, v in steps.items()}
    out.update(ours_per_bw=statistics.median(per_bw["ours"]), hf_per_bw=statistics.median(per_bw["hf"]),
               bw=statistics.median(bws))
    return out


def prefill_rates(ours, hf, engine, length: int, rounds: int) -> dict[str, float]:
    """Prompt tokens/s: prompt length / median time to the first token."""
    ps = prompts(1, length, ours.config.vocab_size)
    our_generate(engine, ps, 1)
    hf_generate(hf, ps, 1)
    t = {"ours": [], "hf": []}
    for _ in range(rounds):
        t["ours"].append(our_generate(engine, ps, 1)[0])
        t["hf"].append(hf_generate(hf, ps, 1)[0])
    return {k: length / statistics.median(v) for k, v in t.items()}


# ---- peak memory (a fresh process per contender) -------------------------------------------

def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(args) -> None:
    """Peak RSS over the pre-weights baseline during a batch-8 run, printed as JSON."""
    dtype = getattr(torch, args.dtype)
    from transformers import AutoConfig, Qwen2ForCausalLM  # import before the baseline

    base = rss_bytes("VmRSS")
    cfg = qwen25.ModelConfig.preset(args.preset)
    if args.who == "ours":
        model = qwen25.load_model(args.model, dtype=dtype) if args.model else qwen25.build_model(cfg, dtype=dtype, seed=0)
    elif args.model:
        model = Qwen2ForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    else:
        with torch.device("meta"):
            model = Qwen2ForCausalLM._from_config(AutoConfig.for_model(**cfg.to_hf()), dtype=dtype)
        model = model.to_empty(device="cpu").eval()
        model.tie_weights()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) so weight construction does not count
    ps = prompts(BATCH, PROMPT_LEN, model.config.vocab_size)
    n = 32
    if args.who == "ours":
        engine = qwen25.Engine(model, max_batch_size=BATCH, max_seq_len=PROMPT_LEN + n)
        cache = engine.cache_bytes
        our_generate(engine, ps, n)
    else:
        hf_generate(model, ps, n)
        c = model.config
        cache = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) \
            * BATCH * (PROMPT_LEN + n) * dtype.itemsize
    peak = rss_bytes("VmHWM") - base
    print(json.dumps({"peak": peak, "weights": weights, "cache": cache}))


def peak_memory(args, who: str, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", who, "--dtype", dtype_name, "--preset", args.preset]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- main ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint folder (default: random weights of --preset)")
    ap.add_argument("--preset", default="0.5B")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-batch", action="store_true", help="skip the batch-8 decode measurement")
    ap.add_argument("--memory-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        args.who = args.memory_child
        return memory_child(args)

    print(f"engine benchmark: {args.model or args.preset + ' (random weights)'}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, kernels: {kernels.best_isa('bfloat16') or kernels.unavailable_reason()}")
    # The Engine moves its weights to 2 MiB pages (hugepages.py); transformers' weights get
    # them too only when torch allocates them so: THP_MEM_ALLOC_ENABLE=1 gives both the same.
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} "
          "(set it to 1 to give transformers' weights huge pages as well)")
    rows, mem_rows = [], []
    n = args.new_tokens
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ours, hf = build_pair(args, dtype)
        t0 = time.perf_counter()
        engine = qwen25.Engine(ours, max_batch_size=BATCH, max_seq_len=1024)
        setup = time.perf_counter() - t0
        with torch.inference_mode():
            b1 = decode_rates(ours, hf, engine, 1, n, args.rounds)
            progress(f"{dtype_name} batch 1 decode tok/s: ours {b1['ours']:.1f}, transformers {b1['hf']:.1f}")
            b8 = {"ours": float("nan"), "hf": float("nan")}
            if not args.skip_batch:
                b8 = decode_rates(ours, hf, engine, BATCH, n, args.rounds)
                progress(f"{dtype_name} batch 8 decode tok/s: ours {b8['ours']:.1f}, transformers {b8['hf']:.1f}")
            p64 = prefill_rates(ours, hf, engine, 64, args.rounds)
            p512 = prefill_rates(ours, hf, engine, 512, args.rounds)
            progress(f"{dtype_name} prefill tok/s (512): ours {p512['ours']:.0f}, transformers {p512['hf']:.0f}")
        step_bytes = decode_bytes_per_step(ours, PROMPT_LEN + n // 2)
        roof = b1["bw"] * 1e9 / step_bytes  # tok/s the median bandwidth allows
        frac_ours = b1["ours_per_bw"] * step_bytes / 1e9  # per round: tok/s x bytes / bandwidth
        frac_hf = b1["hf_per_bw"] * step_bytes / 1e9
        rows.append({
            "dtype": dtype_name, "path": engine.decode_path,
            "b1 ours": f"{b1['ours']:.1f}", "b1 hf": f"{b1['hf']:.1f}", "b1 ratio": f"{b1['ours'] / b1['hf']:.2f}x",
            "b8 ours": f"{b8['ours']:.1f}", "b8 hf": f"{b8['hf']:.1f}", "b8/b1 ours": f"{b8['ours'] / b1['ours']:.2f}x",
            "prefill64 ratio": f"{p64['ours'] / p64['hf']:.2f}x", "prefill512 ours": f"{p512['ours']:.0f}",
            "prefill512 hf": f"{p512['hf']:.0f}", "prefill512 ratio": f"{p512['ours'] / p512['hf']:.2f}x",
            "GB/s": f"{b1['bw']:.0f}", "roofline tok/s": f"{roof:.1f}",
            "% roofline": f"{100 * frac_ours:.0f}%", "hf % roofline": f"{100 * frac_hf:.0f}%", "setup s": f"{setup:.1f}",
        })
        del engine, ours, hf
        if not args.skip_memory:
            for who in ("ours", "hf"):
                m = peak_memory(args, who, dtype_name)
                progress(f"{dtype_name} peak memory {who}: {m['peak'] / 1e6:.0f} MB")
                mem_rows.append({"dtype": dtype_name, "who": who, "peak MB": f"{m['peak'] / 1e6:.0f}",
                                 "weights MB": f"{m['weights'] / 1e6:.0f}", "KV cache MB": f"{m['cache'] / 1e6:.0f}",
                                 "peak / (weights + cache)": f"{m['peak'] / (m['weights'] + m['cache']):.2f}x"})
    print(f"\ndecode tok/s ({PROMPT_LEN}-token prompts, {n} new tokens, greedy; b8 = aggregate of {BATCH} sequences)")
    print(table(rows, ["dtype", "path", "b1 ours", "b1 hf", "b1 ratio", "b8 ours", "b8 hf", "b8/b1 ours"]))
    print("\nroofline (batch 1) and prefill (prompt tok/s, time to first token)")
    print(table(rows, ["dtype", "GB/s", "roofline tok/s", "% roofline", "hf % roofline", "prefill64 ratio",
                       "prefill512 ours", "prefill512 hf", "prefill512 ratio", "setup s"]))
    if mem_rows:
        print("\npeak memory of a batch-8 run (fresh process; RSS over the pre-weights baseline)")
        print(table(mem_rows, ["dtype", "who", "peak MB", "weights MB", "KV cache MB", "peak / (weights + cache)"]))


if __name__ == "__main__":
    main()

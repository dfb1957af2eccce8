"""Encode throughput of the built-in Qwen2.5 tokenizer vs tiktoken and HF tokenizers.

    python benchmarks/tokenizer.py [--mb 8] [--repeats 5] [--threads 2]

Corpus: Python standard-library sources (real code and prose in docstrings) plus generated
multilingual text (CJK, emoji, digits, every kind of whitespace), encoded document by
document. All three engines get the same vocabulary: tiktoken is built from the same ranks
with the canonical Qwen regex, HF `tokenizers` loads the tokenizer.json we export.
Every configuration runs `--repeats` times, interleaved; the best run (least disturbed by
other processes on the machine) and the median are printed, then the ratios.

Goals (issue 3): ours single-thread >= 1.0x tiktoken; ours batched >= 1.7x ours single.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
import unicodedata
from pathlib import Path


def corpus(megabytes: float) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total, limit = [], 0, megabytes * 1e6 * 0.85
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or total >= limit:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
    rng = random.Random(0)
    pools = [range(0x4E00, 0x9FFF), range(0x3041, 0x30FF), range(0x1F300, 0x1F64F), range(0x61, 0x7B),
             range(0x410, 0x450)]
    while total < megabytes * 1e6:
        words = []
        for _ in range(400):
            pool = rng.choice(pools)
            words.append("".join(chr(rng.choice(pool)) for _ in range(rng.randrange(1, 8))))
            words.append(rng.choice([" ", " ", "\n", "\t", "  ", "\u3000", str(rng.randrange(10**6))]))
        texts.append("".join(words))
        total += len(texts[-1].encode("utf-8"))
    return texts


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per configuration (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the batched runs (default 2)")
    ap.add_argument("--no-hf", action="store_true",
                    help="skip HF tokenizers (10x slower): a short run fits a quiet moment")
    args = ap.parse_args()
    # HF tokenizers sizes its thread pool once, at first use: give it --threads, like the others.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)

    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from qwen25.tokenizer import load_tokenizer
    from qwen25.tokenizer.qwen import PATTERN, load_ranks

    texts = corpus(args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    ours = load_tokenizer("qwen2.5")
    ref_tiktoken = tiktoken.Encoding("qwen-canonical", pat_str=PATTERN, mergeable_ranks=load_ranks(),
                                     special_tokens={})
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        hf = HFTokenizer.from_file(str(Path(folder) / "tokenizer.json"))

    nfc_texts = [unicodedata.normalize("NFC", t) for t in texts]
    assert ours.encode_batch(texts) == ref_tiktoken.encode_ordinary_batch(nfc_texts)  # same work

    n = args.threads
    configs = {
        "ours       single": lambda: [ours.encode(t) for t in texts],
        "tiktoken   single": lambda: [ref_tiktoken.encode_ordinary(t) for t in texts],
        "ours       batch": lambda: ours.encode_batch(texts, num_threads=n),
        "tiktoken   batch": lambda: ref_tiktoken.encode_ordinary_batch(texts, num_threads=n),
    }
    if not args.no_hf:
        configs["hf         single"] = lambda: [hf.encode(t, add_special_tokens=False) for t in texts]
        configs["hf         batch"] = lambda: hf.encode_batch_fast(texts, add_special_tokens=False)
    runs: dict[str, list[float]] = {name: [] for name in configs}
    cores: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            wall, cpu = timed(fn)
            runs[name].append(mb / wall)
            cores[name].append(cpu / wall)

    best = {name: max(v) for name, v in runs.items()}
    median = {name: statistics.median(v) for name, v in runs.items()}
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB; {args.repeats} runs each; "
          f"batch = {n} threads; cpus available: {len(os.sched_getaffinity(0))}; "
          f"load average {os.getloadavg()[0]:.2f}")
    # "cores used" = CPU time / wall time: ~n for a batch that really runs in parallel; it can
    # only show a speed-up when other processes leave cores free.
    print(f"{'':20s} {'best MB/s':>10s} {'median MB/s':>12s} {'cores used':>11s}")
    for name in configs:
        print(f"{name:20s} {best[name]:10.2f} {median[name]:12.2f} {statistics.median(cores[name]):11.2f}")
    print("ratios (best / median):")
    pairs = [("ours single / tiktoken single", "ours       single", "tiktoken   single", 1.0),
             ("ours batch / ours single", "ours       batch", "ours       single", 1.7),
             ("ours batch / tiktoken batch", "ours       batch", "tiktoken   batch", None),
             ("ours single / hf single", "ours       single", "hf         single", None),
             ("ours batch / hf batch", "ours       batch", "hf         batch", None)]
    for label, a, b, goal in pairs:
        if a not in best or b not in best:
            continue
        goal_text = f"   (goal >= {goal:.1f}x)" if goal else ""
        print(f"  {label:32s} {best[a] / best[b]:5.2f}x / {median[a] / median[b]:5.2f}x{goal_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

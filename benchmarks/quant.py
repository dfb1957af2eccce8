"""Weight-only int8/int4 decode against llama.cpp on the same weights (issue 18).

One random model shaped like Qwen2.5-0.5B (bf16, seed 0) is saved once; llama.cpp gets it
through our GGUF exporter (q8_0 and q4_0 files of the same weights), we run it through the
engine (C++ decoder) in bf16, int8 (RTN, per channel) and int4 (RTN, groups of --group,
asymmetric), each also with the lm_head quantized to int8 (llama.cpp's q8_0/q4_0 files hold
the tied embedding/output in q8_0, so this is the like-for-like row). Every contender runs in its own fresh subprocess with the same thread count,
so peak memory (max RSS) is its own. Decode tok/s = batch / median duration of one decode
step (--tokens steps timed one by one after a 64-token prompt; greedy; the median resists
the stalls other processes cause on a shared machine).

Printed: decode tok/s, ratios int8 / llama.cpp q8_0 and int4 / q4_0 at batch 1, bf16
batch 8 / batch 1, and peak RSS of each. Goals (issue 18): int8 >= 1.4x q8_0, int4 >=
1.4x q4_0, bf16 batch 8 >= 4x batch 1. On a shared machine the numbers are noisy: say so.

    python benchmarks/quant.py [--threads 2] [--tokens 32] [--group 32] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

PROMPT_LEN = 64


def _prompts(batch: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(batch)
    return torch.randint(0, 151643, (batch, PROMPT_LEN), generator=g).tolist()


def _ours(folder: str, mode: str, batch: int, tokens: int, group: int) -> dict:
    import torch

    import qwen25
    from qwen25.quant.modules import quantize_model

    model = qwen25.load_model(folder, dtype="bfloat16")
    if mode.startswith("int8"):
        quantize_model(model, 8, lm_head=mode.endswith("h"))
    elif mode.startswith("int4"):
        quantize_model(model, 4, group, lm_head=mode.endswith("h"))
    engine = qwen25.Engine(model, max_batch_size=batch, max_seq_len=PROMPT_LEN + tokens + 8)
    prompts = _prompts(batch)
    engine.generate(prompts, max_new_tokens=2, temperature=0.0)  # warm up (kernel build, pages)
    requests = [engine.add(p, max_new_tokens=tokens + 2, temperature=0.0) for p in prompts]
    while not all(len(r.outputs[0].tokens) >= 1 for r in requests):
        engine.step()  # prefill (not timed)
    steps = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    for r in requests:
        engine.cancel(r)
    # the median step: other processes on the machine stall single steps, not the median
    return {"tok_s": batch / statistics.median(steps), "path": engine.runner.decode_path,
            "threads": torch.get_num_threads()}


def _llama(path: str, tokens: int, threads: int, extra_buffers: bool) -> dict:
    """llama.cpp decoding at batch 1. extra_buffers=False opens the model with its plain CPU
    buffers: on a CPU with AMX llama.cpp repacks q8_0 weights into an AMX buffer, and in some
    builds that path segfaults; the parent then retries without it and labels the row."""
    import numpy as np

    from qwen25.formats.llama_cpp import open_llama

    llm = open_llama(path, extra_buffers=extra_buffers, n_ctx=PROMPT_LEN + tokens + 8, n_batch=PROMPT_LEN,
                     n_threads=threads, n_threads_batch=threads, verbose=False, logits_all=True)
    llm.eval(_prompts(1)[0])
    steps = []
    for _ in range(tokens + 2):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        llm.eval([nxt])
        steps.append(time.perf_counter() - t0)
    steps = steps[2:]  # warm-up steps
    return {"tok_s": 1 / statistics.median(steps),
            "path": "llama.cpp" + ("" if extra_buffers else " (plain CPU buffers)")}


def _peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage: Linux carries ru_maxrss across exec, so every
    child would report the parent's peak (the float model it exported) instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.mode.startswith("llama"):
        out = _llama(args.path, args.tokens, args.threads, extra_buffers=args.mode == "llama")
    else:
        out = _ours(args.path, args.mode, args.batch, args.tokens, args.group)
    out["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(out))


def prepare(work: Path) -> tuple[Path, dict[str, Path]]:
    import torch

    import qwen25
    from qwen25.formats.gguf_export import export_gguf
    from qwen25.tokenizer import load_tokenizer

    folder = work / "model"
    if not (folder / "config.json").exists():
        model = qwen25.build_model(qwen25.ModelConfig.preset("0.5B"), dtype=torch.bfloat16, seed=0)
        qwen25.save_model(model, folder)
        load_tokenizer("qwen2.5").save_pretrained(folder)
    ggufs = {}
    for kind in ("q8_0", "q4_0"):
        path = work / f"model-{kind}.gguf"
        if not path.exists():
            model = qwen25.load_model(folder, dtype="float32")
            export_gguf(model.config, model.state_dict(), load_tokenizer(folder), path, kind, tokenizer_folder=folder)
            del model
        ggufs[kind] = path
    return folder, ggufs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed")
    p.add_argument("--group", type=int, default=32, help="int4 group size (q4_0 blocks are 32)")
    p.add_argument("--work", default=None, help="folder for the model and GGUF files (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--path", default="", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="qwen25-quant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    folder, ggufs = prepare(work)
    print(f"prepared {work} in {time.time() - t0:.0f} s", file=sys.stderr)
    runs = [("bf16", "bf16", folder, 1), ("bf16 batch 8", "bf16", folder, 8), ("int8", "int8", folder, 1),
            (f"int4 g{args.group}", "int4", folder, 1), ("int8 + int8 head", "int8h", folder, 1),
            (f"int4 g{args.group} + int8 head", "int4h", folder, 1), ("llama.cpp q8_0", "llama", ggufs["q8_0"], 1),
            ("llama.cpp q4_0", "llama", ggufs["q4_0"], 1)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), THP_MEM_ALLOC_ENABLE="1")
    results = {}

    def run(mode: str, path: Path, batch: int):
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--path", str(path), "--batch", str(batch),
               "--threads", str(args.threads), "--tokens", str(args.tokens), "--group", str(args.group)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        return proc, [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]

    for label, mode, path, batch in runs:
        proc, line = run(mode, path, batch)
        if mode == "llama" and (proc.returncode or not line):
            print(f"{label}: llama.cpp failed with its extra buffers (rc {proc.returncode}); retrying "
                  "with plain CPU buffers", file=sys.stderr)
            proc, line = run("llama-plain", path, batch)
        if proc.returncode or not line:
            print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[label] = json.loads(line[0][7:])
        print(f"{label}: {results[label]}", file=sys.stderr)
    rows = [{"run": k, "decode tok/s": f"{v['tok_s']:.1f}", "path": v["path"],
             "peak RSS MiB": f"{v['peak_rss_mib']:.0f}"} for k, v in results.items()]
    print(table(rows, ["run", "decode tok/s", "path", "peak RSS MiB"]))

    def ratio(a: str, b: str) -> str:
        return f"{results[a]['tok_s'] / results[b]['tok_s']:.2f}x" if a in results and b in results else "n/a"

    print(f"int8 / llama.cpp q8_0: {ratio('int8', 'llama.cpp q8_0')} (goal 1.4x)")
    print(f"int4 / llama.cpp q4_0: {ratio(f'int4 g{args.group}', 'llama.cpp q4_0')} (goal 1.4x)")
    print(f"bf16 batch 8 / batch 1: {ratio('bf16 batch 8', 'bf16')} (goal 4x)")
    print(f"with the head quantized too (llama.cpp's files hold it in q8_0): int8 "
          f"{ratio('int8 + int8 head', 'llama.cpp q8_0')}, int4 {ratio(f'int4 g{args.group} + int8 head', 'llama.cpp q4_0')}")
    print(f"int8 / bf16: {ratio('int8', 'bf16')}, int4 / bf16: {ratio(f'int4 g{args.group}', 'bf16')}")


if __name__ == "__main__":
    main()

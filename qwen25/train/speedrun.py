"""The speedrun: the report's pretraining recipe end to end on built-in data, in one folder.

    fetch the built-in corpora -> train a byte-level BPE tokenizer on them -> filter, dedup,
    decontaminate and tokenise them into shards -> pretrain a small Qwen2.5-architecture
    model in two stages (short context at RoPE base 1e4, then 4x the context at base 1e6:
    ABF, spec §3.3) -> report (markdown, curves, samples, tokens/s, timings)

Everything lands in OUT (default `runs/speedrun`): `tokenizer/`, `data/`, `checkpoints/`,
`metrics.jsonl`, `plots/`, `final/` (model + tokenizer, ready for `qwen25 chat OUT/final`)
and `report.md`. Each phase skips itself when its output is complete, and pretraining
resumes from its newest checkpoint, so re-running the command after an interruption
continues where it stopped. `timings.json` accumulates the seconds spent in each phase.

Profiles are plain configs: "cpu" fits 20 minutes on 2 cores (the goal: held-out
Shakespeare at <= 2.3 bits per byte); "gpu" scales the same recipe to one GPU.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qwen25.errors import UserError
from qwen25.train.config import PretrainConfig, Stage


@dataclass(frozen=True)
class Profile:
    """One speedrun size: tokenizer, data and the pretraining config (out and paths filled in)."""

    name: str  # "cpu" or "gpu"
    vocab_size: int  # BPE vocabulary incl. the 22 control tokens (a small vocab suits a small model)
    tokenizer_chars: int  # characters of the built-in text the tokenizer is trained on
    pretrain: PretrainConfig  # everything else (data/out/tokenizer are set per run)
    notes: str = ""  # why these numbers, for the report
    sample_prompts: tuple[str, ...] = field(default=("ROMEO:", "def fibonacci(n):", "Question:"))


# The mixture favours literature: the goal is measured on Shakespeare, and a 5M-parameter
# model cannot hold much of everything in 3-4M tokens. Code and math stay in (the report
# leans on both) at about a fifth of the tokens together.
MIX = {"literature": 0.78, "code": 0.11, "math": 0.11}

CPU = Profile(
    name="cpu", vocab_size=4096, tokenizer_chars=8_000_000,
    notes="4 layers x 256 wide (3M non-embedding parameters), 4,096-token vocabulary; fp32 "
          "(bf16 autocast measured slower on 2 cores at this size); WSD schedule.",
    pretrain=PretrainConfig(
        model="small",
        model_overrides={"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 2,
                         "tie_word_embeddings": True, "rope_theta": 10_000.0},
        seq_len=256, batch_tokens=16_384, micro_batch=32, lr=3e-3, warmup_steps=20,
        schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0, weight_decay=0.1, grad_clip=1.0,
        precision="fp32", eval_every=50, eval_tokens=0, checkpoint_every=25, keep_checkpoints=2,
        eval_sets=("shakespeare", "all"), sample_tokens=48,
        stages=(Stage("short", steps=180, seq_len=256, mix=MIX),
                Stage("long", steps=30, seq_len=1024, micro_batch=8, rope_theta=1_000_000.0, mix=MIX,
                      short_fraction=0.6, short_seq_len=256))),
)

GPU = Profile(
    name="gpu", vocab_size=16_384, tokenizer_chars=40_000_000,
    notes="12 layers x 768 (Qwen2.5-0.5B-like depth/width ratio), bf16 autocast + compile.",
    pretrain=PretrainConfig(
        model="0.5B",
        model_overrides={"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "num_key_value_heads": 2,
                         "tie_word_embeddings": True, "rope_theta": 10_000.0},
        seq_len=1024, batch_tokens=262_144, micro_batch=32, lr=1.5e-3, warmup_steps=100,
        schedule="wsd", decay_frac=0.25, precision="bf16", compile=True, eval_every=250,
        eval_tokens=0, checkpoint_every=250, keep_checkpoints=2, eval_sets=("shakespeare", "all"),
        sample_tokens=64,
        stages=(Stage("short", steps=1500, seq_len=1024, mix=MIX),
                Stage("long", steps=250, seq_len=4096, micro_batch=8, rope_theta=1_000_000.0, mix=MIX,
                      short_fraction=0.6, short_seq_len=1024))),
)

PROFILES = {"cpu": CPU, "gpu": GPU}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


class Timings:
    """Seconds per phase, accumulated over every invocation (`timings.json` in OUT)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.seconds, indent=1))
        os.replace(tmp, self.path)


def tokenizer_files(cache: Path, limit_chars: int, work: Path) -> list[str]:
    """A balanced sample of the built-in text for tokenizer training (literature, code, math).

    Each domain gets a third of `limit_chars`, read in a fixed order, so the vocabulary is
    deterministic and covers all three kinds of text the model will see.
    """
    groups = {
        "literature": sorted((cache / "shakespeare").glob("*.txt")) + sorted((cache / "milton").glob("*.txt")),
        "code": sorted((cache / "stdlib").rglob("*.py")),
        "math": [cache / "math" / "train.jsonl"],
    }
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name, paths in groups.items():
        budget, parts = limit_chars // len(groups), []
        for p in paths:
            text = p.read_text(encoding="utf-8", errors="replace")
            if name == "math":
                text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
            parts.append(text[:budget])
            budget -= len(parts[-1])
            if budget <= 0:
                break
        path = work / f"{name}.txt"
        path.write_text("\n\n".join(parts), encoding="utf-8")
        out.append(str(path))
    return out


def run_config(prof: Profile, out: Path) -> PretrainConfig:
    return replace(prof.pretrain, out=str(out), data=str(out / "data" / "manifest.json"),
                   tokenizer=str(out / "tokenizer"), sample_prompts=prof.sample_prompts)


def speedrun(out: str | Path = "runs/speedrun", profile_name: str = "cpu",
             started_at: float | None = None, steps_scale: float = 1.0) -> Path:
    """Run (or continue) every phase; return the path of `report.md`.

    started_at: UNIX time the set-up began (the Makefile passes it), to report set-up time.
    steps_scale: multiply every stage's steps (a quick smoke run uses e.g. 0.05).
    """
    from qwen25.data import builtin
    from qwen25.data.pipeline import prepare
    from qwen25.tokenizer.train import train_tokenizer
    from qwen25.train.pretrain import pretrain
    from qwen25.train.report import write_report

    prof = profile(profile_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    if started_at is not None and "setup" not in timings.seconds:
        timings.add("setup", max(0.0, time.time() - started_at))
    cfg = run_config(prof, out)
    if steps_scale != 1.0:
        cfg = replace(cfg, stages=tuple(replace(s, steps=max(2, round(s.steps * steps_scale))) for s in cfg.stages))

    with timings.phase("fetch"):
        cache = builtin.fetch()
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        with timings.phase("tokenizer"):
            files = tokenizer_files(Path(cache), prof.tokenizer_chars, out / ".tokenizer-text")
            print(f"training a {prof.vocab_size}-token BPE vocabulary on {len(files)} files", flush=True)
            train_tokenizer(files, prof.vocab_size, tok_dir, show_progress=False)
    if not (out / "data" / "manifest.json").exists():
        with timings.phase("data"):
            prepare(builtin.builtin_config(out=str(out / "data"), tokenizer=str(tok_dir), root=Path(cache)))
    with timings.phase("pretrain"):
        summary = pretrain(cfg)
    if summary.get("interrupted"):
        raise KeyboardInterrupt  # the CLI reports it; the checkpoint is saved
    with timings.phase("report"):
        path = write_report(out, prof, cfg, summary, timings.seconds, _machine())
    return path


def _machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

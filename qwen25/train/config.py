"""`PretrainConfig` and `Stage`: everything a pretraining run needs, as frozen data.

A run is a list of stages that share one model, optimizer and learning-rate schedule; a
stage sets its sequence length and may raise the RoPE base (the report's long-context
recipe: 4,096 tokens at base 1e4, then 32,768 tokens at base 1e6, spec §3.3). The global
batch is fixed in *tokens*, so a stage with 8x longer sequences takes 8x fewer of them.

Every field has a comment: `qwen25 pretrain --help` prints them. `validate` checks what can
be checked without touching data (shapes, divisibility, names) and raises `UserError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from qwen25.errors import UserError
from qwen25.train.optim import SCHEDULES
from qwen25.train.parallel import PARALLEL_MODES

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Stage:
    """One phase of a run. Fields left None inherit the run-level value."""

    name: str = "main"  # label in logs, plots and the report
    steps: int = 0  # optimizer steps in this stage (0: derive from `tokens`)
    tokens: int = 0  # training tokens in this stage, used when steps is 0
    seq_len: int | None = None  # tokens per training sequence (None: the run's seq_len)
    micro_batch: int | None = None  # sequences per forward pass per rank (None: the run's)
    rope_theta: float | None = None  # RoPE base from this stage on (ABF; None: unchanged)
    max_position_embeddings: int | None = None  # context recorded in config.json (None: max(seq_len, previous))
    short_fraction: float = 0.0  # share of sequences cut into shorter ones (Qwen2.5-Turbo: 0.6)
    short_seq_len: int | None = None  # length of those shorter sequences (None: seq_len // 4)
    reset_optimizer: bool = False  # start the stage with fresh AdamW moments
    mix: dict[str, float] | None = None  # domain weights of this stage's data, e.g. {"code": 2, "literature": 1} (None: natural)


@dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: model, data, batch, optimizer, schedule, stages, bookkeeping."""

    out: str = "runs/pretrain"  # run folder: checkpoints/, metrics.jsonl, plots/, final/
    model: str = "small"  # preset name, or a config.json / checkpoint folder giving the shape
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change, e.g. {"num_hidden_layers": 6}
    init_from: str | None = None  # checkpoint folder whose weights and shape start the run (then `model` is ignored)
    tokenizer: str | None = None  # HF tokenizer folder: sets vocab/eos, copied into checkpoints, used for samples
    data: str = ""  # training data: a manifest.json (or its folder) written by `qwen25 data prepare`
    eval_sets: tuple[str, ...] = ("all",)  # held-out sets to report (loss, bits/byte): "all" or source names of the manifest
    reset_position_ids: bool = False  # restart positions after each EOS (and mask the EOS label)
    seq_len: int = 1024  # tokens per training sequence (stages may change it)
    batch_tokens: int = 65536  # global batch per optimizer step in tokens, all ranks together
    micro_batch: int = 8  # sequences per forward pass per rank (gradient accumulation makes up the rest)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay), "cosine" or "constant", over all stages
    decay_frac: float = 0.2  # WSD: share of all steps spent in the final linear decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices (not biases or norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    precision: str = "fp32"  # "fp32", or "bf16" autocast over float32 master weights
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    compile: bool = False  # torch.compile each decoder block and the cross entropy
    parallel: str = "auto"  # "auto" (FSDP2 under torchrun), "fsdp", "ddp" or "none"
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 0  # weights init and data order
    stages: tuple[Stage, ...] = (Stage(name="main", steps=1000),)  # the phases, in order
    eval_every: int = 100  # steps between held-out evaluations (0: only at stage ends)
    eval_tokens: int = 65536  # held-out tokens per evaluation and set (0: the whole split)
    checkpoint_every: int = 200  # steps between checkpoints (stage ends always save)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_every: int = 0  # steps between sample generations (0: only at the end)
    sample_prompts: tuple[str, ...] = ("The",)  # prompts for sample generations (needs a tokenizer)
    sample_tokens: int = 48  # new tokens per sample
    sample_temperature: float = 0.8  # 0 is greedy
    spike_z: float = 6.0  # skip a step whose loss or grad norm is this many sigmas above recent ones
    ce_chunk: int = 0  # positions per float32 cross-entropy chunk (0: all at once)
    peak_flops: float = 0.0  # FLOP/s that MFU is relative to (0: measure a matmul at start)
    log_every: int = 10  # steps between plain-text progress lines when not on a terminal
    stop_after_step: int = 0  # pause: checkpoint and return after this global step (0: run to the end)


def stage_seq_len(cfg: PretrainConfig, stage: Stage) -> int:
    return stage.seq_len or cfg.seq_len


def stage_micro_batch(cfg: PretrainConfig, stage: Stage) -> int:
    return stage.micro_batch or cfg.micro_batch


def stage_steps(cfg: PretrainConfig, stage: Stage) -> int:
    return stage.steps or math.ceil(stage.tokens / cfg.batch_tokens)


def accumulation(cfg: PretrainConfig, stage: Stage, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (validated to divide exactly)."""
    seqs = cfg.batch_tokens // stage_seq_len(cfg, stage)
    return seqs // (stage_micro_batch(cfg, stage) * world_size)


def validate(cfg: PretrainConfig, world_size: int = 1) -> None:
    """Every check that needs no data or model: raise one `UserError` naming field and fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    _check_ranges(cfg, need)
    need(cfg.schedule in SCHEDULES, f"schedule={cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    need(cfg.precision in PRECISIONS, f"precision={cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    need(cfg.parallel in PARALLEL_MODES, f"parallel={cfg.parallel!r}: use one of {', '.join(PARALLEL_MODES)}")
    need(cfg.lr > 0, f"lr={cfg.lr} must be positive")
    need(0 <= cfg.min_lr_ratio <= 1, f"min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    need(0 <= cfg.decay_frac <= 1, f"decay_frac={cfg.decay_frac} must be in [0, 1]")
    need(0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1, "beta1 and beta2 must be in [0, 1)")
    need(cfg.warmup_steps >= 0 and cfg.grad_clip >= 0 and cfg.weight_decay >= 0,
         "warmup_steps, grad_clip and weight_decay must be >= 0")
    need(cfg.batch_tokens > 0 and cfg.micro_batch > 0 and cfg.seq_len > 0,
         "batch_tokens, micro_batch and seq_len must be positive")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    need(cfg.stop_after_step >= 0, "stop_after_step must be >= 0 (0: run to the end)")
    need(cfg.checkpoint_every >= 0 and cfg.eval_every >= 0 and cfg.sample_every >= 0,
         "checkpoint_every, eval_every and sample_every must be >= 0 (0: only at stage ends)")
    need(len(cfg.stages) > 0, "stages is empty: give at least one stage with steps or tokens")
    need(bool(cfg.data), "data is empty: pass --data DIR/manifest.json (from `qwen25 data prepare`)")
    need(len(cfg.eval_sets) > 0 or cfg.eval_every == 0, "eval_sets is empty: name \"all\" or sources")
    names = [s.name for s in cfg.stages]
    need(len(set(names)) == len(names), f"stage names must be distinct, got {names}")
    for s in cfg.stages:
        where = f"stage {s.name!r}"
        need(s.steps > 0 or s.tokens > 0, f"{where}: set steps or tokens to a positive number")
        T, mb = stage_seq_len(cfg, s), stage_micro_batch(cfg, s)
        need(T > 0 and mb > 0, f"{where}: seq_len and micro_batch must be positive")
        need(cfg.batch_tokens % T == 0,
             f"{where}: batch_tokens={cfg.batch_tokens} is not a multiple of seq_len={T}; "
             f"use a multiple such as {max(1, cfg.batch_tokens // T) * T}")
        seqs = cfg.batch_tokens // T
        per_pass = mb * world_size
        need(seqs % per_pass == 0,
             f"{where}: the batch of {seqs} sequences (batch_tokens {cfg.batch_tokens} / seq_len {T}) "
             f"is not divisible by micro_batch {mb} x {world_size} rank(s); change micro_batch or "
             "batch_tokens so that it divides")
        need(0 <= s.short_fraction < 1, f"{where}: short_fraction={s.short_fraction} must be in [0, 1)")
        if s.short_fraction:
            short = s.short_seq_len or T // 4
            need(0 < short < T and T % short == 0,
                 f"{where}: short_seq_len={short} must divide seq_len={T} and be shorter than it")
        need(s.rope_theta is None or s.rope_theta > 0, f"{where}: rope_theta must be positive")


# Ranges of the plain numeric fields (types are already checked by the config reader):
# field -> (test, what it must be). Every float must also be finite.
_RANGES: dict[str, tuple[Any, str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "eps": (lambda v: v > 0, "a positive finite number (AdamW's epsilon, e.g. 1e-8)"),
    "threads": (lambda v: v >= 0, ">= 0 (0: torch's default)"),
    "log_every": (lambda v: v >= 1, ">= 1 (steps between progress lines)"),
    "ce_chunk": (lambda v: v >= 0, ">= 0 (0: all positions at once)"),
    "spike_z": (lambda v: v > 0, "> 0 (sigmas above recent losses)"),
    "sample_temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
    "sample_tokens": (lambda v: v >= 0, ">= 0"),
    "eval_tokens": (lambda v: v >= 0, ">= 0 (0: the whole split)"),
    "peak_flops": (lambda v: v >= 0, ">= 0 (0: measure at start)"),
    "seed": (lambda v: v >= 0, ">= 0"),
}
_STAGE_RANGES: dict[str, tuple[Any, str]] = {
    "steps": (lambda v: v >= 0, ">= 0"),
    "tokens": (lambda v: v >= 0, ">= 0"),
    "seq_len": (lambda v: v is None or v > 0, "> 0 (or unset)"),
    "micro_batch": (lambda v: v is None or v > 0, "> 0 (or unset)"),
    "max_position_embeddings": (lambda v: v is None or v > 0, "> 0 (or unset)"),
    "short_seq_len": (lambda v: v is None or v > 0, "> 0 (or unset)"),
}


def _check_ranges(cfg: PretrainConfig, need) -> None:
    def finite(v: Any) -> bool:
        return not isinstance(v, float) or math.isfinite(v)

    for name, value in vars(cfg).items():
        test, rule = _RANGES.get(name, (lambda v: True, ""))
        if isinstance(value, float) and not finite(value):
            need(False, f"{name}={value} must be {rule or 'a finite number'}")
        need(test(value), f"{name}={value!r} must be {rule}")
    for s in cfg.stages:
        for name, value in vars(s).items():
            test, rule = _STAGE_RANGES.get(name, (lambda v: True, ""))
            need(finite(value), f"stage {s.name!r}: {name}={value} must be a finite number")
            need(test(value), f"stage {s.name!r}: {name}={value!r} must be {rule}")

"""`GRPOConfig`: an online-RL run with GRPO (spec §5.4), as frozen data.

Every field has a comment (`qwen25 grpo --help` prints them). One *rollout* samples
`group_size` answers to each of `queries_per_step` queries with the engine; each rollout
is followed by `mu` optimizer steps on it, so the run takes `rollouts x mu` steps.
Under `torchrun` the `queries_per_step` queries of a rollout are split evenly over the
processes. The `lora_*` fields and `merge` are SFT's (`qwen25.train.lora`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen25.errors import UserError
from qwen25.train import lora
from qwen25.train.grpo_loss import AGGREGATIONS
from qwen25.train.lora import LORA_TARGETS

ORDERS = ("variance", "random")


@dataclass(frozen=True)
class GRPOConfig:
    model: str = ""  # starting checkpoint (an SFT folder, or a .gguf file)
    out: str = "runs/grpo"  # run folder: checkpoints/, metrics.jsonl, plots/, final/ (adapter/ with LoRA)
    tokenizer: str | None = None  # tokenizer folder (default: the model's own files)
    queries: str = "synth_math"  # built-in query set (training splits only): synth_math | synth_math_chat | instructions | chat_mix | arithmetic
    reward: str = "math_answer"  # rewards with weights: "math_answer,format:0.2,rm:DIR:0.5"
    group_size: int = 8  # G: answers sampled per query (the report: 8)
    queries_per_step: int = 4  # queries per rollout (group_size x this = samples per rollout)
    rollouts: int = 20  # rollouts in the run
    mu: int = 1  # optimizer steps per rollout (GRPO's μ; 1 = on-policy)
    max_new_tokens: int = 128  # answer length cap
    temperature: float = 1.0  # sampling temperature of the rollouts (the ratio uses the same)
    lr: float = 1e-6  # constant learning rate after warmup
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    eps_low: float = 0.2  # clip range below 1 (ρ >= 1 - eps_low)
    eps_high: float = 0.2  # clip range above 1 (ρ <= 1 + eps_high; DAPO raises it to 0.28)
    beta: float = 0.0  # k3 KL coefficient to the starting model (0: no reference is loaded)
    aggregation: str = "token"  # loss aggregation: token | sequence | dr_grpo
    scale_rewards: bool = True  # divide advantages by the group's reward std (False: Dr. GRPO)
    order: str = "variance"  # query selection: variance (the report's order) | random
    pool_factor: int = 2  # candidate pool = pool_factor x queries_per_step queries per rollout
    select_group: int = 4  # answers per candidate query when scoring the pool's variance
    micro_batch: int = 8  # answers per forward/backward pass (per process)
    lora_rank: int = 0  # LoRA rank r (0: train every weight); with LoRA only the adapters train
    lora_alpha: float = 16.0  # LoRA alpha (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input (training forward only; rollouts have none)
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers that get adapters
    merge: bool = False  # with LoRA: also write the merged model to OUT/final
    eval_queries: int = 64  # held-out synthetic-math questions answered greedily per evaluation
    eval_max_new_tokens: int = 160  # answer cap at evaluation
    eval_every: int = 10  # steps between evaluations (0: only at the end)
    checkpoint_every: int = 10  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 1  # steps between plain progress lines when stderr is not a terminal
    stop_after_step: int = 0  # pause after this global step (0: never)
    max_batch_size: int = 32  # engine slots (sequences decoded together)
    seed: int = 0  # seeds query order and every rollout's sampling
    device: str = "cpu"  # torch device
    threads: int = 0  # torch threads (0: torch's default)


def _positive_int(cfg: GRPOConfig, name: str, minimum: int = 1) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise UserError(f"grpo {name}={v!r} must be an integer >= {minimum}")


def _number(cfg: GRPOConfig, name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
        (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise UserError(f"grpo {name}={v!r} must be a finite number {'>' if lo_open else '>='} {lo}"
                        + ("" if hi == math.inf else f" and <= {hi}"))


def validate(cfg: GRPOConfig, world_size: int = 1) -> None:
    """Everything checkable before loading anything; raises UserError naming the field.
    world_size: the processes the rollouts are split over (torchrun's WORLD_SIZE)."""
    if not isinstance(cfg.model, str) or not cfg.model:
        raise UserError("grpo needs --model: the checkpoint to start from (e.g. the SFT run's final/)")
    if cfg.group_size == 1:
        raise UserError("grpo group_size=1: group-normalised advantages need at least 2 answers per query")
    _positive_int(cfg, "group_size", 2)
    for name in ("queries_per_step", "rollouts", "mu", "max_new_tokens", "pool_factor", "micro_batch",
                 "eval_max_new_tokens", "max_batch_size", "log_every", "keep_checkpoints"):
        _positive_int(cfg, name)
    for name in ("warmup_steps", "eval_queries", "eval_every", "checkpoint_every", "stop_after_step",
                 "seed", "threads"):
        _positive_int(cfg, name, 0)
    _positive_int(cfg, "select_group", 2)
    _number(cfg, "temperature", 0.0, lo_open=True)
    _number(cfg, "lr", 0.0)
    _number(cfg, "weight_decay", 0.0)
    _number(cfg, "grad_clip", 0.0)
    _number(cfg, "eps_low", 0.0, 1.0)
    _number(cfg, "eps_high", 0.0)
    _number(cfg, "beta", 0.0)
    if cfg.aggregation not in AGGREGATIONS:
        raise UserError(f"grpo aggregation={cfg.aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
    if cfg.order not in ORDERS:
        raise UserError(f"grpo order={cfg.order!r}; choose from {', '.join(ORDERS)}")
    if not isinstance(cfg.scale_rewards, bool):
        raise UserError(f"grpo scale_rewards={cfg.scale_rewards!r} must be true or false")
    if cfg.queries_per_step % world_size:
        raise UserError(f"grpo queries_per_step={cfg.queries_per_step} is not divisible by the {world_size} "
                        "processes, which each roll out an equal share; use a multiple of the process count")
    lora.check_options(cfg)
    if cfg.group_size > cfg.max_batch_size:
        raise UserError(f"grpo group_size={cfg.group_size} answers share one prompt and need as many engine "
                        f"slots; raise max_batch_size (now {cfg.max_batch_size})")

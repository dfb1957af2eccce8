"""`SFTConfig`: a supervised fine-tuning run (full or LoRA), as frozen data, and its profiles.

The defaults are the report's SFT settings for real checkpoints (spec §5.1): 2 epochs,
sequence length 32,768, learning rate decayed from 7e-6 to 7e-7, weight decay 0.1,
gradient-norm clip 1.0. The report does not state the batch, warmup or schedule shape;
the defaults here (128 conversations per step, 3% warmup, cosine) are common practice
[U]. `PROFILES["tiny"]` fits the speedrun's CPU-sized models: short sequences, a higher
learning rate, few steps. Every field has a comment: `qwen25 sft --help` prints them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwen25.data.chat import TRAIN_ON
from qwen25.data.chat_batches import LAYOUTS
from qwen25.errors import UserError
from qwen25.train import lora
from qwen25.train.config import PRECISIONS
from qwen25.train.lora import LORA_TARGETS
from qwen25.train.optim import SCHEDULES
from qwen25.train.parallel import PARALLEL_MODES


@dataclass(frozen=True)
class SFTConfig:
    """One SFT run: model, chat data, batch, optimizer, LoRA, bookkeeping."""

    out: str = "runs/sft"  # run folder: checkpoints/, metrics.jsonl, plots/, final/ (and adapter/ with LoRA)
    model: str = ""  # the checkpoint folder to fine-tune (HF layout)
    tokenizer: str | None = None  # tokenizer folder (None: the model folder's)
    data: str = "builtin"  # a jsonl of conversations / prompt-completion rows, or "builtin"
    eval_data: str | None = None  # held-out jsonl (None: the built-in held-out set, or eval_fraction of --data)
    eval_fraction: float = 0.02  # share of --data held out when no eval_data is given
    builtin_size: int = 4000  # built-in training conversations to generate (math, instructions, tools)
    train_on: str = "all"  # "all" assistant turns, or only the "last" one
    layout: str = "pack"  # "pack" (several conversations per row), "padding_free" (one row) or "pad"
    seq_len: int = 32768  # tokens per row (longer conversations are dropped and counted)
    batch_size: int = 128  # conversations per optimizer step, all ranks together
    micro_batch: int = 1  # rows per forward pass per rank (conversations with layout "pad")
    epochs: int = 2  # passes over the data
    steps: int = 0  # optimizer steps (0: epochs x conversations // batch_size)
    lr: float = 7e-6  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate / peak (7e-7 / 7e-6)
    schedule: str = "cosine"  # "cosine", "wsd" or "constant"
    warmup_steps: int = -1  # linear warmup steps (-1: 3% of the steps)
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)
    precision: str = "fp32"  # "fp32", or "bf16" autocast over float32 master weights
    activation_checkpointing: bool = False  # recompute block activations in backward
    parallel: str = "auto"  # "auto" (FSDP2 under torchrun), "fsdp", "ddp" or "none"
    device: str = "auto"  # "auto", "cpu" or "cuda"
    threads: int = 0  # CPU threads for torch (0: torch's default)
    seed: int = 0  # data order and LoRA initialisation
    ce_chunk: int = 0  # target positions per float32 cross-entropy chunk (0: all at once)
    max_bad_fraction: float = 0.01  # malformed rows tolerated before the run stops
    lora_rank: int = 0  # LoRA rank r (0: full fine-tuning)
    lora_alpha: float = 16.0  # LoRA alpha (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers that get adapters
    merge: bool = False  # with LoRA: also write the merged model to OUT/final
    eval_every: int = 50  # steps between held-out evaluations (0: only at the end)
    eval_examples: int = 256  # held-out conversations per evaluation (0: all)
    checkpoint_every: int = 200  # steps between checkpoints (the end always saves)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    sample_every: int = 0  # steps between sample replies (0: only at the end)
    sample_count: int = 3  # held-out prompts answered in each sample round
    sample_tokens: int = 128  # new tokens per sample reply (greedy)
    log_every: int = 10  # steps between plain progress lines when not on a terminal
    stop_after_step: int = 0  # pause: checkpoint and return after this step (0: run to the end)


# Settings for the speedrun's small CPU models (fields not named keep the report's values).
PROFILES: dict[str, dict] = {
    "report": {},
    "tiny": {"seq_len": 1024, "batch_size": 16, "micro_batch": 2, "epochs": 1, "lr": 1e-3,
             "min_lr_ratio": 0.1, "warmup_steps": 10, "builtin_size": 1200, "eval_every": 25,
             "eval_examples": 64, "checkpoint_every": 50},
}


def profile_defaults(name: str) -> SFTConfig:
    """The default config of a profile."""
    if name not in PROFILES:
        raise UserError(f"profile {name!r} is unknown; use one of {', '.join(PROFILES)}")
    return dataclasses.replace(SFTConfig(), **PROFILES[name])


def validate(cfg: SFTConfig, world_size: int = 1) -> None:
    """Checks that need no data or model; one `UserError` naming the field and the fix."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(bool(cfg.model), "model is empty: pass --model CHECKPOINT_FOLDER")
    need(cfg.train_on in TRAIN_ON, f"train_on={cfg.train_on!r}: use one of {', '.join(TRAIN_ON)}")
    need(cfg.layout in LAYOUTS, f"layout={cfg.layout!r}: use one of {', '.join(LAYOUTS)}")
    need(cfg.schedule in SCHEDULES, f"schedule={cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    need(cfg.precision in PRECISIONS, f"precision={cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    need(cfg.parallel in PARALLEL_MODES, f"parallel={cfg.parallel!r}: use one of {', '.join(PARALLEL_MODES)}")
    need(cfg.lr > 0 and 0 <= cfg.min_lr_ratio <= 1, "lr must be positive and min_lr_ratio in [0, 1]")
    need(cfg.seq_len > 1 and cfg.micro_batch > 0 and cfg.batch_size > 0,
         "seq_len, batch_size and micro_batch must be positive")
    need(cfg.batch_size % world_size == 0,
         f"batch_size={cfg.batch_size} conversations is not divisible by {world_size} rank(s)")
    need(cfg.epochs > 0 or cfg.steps > 0, "set epochs or steps to a positive number")
    need(0 <= cfg.eval_fraction < 1, "eval_fraction must be in [0, 1)")
    need(0 <= cfg.max_bad_fraction <= 1, "max_bad_fraction must be in [0, 1]")
    lora.check_options(cfg)
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
    need(min(cfg.eval_every, cfg.checkpoint_every, cfg.sample_every, cfg.stop_after_step, cfg.steps) >= 0,
         "eval_every, checkpoint_every, sample_every, stop_after_step and steps must be >= 0")

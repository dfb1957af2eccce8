"""`qwen25 reward train`: a Bradley-Terry reward model on preference pairs (spec §5.3).

The stage: tokenise the pairs (the same loader and drop counts as DPO), put a scalar head on
the starting checkpoint's decoder (`reward_model.RewardModel`; the head starts at N(0,
initializer_range) unless the start is already a reward model), and minimise
-log σ(r_w - r_l - margin) + center·(r_w + r_l)² with the run harness (resume, checkpoints,
DDP). Each step's rewards/chosen, rewards/rejected, margins and accuracies go to
metrics.jsonl ("pairs" records); the held-out pairs are scored every `eval_every` steps
("eval" records, with the ranking accuracy the learning test reads).

Checkpoints hold the decoder as a normal model folder plus `score_head.safetensors`; the
finished model is exported to OUT/final as an HF `Qwen2ForSequenceClassification` folder.

With `lora_rank` the decoder gets LoRA adapters (`lora.py`, as in SFT) and only they and the
head train (the head in full, peft's `modules_to_save`). Checkpoints then also hold the
adapter files, the head among them; OUT/adapter is that PEFT adapter (task SEQ_CLS, for a
`Qwen2ForSequenceClassification` of the base `--model`), and OUT/final has the adapter
merged into the decoder, since a plain sequence classifier is what GRPO and `reward score`
load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from qwen25.checkpoint import load_config, load_model
from qwen25.errors import UserError
from qwen25.train import lora, parallel
from qwen25.train.checkpointing import ResumeError
from qwen25.train.dpo_loss import bradley_terry_loss, preference_metrics
from qwen25.train.lora import LORA_TARGETS
from qwen25.train.loop import SpikeGuard
from qwen25.train.optim import SCHEDULES, build_optimizer, lr_multiplier
from qwen25.train.pair_stage import (PairData, StepMetrics, heldout_batches, load_stage_tokenizer,
                                     micro_batches, plot_pair_metrics, tokenizer_files)
from qwen25.train.reward_model import (ARCHITECTURE, HEAD_KEY, RewardModel, load_reward_model, pair_scores,
                                       save_reward_model)
from qwen25.train.run import Run, RunSettings, config_dict

HEAD_FILE = "score_head.safetensors"


@dataclass(frozen=True)
class RewardConfig:
    model: str = ""  # starting checkpoint: an SFT/LM folder (new head) or a reward-model folder
    data: str = ""  # preference pairs: .jsonl of {prompt, chosen, rejected} (optional "margin")
    out: str = ""  # run folder: checkpoints/, metrics.jsonl, plots/, final/ (re-run to resume)
    tokenizer: str | None = None  # tokenizer folder or 'qwen2.5' (default: the model folder's)
    use_margin: bool = False  # subtract each row's "margin" value inside the sigmoid
    center: float = 0.0  # reward-centring coefficient on (r_w + r_l)^2 (TRL suggests 0.01)
    epochs: int = 1  # passes over the training pairs
    batch_size: int = 16  # pairs per optimizer step, all processes together
    micro_batch: int = 4  # pairs per forward pass on one process
    shared_prompt: bool = True  # chosen and rejected in one row after one copy of the prompt (else two padded rows)
    max_length: int = 1024  # longest prompt + response in tokens; longer pairs are dropped (counted)
    eval_fraction: float = 0.1  # share of the pairs held out for the ranking accuracy
    lr: float = 1e-5  # peak learning rate
    schedule: str = "cosine"  # cosine, wsd or constant (after warmup)
    warmup_steps: int = 0  # linear warmup steps
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    decay_frac: float = 0.2  # wsd: share of the steps spent decaying
    lora_rank: int = 0  # LoRA rank r on the decoder (0: train every weight); the head always trains
    lora_alpha: float = 16.0  # LoRA alpha (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers that get adapters
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # gradient-norm clip (0: off)
    precision: str = "fp32"  # fp32, or bf16 autocast
    parallel: str = "auto"  # auto, none or ddp (under torchrun)
    device: str = "auto"  # auto, cpu, cuda
    seed: int = 0  # pair order, held-out split, head initialisation
    threads: int = 0  # torch CPU threads (0: torch's default)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    eval_every: int = 50  # steps between held-out evaluations (and at the end)
    log_every: int = 10  # steps between plain progress lines when stderr is not a terminal
    stop_after_step: int = 0  # pause: checkpoint and return after this global step (0: never)


def validate(cfg: RewardConfig) -> None:
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if not Path(cfg.model).is_dir():
        raise UserError(f"--model {cfg.model} is not a checkpoint folder")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule {cfg.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {cfg.precision!r} is unknown; use fp32 or bf16")
    if cfg.parallel == "fsdp":
        raise UserError("the reward model trains with --parallel ddp (or none); fsdp is not supported")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.max_length < 2:
        raise UserError("epochs, batch_size and micro_batch must be >= 1 and max_length >= 2")
    if not 0 <= cfg.eval_fraction < 1 or cfg.center < 0:
        raise UserError("--eval-fraction must be in [0, 1) and --center >= 0")
    lora.check_options(cfg)


def reward_train(cfg: RewardConfig) -> dict[str, Any]:
    """Run (or resume) reward-model training; returns the summary (OUT/summary.json)."""
    world = parallel.init_world(cfg.device)
    try:
        return _reward_train(cfg, world)
    finally:
        parallel.shutdown_world(world)


def _is_reward_folder(path: str) -> bool:
    try:
        return ARCHITECTURE in json.loads((Path(path) / "config.json").read_text()).get("architectures", [])
    except (OSError, ValueError, AttributeError):
        return False


def _reward_train(cfg: RewardConfig, world: parallel.World) -> dict[str, Any]:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_stage_tokenizer(cfg.model, cfg.tokenizer)
    vocab = load_config(cfg.model).vocab_size
    if len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} "
                        "embeddings; pass the matching --tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = PairData.load(cfg.data, tokenizer, max_length=cfg.max_length, vocab_size=vocab,
                         eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    margins = _margins(data, cfg.use_margin)
    per_epoch = len(data.train) // cfg.batch_size
    if per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training "
                        "pairs; lower it")
    run = Run(cfg.out, world, config=config_dict(cfg), total_steps=per_epoch * cfg.epochs,
              settings=RunSettings.of(cfg), check_resume=lambda ck: _check_resume(ck, cfg))
    data.report(Path(cfg.out), world, run.write)

    # ---- model: resumed, a reward model to continue, or an LM with a new head ----------
    if run.resume is not None:
        inner = RewardModel(load_model(run.resume.path, dtype=torch.float32), pad)
        with torch.no_grad():
            inner.score.weight.copy_(load_file(str(run.resume.path / HEAD_FILE))[HEAD_KEY])
    elif _is_reward_folder(cfg.model):
        inner = load_reward_model(cfg.model)
        inner.pad_token_id = pad
    else:
        inner = RewardModel(load_model(cfg.model, dtype=torch.float32), pad)
        inner.init_head(cfg.seed)
    if cfg.lora_rank:  # the head (outside the backbone) stays trainable and goes into the adapter
        lora.apply(inner.backbone, cfg, base=cfg.model, resume=run.resume.path if run.resume else None)
        lora.save_head_in_full(inner.backbone, "score")
    if inner.backbone.lm_head.weight is not inner.backbone.model.embed_tokens.weight:  # untied (7B+)
        inner.backbone.lm_head.requires_grad_(False)  # never used: DDP would wait for its gradient
    inner = inner.to(world.device).train()
    model = parallel.parallelize(inner, world, mode="ddp" if cfg.parallel == "auto" else cfg.parallel)
    optimizer = build_optimizer(inner, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
    files = tokenizer_files(cfg.tokenizer or cfg.model)
    head_tmp = Path(cfg.out) / HEAD_FILE

    def weights():
        state = parallel.full_model_state(model)
        head = state[HEAD_KEY].contiguous() if world.is_main else None  # only rank 0 receives the state
        if world.is_main:
            save_file({HEAD_KEY: head}, str(head_tmp))
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        if not cfg.lora_rank:
            return backbone, inner.config, files + [head_tmp]
        base, adapter = lora.split_checkpoint(backbone, inner.backbone, Path(cfg.out) / lora.STAGING,
                                              world.is_main, heads={lora.head_key("score"): head})
        return base, inner.config, files + [head_tmp, *adapter]

    run.attach(model, inner, optimizer, SpikeGuard(), extra_files=files)
    run.checkpoint_weights(weights)
    run.checkpoint_state(lambda: {"pairs": len(data.pairs)})

    metrics = StepMetrics()
    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    extra = {"margin": margins}
    shared = _shared_prompt(cfg, inner)

    def loss_fn(m, batch):
        rw, rl = pair_scores(m, batch)
        losses = bradley_terry_loss(rw, rl, batch["margin"] if cfg.use_margin else None, cfg.center)
        metrics.add(preference_metrics(rw, rl), losses.shape[0])
        return losses.sum(), losses.shape[0]

    def flush() -> None:
        means = metrics.means(world)
        if means:
            run.log.log({"kind": "pairs", "step": run.step, **means})

    def next_batch() -> list:
        flush()
        return micro_batches(data, run.step, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch,
                             seed=cfg.seed, world=world, pad_id=pad, extra=extra, shared_prompt=shared)

    def evaluate(final: bool) -> dict:
        if not data.heldout:
            return {}
        r = heldout_metrics(model, data, cfg, world, pad, extra, autocast)
        if not final:
            run.log.log({"kind": "eval", "step": run.step, "tokens": run.tokens, "split": "pairs", **r})
            run.write(f"step {run.step}: held-out pairs: loss {r['loss']:.4f}, ranking accuracy "
                      f"{r['rewards/accuracies']:.3f}")
        return r

    def export(ckpt: Path) -> Path:
        if cfg.lora_rank:
            lora.copy_adapter(ckpt, Path(cfg.out) / "adapter")
            backbone = lora.merged_model(ckpt, cfg)
        else:
            backbone = load_model(ckpt, dtype=torch.float32)
        rm = RewardModel(backbone, pad)
        with torch.no_grad():
            rm.score.weight.copy_(load_file(str(ckpt / HEAD_FILE))[HEAD_KEY])
        dest = save_reward_model(rm, Path(cfg.out) / "final")
        for f in files:
            shutil.copyfile(f, dest / f.name)
        return dest

    if run.resume is None and data.heldout:
        run.summary["eval_before"] = heldout_metrics(model, data, cfg, world, pad, extra, autocast)
    lr_at = lambda step: cfg.lr * lr_multiplier(  # noqa: E731
        cfg.schedule, step, run.total_steps, cfg.warmup_steps, min_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
    with run:
        run.train(run.total_steps, start=run.step, next_batch=next_batch, loss_fn=loss_fn, lr_at=lr_at,
                  grad_clip=cfg.grad_clip, autocast=autocast, label="reward", evaluate=evaluate)
        flush()
    summary = run.finish(evaluate=evaluate, export=export, extra=lambda: {"data": data.stats.as_dict()})
    if world.is_main:
        plot_pair_metrics(Path(cfg.out) / "metrics.jsonl", Path(cfg.out) / "plots")
    return summary


def _margins(data: PairData, use: bool) -> torch.Tensor:
    out = torch.zeros(len(data.pairs))
    if not use:
        return out
    for i, p in enumerate(data.pairs):
        m = p.meta.get("margin")
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            raise UserError(f"--use-margin needs a numeric 'margin' in every row; pair {i} has {m!r}")
        out[i] = float(m)
    return out


def _check_resume(ck, cfg: RewardConfig) -> None:
    saved, mine = ck.state.get("config", {}), config_dict(cfg)
    for key in ("data", "batch_size", "seed", "max_length", "eval_fraction", "use_margin", "lora_rank",
                "lora_targets"):
        if key in saved and saved[key] != mine[key]:
            raise ResumeError(f"{cfg.out} was started with {key}={saved[key]!r}, not {mine[key]!r}; "
                              "use the same settings to resume, or a new --out")
    if not (ck.path / HEAD_FILE).exists():
        raise ResumeError(f"{ck.path} has no {HEAD_FILE}: it is not a reward-model checkpoint")


@torch.no_grad()
def _shared_prompt(cfg: RewardConfig, model) -> bool:
    """Whether batches put chosen and rejected behind one prompt: a [T, T] mask per row,
    which dual chunk attention does not take (it runs the padded rows instead)."""
    inner = getattr(model, "module", model)
    return cfg.shared_prompt and inner.config.dual_chunk_attention is None


def heldout_metrics(model, data: PairData, cfg: RewardConfig, world: parallel.World, pad: int, extra,
                    autocast) -> dict[str, float]:
    """Mean loss and rewards/* over the held-out pairs; rewards/accuracies is the share
    ranked correctly (chance: 0.5)."""
    was = model.training
    model.eval()
    total = StepMetrics()
    for b in heldout_batches(data, cfg.micro_batch, world, pad, extra, _shared_prompt(cfg, model)):
        with torch.autocast(world.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            rw, rl = pair_scores(model, b)
        losses = bradley_terry_loss(rw, rl, b["margin"] if cfg.use_margin else None, cfg.center)
        total.add(preference_metrics(rw, rl) | {"loss": losses.sum()}, losses.shape[0])
    model.train(was)
    return total.means(world)

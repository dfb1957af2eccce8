"""`qwen25 dpo`: offline preference optimisation of an SFT model (spec §5.2), on the run harness.

The stage, top to bottom: check the inputs; tokenise the pairs once (bad rows dropped and
counted); compute the reference model's log-probs of every pair *once* and store them in
OUT/reference_logps.safetensors (a resumed run reads them back, so the reference model is
never loaded again and the values are bitwise the same); then train the policy with one of
the DPO losses (dpo_loss.py) and AdamW or the Online Merging Optimizer (merging_optim.py).
Each optimizer step takes `batch_size` pairs, the order a pure function of (seed, step), so
resuming needs no data-loader state; metrics.jsonl gets the harness's train record plus a
"pairs" record per step (rewards/chosen, rewards/rejected, margins, accuracies, logps) and
an "eval" record on the held-out pairs.

The reference is the starting checkpoint unless `ref_model` names another; it must share
the policy's vocabulary (another vocabulary would compare log-probs of different tokens).

With `lora_rank` the policy is the starting checkpoint plus LoRA adapters (`lora.py`, as in
SFT): only lora_A / lora_B train, and since B starts at zero the policy starts equal to the
reference, whose log-probs are taken from the same weights before the adapters go in.
Checkpoints store the frozen base plus the adapter files; the output is OUT/adapter (a PEFT
folder for the base `--model`) and, with `merge`, OUT/final with the adapter merged in.
Without LoRA the trained policy is OUT/final.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen25.checkpoint import load_config, load_model
from qwen25.errors import UserError
from qwen25.files import atomic_path, sha256_file
from qwen25.train import lora, parallel
from qwen25.train.checkpointing import ResumeError, export_model
from qwen25.train.dpo_loss import DPO_LOSSES, check_dpo_args, dpo_loss, pair_logprobs, preference_metrics
from qwen25.train.loop import SpikeGuard
from qwen25.train.merging_optim import OnlineMergingAdamW, reference_task_vector
from qwen25.train.optim import SCHEDULES, build_optimizer, lr_multiplier, param_groups
from qwen25.train.pair_stage import (PairData, StepMetrics, heldout_batches, load_stage_tokenizer,
                                     micro_batches, plot_pair_metrics, tokenizer_files)
from qwen25.train.lora import LORA_TARGETS
from qwen25.train.run import Run, RunSettings, config_dict

REF_FILE = "reference_logps.safetensors"
OPTIMIZERS = ("adamw", "merging")


@dataclass(frozen=True)
class DPOConfig:
    model: str = ""  # SFT checkpoint folder: the policy's start and, by default, the reference
    data: str = ""  # preference pairs: .jsonl of {prompt, chosen, rejected} (qwen25 pairs build)
    out: str = ""  # run folder: checkpoints/, metrics.jsonl, plots/, final/ (re-run to resume)
    ref_model: str | None = None  # reference model folder (default: --model)
    tokenizer: str | None = None  # tokenizer folder or 'qwen2.5' (default: the model folder's)
    loss: str = "sigmoid"  # sigmoid, ipo, hinge or robust
    beta: float = 0.1  # β: inverse temperature of the implicit reward (IPO: its regulariser)
    label_smoothing: float = 0.0  # assumed share of flipped labels (sigmoid -> cDPO; robust)
    epochs: int = 1  # passes over the training pairs (the report: 1)
    batch_size: int = 16  # pairs per optimizer step, all processes together
    micro_batch: int = 4  # pairs per forward pass on one process
    max_length: int = 1024  # longest prompt + response in tokens; longer pairs are dropped (counted)
    eval_fraction: float = 0.05  # share of the pairs held out for evaluation
    lr: float = 7e-7  # peak learning rate (the report: 7e-7)
    schedule: str = "cosine"  # cosine, wsd or constant (after warmup)
    warmup_steps: int = 0  # linear warmup steps
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    decay_frac: float = 0.2  # wsd: share of the steps spent decaying
    optimizer: str = "adamw"  # adamw, or merging (the Online Merging Optimizer, OnDARE)
    merge_base: str | None = None  # merging: the base model the SFT model came from (tau_ref = SFT - base)
    merge_keep: float = 0.01  # merging: DARE keep probability of each update (reference script: 0.01)
    merge_alpha: float = 1e-7  # merging: weight of tau_ref in every step's merge (reference script: 1e-7)
    merge_rescale: bool = False  # merging: restore the L1 norm of the sparsified update
    lora_rank: int = 0  # LoRA rank r (0: train every weight)
    lora_alpha: float = 16.0  # LoRA alpha (updates scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # linear layers that get adapters
    merge: bool = False  # with LoRA: also write the merged model to OUT/final
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (matrices only)
    grad_clip: float = 1.0  # gradient-norm clip (0: off)
    precision: str = "fp32"  # fp32, or bf16 autocast
    parallel: str = "auto"  # auto, none, ddp or fsdp (under torchrun)
    device: str = "auto"  # auto, cpu, cuda
    seed: int = 0  # pair order, held-out split, merge masks
    threads: int = 0  # torch CPU threads (0: torch's default)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    eval_every: int = 50  # steps between held-out evaluations (and at the end)
    log_every: int = 10  # steps between plain progress lines when stderr is not a terminal
    stop_after_step: int = 0  # pause: checkpoint and return after this global step (0: never)


def validate(cfg: DPOConfig) -> None:
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if not Path(cfg.model).is_dir():
        raise UserError(f"--model {cfg.model} is not a checkpoint folder; pass the SFT model's folder")
    if cfg.loss not in DPO_LOSSES:
        raise UserError(f"--loss {cfg.loss!r} is unknown; use one of {', '.join(DPO_LOSSES)}")
    check_dpo_args(cfg.beta, cfg.loss, cfg.label_smoothing)
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {cfg.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer != "merging" and cfg.merge_base:
        raise UserError("--merge-base only applies with --optimizer merging")
    lora.check_options(cfg)
    if cfg.lora_rank and cfg.optimizer == "merging":
        # OnDARE merges each full-weight update with the SFT task vector (SFT - base); LoRA
        # updates live in low-rank factors that have no such counterpart.
        raise UserError("--optimizer merging works on full weights, not LoRA adapters; use --optimizer adamw "
                        "with --lora-rank, or drop --lora-rank")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule {cfg.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if cfg.precision not in ("fp32", "bf16"):
        raise UserError(f"--precision {cfg.precision!r} is unknown; use fp32 or bf16")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.micro_batch < 1 or cfg.max_length < 2:
        raise UserError("epochs, batch_size and micro_batch must be >= 1 and max_length >= 2")
    if not 0 <= cfg.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1) (got {cfg.eval_fraction})")


def dpo(cfg: DPOConfig) -> dict[str, Any]:
    """Run (or resume) DPO; returns the summary also written to OUT/summary.json."""
    world = parallel.init_world(cfg.device)
    try:
        return _dpo(cfg, world)
    finally:
        parallel.shutdown_world(world)


def _dpo(cfg: DPOConfig, world: parallel.World) -> dict[str, Any]:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.optimizer == "merging" and cfg.parallel == "fsdp":
        raise UserError("the merging optimizer works on whole tensors; use --parallel ddp with it")
    tokenizer = load_stage_tokenizer(cfg.model, cfg.tokenizer)
    vocab = load_config(cfg.model).vocab_size
    if len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} "
                        "embeddings; pass the matching --tokenizer")
    if cfg.ref_model and load_config(cfg.ref_model).vocab_size != vocab:
        raise UserError(f"--ref-model {cfg.ref_model} has a vocabulary of "
                        f"{load_config(cfg.ref_model).vocab_size}, the policy {vocab}; DPO compares "
                        "log-probs of the same tokens, so pass a reference with the policy's vocabulary")
    data = PairData.load(cfg.data, tokenizer, max_length=cfg.max_length, vocab_size=vocab,
                         eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    per_epoch = len(data.train) // cfg.batch_size
    if per_epoch == 0:
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train)} training "
                        "pairs; lower it")
    run = Run(cfg.out, world, config=config_dict(cfg), total_steps=per_epoch * cfg.epochs,
              settings=RunSettings.of(cfg), check_resume=lambda ck: _check_resume(ck, cfg))
    data.report(Path(cfg.out), world, run.write)
    start = load_model(run.resume.path if run.resume else cfg.model, dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = torch.bfloat16 if cfg.precision == "bf16" else None

    # ---- the reference, once -----------------------------------------------------------
    ref = reference_logps(cfg, data, world, start if run.resume is None else None, vocab, pad, autocast,
                          run.write)

    # ---- policy (+ LoRA) and optimizer -------------------------------------------------
    if cfg.lora_rank:
        lora.apply(start, cfg, base=cfg.model, resume=run.resume.path if run.resume else None)
    inner = start.to(world.device).train()
    model = parallel.parallelize(inner, world, mode=cfg.parallel)
    optimizer = _optimizer(cfg, inner, fresh=run.resume is None)
    files = tokenizer_files(cfg.tokenizer or cfg.model)
    if cfg.lora_rank:
        run.checkpoint_weights(lambda: lora.checkpoint_weights(model, inner, run.out, world.is_main, files))
    run.attach(model, inner, optimizer, SpikeGuard(), extra_files=files)
    run.checkpoint_state(lambda: {"pairs": len(data.pairs)})

    metrics = StepMetrics()
    beta, kind, eps = cfg.beta, cfg.loss, cfg.label_smoothing

    def loss_fn(m, batch):
        logps = pair_logprobs(m, batch)
        out = dpo_loss(logps, batch["ref_chosen"], batch["ref_rejected"], beta=beta, loss_type=kind,
                       label_smoothing=eps)
        n = out.losses.shape[0]
        metrics.add(preference_metrics(out.chosen_rewards, out.rejected_rewards)
                    | {"logps/chosen": logps.chosen.detach().sum(), "logps/rejected": logps.rejected.detach().sum()}, n)
        return out.losses.sum(), n

    def flush() -> None:
        means = metrics.means(world)
        if means:
            run.log.log({"kind": "pairs", "step": run.step, **means})

    def next_batch() -> list:
        flush()  # the previous step's pair metrics (every rank is here at the same time)
        return micro_batches(data, run.step, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch,
                             seed=cfg.seed, world=world, pad_id=pad, extra=ref)

    def evaluate(final: bool) -> dict:
        if not data.heldout:
            return {}
        r = _heldout(model, data, cfg, world, pad, ref, autocast)
        if not final:
            run.log.log({"kind": "eval", "step": run.step, "tokens": run.tokens, "split": "pairs", **r})
            run.write(f"step {run.step}: held-out pairs: loss {r['loss']:.4f}, reward accuracy "
                      f"{r['rewards/accuracies']:.3f}, margin {r['rewards/margins']:.4f}")
        return r

    lr_at = lambda step: cfg.lr * lr_multiplier(  # noqa: E731
        cfg.schedule, step, run.total_steps, cfg.warmup_steps, min_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
    with run:
        run.train(run.total_steps, start=run.step, next_batch=next_batch, loss_fn=loss_fn, lr_at=lr_at,
                  grad_clip=cfg.grad_clip, autocast=autocast, label="dpo", evaluate=evaluate)
        flush()
    summary = run.finish(evaluate=evaluate, export=lambda ckpt: _export(cfg, ckpt, files),
                         extra=lambda: {"data": data.stats.as_dict(), "lora": bool(cfg.lora_rank)})
    if world.is_main:
        plot_pair_metrics(Path(cfg.out) / "metrics.jsonl", Path(cfg.out) / "plots")
    return summary


def _export(cfg: DPOConfig, ckpt: Path, files: list[Path]) -> Path:
    """OUT/final without LoRA; with it OUT/adapter, and OUT/final merged when `merge`
    (SFT's layout). Returns the folder to use."""
    out = Path(cfg.out)
    if not cfg.lora_rank:
        return export_model(ckpt, out / "final")
    return lora.export(ckpt, out, cfg, extra_files=files)


def _check_resume(ck, cfg: DPOConfig) -> None:
    saved, mine = ck.state.get("config", {}), config_dict(cfg)
    for key in ("data", "loss", "beta", "batch_size", "seed", "max_length", "eval_fraction", "optimizer",
                "lora_rank", "lora_targets"):
        if key in saved and saved[key] != mine[key]:
            raise ResumeError(f"{cfg.out} was started with {key}={saved[key]!r}, not {mine[key]!r}; "
                              "use the same settings to resume, or a new --out")


def _optimizer(cfg: DPOConfig, inner, fresh: bool) -> torch.optim.Optimizer:
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return build_optimizer(inner, cfg.lr, betas, cfg.eps, cfg.weight_decay)
    opt = OnlineMergingAdamW(param_groups(inner.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=betas,
                             eps=cfg.eps, keep=cfg.merge_keep, alpha=cfg.merge_alpha if cfg.merge_base else 0.0,
                             rescale=cfg.merge_rescale, seed=cfg.seed)
    if cfg.merge_base and fresh:  # on resume tau_ref comes back with the optimizer state
        base = load_model(cfg.merge_base, dtype=torch.float32)
        if base.config.vocab_size != inner.config.vocab_size:
            raise UserError(f"--merge-base has a vocabulary of {base.config.vocab_size}, the SFT model "
                            f"{inner.config.vocab_size}; pass the base model the SFT model was trained from")
        sft = {n: p.detach() for n, p in inner.named_parameters()}
        tau = reference_task_vector(sft, dict(base.named_parameters()), keep=cfg.merge_keep, seed=cfg.seed)
        opt.set_task_vector(tau)
        del base
    return opt


# --------------------------------------------------------------------------------------
# Reference log-probs: computed once, stored with the run
# --------------------------------------------------------------------------------------


def _fingerprint(cfg: DPOConfig, data: PairData) -> dict:
    ref = Path(cfg.ref_model or cfg.model)
    weights = sorted(ref.glob("*.safetensors"))
    return {"data_sha256": sha256_file(Path(cfg.data)), "pairs": len(data.pairs), "max_length": cfg.max_length,
            "reference": str(ref.resolve()), "reference_bytes": sum(w.stat().st_size for w in weights),
            "precision": cfg.precision}


def reference_logps(cfg: DPOConfig, data: PairData, world: parallel.World, start_model, vocab: int,
                    pad: int, autocast, write) -> dict[str, torch.Tensor]:
    """{"ref_chosen", "ref_rejected"}: float32 [N] summed log-probs of every pair under the
    reference, read from OUT/reference_logps.safetensors or computed and written there.

    start_model: the freshly loaded starting weights (None on resume); used as the
    reference when no other is named, so no second copy is loaded."""
    path = Path(cfg.out) / REF_FILE
    want = _fingerprint(cfg, data)
    if path.exists():
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["fingerprint"])
            if meta != want:
                raise ResumeError(f"{path} was computed for other data or another reference ({meta}); "
                                  "use a new --out for a new run")
            return {k: f.get_tensor(k) for k in ("ref_chosen", "ref_rejected")}
    if cfg.ref_model or start_model is None:
        ref = load_model(cfg.ref_model or cfg.model, dtype=torch.float32)
    else:
        ref = start_model
    if ref.config.vocab_size != vocab:
        raise UserError(f"the reference model has a vocabulary of {ref.config.vocab_size}, the policy "
                        f"{vocab}; DPO compares log-probs of the same tokens, so pass a reference "
                        "with the policy's vocabulary")
    write(f"reference log-probs of {len(data.pairs)} pairs (once; stored in {path.name})")
    n = len(data.pairs)
    chosen = torch.zeros(n, dtype=torch.float64, device=world.device)
    rejected = torch.zeros(n, dtype=torch.float64, device=world.device)
    was = ref.training
    ref = ref.to(world.device).eval()
    mine = list(range(world.rank, n, world.world_size))
    from qwen25.train.pair_stage import collate

    with torch.no_grad(), torch.autocast(world.device.type, dtype=autocast or torch.float32,
                                         enabled=autocast is not None):
        for s in range(0, len(mine), cfg.micro_batch):
            idx = mine[s:s + cfg.micro_batch]
            b = {k: v.to(world.device) for k, v in collate(data.pairs, idx, pad).items()}
            lp = pair_logprobs(ref, b)
            chosen[idx] = lp.chosen.double()
            rejected[idx] = lp.rejected.double()
    ref.train(was)
    parallel.all_reduce_sum(chosen, world)
    parallel.all_reduce_sum(rejected, world)
    out = {"ref_chosen": chosen.float().cpu(), "ref_rejected": rejected.float().cpu()}
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True) as tmp:
            save_file(out, str(tmp), metadata={"fingerprint": json.dumps(want)})
    parallel.barrier(world)
    return out


@torch.no_grad()
def _heldout(model, data: PairData, cfg: DPOConfig, world: parallel.World, pad: int, ref, autocast) -> dict:
    was = model.training
    model.eval()
    total = StepMetrics()
    for b in heldout_batches(data, cfg.micro_batch, world, pad, ref):
        with torch.autocast(world.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            logps = pair_logprobs(model, b)
        out = dpo_loss(logps, b["ref_chosen"], b["ref_rejected"], beta=cfg.beta, loss_type=cfg.loss,
                       label_smoothing=cfg.label_smoothing)
        total.add(preference_metrics(out.chosen_rewards, out.rejected_rewards) | {"loss": out.losses.sum()},
                  out.losses.shape[0])
    model.train(was)
    return total.means(world)

"""Pretraining as one straight-line function: `pretrain(cfg) -> summary`.

    validate config -> join the process group -> find the newest complete checkpoint
    -> build (or load) the model -> parallelize -> AdamW (+ its saved state)
    -> for each stage: set RoPE base and sequence length, open the data at its saved
       position, then step / evaluate / sample / checkpoint until the stage is done
    -> export `OUT/final` (HF folder + tokenizer), plots, summary.json

Re-running the same command continues from the newest complete checkpoint: weights,
AdamW moments, the data loaders' positions, RNG states, the spike guard and the step
counters are all restored, so on a CPU in float32 the resumed losses equal the
uninterrupted run's bit for bit. SIGTERM/SIGINT save a checkpoint at the next step
boundary and return (`summary["interrupted"]`); `stop_after_step` pauses the same way
(`summary["paused"]`), e.g. to re-plan the remaining steps (the speedrun does).

The long-context stage follows the report (spec §3.3): it continues from the previous
stage's weights (and optimizer, unless `reset_optimizer`), with a longer `seq_len` and the
RoPE base raised (ABF) — the checkpoint's `config.json` then carries the new `rope_theta`.
`short_fraction` cuts that share of each batch's sequences into shorter ones (Turbo: 40%
at full length, 60% shorter), same tokens, so the model keeps seeing short contexts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qwen25.checkpoint import load_config, load_model
from qwen25.config import ModelConfig
from qwen25.errors import UserError
from qwen25.model.model import Transformer, build_model
from qwen25.train import checkpointing as ckpt_io
from qwen25.train import parallel
from qwen25.train.config import (PretrainConfig, accumulation, stage_micro_batch, stage_seq_len,
                                 stage_steps, validate)
from qwen25.train.data import LoaderFactory, open_loader, split_length_mix, to_device
from qwen25.train.loop import (SpikeGuard, StopFlag, Throughput, evaluate, flops_per_token, lm_loss,
                               measure_matmul_flops, train_step)
from qwen25.train.losses import bits_per_byte
from qwen25.train.metrics import MetricsLog, plot_metrics
from qwen25.train.optim import build_optimizer, lr_multiplier
from qwen25.train.samples import generate_samples

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja")


# --------------------------------------------------------------------------------------
# Model configuration per stage
# --------------------------------------------------------------------------------------


def base_model_config(cfg: PretrainConfig, tokenizer=None) -> ModelConfig:
    """The shape the run trains: a preset or a config.json, the overrides, the tokenizer's ids."""
    if cfg.init_from:
        mc = load_config(cfg.init_from)  # the weights fix the shape
    elif Path(cfg.model).exists():
        mc = ModelConfig.from_hf(cfg.model)
    elif cfg.model.endswith(".json") or "/" in cfg.model:
        raise UserError(f"model={cfg.model!r}: no such file or folder; give a preset name or a config.json")
    else:
        mc = ModelConfig.preset(cfg.model)
    changes = dict(cfg.model_overrides)
    if tokenizer is not None:
        if "vocab_size" not in changes and not cfg.init_from and tokenizer.vocab_size != mc.vocab_size:
            changes["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64  # pad like Qwen does
        eos = tokenizer.eos_token_id
        changes.setdefault("eos_token_id", eos)
        changes.setdefault("bos_token_id", eos)  # Qwen has no BOS; HF configs name <|endoftext|>
    else:
        vocab = changes.get("vocab_size", mc.vocab_size)
        for key in ("eos_token_id", "bos_token_id"):  # ids past a shrunken vocabulary mean nothing
            ids = getattr(mc, key)
            if key not in changes and ids is not None and max(ids if isinstance(ids, tuple) else (ids,)) >= vocab:
                changes[key] = None
    first = cfg.stages[0]
    # A model trained from scratch knows the context it was trained on; one continued from
    # a checkpoint keeps at least the context it came with.
    known = mc.max_position_embeddings if cfg.init_from else 0
    changes.setdefault("max_position_embeddings",
                       max(stage_seq_len(cfg, first), first.max_position_embeddings or 0, known))
    if first.rope_theta:
        changes["rope_theta"] = first.rope_theta
    mc = mc.replace(**changes) if changes else mc
    if tokenizer is not None and tokenizer.vocab_size > mc.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{mc.vocab_size} embedding rows; raise vocab_size")
    return mc


def stage_model_config(cfg: PretrainConfig, base: ModelConfig, index: int) -> ModelConfig:
    """The model config in force during stage `index` (RoPE base and context of stages <= index)."""
    mc = base
    for s in cfg.stages[1:index + 1]:
        T = stage_seq_len(cfg, s)
        mc = mc.replace(rope_theta=s.rope_theta or mc.rope_theta,
                        max_position_embeddings=max(T, s.max_position_embeddings or 0, mc.max_position_embeddings))
    return mc


_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "num_experts",
          "moe_intermediate_size", "shared_expert_intermediate_size")


def _check_same_shape(loaded: ModelConfig, wanted: ModelConfig, where: str) -> None:
    diffs = [f"{k} {getattr(loaded, k)} vs {getattr(wanted, k)}" for k in _SHAPE
             if getattr(loaded, k) != getattr(wanted, k)]
    if diffs:
        raise UserError(f"{where}: its weights do not fit the configured model ({'; '.join(diffs)}); "
                        "drop the model_overrides that change the shape")


def _check_resume(ck: ckpt_io.Checkpoint, expected: ModelConfig, cfg: PretrainConfig, world_size: int) -> None:
    saved, wanted = ck.model_config.to_hf(), expected.to_hf()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}"
             for k in sorted(set(saved) | set(wanted))
             if k != "torch_dtype" and saved.get(k) != wanted.get(k)]
    if diffs:
        raise ckpt_io.ResumeError(
            f"{ck.path} holds a different model ({'; '.join(diffs[:3])}); resume with the config "
            "that wrote it, or pass a new --out folder to start a new run")
    if ck.state.get("world_size") != world_size:
        raise ckpt_io.ResumeError(
            f"{ck.path} was written by {ck.state.get('world_size')} rank(s); resume with the same "
            f"number of processes (now {world_size}) so each rank finds its data position")
    st = ck.state["stage"]
    if st >= len(cfg.stages) or ck.state.get("stage_seq_len") != stage_seq_len(cfg, cfg.stages[st]):
        raise ckpt_io.ResumeError(
            f"{ck.path} stopped in stage {st} with seq_len {ck.state.get('stage_seq_len')}, which this "
            "config's stages no longer match; keep the stages of the run you resume")


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def pretrain(cfg: PretrainConfig, *, loader_factory: LoaderFactory = open_loader) -> dict[str, Any]:
    """Run (or resume) every stage of `cfg`; return the summary written to OUT/summary.json."""
    world = parallel.init_world(cfg.device)
    try:
        return _pretrain(cfg, world, loader_factory)
    finally:
        parallel.shutdown_world(world)


def _pretrain(cfg: PretrainConfig, world: parallel.World, loader_factory: LoaderFactory) -> dict[str, Any]:
    # ---- everything that can be wrong with the input, before any work ----------------
    validate(cfg, world.world_size)
    if not Path(cfg.data).exists():
        raise UserError(f"data manifest {cfg.data} not found; create it with `qwen25 data prepare ... "
                        "--out DIR` and pass DIR/manifest.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = _load_tokenizer(cfg.tokenizer)
    base = base_model_config(cfg, tokenizer)
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    resume = ckpt_io.latest_checkpoint(ckpt_root)
    if resume is not None:
        _check_resume(resume, stage_model_config(cfg, base, resume.state["stage"]), cfg, world.world_size)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temporaries(ckpt_root)
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    parallel.barrier(world)

    # ---- model, parallelism, optimizer -------------------------------------------------
    state = resume.state if resume else {"step": 0, "stage": 0, "stage_step": 0, "tokens": 0,
                                         "elapsed_s": 0.0}
    stage_idx = state["stage"]
    mcfg = stage_model_config(cfg, base, stage_idx)
    if resume is not None:
        model = load_model(resume.path, dtype=torch.float32)
    elif cfg.init_from:
        model = load_model(cfg.init_from, dtype=torch.float32)
        _check_same_shape(model.config, mcfg, cfg.init_from)
    else:
        model = build_model(mcfg, device="cpu", dtype=torch.float32, seed=cfg.seed)
    model.config = mcfg  # same shape (checked); this run's ids and context
    model.set_rope(mcfg)
    model = model.to(world.device).train()
    inner: Transformer = model
    model = parallel.parallelize(model, world, mode=cfg.parallel, compile=cfg.compile,
                                 activation_checkpointing=cfg.activation_checkpointing)
    optimizer = build_optimizer(inner, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
    guard = SpikeGuard(z=cfg.spike_z)
    if resume is not None:
        parallel.load_full_optimizer_state(model, optimizer, ckpt_io.load_optimizer_state(resume))
        ckpt_io.set_rng_state(ckpt_io.load_rng_state(resume, world.rank), world.device)
        guard.load_state_dict(state["guard"])

    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    log = MetricsLog(out / "metrics.jsonl", enabled=world.is_main)
    log.truncate_after(state["step"])
    total_steps = sum(stage_steps(cfg, s) for s in cfg.stages)
    step, tokens = state["step"], state["tokens"]
    peak = cfg.peak_flops or measure_matmul_flops(world.device, autocast or torch.float32)
    extra = [Path(cfg.tokenizer) / f for f in TOKENIZER_FILES] if cfg.tokenizer else []
    extra = [f for f in extra if f.exists()]
    loss_fn = lambda m, b: lm_loss(m, b, inner.config, cfg.ce_chunk or None, compiled=cfg.compile)  # noqa: E731
    elapsed0, t_start = state.get("elapsed_s", 0.0), time.perf_counter()
    summary: dict[str, Any] = {"interrupted": None, "resumed_from": resume.step if resume else None}

    def save() -> Path:
        loader_states = _gather(loader.state_dict(), world)
        rngs = _gather_rng(world)
        trainer_state = {
            "stage": stage_idx, "stage_step": stage_step, "tokens": tokens,
            "stage_seq_len": stage_seq_len(cfg, stage), "world_size": world.world_size,
            "data": loader_states, "guard": guard.state_dict(),
            "elapsed_s": elapsed0 + time.perf_counter() - t_start, "config": config_to_dict(cfg)}
        model_state = parallel.full_model_state(model)
        optim_state = parallel.full_optimizer_state(model, optimizer)
        path = ckpt_root / ckpt_io.step_dir_name(step)
        if world.is_main:
            path = ckpt_io.save_checkpoint(
                ckpt_root, step, model_state=model_state, model_config=inner.config,
                optimizer_state=optim_state, trainer_state=trainer_state, rng_states=rngs,
                keep=cfg.keep_checkpoints, extra_files=extra)
        parallel.barrier(world)
        return path

    bar = tqdm(total=total_steps, initial=step, disable=not world.is_main or None, dynamic_ncols=True,
               unit="step", file=sys.stderr)
    plain = world.is_main and bar.disable  # not a terminal: print a line every log_every steps
    last_path = resume.path if resume else None
    with StopFlag() as stop:
        for stage_idx in range(state["stage"], len(cfg.stages)):
            stage = cfg.stages[stage_idx]
            resuming_here = resume is not None and stage_idx == state["stage"]
            stage_step = state["stage_step"] if resuming_here else 0
            inner.config = stage_model_config(cfg, base, stage_idx)
            inner.set_rope(inner.config)  # ABF: the new base from this stage's first step on
            if stage_step == 0:
                guard.new_stage()
                if stage.reset_optimizer and stage_idx > 0:
                    optimizer.state.clear()
            T, mb = stage_seq_len(cfg, stage), stage_micro_batch(cfg, stage)
            accum, n_steps = accumulation(cfg, stage, world.world_size), stage_steps(cfg, stage)
            loader = loader_factory(cfg.data, split="train", seq_len=T, batch_size=mb, world=world,
                                    seed=cfg.seed + stage_idx, shuffle=True, mix=stage.mix,
                                    reset_position_ids=cfg.reset_position_ids)
            if resuming_here:
                loader.load_state_dict(state["data"][world.rank])
            batches = iter(loader)
            meter = Throughput(flops_per_token(inner.config, T), peak)
            if world.is_main and stage_step == 0:
                bar.write(f"stage {stage.name}: {n_steps} steps of {cfg.batch_tokens} tokens, seq_len {T}, "
                          f"rope_theta {inner.config.rope_theta:g}, {accum} micro-batch(es) of {mb} per rank")
            while stage_step < n_steps:
                if stop.agreed(world):
                    summary["interrupted"] = stop.requested or "signal on another rank"
                    break
                if cfg.stop_after_step and step >= cfg.stop_after_step:
                    summary["paused"] = step
                    break
                micro = [to_device(next(batches), world.device) for _ in range(accum)]
                micro = split_length_mix(micro, stage.short_fraction, stage.short_seq_len or T // 4)
                lr = cfg.lr * lr_multiplier(cfg.schedule, step, total_steps, cfg.warmup_steps,
                                            min_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
                res = train_step(model, optimizer, micro, loss_fn, lr=lr, world=world,
                                 grad_clip=cfg.grad_clip, aux_coef=inner.config.router_aux_loss_coef
                                 if inner.config.is_moe else 0.0, autocast_dtype=autocast, guard=guard)
                step, stage_step, tokens = step + 1, stage_step + 1, tokens + res.tokens
                meter.update(res.tokens)
                log.log({"kind": "train", "step": step, "stage": stage.name, "loss": res.loss, "lr": lr,
                         "tokens": tokens, "grad_norm": res.grad_norm, "tokens_per_s": meter.tokens_per_s,
                         "mfu": meter.mfu, "skipped": res.skipped, "aux_loss": res.aux_loss})
                if res.skipped and world.is_main:
                    bar.write(f"step {step}: update skipped: {res.skipped}")
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{meter.tokens_per_s:.0f}",
                                mfu=f"{(meter.mfu or 0) * 100:.1f}%", stage=stage.name)
                if plain and step % cfg.log_every == 0:
                    print(f"step {step}/{total_steps} [{stage.name}] loss {res.loss:.4f} lr {lr:.2e} "
                          f"{meter.tokens_per_s:.0f} tok/s mfu {(meter.mfu or 0) * 100:.1f}% "
                          f"eta {meter.eta_s(n_steps - stage_step) / 60:.1f} min", flush=True)
                end = stage_step == n_steps
                if end or (cfg.eval_every and step % cfg.eval_every == 0):
                    summary["eval"] = _evaluate_all(cfg, model, loss_fn, world, loader_factory, T,
                                                    mb, autocast, stop, log, step, tokens, bar)
                if tokenizer is not None and cfg.sample_every and step % cfg.sample_every == 0:
                    _log_samples(cfg, inner, tokenizer, log, step, bar)
                if end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    last_path = save()
                meter.reset_clock()
            if summary["interrupted"] or "paused" in summary:
                break
        bar.close()
        if summary["interrupted"] or "paused" in summary:
            last_path = save()  # a no-op when this step was just saved
            if world.is_main and summary["interrupted"]:
                print(f"{summary['interrupted']}: saved {last_path}; run the same command to resume",
                      file=sys.stderr)
        elif last_path is not None:
            if "eval" not in summary:  # a finished run re-run: report its final numbers again
                summary["eval"] = _evaluate_all(cfg, model, loss_fn, world, loader_factory, T, mb,
                                                autocast, stop, None, step, tokens, bar)
            if world.is_main:
                summary["final"] = str(ckpt_io.export_model(last_path, out / "final"))
            if tokenizer is not None:  # every rank: under FSDP the forward is collective
                summary["samples"] = _log_samples(cfg, inner, tokenizer, log, step, None)
    if world.is_main:
        plot_metrics(out / "metrics.jsonl", out / "plots")
        summary |= {"step": step, "tokens": tokens, "elapsed_s": elapsed0 + time.perf_counter() - t_start,
                    "parameters": _count(inner), "model_config": inner.config.to_hf()}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# --------------------------------------------------------------------------------------
# Pieces of the run
# --------------------------------------------------------------------------------------


def _evaluate_all(cfg, model, loss_fn, world, loader_factory, T, mb, autocast, stop, log, step,
                  tokens, bar) -> dict[str, dict[str, float]]:
    """Held-out loss and bits per byte on each eval set (the same batches every time)."""
    results = {}
    for name in cfg.eval_sets:
        # Full micro-batches only (every rank takes the same steps); a held-out set smaller
        # than one micro-batch is scored a sequence at a time instead of not at all.
        for batch_size in dict.fromkeys((mb, 1)):
            loader = loader_factory(cfg.data, split="val", seq_len=T, batch_size=batch_size, world=world,
                                    seed=0, shuffle=False, sources=None if name == "all" else [name],
                                    epochs=1, reset_position_ids=cfg.reset_position_ids)
            limit = max(1, cfg.eval_tokens // (T * batch_size * world.world_size)) if cfg.eval_tokens else None
            batches = (to_device(b, world.device) for b in itertools.islice(loader, limit))
            r = evaluate(model, batches, loss_fn, world, autocast, stop)
            if r["tokens"] or stop.requested:
                break
        if stop.requested:  # cut short by a signal: a partial evaluation is not a result
            break
        bpt = getattr(loader, "bytes_per_token", None)
        r["bpb"] = bits_per_byte(r["loss_sum"], r["tokens"] * bpt) if bpt and r["tokens"] else None
        results[name] = r
        if log is not None:
            log.log({"kind": "eval", "step": step, "tokens": tokens, "split": name, "loss": r["loss"],
                     "bpb": r["bpb"]})
        if world.is_main:
            bpb = f", {r['bpb']:.3f} bits/byte" if r["bpb"] else ""
            bar.write(f"step {step}: held-out {name}: loss {r['loss']:.4f}{bpb}")
    return results


def _log_samples(cfg, model, tokenizer, log, step, bar) -> list[dict[str, str]]:
    prompts = [tokenizer.encode(p) for p in cfg.sample_prompts]
    outs = generate_samples(model, prompts, cfg.sample_tokens, cfg.sample_temperature, seed=cfg.seed,
                            stop_ids=(tokenizer.eos_token_id,))
    samples = []
    for text, ids in zip(cfg.sample_prompts, outs):
        completion = tokenizer.decode(ids)
        samples.append({"prompt": text, "completion": completion})
        log.log({"kind": "sample", "step": step, "prompt": text, "text": completion})
        if bar is not None:
            bar.write(f"step {step} sample: {text!r} -> {completion!r}")
    return samples


def _gather(obj, world: parallel.World) -> list:
    """Every rank's JSON-able object, in rank order (all ranks receive the list)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def _gather_rng(world: parallel.World) -> list[dict[str, torch.Tensor]]:
    mine = {k: v.tolist() for k, v in ckpt_io.rng_state(world.device).items()}
    return [{k: torch.tensor(v, dtype=torch.uint8) for k, v in d.items()} for d in _gather(mine, world)]


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    if not Path(path).exists():
        raise UserError(f"tokenizer {path} not found; train one with `qwen25 tokenizer train` or omit it")
    from qwen25.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _count(model: Transformer) -> dict[str, int]:
    from qwen25.config import count_parameters

    return count_parameters(model.config)


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    """JSON form of a config (tuples become lists; `config_from_dict` reverses it)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def total_tokens(cfg: PretrainConfig) -> int:
    """Training tokens the whole run consumes (all stages, all ranks)."""
    return sum(stage_steps(cfg, s) * cfg.batch_tokens for s in cfg.stages)

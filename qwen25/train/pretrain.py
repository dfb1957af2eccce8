"""Pretraining as one straight-line function: `pretrain(cfg) -> summary`.

    validate config -> join the process group -> find the newest complete checkpoint
    -> build (or load) the model -> parallelize -> AdamW (+ its saved state)
    -> for each stage: set RoPE base and sequence length, open the data at its saved
       position, then step / evaluate / sample / checkpoint until the stage is done
    -> export `OUT/final` (HF folder + tokenizer), plots, summary.json

The bookkeeping (run folder, resume, step loop, checkpoints, metrics, export) is the shared
harness `qwen25.train.run.Run`; this file only says what pretraining trains on and how.

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

import itertools
from pathlib import Path
from typing import Any

import torch

from qwen25.checkpoint import load_config, load_model
from qwen25.config import ModelConfig
from qwen25.errors import UserError
from qwen25.model.model import Transformer, build_model
from qwen25.train import checkpointing as ckpt_io
from qwen25.train import parallel
from qwen25.train.config import (PretrainConfig, accumulation, stage_micro_batch, stage_seq_len,
                                 stage_steps, validate)
from qwen25.train.data import LoaderFactory, open_loader, split_length_mix, to_device
from qwen25.train.loop import (SpikeGuard, Throughput, evaluate, flops_per_token, lm_loss,
                               measure_matmul_flops)
from qwen25.train.losses import bits_per_byte
from qwen25.train.optim import build_optimizer, lr_multiplier
from qwen25.train.run import Run, RunSettings, config_dict
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
    run = Run(cfg.out, world, config=config_to_dict(cfg), total_steps=sum(stage_steps(cfg, s) for s in cfg.stages),
              settings=RunSettings.of(cfg), check_resume=lambda ck: _check_resume(
                  ck, stage_model_config(cfg, base, ck.state["stage"]), cfg, world.world_size))

    # ---- model, parallelism, optimizer -------------------------------------------------
    state = run.state or {"stage": 0, "stage_step": 0}
    mcfg = stage_model_config(cfg, base, state["stage"])
    if run.resume is not None:
        model = load_model(run.resume.path, dtype=torch.float32)
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
    extra = [Path(cfg.tokenizer) / f for f in TOKENIZER_FILES] if cfg.tokenizer else []
    run.attach(model, inner, optimizer, SpikeGuard(z=cfg.spike_z), extra_files=extra)

    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    peak = cfg.peak_flops or measure_matmul_flops(world.device, autocast or torch.float32)
    loss_fn = lambda m, b: lm_loss(m, b, inner.config, cfg.ce_chunk or None, compiled=cfg.compile)  # noqa: E731
    lr_at = lambda step: cfg.lr * lr_multiplier(  # noqa: E731
        cfg.schedule, step, run.total_steps, cfg.warmup_steps, min_ratio=cfg.min_lr_ratio, decay_frac=cfg.decay_frac)
    where = {"stage": state["stage"], "T": 0, "mb": 0}  # the stage in progress, for checkpoints and evaluations

    def evaluate(final: bool) -> dict:
        return _evaluate_all(cfg, model, loss_fn, world, loader_factory, where["T"], where["mb"], autocast,
                             run, None if final else run.log, run.step, run.tokens)

    def sample(final: bool) -> list[dict[str, str]] | None:
        if tokenizer is None:
            return None
        return _log_samples(cfg, inner, tokenizer, run.log, run.step, None if final else run)

    with run:
        for stage_idx in range(state["stage"], len(cfg.stages)):
            stage = cfg.stages[stage_idx]
            resuming_here = run.resume is not None and stage_idx == state["stage"]
            stage_step = state["stage_step"] if resuming_here else 0
            inner.config = stage_model_config(cfg, base, stage_idx)
            inner.set_rope(inner.config)  # ABF: the new base from this stage's first step on
            if stage_step == 0:
                run.guard.new_stage()
                if stage.reset_optimizer and stage_idx > 0:
                    optimizer.state.clear()
            T, mb = stage_seq_len(cfg, stage), stage_micro_batch(cfg, stage)
            accum, n_steps = accumulation(cfg, stage, world.world_size), stage_steps(cfg, stage)
            where.update(stage=stage_idx, T=T, mb=mb)
            loader = loader_factory(cfg.data, split="train", seq_len=T, batch_size=mb, world=world,
                                    seed=cfg.seed + stage_idx, shuffle=True, mix=stage.mix,
                                    reset_position_ids=cfg.reset_position_ids)
            if resuming_here:
                loader.load_state_dict(state["data"][world.rank])
            batches = iter(loader)
            run.checkpoint_state(lambda stage_idx=stage_idx, T=T: {
                "stage": stage_idx, "stage_step": run.stage_step, "stage_seq_len": T}, data=loader.state_dict)
            if stage_step == 0:
                run.write(f"stage {stage.name}: {n_steps} steps of {cfg.batch_tokens} tokens, seq_len {T}, "
                          f"rope_theta {inner.config.rope_theta:g}, {accum} micro-batch(es) of {mb} per rank")

            def next_batch(batches=batches, stage=stage, T=T) -> list:
                micro = [to_device(next(batches), world.device) for _ in range(accum)]
                return split_length_mix(micro, stage.short_fraction, stage.short_seq_len or T // 4)

            done = run.train(n_steps, start=stage_step, next_batch=next_batch, loss_fn=loss_fn, lr_at=lr_at,
                             grad_clip=cfg.grad_clip, autocast=autocast, label=stage.name,
                             aux_coef=inner.config.router_aux_loss_coef if inner.config.is_moe else 0.0,
                             meter=Throughput(flops_per_token(inner.config, T), peak),
                             evaluate=evaluate, sample=sample)
            if not done:
                break
    return run.finish(evaluate=evaluate, sample=sample if tokenizer is not None else None,
                      extra=lambda: {"parameters": _count(inner), "model_config": inner.config.to_hf()})


# --------------------------------------------------------------------------------------
# Pieces of the run
# --------------------------------------------------------------------------------------


def _evaluate_all(cfg, model, loss_fn, world, loader_factory, T, mb, autocast, run: Run, log, step,
                  tokens) -> dict[str, dict[str, float]]:
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
            r = evaluate(model, batches, loss_fn, world, autocast, run.stop_flag)
            if r["tokens"] or run.stop_requested:
                break
        if run.stop_requested:  # cut short by a signal: a partial evaluation is not a result
            break
        bpt = getattr(loader, "bytes_per_token", None)
        r["bpb"] = bits_per_byte(r["loss_sum"], r["tokens"] * bpt) if bpt and r["tokens"] else None
        results[name] = r
        if log is not None:
            log.log({"kind": "eval", "step": step, "tokens": tokens, "split": name, "loss": r["loss"],
                     "bpb": r["bpb"]})
        bpb = f", {r['bpb']:.3f} bits/byte" if r["bpb"] else ""
        run.write(f"step {step}: held-out {name}: loss {r['loss']:.4f}{bpb}")
    return results


def _log_samples(cfg, model, tokenizer, log, step, run: Run | None) -> list[dict[str, str]]:
    prompts = [tokenizer.encode(p) for p in cfg.sample_prompts]
    outs = generate_samples(model, prompts, cfg.sample_tokens, cfg.sample_temperature, seed=cfg.seed,
                            stop_ids=(tokenizer.eos_token_id,))
    samples = []
    for text, ids in zip(cfg.sample_prompts, outs):
        completion = tokenizer.decode(ids)
        samples.append({"prompt": text, "completion": completion})
        log.log({"kind": "sample", "step": step, "prompt": text, "text": completion})
        if run is not None:
            run.write(f"step {step} sample: {text!r} -> {completion!r}")
    return samples


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
    return config_dict(cfg)


def total_tokens(cfg: PretrainConfig) -> int:
    """Training tokens the whole run consumes (all stages, all ranks)."""
    return sum(stage_steps(cfg, s) * cfg.batch_tokens for s in cfg.stages)

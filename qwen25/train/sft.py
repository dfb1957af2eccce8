"""Supervised fine-tuning (full or LoRA) as one stage on the run harness: `sft(cfg) -> summary`.

    validate -> tokenizer (must be a chat one) -> read + encode the conversations (bad rows
    skipped and reported, too many stop the run) -> Run (resume) -> model from the newest
    checkpoint or --model, LoRA adapters if asked -> parallelize -> AdamW
    -> steps of `batch_size` conversations with the assistant-only loss, held-out loss
       and sample replies on held-out prompts, checkpoints -> export

The loss is the summed cross entropy over the assistant tokens of the step's conversations
divided by their count (all micro-batches, all ranks), the same whether conversations are
padded, packed or padding-free (`qwen25.data.chat_batches`). Only the assistant positions
go through the LM head (`Transformer.forward(logits_at=...)`).

Stopping: the exported model's `config.json` and `generation_config.json` name
`<|im_end|>` first among the eos ids (then `<|endoftext|>`), whatever the base checkpoint
said: Qwen2.5 base configs name `<|endoftext|>` only, and a model fine-tuned on chat turns
ends them with `<|im_end|>`, so generation would otherwise run past the end of the reply.

Output: OUT/final (an HF folder with the tokenizer) for full fine-tuning; with LoRA,
OUT/adapter (a PEFT adapter folder for the base `--model`) and, with `merge`, OUT/final
holding the merged weights. OUT/plots/loss.png has the training and held-out loss.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path
from typing import Any

import torch

from qwen25.checkpoint import load_config, load_model
from qwen25.config import ModelConfig
from qwen25.data.chat import IGNORE_INDEX, Example, LoadReport, check_tokenizer, load_examples, read_jsonl
from qwen25.data.chat_batches import ChatBatches, empty_batch, layout
from qwen25.errors import UserError
from qwen25.model.model import Transformer
from qwen25.model.moe import config_balance_loss
from qwen25.train import checkpointing as ckpt_io
from qwen25.train import lora, parallel
from qwen25.train.data import to_device
from qwen25.train.loop import SpikeGuard, Throughput, evaluate, flops_per_token
from qwen25.train.losses import cross_entropy_sum
from qwen25.train.optim import build_optimizer, lr_multiplier
from qwen25.train.pretrain import TOKENIZER_FILES
from qwen25.train.run import Run, RunSettings, config_dict
from qwen25.train.samples import generate_samples
from qwen25.train.sft_config import SFTConfig, validate


def sft_loss(model, batch: dict[str, torch.Tensor], cfg: ModelConfig, ce_chunk: int | None = None):
    """(summed CE over the target tokens, their count[, MoE aux]) for `train_step`."""
    labels = batch["labels"]
    at = labels != IGNORE_INDEX
    kwargs = {"positions": batch.get("position_ids"), "attention_mask": batch.get("attention_mask"),
              "logits_at": at}
    if cfg.is_moe:
        logits, router = model(batch["input_ids"], output_router_logits=True, **kwargs)
        aux = config_balance_loss(router, cfg, at)
        ce, count = cross_entropy_sum(logits, labels[at], ce_chunk)
        return ce, count, aux
    ce, count = cross_entropy_sum(model(batch["input_ids"], **kwargs), labels[at], ce_chunk)
    return ce, count


def chat_eos_ids(tokenizer) -> tuple[int, ...]:
    """`<|im_end|>` first, then the tokenizer's other stop ids (`<|endoftext|>`)."""
    im_end = tokenizer.token_to_id("<|im_end|>")
    return tuple(dict.fromkeys([im_end, *tokenizer.stop_token_ids]))


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def load_data(cfg: SFTConfig, tokenizer) -> tuple[list[Example], list[Example], list[dict], dict[str, Any]]:
    """(training examples, held-out examples, held-out rows for sample prompts, data report)."""
    if cfg.data == "builtin":
        from qwen25.data.sft_builtin import builtin_rows

        train_rows = builtin_rows("train", cfg.builtin_size, seed=cfg.seed)
        eval_rows = builtin_rows("test", max(cfg.eval_examples, cfg.sample_count, 64), seed=cfg.seed)
    else:
        rows = list(read_jsonl(cfg.data))
        if cfg.eval_data:
            train_rows, eval_rows = rows, list(read_jsonl(cfg.eval_data))
        else:
            held = set(random.Random(f"heldout:{cfg.seed}").sample(range(len(rows)), int(len(rows) * cfg.eval_fraction)))
            train_rows = [r for i, r in enumerate(rows) if i not in held]
            eval_rows = [r for i, r in enumerate(rows) if i in held]
    train, train_report = load_examples(train_rows, tokenizer, cfg.seq_len, cfg.train_on, cfg.max_bad_fraction,
                                        what=f"SFT data {cfg.data}")
    held_out, eval_report = ([], LoadReport()) if not eval_rows else load_examples(
        eval_rows, tokenizer, cfg.seq_len, cfg.train_on, max(cfg.max_bad_fraction, 0.5), what="held-out data")
    prompts = [row for _, row in eval_rows if isinstance(row, dict) and "messages" in row]
    return train, held_out, prompts, {"train": _report(train_report), "held_out": _report(eval_report)}


def _report(r: LoadReport) -> dict[str, Any]:
    return {"rows": r.rows, "kept": r.kept, "malformed": len(r.bad), "too_long": len(r.too_long),
            "first_problems": [f"{w}: {why}" for w, why in r.bad[:5]], "summary": r.summary()}


def _equalise(micro: list[dict], world: parallel.World, pad_id: int) -> list[dict]:
    """Pad every rank to the same number of micro-batches (FSDP forwards are collective).
    The empty ones go first so the gradient-syncing last backward is a real one."""
    if not world.distributed:
        return micro
    n = int(parallel.all_reduce_max(float(len(micro)), world))
    return [to_device(empty_batch(pad_id), world.device) for _ in range(n - len(micro))] + micro


def _reply_prompt(row: dict) -> tuple[list[dict], list | None, str]:
    """(messages before the last assistant turn, tools, that turn's text)."""
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return messages[:last], row.get("tools"), str(messages[last].get("content") or "")


# --------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run (or resume) SFT; return the summary written to OUT/summary.json."""
    world = parallel.init_world(cfg.device)
    try:
        return _sft(cfg, world)
    finally:
        parallel.shutdown_world(world)


def _sft(cfg: SFTConfig, world: parallel.World) -> dict[str, Any]:
    validate(cfg, world.world_size)
    if not Path(cfg.model).is_dir():
        raise UserError(f"model {cfg.model} is not a checkpoint folder; give an HF folder (config.json + "
                        "safetensors), e.g. a pretraining run's OUT/final")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok_dir = Path(cfg.tokenizer or cfg.model)
    tokenizer = _load_tokenizer(tok_dir)
    check_tokenizer(tokenizer)
    base_cfg = load_config(cfg.model)
    if tokenizer.vocab_size > base_cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but {cfg.model} only "
                        f"{base_cfg.vocab_size} embedding rows; pass the model's own tokenizer")
    eos = chat_eos_ids(tokenizer)
    mcfg = base_cfg.replace(eos_token_id=eos, bos_token_id=base_cfg.bos_token_id if base_cfg.bos_token_id is not
                            None and base_cfg.bos_token_id < base_cfg.vocab_size else None)
    train, held_out, prompt_rows, data_report = load_data(cfg, tokenizer)
    if world.is_main:
        print(f"SFT data: {data_report['train']['summary']}", file=sys.stderr)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[-1]
    loader = ChatBatches(train, batch_size=cfg.batch_size, micro_batch=cfg.micro_batch, seq_len=cfg.seq_len,
                         layout=cfg.layout, rank=world.rank, world_size=world.world_size, seed=cfg.seed,
                         pad_id=pad_id)
    total = cfg.steps or cfg.epochs * loader.steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else max(1, round(0.03 * total))
    run = Run(cfg.out, world, config=config_dict(cfg), total_steps=total, settings=RunSettings.of(cfg),
              check_resume=lambda ck: _check_resume(ck, cfg, world.world_size))

    # ---- model (+ LoRA), parallelism, optimizer ---------------------------------------
    model = load_model(run.resume.path if run.resume else cfg.model, dtype=torch.float32)
    model.config = mcfg
    if cfg.lora_rank:
        lora.apply(model, cfg, base=cfg.model, resume=run.resume.path if run.resume else None)
    model = model.to(world.device).train()
    inner: Transformer = model
    model = parallel.parallelize(model, world, mode=cfg.parallel, activation_checkpointing=cfg.activation_checkpointing)
    optimizer = build_optimizer(inner, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay)
    extra = [tok_dir / f for f in TOKENIZER_FILES]
    if cfg.lora_rank:
        run.checkpoint_weights(lambda: lora.checkpoint_weights(model, inner, run.out, world.is_main, extra))
    run.attach(model, inner, optimizer, SpikeGuard(), extra_files=extra)
    if run.resume is not None:
        loader.load_state_dict(run.state["data"][world.rank])
    run.checkpoint_state(dict, data=loader.state_dict)
    batches = iter(loader)

    autocast = torch.bfloat16 if cfg.precision == "bf16" else None
    loss_fn = lambda m, b: sft_loss(m, b, inner.config, cfg.ce_chunk or None)  # noqa: E731
    lr_at = lambda step: cfg.lr * lr_multiplier(cfg.schedule, step, total, warmup,  # noqa: E731
                                                min_ratio=cfg.min_lr_ratio, decay_frac=0.2)
    held = held_out[:cfg.eval_examples] if cfg.eval_examples else held_out
    eval_share = held[world.rank::world.world_size]

    def next_batch() -> list[dict]:
        return _equalise([to_device(b, world.device) for b in next(batches)], world, pad_id)

    def evaluate_held_out(final: bool) -> dict:
        if not held:
            return {}
        micro = [to_device(b, world.device) for b in layout(eval_share, "pad", max(cfg.micro_batch, 1),
                                                            cfg.seq_len, pad_id)] if eval_share else []
        r = evaluate(model, _equalise(micro, world, pad_id), loss_fn, world, autocast, run.stop_flag)
        if not final:
            run.log.log({"kind": "eval", "step": run.step, "tokens": run.tokens, "split": "held-out",
                         "loss": r["loss"], "bpb": None})
            run.write(f"step {run.step}: held-out loss {r['loss']:.4f} ({int(r['tokens'])} assistant tokens)")
        return {"held-out": r}

    def sample(final: bool) -> list[dict[str, str]]:
        from qwen25.chat import encode_chat

        chosen = prompt_rows[:cfg.sample_count]
        prompts = [_reply_prompt(row) for row in chosen]
        ids = [encode_chat(tokenizer, msgs, tools, add_generation_prompt=True)[0] for msgs, tools, _ in prompts]
        outs = generate_samples(inner, ids, cfg.sample_tokens, temperature=0.0, seed=cfg.seed, stop_ids=eos)
        samples = []
        for (msgs, _, reference), new in zip(prompts, outs):
            prompt = str(msgs[-1].get("content") or "")
            reply = tokenizer.decode(new)
            samples.append({"prompt": prompt, "completion": reply, "reference": reference})
            run.log.log({"kind": "sample", "step": run.step, "prompt": prompt, "text": reply})
            if not final:
                run.write(f"step {run.step} sample: {prompt[:60]!r} -> {reply[:120]!r}")
        return samples

    meter = Throughput(flops_per_token(inner.config, cfg.seq_len), None)
    with run:
        run.train(total, start=run.step, next_batch=next_batch, loss_fn=loss_fn, lr_at=lr_at,
                  grad_clip=cfg.grad_clip, autocast=autocast, meter=meter,
                  aux_coef=inner.config.router_aux_loss_coef if inner.config.is_moe else 0.0,
                  evaluate=evaluate_held_out, sample=sample if prompt_rows else None)
    return run.finish(evaluate=evaluate_held_out, sample=sample if prompt_rows else None,
                      export=lambda path: _export(cfg, path, mcfg, extra, Path(cfg.out)),
                      extra=lambda: {"data": data_report, "eos_token_id": list(eos),
                                     "steps_per_epoch": loader.steps_per_epoch, "lora": bool(cfg.lora_rank)})


def _export(cfg: SFTConfig, ckpt: Path, mcfg: ModelConfig, extra: list[Path], out: Path) -> Path:
    """OUT/final (full FT, or LoRA merged) and OUT/adapter (LoRA); generation_config with
    the chat eos ids either way. Returns the folder to use."""
    gen = {"bos_token_id": mcfg.bos_token_id, "eos_token_id": list(mcfg.eos_token_ids),
           "pad_token_id": mcfg.eos_token_ids[-1]}
    if not cfg.lora_rank:
        dest = ckpt_io.export_model(ckpt, out / "final")
        (dest / "generation_config.json").write_text(_json(gen))
        return dest
    return lora.export(ckpt, out, cfg, config=mcfg, generation_config=gen, extra_files=extra)


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2)


def _check_resume(ck: ckpt_io.Checkpoint, cfg: SFTConfig, world_size: int) -> None:
    saved = ck.state.get("config", {})
    for key in ("model", "lora_rank", "lora_targets", "layout", "batch_size", "seq_len", "data", "seed"):
        mine = config_dict(cfg)[key]
        if saved.get(key) != mine:
            raise ckpt_io.ResumeError(f"{ck.path} was written with {key}={saved.get(key)!r}, this run has "
                                      f"{mine!r}; resume with the settings that started it, or pass a new --out")
    if ck.state.get("world_size") != world_size:
        raise ckpt_io.ResumeError(f"{ck.path} was written by {ck.state.get('world_size')} rank(s); resume with "
                                  f"the same number of processes (now {world_size})")


def _load_tokenizer(path: Path):
    from qwen25.tokenizer import load_tokenizer

    if not path.exists():
        raise UserError(f"tokenizer {path} not found; pass --tokenizer FOLDER")
    try:
        return load_tokenizer(path)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no usable tokenizer ({e}); pass --tokenizer FOLDER") from None


__all__ = ["chat_eos_ids", "load_data", "sft", "sft_loss", "itertools"]

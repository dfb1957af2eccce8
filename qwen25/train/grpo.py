"""`grpo(cfg)`: online RL with GRPO on the shared run harness, rollouts on our engine.

One rollout, then `mu` optimizer steps on it (spec §5.4):

1. select queries: a candidate pool of `pool_factor x queries_per_step` training queries
   is answered `select_group` times each; queries whose rewards vary most come first and
   zero-variance ones are dropped (`order="variance"`, the report's ordering), or the
   pool's first queries are taken (`order="random"`, the baseline it is measured against);
2. sample `group_size` answers per selected query with the `Engine`, which shares the
   policy's weights in memory (a training step is seen by the next rollout without a copy)
   and records each token's log-prob under the distribution it sampled from (temperature
   applied) as π_old; the G answers of a query share one prefill;
3. score each answer with the rewards (`qwen25.train.rewards`); a reward that fails drops
   the sample (counted); group-normalised advantages;
4. `mu` harness steps, each one `train_step` over micro-batches of answers with
   `grpo_loss`, whose (loss sum, normaliser) make gradient accumulation exact.

Logged per step besides the harness's loss: reward (mean, std), answer length, entropy,
clip fraction, k3 KL, and mean |ρ − 1| at the first update of each rollout, which measures
how well the engine's and the trainer's log-probs agree (should be ~1e-6 in fp32).

Resume is exact: rollouts are seeded by (seed, rollout index), and a run stopped between
the `mu` updates of a rollout stores that rollout with its checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from qwen25.engine import Engine, SamplingParams
from qwen25.engine.dispatch import Dispatcher
from qwen25.engine.engine import default_stop_ids
from qwen25.errors import UserError
from qwen25.train import parallel
from qwen25.train.grpo_config import GRPOConfig, validate
from qwen25.train.grpo_loss import grpo_loss, group_advantages, order_by_reward_variance
from qwen25.train.grpo_queries import check_query_set, query
from qwen25.train.optim import build_optimizer
from qwen25.train.rewards import RewardError, parse_reward_spec, total_reward
from qwen25.train.run import Run, RunSettings, config_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


# ---- rollouts ----------------------------------------------------------------------------


def _sample(dispatcher: Dispatcher, prompts: list[list[int]], n: int, params: SamplingParams, seed: int) -> list:
    """n answers per prompt; prompt q's samples are seeded seed*1000003 + q*n + j."""
    subs = [dispatcher.submit(p, dataclasses.replace(params, n=n, seed=seed * 1_000_003 + q * n))
            for q, p in enumerate(prompts)]
    for _ in dispatcher.run(subs):
        pass
    return subs


def _score(rewards, tokenizer, examples, subs) -> tuple[list[list[float | None]], int]:
    """Rewards [query][answer] (None where the reward failed) and the failure count."""
    out, failed = [], 0
    for ex, sub in zip(examples, subs):
        row = []
        for i in range(sub.n):
            try:
                row.append(total_reward(rewards, "", sub.text(i), ex)[0])
            except RewardError:
                row.append(None)
                failed += 1
        out.append(row)
    return out, failed


def rollout(cfg: GRPOConfig, index: int, dispatcher: Dispatcher, tokenizer, rewards, stop_ids) -> dict[str, Any]:
    """Rollout `index`: selected queries, their answers, log-probs, rewards and advantages,
    as JSON-able lists (stored in a checkpoint taken between its updates)."""
    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop_token_ids=tuple(stop_ids))
    pool_size = cfg.queries_per_step * cfg.pool_factor
    base = index * pool_size
    pool = [query(cfg.queries, base + k) for k in range(pool_size)]
    prompts = [tokenizer.apply_chat_template(list(ex.messages), add_generation_prompt=True) for ex in pool]
    stats: dict[str, Any] = {"pool": pool_size}
    if cfg.order == "variance":
        subs = _sample(dispatcher, prompts, cfg.select_group, params, seed=cfg.seed * 7919 + 2 * index + 1)
        scores, _ = _score(rewards, tokenizer, pool, subs)
        sel = order_by_reward_variance([[r for r in row if r is not None] or [0.0, 0.0] for row in scores])
        chosen = sel.order[:cfg.queries_per_step]
        stats |= {"zero_variance": len(sel.dropped),
                  "selected_variance": sum(sel.variances[q] for q in chosen) / max(len(chosen), 1),
                  "pool_variance": sum(sel.variances) / len(sel.variances)}
        if not chosen:  # nothing in the pool teaches anything: train on the first queries anyway
            chosen = list(range(cfg.queries_per_step))
    else:
        chosen = list(range(cfg.queries_per_step))
    examples = [pool[q] for q in chosen]
    prompts = [prompts[q] for q in chosen]
    subs = _sample(dispatcher, prompts, cfg.group_size, params, seed=cfg.seed * 7919 + 2 * index)
    scores, failed = _score(rewards, tokenizer, examples, subs)
    t_gen = time.perf_counter() - t0

    samples = []
    all_rewards = []
    for q, (sub, row) in enumerate(zip(subs, scores)):
        valid = [i for i, r in enumerate(row) if r is not None]
        adv = [0.0] * len(row)
        if len(valid) >= 2:
            a = group_advantages(torch.tensor([[row[i] for i in valid]], dtype=torch.float64),
                                 scale=cfg.scale_rewards)[0].tolist()
            for i, v in zip(valid, a):
                adv[i] = v
        for i in valid:
            all_rewards.append(row[i])
            samples.append({"prompt": prompts[q], "tokens": sub.tokens(i), "old_logp": sub.sampled_logprobs(i),
                            "advantage": adv[i], "reward": row[i], "query": examples[q].id})
    rw = torch.tensor(all_rewards or [0.0], dtype=torch.float64)
    stats |= {"reward_mean": float(rw.mean()), "reward_std": float(rw.std(unbiased=False)),
              "reward_failed": failed, "answers": len(samples),
              "length_mean": sum(len(s["tokens"]) for s in samples) / max(len(samples), 1),
              "rollout_s": t_gen, "queries_used": [ex.id for ex in examples]}
    return {"index": index, "samples": samples, "stats": stats}


# ---- batches and the loss ----------------------------------------------------------------


def micro_batches(samples: list[dict], size: int, ref_model=None, temperature: float = 1.0) -> list[dict]:
    """Right-padded batches: input_ids [B, L], targets, mask (1 where the target is an answer
    token), old_logp aligned with targets, advantages [B], and ref_logp when a reference is given."""
    out = []
    for start in range(0, len(samples), size):
        part = samples[start:start + size]
        L = max(len(s["prompt"]) + len(s["tokens"]) - 1 for s in part)
        ids = torch.zeros(len(part), L, dtype=torch.long)
        targets = torch.zeros(len(part), L, dtype=torch.long)
        mask = torch.zeros(len(part), L)
        old = torch.zeros(len(part), L)
        for b, s in enumerate(part):
            seq = s["prompt"] + s["tokens"]
            n, p = len(seq) - 1, len(s["prompt"])
            ids[b, :n] = torch.tensor(seq[:-1])
            targets[b, :n] = torch.tensor(seq[1:])
            mask[b, p - 1:n] = 1.0  # targets p-1.. are the answer's tokens
            old[b, p - 1:n] = torch.tensor(s["old_logp"], dtype=torch.float32)
        batch = {"input_ids": ids, "targets": targets, "mask": mask, "old_logp": old,
                 "advantages": torch.tensor([s["advantage"] for s in part], dtype=torch.float32)}
        if ref_model is not None:
            with torch.no_grad():
                batch["ref_logp"] = answer_logprobs(ref_model, ids, targets, mask, temperature)[0]
        out.append(batch)
    return out


def answer_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, temperature: float,
                    entropy: bool = False, chunk: int = 512) -> tuple[torch.Tensor, float]:
    """log p_T of the answer tokens as [B, L] (0 off the answer; differentiable) and, when asked,
    the summed entropy of those positions' distributions (a float, no gradient).

    The lm_head runs on the answer positions only (`logits_at`), and one log-softmax serves
    both the log-probs and the entropy, so a micro-batch holds one [answer tokens, vocab]
    float32 array and its gradient instead of the several [B, L, vocab] copies a plain
    full-logits loss makes (on a CPU, fresh multi-GB arrays per micro-batch were most of the
    update's time, spent in page faults)."""
    where = mask.bool()
    logits = model(ids, logits_at=where).float()  # [N, V], row-major over (b, t)
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(-1, targets[where].unsqueeze(-1)).squeeze(-1)
    total = 0.0
    if entropy:
        with torch.no_grad():
            for i in range(0, lp.shape[0], chunk):
                part = lp[i:i + chunk]
                total -= float((part.exp() * part).sum())
    return torch.zeros(mask.shape, dtype=chosen.dtype, device=chosen.device).masked_scatter(where, chosen), total


class GRPOObjective:
    """`loss_fn(model, batch)` for `train_step`, collecting the step's statistics."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.sums = {"tokens": 0.0, "clipped": 0.0, "kl": 0.0, "ratio_dev": 0.0, "entropy": 0.0}

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logp, entropy = answer_logprobs(model, batch["input_ids"], batch["targets"], batch["mask"],
                                        cfg.temperature, entropy=True)
        out = grpo_loss(logp, batch["old_logp"], batch["advantages"], batch["mask"], eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=batch.get("ref_logp"),
                        aggregation=cfg.aggregation, max_length=cfg.max_new_tokens)
        self.sums["entropy"] += entropy
        self.sums["tokens"] += float(out.tokens)
        self.sums["clipped"] += float(out.clipped_sum)
        self.sums["kl"] += float(out.kl_sum)
        self.sums["ratio_dev"] += float(out.ratio_dev_sum)
        return out.loss_sum, out.normaliser

    def means(self) -> dict[str, float]:
        n = max(self.sums["tokens"], 1.0)
        return {"clip_frac": self.sums["clipped"] / n, "kl": self.sums["kl"] / n,
                "ratio_dev": self.sums["ratio_dev"] / n, "entropy": self.sums["entropy"] / n}


# ---- evaluation --------------------------------------------------------------------------


def heldout_accuracy(dispatcher: Dispatcher, tokenizer, n: int, max_new_tokens: int, stop_ids) -> dict[str, float]:
    """Greedy answers to the first n held-out synthetic-math questions (families never
    trained on): strict accuracy, flexible accuracy and the answer-format rate."""
    from qwen25.eval.tasks import get_task
    from qwen25.eval.tasks.math import score_number, strict_number

    examples = get_task("synth_math").examples(0)[:n]
    prompts = [tokenizer.apply_chat_template(list(ex.messages), add_generation_prompt=True) for ex in examples]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_ids))
    subs = dispatcher.generate(prompts, params)
    strict = flexible = fmt = 0.0
    for ex, sub in zip(examples, subs):
        s = score_number(sub.text(0), ex)
        strict += s["exact_match_strict"]
        flexible += s["exact_match_flexible"]
        fmt += strict_number(sub.text(0)) is not None
    k = max(len(examples), 1)
    return {"heldout_strict": strict / k, "heldout_flexible": flexible / k, "heldout_format": fmt / k,
            "heldout_n": len(examples)}


# ---- the stage ---------------------------------------------------------------------------


def _load_tokenizer(cfg: GRPOConfig):
    from qwen25 import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    if getattr(tok, "chat_template", True) is None:
        raise UserError(f"the tokenizer of {cfg.tokenizer or cfg.model} has no chat template; GRPO renders "
                        "queries as chat: start from a chat (SFT) checkpoint or pass --tokenizer")
    return tok


def grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """Run (or resume) GRPO; returns the harness summary (see `Run.finish`)."""
    validate(cfg)
    check_query_set(cfg.queries)
    world = parallel.init_world(cfg.device)
    try:
        return _grpo(cfg, world)
    finally:
        parallel.shutdown_world(world)


def _grpo(cfg: GRPOConfig, world: parallel.World) -> dict[str, Any]:
    from qwen25 import load_model

    if world.distributed:
        raise UserError("grpo runs on one process for now; run it without torchrun")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rewards = parse_reward_spec(cfg.reward, load_reward_model=_reward_model_loader(cfg))
    tokenizer = _load_tokenizer(cfg)
    run = Run(cfg.out, world, config=config_dict(cfg), total_steps=cfg.rollouts * cfg.mu,
              settings=RunSettings.of(cfg))
    model = load_model(run.resume.path if run.resume else cfg.model, dtype=torch.float32, device=world.device)
    start_gen = getattr(model, "generation_config", None)
    model.train()
    ref = None
    if cfg.beta:
        ref = load_model(cfg.model, dtype=torch.float32, device=world.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    optimizer = build_optimizer(model, cfg.lr, weight_decay=cfg.weight_decay)
    src = Path(cfg.tokenizer or cfg.model)
    extra = [src / f for f in TOKENIZER_FILES] if src.is_dir() else []
    run.attach(model, model, optimizer, extra_files=extra)
    if start_gen is not None:
        model.generation_config = start_gen

    stop_ids = sorted(set(default_stop_ids(model)) | set(tokenizer.stop_token_ids))
    prompt_cap = max(len(tokenizer.apply_chat_template(list(query(cfg.queries, 0).messages),
                                                       add_generation_prompt=True)) * 4, 512)
    engine = Engine(model, max_batch_size=cfg.max_batch_size, max_seq_len=prompt_cap + cfg.max_new_tokens,
                    hugepages=False)  # weights are updated in place between rollouts
    dispatcher = Dispatcher(engine, tokenizer)
    objective = GRPOObjective(cfg)
    held = {"rollout": run.state.get("rollout")}  # restored mid-rollout (between its mu updates)

    pending = {"stats": False}  # the last step's objective statistics are not yet logged

    def log_update() -> None:
        if pending["stats"]:
            index, update = divmod(run.step - 1, cfg.mu)
            rec = {"kind": "grpo_update", "step": run.step, "rollout": index, "update": update, **objective.means()}
            if update == 0:  # before any update on this rollout: engine vs trainer log-probs
                rec["first_update_ratio_dev"] = rec["ratio_dev"]
            run.log.log(rec)
            pending["stats"] = False

    def next_batch() -> list[dict]:
        log_update()
        index = run.step // cfg.mu
        if held["rollout"] is None or held["rollout"]["index"] != index:
            with torch.no_grad():
                held["rollout"] = rollout(cfg, index, dispatcher, tokenizer, rewards, stop_ids)
            _log_rollout(run, run.step, held["rollout"]["stats"])
        samples = held["rollout"]["samples"]
        if not samples:
            raise UserError(f"rollout {index}: every reward failed; check --reward {cfg.reward!r}")
        objective.reset()
        pending["stats"] = True
        return micro_batches(samples, cfg.micro_batch, ref, cfg.temperature)

    def evaluate(final: bool = False) -> dict:
        if cfg.eval_queries == 0:
            return {}
        log_update()
        was = model.training
        model.eval()
        with torch.no_grad():
            res = heldout_accuracy(dispatcher, tokenizer, cfg.eval_queries, cfg.eval_max_new_tokens, stop_ids)
        model.train(was)
        if not final:
            run.log.log({"kind": "heldout", "step": run.step, **res})
            run.write(f"step {run.step}: held-out synthetic math strict {res['heldout_strict']:.3f} "
                      f"flexible {res['heldout_flexible']:.3f} format {res['heldout_format']:.3f}")
        return res

    run.checkpoint_state(lambda: {"rollout": held["rollout"] if run.step % cfg.mu else None})
    if run.step == 0 and cfg.eval_queries:
        run.summary["eval_start"] = evaluate()
    lr_at = lambda step: cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr  # noqa: E731
    with run:
        run.train(cfg.rollouts * cfg.mu, start=run.step, next_batch=next_batch, loss_fn=objective, lr_at=lr_at,
                  grad_clip=cfg.grad_clip, evaluate=evaluate)
        log_update()
    return run.finish(evaluate=evaluate)


def _log_rollout(run: Run, step: int, stats: dict) -> None:
    run.log.log({"kind": "rollout", "step": step + 1, **{k: v for k, v in stats.items() if k != "queries_used"}})


def _reward_model_loader(cfg: GRPOConfig):
    def load(path: str):
        from qwen25.train.reward_score import load_reward_scorer

        if not Path(path).is_dir():
            raise UserError(f"reward rm:{path}: not a folder; pass a reward model written by `qwen25 reward train`")
        return load_reward_scorer(path, device=cfg.device)
    return load

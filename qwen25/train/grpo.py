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

Resume is exact: rollouts are seeded by (seed, rollout index, query), and a run stopped
between the `mu` updates of a rollout stores that rollout with its checkpoint (every
rank's share; resume with the same number of processes).

LoRA (`lora_rank > 0`, SFT's fields and `qwen25.train.lora`): only the adapters train. The
engine samples from a `lora.MergedView`, a plain model that shares the frozen tensors and
holds W + (alpha / r) B A for the adapted matrices, re-merged in place before each rollout
and evaluation: the C++ decoder keeps running (it reads plain linears, not peft's layers)
and the frozen base stays bit-exact (merging into it and unmerging would round it a little
every rollout), for one copy of the adapted matrices. With beta > 0 the reference is the
same model with its adapters switched off (`lora.adapters_disabled`), not a second copy.
Output: OUT/adapter (a PEFT folder) and, with `merge`, OUT/final merged, as in SFT.

Several processes (`torchrun --nproc_per_node N`, DDP; never FSDP: every rank's engine needs
the whole weights) give the losses and updates of one process with the same config. Rank r
rolls out queries r·k .. (r+1)·k − 1 of the step's selected ones (k = queries_per_step / N)
and trains on their answers; a query's samples are seeded by (seed, rollout index, its
index among the step's queries), not by rank, and the engine's outputs do not depend on what
else it is decoding (bitwise on the C++ decoder, to rounding on the PyTorch one), so the
answers are those of one process. `train_step` sums the loss
normaliser over ranks, so the objective is the one-process objective. For
`order="variance"` each rank scores an equal slice of the candidate pool (seeded by pool
index) and the rewards are all-gathered, so every rank orders the same whole pool as one
process does, and the pool costs 1/N of the scoring per rank, not the whole of it; only
the rewards (pool x select_group floats) travel. Ranks whose answers need fewer
micro-batches (failed rewards drop answers) get empty ones first, which count nothing.
Logged statistics are reduced over ranks.
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
from qwen25.train import lora, parallel
from qwen25.train.checkpointing import ResumeError
from qwen25.train.data import to_device
from qwen25.train.grpo_config import GRPOConfig, validate
from qwen25.train.grpo_loss import grpo_loss, group_advantages, order_by_reward_variance
from qwen25.train.grpo_queries import check_query_set, query
from qwen25.train.optim import build_optimizer
from qwen25.train.rewards import RewardError, parse_reward_spec, total_reward
from qwen25.train.run import Run, RunSettings, config_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


# ---- rollouts ----------------------------------------------------------------------------


def _sample(dispatcher: Dispatcher, prompts: list[list[int]], n: int, params: SamplingParams, seed: int,
            first: int = 0) -> list:
    """n answers per prompt; prompt q is query first + q of the step (numbered across all
    ranks), whose samples are seeded seed*1000003 + (first + q)*n + j."""
    subs = [dispatcher.submit(p, dataclasses.replace(params, n=n, seed=seed * 1_000_003 + (first + q) * n))
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


def rollout(cfg: GRPOConfig, index: int, dispatcher: Dispatcher, tokenizer, rewards, stop_ids,
            world: parallel.World | None = None) -> dict[str, Any]:
    """Rollout `index`: this rank's selected queries, their answers, log-probs, rewards and
    advantages, as JSON-able lists (stored in a checkpoint taken between its updates), and
    the statistics of the whole rollout (all ranks). Collective when `world` is distributed."""
    world = world or parallel.World()
    n_ranks, rank = world.world_size, world.rank
    t0 = time.perf_counter()
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            stop_token_ids=tuple(stop_ids))
    pool_size = cfg.queries_per_step * cfg.pool_factor
    base = index * pool_size
    pool = [query(cfg.queries, base + k) for k in range(pool_size)]
    prompts = [tokenizer.apply_chat_template(list(ex.messages), add_generation_prompt=True) for ex in pool]
    stats: dict[str, Any] = {"pool": pool_size}
    if cfg.order == "variance":
        share = pool_size // n_ranks  # queries_per_step divides by the ranks, so the pool does
        lo = rank * share
        subs = _sample(dispatcher, prompts[lo:lo + share], cfg.select_group, params,
                       seed=cfg.seed * 7919 + 2 * index + 1, first=lo)
        mine, _ = _score(rewards, tokenizer, pool[lo:lo + share], subs)
        scores = [row for part in parallel.all_gather_object(mine, world) for row in part]  # pool order
        sel = order_by_reward_variance([[r for r in row if r is not None] or [0.0, 0.0] for row in scores])
        chosen = sel.order[:cfg.queries_per_step]
        stats |= {"zero_variance": len(sel.dropped),
                  "selected_variance": sum(sel.variances[q] for q in chosen) / max(len(chosen), 1),
                  "pool_variance": sum(sel.variances) / len(sel.variances)}
        if not chosen:  # nothing in the pool teaches anything: train on the first queries anyway
            chosen = list(range(cfg.queries_per_step))
    else:
        chosen = list(range(cfg.queries_per_step))
    # `chosen` may be shorter than queries_per_step (zero-variance queries dropped): rank r
    # takes its k-slice of it, possibly empty.
    k = cfg.queries_per_step // n_ranks
    first = rank * k
    mine_q = chosen[first:first + k]
    examples = [pool[q] for q in mine_q]
    prompts = [prompts[q] for q in mine_q]
    subs = _sample(dispatcher, prompts, cfg.group_size, params, seed=cfg.seed * 7919 + 2 * index, first=first)
    scores, failed = _score(rewards, tokenizer, examples, subs)

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
    lengths = [len(s["tokens"]) for s in samples]
    parts = parallel.all_gather_object((all_rewards, lengths, failed, time.perf_counter() - t0), world)
    all_rewards = [r for p in parts for r in p[0]]
    lengths = [n for p in parts for n in p[1]]
    rw = torch.tensor(all_rewards or [0.0], dtype=torch.float64)
    stats |= {"reward_mean": float(rw.mean()), "reward_std": float(rw.std(unbiased=False)),
              "reward_failed": sum(p[2] for p in parts), "answers": len(lengths),
              "length_mean": sum(lengths) / max(len(lengths), 1),
              "rollout_s": max(p[3] for p in parts), "queries_used": [pool[q].id for q in chosen]}
    return {"index": index, "samples": samples, "stats": stats}


# ---- batches and the loss ----------------------------------------------------------------


def micro_batches(samples: list[dict], size: int, ref_model=None, temperature: float = 1.0,
                  device: torch.device | None = None) -> list[dict]:
    """Right-padded batches: input_ids [B, L], targets, mask (1 where the target is an answer
    token), old_logp aligned with targets, advantages [B], and ref_logp when a reference is given
    (any callable `ref_model(ids, logits_at=mask)` -> logits), on `device` (default: CPU)."""
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
        if device is not None:
            batch = to_device(batch, device)
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


def empty_batch(with_ref: bool, device: torch.device | None = None) -> dict:
    """A micro-batch of one padding token that counts nothing (normaliser 0) but touches every
    weight: it evens out the micro-batch counts of the ranks (see `GRPOObjective`)."""
    z = torch.zeros(1, 1)
    batch = {"input_ids": z.long(), "targets": z.long(), "mask": z, "old_logp": z, "advantages": torch.zeros(1),
             "empty": torch.ones(())}
    if with_ref:
        batch["ref_logp"] = z
    return batch if device is None else to_device(batch, device)


class _AdaptersOff:
    """The reference policy of a LoRA run: the trained model with its adapters switched off."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with lora.adapters_disabled(self.model):
            return self.model(*args, **kwargs)


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
        if "empty" in batch:  # padding (`empty_batch`): in the graph, so DDP's all-reduce runs, but worth 0
            return out.loss_sum * 0.0, torch.zeros_like(out.normaliser)
        return out.loss_sum, out.normaliser

    def means(self, world: parallel.World | None = None) -> dict[str, float]:
        """Per-token means of the step's statistics, over all ranks (collective)."""
        keys = ("tokens", "clipped", "kl", "ratio_dev", "entropy")
        t = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64,
                         device=world.device if world is not None else None)
        if world is not None:
            parallel.all_reduce_sum(t, world)
        sums = dict(zip(keys, t.tolist()))
        n = max(sums["tokens"], 1.0)
        return {"clip_frac": sums["clipped"] / n, "kl": sums["kl"] / n,
                "ratio_dev": sums["ratio_dev"] / n, "entropy": sums["entropy"] / n}


# ---- evaluation --------------------------------------------------------------------------


def heldout_accuracy(dispatcher: Dispatcher, tokenizer, n: int, max_new_tokens: int, stop_ids,
                     world: parallel.World | None = None) -> dict[str, float]:
    """Greedy answers to the first n held-out synthetic-math questions (families never
    trained on): strict accuracy, flexible accuracy and the answer-format rate. Each rank
    answers every world_size-th question; the counts are summed (collective)."""
    from qwen25.eval.tasks import get_task
    from qwen25.eval.tasks.math import score_number, strict_number

    world = world or parallel.World()
    everything = get_task("synth_math").examples(0)[:n]
    examples = everything[world.rank::world.world_size]
    prompts = [tokenizer.apply_chat_template(list(ex.messages), add_generation_prompt=True) for ex in examples]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_ids))
    subs = dispatcher.generate(prompts, params)
    strict = flexible = fmt = 0.0
    for ex, sub in zip(examples, subs):
        s = score_number(sub.text(0), ex)
        strict += s["exact_match_strict"]
        flexible += s["exact_match_flexible"]
        fmt += strict_number(sub.text(0)) is not None
    counts = parallel.all_reduce_sum(torch.tensor([strict, flexible, fmt], dtype=torch.float64,
                                                  device=world.device), world).tolist()
    k = max(len(everything), 1)
    return {"heldout_strict": counts[0] / k, "heldout_flexible": counts[1] / k, "heldout_format": counts[2] / k,
            "heldout_n": len(everything)}


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
    validate(cfg)  # the world size is checked once known (in _grpo)
    check_query_set(cfg.queries)
    world = parallel.init_world(cfg.device)
    try:
        return _grpo(cfg, world)
    finally:
        parallel.shutdown_world(world)


def _grpo(cfg: GRPOConfig, world: parallel.World) -> dict[str, Any]:
    from qwen25 import load_model

    validate(cfg, world.world_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rewards = parse_reward_spec(cfg.reward, load_reward_model=_reward_model_loader(cfg))
    tokenizer = _load_tokenizer(cfg)
    run = Run(cfg.out, world, config=config_dict(cfg), total_steps=cfg.rollouts * cfg.mu,
              settings=RunSettings.of(cfg), check_resume=lambda ck: _check_resume(ck, cfg, world.world_size))
    # A LoRA checkpoint holds the frozen base under plain names plus the adapter files.
    inner = load_model(run.resume.path if run.resume else cfg.model, dtype=torch.float32)
    start_gen = getattr(inner, "generation_config", None)
    if cfg.lora_rank:  # injected on the CPU, where its seeded init is drawn
        lora.apply(inner, cfg, base=cfg.model, resume=run.resume.path if run.resume else None)
    inner = inner.to(world.device).train()
    model = parallel.parallelize(inner, world, mode="ddp")  # the module to train (inner on one process)
    ref = None
    if cfg.beta and cfg.lora_rank:
        ref = _AdaptersOff(inner)
    elif cfg.beta:
        ref = load_model(cfg.model, dtype=torch.float32, device=world.device).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    optimizer = build_optimizer(inner, cfg.lr, weight_decay=cfg.weight_decay)
    src = Path(cfg.tokenizer or cfg.model)
    extra = [src / f for f in TOKENIZER_FILES] if src.is_dir() else []
    if cfg.lora_rank:
        run.checkpoint_weights(lambda: lora.checkpoint_weights(model, inner, run.out, world.is_main, extra))
    run.attach(model, inner, optimizer, extra_files=extra)
    if start_gen is not None:
        inner.generation_config = start_gen

    stop_ids = sorted(set(default_stop_ids(inner)) | set(tokenizer.stop_token_ids))
    prompt_cap = max(len(tokenizer.apply_chat_template(list(query(cfg.queries, 0).messages),
                                                       add_generation_prompt=True)) * 4, 512)
    view = lora.MergedView(inner) if cfg.lora_rank else None  # why a view: the module docstring
    engine = Engine(view.model if view else inner, max_batch_size=cfg.max_batch_size,
                    max_seq_len=prompt_cap + cfg.max_new_tokens, hugepages=False)  # weights change in place
    dispatcher = Dispatcher(engine, tokenizer)
    objective = GRPOObjective(cfg)
    saved = run.state.get("data") if run.resume else None
    held = {"rollout": (saved[world.rank] or {}).get("rollout") if saved else None}  # mid-rollout resume

    pending = {"stats": False}  # the last step's objective statistics are not yet logged

    def sync_engine() -> None:
        """Make the engine's weights the policy's (LoRA: re-merge; full weights are shared)."""
        if view is not None:
            view.refresh()

    def log_update() -> None:
        if pending["stats"]:
            index, update = divmod(run.step - 1, cfg.mu)
            rec = {"kind": "grpo_update", "step": run.step, "rollout": index, "update": update,
                   **objective.means(world)}
            if update == 0:  # before any update on this rollout: engine vs trainer log-probs
                rec["first_update_ratio_dev"] = rec["ratio_dev"]
            run.log.log(rec)
            pending["stats"] = False

    def next_batch() -> list[dict]:
        log_update()
        index = run.step // cfg.mu
        if held["rollout"] is None or held["rollout"]["index"] != index:
            sync_engine()
            with torch.no_grad():
                held["rollout"] = rollout(cfg, index, dispatcher, tokenizer, rewards, stop_ids, world)
            _log_rollout(run, run.step, held["rollout"]["stats"])
        if not held["rollout"]["stats"]["answers"]:  # the same on every rank
            raise UserError(f"rollout {index}: every reward failed; check --reward {cfg.reward!r}")
        objective.reset()
        pending["stats"] = True
        micro = micro_batches(held["rollout"]["samples"], cfg.micro_batch, ref, cfg.temperature, world.device)
        if world.distributed:  # equal counts: the last backward of every rank is the synced one
            n = int(parallel.all_reduce_max(float(len(micro)), world))
            micro = [empty_batch(ref is not None, world.device) for _ in range(n - len(micro))] + micro
        return micro

    def evaluate(final: bool = False) -> dict:
        if cfg.eval_queries == 0:
            return {}
        log_update()
        sync_engine()
        was = model.training
        model.eval()
        with torch.no_grad():
            res = heldout_accuracy(dispatcher, tokenizer, cfg.eval_queries, cfg.eval_max_new_tokens, stop_ids, world)
        model.train(was)
        if not final:
            run.log.log({"kind": "heldout", "step": run.step, **res})
            run.write(f"step {run.step}: held-out synthetic math strict {res['heldout_strict']:.3f} "
                      f"flexible {res['heldout_flexible']:.3f} format {res['heldout_format']:.3f}")
        return res

    run.checkpoint_state(dict, data=lambda: {"rollout": held["rollout"] if run.step % cfg.mu else None})
    if run.step == 0 and cfg.eval_queries:
        run.summary["eval_start"] = evaluate()
    lr_at = lambda step: cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr  # noqa: E731
    with run:
        run.train(cfg.rollouts * cfg.mu, start=run.step, next_batch=next_batch, loss_fn=objective, lr_at=lr_at,
                  grad_clip=cfg.grad_clip, evaluate=evaluate)
        log_update()
    export = (lambda ckpt: lora.export(ckpt, cfg.out, cfg, extra_files=extra)) if cfg.lora_rank else None
    return run.finish(evaluate=evaluate, export=export, extra=lambda: {"lora": bool(cfg.lora_rank)})


def _check_resume(ck, cfg: GRPOConfig, world_size: int) -> None:
    saved, mine = ck.state.get("config", {}), config_dict(cfg)
    for key in ("lora_rank", "lora_targets"):
        if saved.get(key, mine[key]) != mine[key]:
            raise ResumeError(f"{ck.path} was written with {key}={saved[key]!r}, this run has {mine[key]!r}; "
                              "resume with the settings that started it, or pass a new --out")
    if ck.state.get("world_size", 1) != world_size:
        raise ResumeError(f"{ck.path} was written by {ck.state.get('world_size')} process(es), each holding its "
                          f"share of the rollout; resume with the same number (now {world_size})")


def _log_rollout(run: Run, step: int, stats: dict) -> None:
    run.log.log({"kind": "rollout", "step": step + 1, **{k: v for k, v in stats.items() if k != "queries_used"}})


def _reward_model_loader(cfg: GRPOConfig):
    def load(path: str):
        from qwen25.train.reward_score import load_reward_scorer

        if not Path(path).is_dir():
            raise UserError(f"reward rm:{path}: not a folder; pass a reward model written by `qwen25 reward train`")
        return load_reward_scorer(path, device=cfg.device)
    return load

"""Seconds per GRPO step, rollout and update apart: our stage's pieces against TRL's GRPOTrainer.

Same model (a random Qwen2 saved once, loaded by both), same queries (the built-in
synthetic-math training queries, in the chat template), same group size, answer length,
temperature, dtype (fp32) and reward (a cheap one that varies within a group, so the
update is not trivially zero). Ours: `rollout` (engine, G samples sharing one prefill) and
`train_step` with the GRPO objective. TRL: `GRPOTrainer` steps, its `_generate` timed as
the rollout (transformers `generate`), the rest of the step as the update.

    python benchmarks/grpo.py [--steps 3] [--group 4] [--queries 4] [--new-tokens 32]

Prints median seconds per step of each part and the ratios (goal: rollout >= 3x, step >= 2x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parity(prompts=None, completions=None, completion=None, **kw):
    """Reward: 1 for an answer of even length in characters (cheap, varies within a group)."""
    if completions is not None:  # TRL's signature: lists
        return [float(len(_text(c)) % 2 == 0) for c in completions]
    return float(len(completion) % 2 == 0)


def _text(c):
    return c[-1]["content"] if isinstance(c, list) else c


def make_model(folder: Path, hidden: int, layers: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen25 import load_tokenizer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
                      max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=151645,
                      pad_token_id=151643)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    load_tokenizer("qwen2.5").save_pretrained(folder)


def ours(folder: Path, args) -> tuple[list[float], list[float]]:
    from qwen25 import Engine, load_model, load_tokenizer
    from qwen25.engine.dispatch import Dispatcher
    from qwen25.train import rewards as R
    from qwen25.train.grpo import GRPOObjective, micro_batches, rollout
    from qwen25.train.grpo_config import GRPOConfig
    from qwen25.train.loop import train_step
    from qwen25.train.optim import build_optimizer
    from qwen25.train.parallel import init_world

    R.BUILTIN["parity"] = (lambda p, c, e: parity(completion=c), "benchmark")
    cfg = GRPOConfig(model=str(folder), reward="parity", group_size=args.group, queries_per_step=args.queries,
                     max_new_tokens=args.new_tokens, temperature=1.0, order="random", micro_batch=args.group * args.queries,
                     lr=1e-6)
    model = load_model(folder, dtype=torch.float32).train()
    tok = load_tokenizer(folder)
    d = Dispatcher(Engine(model, max_batch_size=args.group * args.queries, max_seq_len=512, hugepages=False), tok)
    opt = build_optimizer(model, cfg.lr, weight_decay=0.0)
    world, objective = init_world("cpu"), GRPOObjective(cfg)
    rewards = R.parse_reward_spec("parity")
    gen, upd = [], []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            ro = rollout(cfg, step, d, tok, rewards, tok.stop_token_ids)
        t1 = time.perf_counter()
        train_step(model, opt, micro_batches(ro["samples"], cfg.micro_batch), objective, lr=cfg.lr, world=world)
        t2 = time.perf_counter()
        if step:  # the first step warms up (kernel build, allocator)
            gen.append(t1 - t0)
            upd.append(t2 - t1)
    return gen, upd


def trl(folder: Path, args, out: Path) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from qwen25.train.grpo_queries import query

    n = (args.steps + 1) * args.queries
    rows = [{"prompt": list(query("synth_math", i).messages)} for i in range(n)]
    config = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.group * args.queries,
                        num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0,
                        learning_rate=1e-6, max_steps=args.steps + 1, logging_steps=1, report_to="none",
                        use_cpu=True, beta=0.0, save_strategy="no", shuffle_dataset=False, seed=0,
                        dataloader_num_workers=0, bf16=False, fp16=False)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[parity], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)
    gen_times: list[float] = []
    inner = trainer._generate

    def timed_generate(*a, **kw):
        t = time.perf_counter()
        r = inner(*a, **kw)
        gen_times.append(time.perf_counter() - t)
        return r

    trainer._generate = timed_generate
    step_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **kw):
            step_times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    gen, steps = gen_times[1:], step_times[1:]
    return gen, [s - g for s, g in zip(steps, gen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        make_model(folder, args.hidden, args.layers)
        t_gen, t_upd = trl(folder, args, Path(tmp) / "trl")
        o_gen, o_upd = ours(folder, args)
    med = statistics.median
    print(f"model hidden {args.hidden} x {args.layers} layers, vocab 151936, fp32, {args.threads} threads; "
          f"{args.queries} queries x G={args.group}, {args.new_tokens} new tokens, {args.steps} timed steps")
    print(f"{'':10s} {'rollout s':>10s} {'update s':>10s} {'step s':>10s}")
    print(f"{'TRL':10s} {med(t_gen):10.2f} {med(t_upd):10.2f} {med(t_gen) + med(t_upd):10.2f}")
    print(f"{'qwen25':10s} {med(o_gen):10.2f} {med(o_upd):10.2f} {med(o_gen) + med(o_upd):10.2f}")
    print(f"ratio (TRL / ours): rollout {med(t_gen) / med(o_gen):.2f}x, update {med(t_upd) / med(o_upd):.2f}x, "
          f"step {(med(t_gen) + med(t_upd)) / (med(o_gen) + med(o_upd)):.2f}x")


if __name__ == "__main__":
    main()

"""The speedrun: the report's whole recipe end to end on built-in data, in one folder.

    fetch the built-in corpora -> train a byte-level BPE tokenizer on them -> filter, dedup,
    decontaminate and tokenise them into shards -> pretrain a small Qwen2.5-architecture
    model in two stages (short context at RoPE base 1e4, then 4x the context at base 1e6:
    ABF, spec §3.3) -> post-training (`qwen25.recipes.post_training`: SFT, pairs, DPO,
    reward model, GRPO) -> every stage evaluated (`qwen25.recipes.report_card`) -> report

Everything lands in OUT (default `runs/speedrun`): `tokenizer/`, `data/`, `checkpoints/`,
`metrics.jsonl` and `plots/` of pretraining, `base/` (the pretrained model), one run folder
per post-training stage (`sft/`, `pairs/`, `dpo/`, `rm/`, `grpo/`), `card.json`, `final/`
(the aligned model + tokenizer, ready for `qwen25 chat OUT/final`) and `report.md`. Each
phase skips itself when its output is complete and every training stage resumes from its
newest checkpoint, so re-running the command after an interruption continues where it
stopped. `timings.json` accumulates the seconds spent in each phase.

Profiles are plain configs: "cpu" gives pretraining 20 minutes on 2 cores (the goal:
held-out Shakespeare at <= 2.3 bits per byte) and post-training about 20 minutes;
"gpu" scales the same recipe to one GPU; "smoke" checks every stage in about two minutes.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qwen25.errors import UserError
from qwen25.files import atomic_write, sha256_file
from qwen25.recipes import post_training
from qwen25.train.config import PretrainConfig, Stage


@dataclass(frozen=True)
class Profile:
    """One speedrun size: tokenizer, data and the pretraining config (out and paths filled in)."""

    name: str  # "cpu" or "gpu"
    vocab_size: int  # BPE vocabulary incl. the 22 control tokens (a small vocab suits a small model)
    tokenizer_chars: int  # characters of the built-in text the tokenizer is trained on
    pretrain: PretrainConfig  # everything else (data/out/tokenizer are set per run)
    budget_s: float | None = None  # wall-clock budget of the whole run; None: train the stages' steps
    max_tokens: int = 0  # with a budget: never plan more training tokens than this
    stage_shares: tuple[float, ...] = ()  # with a budget: share of the steps each stage gets
    # with a budget: (precision, micro_batch[, "compile"]) timed to pick the fastest
    candidates: tuple[tuple, ...] = ()
    sources: tuple[str, ...] = ()  # built-in sources to prepare (empty: all of them)
    notes: str = ""  # why these numbers, for the report
    sample_prompts: tuple[str, ...] = ("ROMEO:", "def fibonacci(n):", "Question:")
    post: post_training.PostProfile | None = None  # the post-training plan; None: stop at the base model


# Domain weights of every batch. The report leans on math and code; so does this mix, because a
# model this small learns to read a word problem's numbers only after several passes over the
# built-in math (1.4M tokens): with an eighth of 6M tokens (half a pass) the SFT model's worked
# solutions were as likely after another question as after their own (question use 0.00) and
# it answered 2% of held-out math; with 35% of 12M tokens (three passes) question use is 1.06
# nats per token and it answers 8%, while held-out Shakespeare is better too (1.875 vs 2.030
# bits per byte after pretraining). Measured 2026-12-04, see post_training.py.
MIX = {"literature": 0.55, "code": 0.10, "math": 0.35}

# Chosen from learning-curve sweeps of this exact recipe (same data and tokenizer training,
# bits per byte on held-out literature at equal tokens): at 3.5M tokens a 4 x 192 model is
# within 0.03 bpb of 4 x 256 while training ~1.3x faster on 2 cores; an 8,192 vocabulary
# beats 4,096 (more bytes per token); a global batch of 8,192 tokens beats 16,384 (2.21 vs
# 2.33 bpb) and 32,768; peak LR 3e-3 beats 2e-3 and 5e-3; WSD with a 30% decay beats cosine.
# Micro-batches of 8 sequences train faster than 32 on a CPU (the activations stay in cache).
# 12M tokens (1.6 passes over the 7.4M-token built-in data) fit the 20-minute budget on a fast
# host (bf16 + compile, 18.8k tokens/s: 11 minutes); at 6M and 35% math the model does not yet
# read the question (question use 0.01 with 3 heads, 0.01 with 6, 0.03 at a 4,096-token batch).
CPU = Profile(
    name="cpu", vocab_size=8192, tokenizer_chars=8_000_000, budget_s=20 * 60, max_tokens=12_000_000,
    stage_shares=(0.85, 0.15), candidates=(("fp32", 8), ("bf16", 8), ("bf16", 8, "compile")),
    notes="4 layers x 192 wide (1.7M non-embedding parameters), 8,192-token vocabulary, global batch "
          "8,192 tokens, 35% math. The step count is planned from a throughput measurement on this machine so "
          "the whole run fits its 20-minute budget; precision, micro-batch and torch.compile (of the "
          "blocks and the loss) are the fastest of the timed candidates.",
    post=post_training.CPU,
    pretrain=PretrainConfig(
        model="small",
        model_overrides={"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 4,
                         "num_attention_heads": 3, "num_key_value_heads": 1,
                         "tie_word_embeddings": True, "rope_theta": 10_000.0},
        seq_len=256, batch_tokens=8192, micro_batch=8, lr=3e-3, warmup_steps=20,
        schedule="wsd", decay_frac=0.3, min_lr_ratio=0.0, weight_decay=0.1, grad_clip=1.0,
        precision="fp32", eval_every=150, eval_tokens=0, checkpoint_every=50, keep_checkpoints=2,
        eval_sets=("shakespeare", "all"), sample_tokens=48, log_every=25,
        stages=(Stage("short", steps=600, seq_len=256, mix=MIX),
                Stage("long", steps=100, seq_len=1024, micro_batch=2, rope_theta=1_000_000.0, mix=MIX,
                      short_fraction=0.6, short_seq_len=256))),
)

# One GPU: a wider, deeper model and several passes over the (small) built-in corpus.
GPU = Profile(
    name="gpu", vocab_size=16_384, tokenizer_chars=40_000_000,
    notes="8 layers x 384 (14M non-embedding parameters), 16,384-token vocabulary, bf16 autocast; "
          "about 4 passes over the built-in corpus.",
    post=post_training.GPU,
    pretrain=PretrainConfig(
        model="small",
        model_overrides={"hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 8,
                         "num_attention_heads": 6, "num_key_value_heads": 2,
                         "tie_word_embeddings": True, "rope_theta": 10_000.0},
        seq_len=512, batch_tokens=65_536, micro_batch=64, lr=2e-3, warmup_steps=50,
        schedule="wsd", decay_frac=0.3, precision="bf16", eval_every=100, eval_tokens=0,
        checkpoint_every=100, keep_checkpoints=2, eval_sets=("shakespeare", "all"), sample_tokens=64,
        stages=(Stage("short", steps=520, seq_len=512, mix=MIX),
                Stage("long", steps=90, seq_len=2048, micro_batch=16, rope_theta=1_000_000.0, mix=MIX,
                      short_fraction=0.6, short_seq_len=512))),
)

# A minute on a laptop: the whole pipeline on the Shakespeare source alone, a tiny model.
# For checking an installation (and for the project's end-to-end test), not for results.
SMOKE = Profile(
    name="smoke", vocab_size=1024, tokenizer_chars=2_000_000, sources=("shakespeare",),
    notes="2 layers x 96, 1,024-token vocabulary, Shakespeare only: checks the pipeline end to end.",
    sample_prompts=("ROMEO:",),
    post=post_training.SMOKE,
    pretrain=PretrainConfig(
        model="small",
        model_overrides={"hidden_size": 96, "intermediate_size": 288, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1,
                         "tie_word_embeddings": True, "rope_theta": 10_000.0},
        seq_len=128, batch_tokens=4096, micro_batch=16, lr=5e-3, warmup_steps=5, schedule="wsd",
        decay_frac=0.3, eval_every=0, eval_tokens=0, checkpoint_every=20, keep_checkpoints=2,
        eval_sets=("shakespeare", "all"), sample_tokens=24, log_every=10,
        stages=(Stage("short", steps=80, seq_len=128),
                Stage("long", steps=10, seq_len=512, micro_batch=4, rope_theta=1_000_000.0,
                      short_fraction=0.6, short_seq_len=128))),
)

PROFILES = {"cpu": CPU, "gpu": GPU, "smoke": SMOKE}


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


class Timings:
    """Seconds per phase, accumulated over every invocation (`timings.json` in OUT)."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        atomic_write(self.path, json.dumps(self.seconds, indent=1))


def tokenizer_files(cache: Path, limit_chars: int, work: Path) -> list[str]:
    """A balanced sample of the built-in text for tokenizer training (literature, code, math).

    Each domain gets a third of `limit_chars`, read in a fixed order, so the vocabulary is
    deterministic and covers all three kinds of text the model will see.
    """
    groups = {
        "literature": sorted((cache / "shakespeare").glob("*.txt")) + sorted((cache / "milton").glob("*.txt")),
        "code": sorted((cache / "stdlib").rglob("*.py")),
        "math": [cache / "math" / "train.jsonl"],
    }
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for name, paths in groups.items():
        budget, parts = limit_chars // len(groups), []
        for p in paths:
            text = p.read_text(encoding="utf-8", errors="replace")
            if name == "math":
                text = "\n\n".join(json.loads(line)["text"] for line in text.splitlines() if line.strip())
            parts.append(text[:budget])
            budget -= len(parts[-1])
            if budget <= 0:
                break
        path = work / f"{name}.txt"
        path.write_text("\n\n".join(parts), encoding="utf-8")
        out.append(str(path))
    return out


def run_config(prof: Profile, out: Path) -> PretrainConfig:
    return replace(prof.pretrain, out=str(out), data=str(out / "data" / "manifest.json"),
                   tokenizer=str(out / "tokenizer"), sample_prompts=prof.sample_prompts)


# --------------------------------------------------------------------------------------
# Fitting the run into its time budget
# --------------------------------------------------------------------------------------

LONG_STAGE_COST = 1.15  # tokens of the long stage cost ~15% more (attention over 1024 positions)
AFTER_TRAINING_S = 45.0  # final evaluation, export, samples and report
OVERHEAD = 0.9  # share of the training time spent in steps (the rest: evaluations, checkpoints)
MIN_STEPS = 60  # a floor: a run too short to learn anything is pointless
PROBE_STEPS = 40  # steps trained before the final plan (inside warmup + constant LR: any plan fits)


def measure_rates(cfg: PretrainConfig, candidates, tokenizer, rounds: int = 2) -> dict[str, float]:
    """Training tokens/s of the run's model per candidate, on random tokens; keys
    "precision/micro_batch[/compile]".

    Candidates alternate step by step and each keeps its fastest step, so a burst of load
    from other processes does not decide the choice. The untimed first round also compiles;
    a compile candidate whose compilation fails (no working C++ toolchain, say) is dropped
    with a note, so the run goes on eagerly.
    """
    import torch

    from qwen25.model.model import build_model
    from qwen25.train.loop import lm_loss, train_step
    from qwen25.train.optim import build_optimizer
    from qwen25.train.parallel import World, apply_compile
    from qwen25.train.pretrain import base_model_config

    mc = base_model_config(cfg, tokenizer)
    T, g = cfg.seq_len, torch.Generator().manual_seed(0)
    steps = {}
    for precision, mb, *options in candidates:
        compiled = "compile" in options
        model = build_model(mc, seed=0)
        if compiled:
            apply_compile(model)
        opt = build_optimizer(model, cfg.lr)
        micro = []
        for _ in range(cfg.batch_tokens // (T * mb)):
            ids = torch.randint(0, mc.vocab_size, (mb, T + 1), generator=g)
            micro.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:].contiguous(),
                          "position_ids": torch.arange(T).expand(mb, T)})
        dtype = torch.bfloat16 if precision == "bf16" else None
        steps["/".join([precision, str(mb), *options])] = (
            lambda model=model, opt=opt, micro=micro, dtype=dtype, compiled=compiled: train_step(
                model, opt, micro, lambda m, b: lm_loss(m, b, mc, compiled=compiled), lr=cfg.lr, world=World(),
                autocast_dtype=dtype))
    best = {k: float("inf") for k in steps}
    for r in range(rounds + 1):
        for k, step in list(steps.items()):
            t0 = time.perf_counter()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - only a compile candidate's warm-up is forgiven
                if r or not k.endswith("/compile"):
                    raise
                print(f"timing: dropped {k}, torch.compile failed ({type(e).__name__}: {str(e)[:200]})",
                      flush=True)
                del steps[k], best[k]
                continue
            if r:  # round 0 warms up (and compiles)
                best[k] = min(best[k], time.perf_counter() - t0)
    return {k: cfg.batch_tokens / t for k, t in best.items()}


def plan_steps(prof: Profile, cfg: PretrainConfig, rate: float, seconds: float, done: int = 0) -> list[int]:
    """Steps per stage so that the steps after `done` take `seconds` at `rate` tokens/s."""
    cost = sum(share * (LONG_STAGE_COST if i else 1.0) for i, share in enumerate(prof.stage_shares))
    more = max(0.0, seconds - AFTER_TRAINING_S) * OVERHEAD * rate / cost / cfg.batch_tokens
    total = min(int(done + more), prof.max_tokens // cfg.batch_tokens)
    # Never end before the steps already trained can sit in the constant-LR phase of WSD.
    total = max(total, MIN_STEPS, math.ceil((done + 1) / (1 - cfg.decay_frac)) + 1)
    steps = [max(4, round(total * share)) for share in prof.stage_shares]
    steps[0] = max(steps[0], done + 1)
    return steps


def apply_plan(cfg: PretrainConfig, p: dict[str, Any]) -> PretrainConfig:
    stages = []
    for stage, steps in zip(cfg.stages, p["steps"]):
        T = stage.seq_len or cfg.seq_len
        stages.append(replace(stage, steps=steps, micro_batch=max(1, p["micro_batch"] * cfg.seq_len // T)))
    return replace(cfg, precision=p["precision"], micro_batch=p["micro_batch"],
                   compile=p.get("compile", cfg.compile), stages=tuple(stages))


def _save_plan(path: Path, p: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(p, indent=1))


def measured_rate(metrics_path: Path, first: int = 10) -> float | None:
    """Median training tokens/s the run logged from step `first` on (evaluations excluded)."""
    from qwen25.train.metrics import read_metrics

    rates = [r["tokens_per_s"] for r in read_metrics(metrics_path)
             if r.get("kind") == "train" and r["step"] >= first and r.get("tokens_per_s")]
    return statistics.median(rates) if rates else None


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def speedrun(out: str | Path = "runs/speedrun", profile_name: str = "cpu",
             started_at: float | None = None, steps_scale: float = 1.0) -> Path:
    """Run (or continue) every phase; return the path of `report.md`.

    started_at: UNIX time the set-up began (the Makefile passes it), to report set-up time.
    steps_scale: multiply every stage's steps (a quick smoke run uses e.g. 0.05).

    With a time budget the step count is planned twice: from a quick timing of the
    candidate settings on random tokens (which also picks precision and micro-batch), and
    again after `PROBE_STEPS` real steps from the rate they achieved, for the time then
    left. Both plans leave the first steps' learning rate alone (warmup, then constant), so
    the run is the same run whichever plan it ends with; `plan.json` keeps the final one
    and a re-run after an interruption trains exactly that.
    """
    from qwen25.data import builtin
    from qwen25.data.pipeline import prepare
    from qwen25.tokenizer import load_tokenizer
    from qwen25.tokenizer.train import train_tokenizer
    from qwen25.train.pretrain import pretrain
    from qwen25.train.report import write_report

    prof = profile(profile_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = Timings(out / "timings.json")
    if started_at is not None and "setup" not in timings.seconds:
        timings.add("setup", max(0.0, time.time() - started_at))
    cfg = run_config(prof, out)
    if steps_scale != 1.0:
        cfg = replace(cfg, stages=tuple(replace(s, steps=max(2, round(s.steps * steps_scale))) for s in cfg.stages))

    with timings.phase("fetch"):
        cache = Path(builtin.fetch())
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        with timings.phase("tokenizer"):
            files = tokenizer_files(cache, prof.tokenizer_chars, out / ".tokenizer-text")
            print(f"training a {prof.vocab_size}-token BPE vocabulary on {len(files)} files", flush=True)
            train_tokenizer(files, prof.vocab_size, tok_dir, show_progress=False)
    if not (out / "data" / "manifest.json").exists():
        with timings.phase("data"):
            sources = tuple(src for src in builtin.builtin_sources(cache)
                            if not prof.sources or src.name in prof.sources)
            prepare(builtin.builtin_config(out=str(out / "data"), tokenizer=str(tok_dir), root=cache,
                                           sources=sources))

    run_plan = None
    if prof.budget_s is not None and steps_scale == 1.0:
        path = out / "plan.json"
        run_plan = json.loads(path.read_text()) if path.exists() else None
        if run_plan is None:
            with timings.phase("plan"):
                rates = measure_rates(cfg, prof.candidates, load_tokenizer(str(tok_dir)))
                best = max(rates, key=rates.get)
                left = prof.budget_s - sum(timings.seconds.values())
                precision, mb, *options = best.split("/")
                run_plan = {"precision": precision, "micro_batch": int(mb), "compile": "compile" in options,
                            "rates_tokens_per_s": rates, "final": False,
                            "steps": plan_steps(prof, cfg, rates[best], left)}
            _save_plan(path, run_plan)
        if not run_plan["final"]:
            with timings.phase("pretrain"):
                probe = pretrain(replace(apply_plan(cfg, run_plan), stop_after_step=PROBE_STEPS))
            if probe.get("interrupted"):
                raise KeyboardInterrupt
            rate = measured_rate(out / "metrics.jsonl") or max(run_plan["rates_tokens_per_s"].values())
            left = prof.budget_s - sum(timings.seconds.values())
            done = probe.get("paused", probe["step"])
            run_plan |= {"final": True, "measured_tokens_per_s": rate, "seconds_left": left,
                         "steps": plan_steps(prof, cfg, rate, left, done)}
            run_plan["tokens"] = sum(run_plan["steps"]) * cfg.batch_tokens
            _save_plan(path, run_plan)
        print(f"plan: {run_plan['steps']} steps ({run_plan['tokens']:,} tokens) in "
              f"{run_plan['precision']} with micro-batches of {run_plan['micro_batch']}"
              f"{' + torch.compile' if run_plan.get('compile') else ''}", flush=True)
        cfg = apply_plan(cfg, run_plan)
    base = out / "base"
    if _pretrained(out):
        summary = json.loads((out / "summary.json").read_text())
    else:
        with timings.phase("pretrain"):
            summary = pretrain(cfg)
        if summary.get("interrupted"):
            raise KeyboardInterrupt  # the CLI reports it; the checkpoint is saved
        if prof.post is not None:  # OUT/final becomes the aligned model; the pretrained one is OUT/base
            _replace_dir(out / "final", base)
    post = None
    if prof.post is not None:
        post = _post_training(out, prof, timings)
    with timings.phase("report"):
        path = write_report(out, prof, cfg, summary, timings.seconds, _machine(), run_plan, post=post)
    return path


def _pretrained(out: Path) -> bool:
    """Pretraining finished and its model moved to OUT/base (re-runs skip it)."""
    path = out / "summary.json"
    if not (out / "base" / "config.json").is_file() or not path.is_file():
        return False
    s = json.loads(path.read_text())
    return bool(s.get("final")) and not s.get("interrupted") and not s.get("paused")


def _replace_dir(src: Path, dest: Path) -> None:
    """Copy folder src to dest, replacing dest, never leaving a half folder."""
    import shutil

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def stale_stages(card: dict, weights: dict[str, str], reward_model: str) -> list[str]:
    """Stages whose card entry must be (re)computed: missing, or measured on other weights (a
    stage retrained after its folder was removed), or all of them when the reward model that
    scores every row changed. Keys of `weights` in order; values are the weights' sha256."""
    if card.get("_meta", {}).get("reward_model") != reward_model:
        return list(weights)
    return [s for s, h in weights.items() if card.get(s, {}).get("weights") != h]


def _post_training(out: Path, prof: Profile, timings: Timings) -> list[str]:
    """SFT -> pairs -> DPO -> reward model -> GRPO, the card of every stage, OUT/final = GRPO's model."""
    from qwen25.data import builtin
    from qwen25.recipes import report_card as rc
    from qwen25.recipes.post_training import run_post_training, stage_dirs
    from qwen25.train.reward_score import load_reward_scorer

    summaries = run_post_training(out, prof.post, timings)
    card_path = out / "card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    d = stage_dirs(out)
    folders = {s: out / "base" if s == "base" else d[s] / "final" for s in ("base", "sft", "dpo", "grpo")}
    weights = {s: sha256_file(f / "model.safetensors") for s, f in folders.items()}
    scorer = sha256_file(d["rm"] / "final" / "model.safetensors")
    todo = stale_stages(card, weights, scorer)
    if todo:
        with timings.phase("evaluate"):
            seen = rc.trained_questions(Path(builtin.fetch()))
            sets = rc.heldout_math(prof.post.eval_math, seen)
            instructions = rc.heldout_instructions(prof.post.eval_if)
            reward_model = load_reward_scorer(str(d["rm"] / "final"))
            for stage in todo:
                print(f"== evaluate {stage}: {folders[stage]}", flush=True)
                card[stage] = rc.evaluate_stage(folders[stage], sets, instructions,
                                                manifest=out / "data" / "manifest.json",
                                                max_new_tokens=prof.post.eval_tokens,
                                                reward_model=reward_model, base_format=stage == "base")
                card[stage]["weights"] = weights[stage]
                card["_meta"] = {"math": prof.post.eval_math, "instructions": prof.post.eval_if,
                                 "reward_model": scorer}
                atomic_write(card_path, json.dumps(card, indent=1))
    _replace_dir(d["grpo"] / "final", out / "final")  # a few MB: cheaper than proving it is current
    return rc.post_training_section(out, card, summaries, timings.seconds)


def _machine() -> dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

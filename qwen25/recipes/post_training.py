"""The speedrun's post-training: the report's recipe after pretraining, on built-in data.

    base (OUT/final) -> SFT on the built-in conversations (OUT/sft) -> preference pairs
    sampled from the SFT model and judged by the math verifier (OUT/pairs) -> DPO from the
    SFT model (OUT/dpo) -> a reward model on the same pairs (OUT/rm) -> GRPO from the DPO
    model with the verifier's reward plus the reward model's (OUT/grpo) -> every stage's
    checkpoint evaluated on the held-out sets (OUT/card.json; `qwen25.recipes.report_card`)

Each stage is the same function `qwen25 sft|pairs build|dpo|reward train|grpo` runs, with
a config built here from the profile; its run folder makes it resumable (re-running picks
up its newest checkpoint) and a finished stage is skipped (its `summary.json` names the
exported `final/`). The stage order follows the report (spec §5: SFT, offline RL with DPO,
online RL with GRPO against a reward model and verifiable rewards).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("sft", "pairs", "dpo", "rm", "grpo")


@dataclass(frozen=True)
class PostProfile:
    """Overrides of each stage's config (fields not named keep the stage's defaults)."""

    sft: dict[str, Any] = field(default_factory=dict)
    pairs: dict[str, Any] = field(default_factory=dict)
    dpo: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    grpo_reward: str = "verifier,answer_format:0.3"  # GRPO's verifiable rewards (the reward model is added)
    grpo_rm_weight: float = 0.2  # weight of the reward model's score next to the verifiers' 0/1
    eval_math: int = 200  # held-out math questions per set and stage
    eval_if: int = 100  # held-out instruction-following prompts per stage
    eval_tokens: int = 160  # new tokens per held-out answer
    notes: str = ""


# The tiny models of the CPU speedrun learn at learning rates far above the report's (which
# are for 0.5B-72B models). Measured on the earlier 6M-token base (2 cores): SFT at 1e-3
# reached 100% answer format and 79% instruction following but raised held-out Shakespeare
# from 2.04 to 3.04 bits per byte; 3e-4 kept the format at 100% and the forgetting at 2.45.
# The current base (12M tokens, 35% math) is stiffer: on it with 6 query and 6 KV heads, 3e-4
# gave instruction following 46% and held-out math 11%, 6e-4 gave 60% and 14.5%, so SFT runs
# at 6e-4 (Shakespeare 1.89 -> 2.43 bits per byte in the full recipe).
# DPO 5e-5. No GRPO setting tried has yet bought a
# held-out gain on its target (instruction following after DPO, 75-76%):
#   3e-5, T 1.0, instruction prompts, 0.2 x reward model: 76% -> 73% (100 prompts), the
#     boxed math format 99.5% -> 87.5%, reward-model score -1.11 -> -0.87;
#   1e-4, T 1.0, the `chat_mix` of instruction and math prompts: 76% -> 76%, but every reply
#     took the instruction style ("So the answer is N."), boxed format 0%, reward-model
#     score -> +1.07 (variance ordering keeps almost only instruction prompts, since nearly
#     all math groups score 0; the weak reward model is what rises);
#   5e-5, T 0.7, instruction prompts, 0.1 x reward model (this profile): 75% -> 75% (300
#     prompts), format 88.5%, reward-model score -1.11 -> -0.88;
#   1e-4, T 0.7, 0.05 x reward model: 75% -> 74.3%, format 73.5%, reward-model score -0.53.
# Those runs started from an older DPO model. From the DPO model of the current recipe
# (instruction following 63.7%, format 83.0%, math 1.5%), 2026-12-03:
#   instruction prompts, "ifeval,math_answer" + 0.1 x reward model: instruction following
#     75.0%, but format 27.5% and math 0.0%: the math replies took the instruction style;
#   the same with a k3 KL penalty (beta 0.05): 75.0%, format 39.5%;
#   `chat_mix` (instruction and math prompts alternating), "verifier,answer_format:0.3" + 0.1 x
#     reward model (this profile): instruction following 75.3%, format 100%, math 1.5%
#     (unchanged), 2.6 minutes. Rewarding each set's answer format, right or wrong, is what
#     keeps the math replies boxed while the constraints are learned;
#   GRPO on math prompts alone from the SFT model (`benchmarks/grpo_speedrun.py`, boxed-answer
#     reward, 5e-5, 10 minutes, 236 steps): math 3.5% -> 0.5%. 15 of 16 candidate groups score
#     0 throughout: at a ~3% pass rate there is almost nothing for GRPO to reinforce.
#
# The SFT model's math ceiling (pass@8 on the 200 held-out questions, T = 1; greedy in brackets),
# 2026-12-04: this recipe 15.0% (2.0%); SFT at 1e-3 8.5% (2.0%); pretraining with 35% math
# 15.0% (4.5%, Shakespeare 2.030 -> 2.091 bpb); the same with 6 query and 6 KV heads 16.0% (2.5%).
# 12M pretraining tokens (the 20-minute budget allows them at bf16 + compile; the cap is 6M):
# 13.5% (4.0%), Shakespeare 1.808, but SFT instruction following 44% and the final card's 60.3%
# (then: 64% and 70%); 12M with 35% math and 6/6 heads: 26.5% (11.0%).
# The replies go wrong copying the question's numbers. The report card's question use (NLL of
# the worked solution after another question of its family minus after its own) says why: it
# was 0.00 nats per token for every 6M-token base and its SFT model, whatever the mix, heads or
# batch; at 12M tokens with 35% math the SFT model reaches 1.06, and the full recipe (this
# profile on that base) gives math 8.0%, instruction following 76.3% after SFT (old: 2.0%, 64%).
#
# What the stages can move: a model of 1.7M non-embedding parameters learns the answer
# format and the constraints at once but multiplies badly (about 3% of its sampled answers
# to training-family math are right), so the SFT model's math samples give few pairs (74
# of 512 questions). Its instruction-following prompts pass or fail often enough to give
# many (338 of 512): pairs come from both, judged by the math verifier and the IFEval
# checkers; GRPO trains on instruction and math prompts with each set's verifier and answer
# format, plus the reward model.
CPU = PostProfile(
    sft={"seq_len": 1024, "batch_size": 16, "micro_batch": 4, "epochs": 2, "lr": 6e-4, "min_lr_ratio": 0.1,
         "warmup_steps": 10, "builtin_size": 3000, "eval_every": 50, "eval_examples": 64,
         "checkpoint_every": 100, "sample_tokens": 96},
    pairs={"queries": 512, "samples": 8, "temperature": 1.0, "max_new_tokens": 160, "batch_size": 16,
           "tasks": ("mathgen", "instructions")},
    dpo={"epochs": 2, "batch_size": 16, "micro_batch": 8, "max_length": 512, "lr": 5e-5, "beta": 0.1,
         "warmup_steps": 2, "eval_every": 10, "checkpoint_every": 50},
    reward={"epochs": 2, "batch_size": 16, "micro_batch": 8, "max_length": 512, "lr": 1e-4, "eval_every": 10,
            "checkpoint_every": 50},
    grpo={"queries": "chat_mix", "group_size": 8, "queries_per_step": 8, "rollouts": 30, "mu": 2,
          "max_new_tokens": 128, "temperature": 0.7, "lr": 5e-5, "warmup_steps": 3, "eval_queries": 0,
          "checkpoint_every": 10, "max_batch_size": 64, "micro_batch": 16},
    grpo_rm_weight=0.1, eval_if=300,
    notes="SFT 2 epochs over ~3,000 built-in conversations; 512 math and 512 instruction queries x 8 "
          "samples for pairs; GRPO 30 rollouts of 8 instruction/math queries x 8 answers, 2 updates each.",
)

GPU = dataclasses.replace(
    CPU,
    sft={**CPU.sft, "builtin_size": 12000, "batch_size": 64, "micro_batch": 8, "precision": "bf16"},
    pairs={**CPU.pairs, "queries": 2048, "batch_size": 32},
    grpo={**CPU.grpo, "rollouts": 100, "queries_per_step": 16, "max_batch_size": 128,
          "device": "cuda"},  # GRPO's device defaults to the CPU; the other stages pick the GPU themselves
    eval_math=500, eval_if=300, notes="Every stage about 4x the CPU profile's data (not yet run on a GPU).")

SMOKE = PostProfile(
    sft={"seq_len": 512, "batch_size": 8, "micro_batch": 4, "epochs": 1, "steps": 6, "lr": 1e-3,
         "warmup_steps": 1, "builtin_size": 120, "eval_every": 0, "eval_examples": 8, "checkpoint_every": 3,
         "sample_count": 1, "sample_tokens": 16},
    # a model this small answers nothing right: multiple-choice pairs keep the later stages fed
    pairs={"queries": 16, "samples": 4, "max_new_tokens": 24, "batch_size": 8,
           "tasks": ("mathgen", "instructions", "mathgen-mc")},
    dpo={"epochs": 1, "batch_size": 4, "micro_batch": 4, "max_length": 256, "lr": 1e-4, "eval_every": 0,
         "checkpoint_every": 2, "eval_fraction": 0.2},
    reward={"epochs": 1, "batch_size": 4, "micro_batch": 4, "max_length": 256, "lr": 1e-4, "eval_every": 0,
            "checkpoint_every": 2, "eval_fraction": 0.2},
    grpo={"queries": "instructions", "group_size": 4, "queries_per_step": 2, "rollouts": 2,
          "max_new_tokens": 16, "lr": 1e-5, "eval_queries": 0, "checkpoint_every": 1, "max_batch_size": 16},
    eval_math=8, eval_if=4, eval_tokens=24, notes="Checks every stage runs; not for results.")

PROFILES = {"cpu": CPU, "gpu": GPU, "smoke": SMOKE}


def stage_dirs(out: Path) -> dict[str, Path]:
    """Run folder of each stage under the speedrun's OUT."""
    return {"base": out, **{s: out / s for s in STAGES}}


def _done(run_dir: Path) -> bool:
    """A stage whose summary names an exported final/ (not a pause, not an interruption)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(s.get("final")) and not s.get("interrupted") and not s.get("paused") and (run_dir / "final").is_dir()


def _pairs_done(path: Path) -> bool:
    return path.is_file() and path.with_name(path.name + ".stats.json").is_file()


def _interrupted(summary: dict) -> None:
    if summary.get("interrupted") or summary.get("paused"):
        raise KeyboardInterrupt  # the checkpoint is saved; re-running the speedrun resumes


def run_post_training(out: Path, prof: PostProfile, timings, *, pretrain_cfg=None) -> dict[str, Any]:
    """Run (or continue) SFT -> pairs -> DPO -> reward model -> GRPO; return the stages' summaries."""
    from qwen25.data.pair_build import BuildConfig, build
    from qwen25.train.dpo import DPOConfig, dpo
    from qwen25.train.grpo import grpo
    from qwen25.train.grpo_config import GRPOConfig
    from qwen25.train.reward import RewardConfig, reward_train
    from qwen25.train.sft import sft
    from qwen25.train.sft_config import SFTConfig

    d = stage_dirs(out)
    base = out / "base"  # the pretrained model (the speedrun moves pretraining's final/ here)
    summaries: dict[str, Any] = {}

    def stage(name: str, fn, cfg) -> None:
        if not _done(Path(cfg.out)):
            print(f"== {name}: {cfg.out}", flush=True)
            with timings.phase(name):
                _interrupted(fn(cfg))
        summaries[name] = json.loads((Path(cfg.out) / "summary.json").read_text())

    stage("sft", sft, dataclasses.replace(SFTConfig(), model=str(base), out=str(d["sft"]), data="builtin",
                                          **prof.sft))
    sft_final = str(d["sft"] / "final")

    pairs = d["pairs"] / "pairs.jsonl"
    if not _pairs_done(pairs):
        print(f"== pairs: sampling the SFT model into {pairs}", flush=True)
        with timings.phase("pairs"):
            build(dataclasses.replace(BuildConfig(), **{"model": sft_final, "out": str(pairs), "tasks": ("mathgen",),
                                                        **prof.pairs}))
    summaries["pairs"] = json.loads(pairs.with_name(pairs.name + ".stats.json").read_text())
    if not summaries["pairs"].get("pairs"):
        from qwen25.errors import UserError

        raise UserError(f"the SFT model's samples gave no preference pair ({summaries['pairs']}); "
                        "train SFT longer or sample more queries")

    stage("dpo", dpo, dataclasses.replace(DPOConfig(), model=sft_final, data=str(pairs), out=str(d["dpo"]),
                                          **prof.dpo))
    stage("rm", reward_train, dataclasses.replace(RewardConfig(), model=sft_final, data=str(pairs),
                                                  out=str(d["rm"]), **prof.reward))
    reward = prof.grpo_reward + (f",rm:{d['rm'] / 'final'}:{prof.grpo_rm_weight}" if prof.grpo_rm_weight else "")
    stage("grpo", grpo, dataclasses.replace(GRPOConfig(), model=str(d["dpo"] / "final"), out=str(d["grpo"]),
                                            reward=reward, **prof.grpo))
    return summaries

"""GRPO learning evidence on the speedrun's own SFT model: held-out synthetic math (issue 17).

Takes the CPU speedrun's SFT checkpoint (`make speedrun` writes runs/speedrun/sft/final),
scores it with the report card's metrics (200 held-out questions of the trained math
families, greedy, chat template, strict \\boxed{} match; plus instruction following and
Shakespeare bits per byte, to show what the run costs elsewhere), trains it with
`qwen25 grpo --queries synth_math_chat --reward math_latex` for a wall-clock budget (SIGTERM:
the harness checkpoints and the newest checkpoint is scored), and scores it again.
`--order random` runs the same budget without the report's variance ordering of queries,
for the comparison the issue asks for.

    python benchmarks/grpo_speedrun.py [--model runs/speedrun/sft/final] [--minutes 10] [--order variance] [--headroom-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qwen25.recipes import report_card as rc  # noqa: E402


def score(model: Path, sets: dict, args) -> dict:
    res = rc.evaluate_stage(model, sets, rc.heldout_instructions(args.n_if), manifest=Path(args.manifest),
                            max_new_tokens=160)
    return {k: v for k, v in res.items() if k in rc.METRICS} | {"sample": res["samples"][0]["reply"][:200]}


@torch.no_grad()
def headroom(model_dir: Path, problems: list[dict], args) -> dict:
    """What GRPO can sharpen: the share of sampled answers that are right, and pass@k (a question
    with at least one right answer among k samples), at the rollouts' temperature. Greedy accuracy
    cannot rise past pass@k by sharpening alone, and a group with no right answer has no signal."""
    from qwen25.checkpoint import load_model
    from qwen25.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(str(model_dir))
    prompts = [rc.chat_prompt(tok, p["question"]) for p in problems]
    replies = rc.sample_replies(model, tok, prompts, 160, temperature=args.temperature, n=args.k, seed=1)
    right = [[rc.math_right(text, p) for text, _ in rs] for rs, p in zip(replies, problems)]
    return {"sample_acc": sum(map(sum, right)) / (args.k * len(right)),
            f"pass@{args.k}": sum(max(r) > 0 for r in right) / len(right)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/speedrun/sft/final")
    ap.add_argument("--manifest", default="runs/speedrun/data/manifest.json")
    ap.add_argument("--out", default="runs/grpo-speedrun")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--order", default="variance", choices=("variance", "random"))
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reward", default="math_latex")
    ap.add_argument("--n", type=int, default=200, help="held-out math questions")
    ap.add_argument("--n-if", type=int, default=100, help="held-out instruction prompts")
    ap.add_argument("--k", type=int, default=8, help="samples per question for the pass@k headroom")
    ap.add_argument("--headroom-only", action="store_true", help="score the starting model only, no GRPO")
    ap.add_argument("--skip-before", action="store_true", help="reuse OUT/before.json")
    args = ap.parse_args()
    out = Path(args.out) / args.order
    out.mkdir(parents=True, exist_ok=True)
    before_file = Path(args.out) / "before.json"
    sets = rc.heldout_math(args.n, rc.trained_questions(Path("data_cache")))
    if args.skip_before and before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = score(Path(args.model), sets, args) | headroom(Path(args.model), sets["math_seen"], args)
        before_file.write_text(json.dumps(before, indent=1))
    print("before:", json.dumps(before), flush=True)
    if args.headroom_only:
        return

    cmd = [sys.executable, "-m", "qwen25", "grpo", "--model", args.model, "--out", str(out / "run"),
           "--queries", "synth_math_chat", "--reward", args.reward, "--order", args.order,
           "--group-size", "8", "--queries-per-step", "8", "--rollouts", "1000", "--mu", "1",
           "--max-new-tokens", "128", "--temperature", str(args.temperature), "--lr", str(args.lr),
           "--warmup-steps", "3", "--eval-queries", "0", "--checkpoint-every", "10", "--max-batch-size", "64",
           "--micro-batch", "16"]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the harness checkpoints on SIGTERM
        proc.wait()
    trained_s = time.time() - t0
    from qwen25.train.checkpointing import export_model, latest_checkpoint

    last = latest_checkpoint(out / "run" / "checkpoints")
    final = out / "run" / "final"
    if not (final / "config.json").exists():
        final = export_model(last.path, final)
    after = score(final, sets, args)
    rollouts = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()
                if '"rollout"' in line]
    rollouts = [r for r in rollouts if r.get("kind") == "rollout"]
    result = {"before": before, "after": after, "order": args.order, "grpo_seconds": trained_s,
              "steps": last.step if last else None, "gain_points": 100 * (after["math_seen"] - before["math_seen"]),
              "reward_mean_first5": sum(r["reward_mean"] for r in rollouts[:5]) / max(len(rollouts[:5]), 1),
              "reward_mean_last5": sum(r["reward_mean"] for r in rollouts[-5:]) / max(len(rollouts[-5:]), 1)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.order} order, {trained_s / 60:.1f} min, {result['steps']} steps: held-out math (seen families, "
          f"{args.n}) {100 * before['math_seen']:.1f}% -> {100 * after['math_seen']:.1f}% "
          f"({result['gain_points']:+.1f} points, goal +15); format {100 * before['format']:.1f}% -> "
          f"{100 * after['format']:.1f}%; instruction following {100 * (before['ifeval'] or 0):.1f}% -> "
          f"{100 * (after['ifeval'] or 0):.1f}%; bpb {before['bpb']:.3f} -> {after['bpb']:.3f}; training reward "
          f"{result['reward_mean_first5']:.3f} (first 5 rollouts) -> {result['reward_mean_last5']:.3f} (last 5)")


if __name__ == "__main__":
    main()

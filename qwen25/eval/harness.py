"""`qwen25 eval run`: run benchmark tasks on a backend, write results and a report card.

    cfg = EvalConfig(tasks=("arc_easy", "gsm8k"), limit=100)
    results = run_eval(LocalBackend(model, tokenizer), cfg, model_info)

For each task: build its examples (tasks/), ask the backend (log-likelihoods for multiple
choice, completions for generative tasks), score every example with the task's scorer,
aggregate (mean and its standard error; pass@k with the unbiased estimator), and record
everything per example. Output folder (`cfg.out`):

- results.json: {"model": {path, sha256, backend}, "config": {...}, "sandbox": {...},
  "tasks": {name: {"metrics": {m: {"value", "stderr"}}, "n", "num_fewshot", "seconds",
  "contamination"}}};
- samples/<task>.jsonl: one row per example (id, target, per-choice log-likelihoods or the
  completions, and its scores);
- report.md with PNG charts (report.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen25.errors import UserError
from qwen25.eval.tasks import PROBES, get_task
from qwen25.eval.tasks.base import GenExample, MCExample, mc_metrics, mean_stderr


@dataclass(frozen=True)
class EvalConfig:
    """`qwen25 eval run`: what to evaluate and how."""

    tasks: tuple[str, ...] = ("arc_easy",)  # task names (see `qwen25 eval run --help`)
    limit: int | None = None  # first N examples of each task (None: all)
    num_fewshot: int | None = None  # few-shot examples in the prompt (None: the task's default)
    chat: bool = False  # prompts through the chat template (instruct models)
    samples: int = 1  # completions per generative prompt; pass@k is reported for k <= samples
    temperature: float = 0.0  # 0 = greedy; use > 0 with samples > 1
    max_new_tokens: int | None = None  # cap on generated tokens (None: the task's own)
    seed: int = 0  # sampling seed (sample i of prompt j uses seed + j)
    out: str = "runs/eval"  # folder for results.json, samples/, report.md and charts
    train_data: tuple[str, ...] = ()  # training texts for the contamination column

    def validate(self) -> None:
        if not self.tasks:
            raise UserError("no tasks given; pass --tasks, e.g. --tasks arc_easy,gsm8k")
        for name in self.tasks:
            if name not in PROBES:
                get_task(name)  # unknown names fail here, before any model work
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit {self.limit}: give a positive number of examples (or omit it for all)")
        if self.samples < 1:
            raise UserError("--samples must be at least 1")
        if self.samples > 1 and self.temperature <= 0:
            raise UserError("--samples > 1 with greedy decoding repeats one answer; set --temperature > 0")
        if self.temperature < 0:
            raise UserError("--temperature must be >= 0")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise UserError("--num-fewshot must be >= 0")


def _aggregate(per_example: list[dict[str, float]], names) -> dict[str, dict]:
    out = {}
    for m in names:
        vals = [s[m] for s in per_example if m in s]
        if vals:
            out[m] = {"value": sum(vals) / len(vals), "stderr": mean_stderr(vals)}
    return out


def _run_mc(backend, task, examples: list[MCExample], chat: bool, rows: list[dict]) -> list[dict]:
    pairs, owner = [], []
    for e_i, ex in enumerate(examples):
        for ctx, cont in zip(ex.contexts, ex.continuations):
            if chat:
                ctx, cont = backend.chat_text([{"role": "user", "content": ctx.strip()}]), cont.lstrip()
            pairs.append((ctx, cont))
            owner.append(e_i)
    lls = backend.loglik(pairs, chat=chat)
    per_ex: list[list] = [[] for _ in examples]
    for e_i, ll in zip(owner, lls):
        per_ex[e_i].append(ll)
    scores = []
    for ex, ll in zip(examples, per_ex):
        s = mc_metrics([x.logprob for x in ll], ex)
        scores.append(s)
        rows.append({"id": ex.id, "gold": ex.gold, "logliks": [x.logprob for x in ll],
                     "greedy": [x.greedy for x in ll], "tokens": [x.tokens for x in ll], **s})
    return scores


def _run_gen(backend, task, examples: list[GenExample], cfg: EvalConfig, rows: list[dict]) -> list[dict]:
    from qwen25.eval.tasks.code import pass_at_ks

    by_budget: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        budget = min(ex.max_new_tokens, cfg.max_new_tokens or ex.max_new_tokens)
        by_budget.setdefault((budget, ex.stop), []).append(i)
    completions: list[list[str]] = [[] for _ in examples]
    for (budget, stop), idx in by_budget.items():
        prompts = [examples[i].messages if cfg.chat else examples[i].prompt for i in idx]
        outs = backend.generate(prompts, () if cfg.chat else stop, budget, n=cfg.samples,
                                temperature=cfg.temperature, seed=cfg.seed, chat=cfg.chat)
        for i, o in zip(idx, outs):
            completions[i] = o
    scores, passed = [], []
    for ex, outs in zip(examples, completions):
        each = [task.score(c, ex) for c in outs]
        s = {m: sum(e[m] for e in each) / len(each) for m in each[0]}
        passed.append([e.get("pass@1", 0.0) == 1.0 for e in each])
        scores.append(s)
        rows.append({"id": ex.id, "target": ex.target if isinstance(ex.target, (str, int, float)) else None,
                     "completions": outs, "scores": each, **s})
    if "pass@1" in task.metrics and cfg.samples > 1:
        return scores + [{"__passk__": pass_at_ks(passed, (1, 5, 10, 100))}]
    return scores


def _contamination(examples, train_data) -> dict:
    from qwen25.eval.contamination import NGRAM, contaminated, item_text, training_texts

    flags = contaminated([item_text(e) for e in examples], training_texts(train_data))
    return {"ngram": NGRAM, "items": sum(flags), "fraction": sum(flags) / max(1, len(flags)),
            "ids": [e.id for e, f in zip(examples, flags) if f][:50]}


def run_task(backend, name: str, cfg: EvalConfig, progress=None) -> tuple[dict, list[dict]]:
    """Evaluate one task; returns (its results entry, per-sample rows)."""
    if name in PROBES:
        from qwen25.eval.probes import run_probe

        return run_probe(backend, name, cfg)
    task = get_task(name)
    examples = task.examples(cfg.num_fewshot)
    if cfg.limit is not None:
        examples = examples[:cfg.limit]
    if cfg.chat:
        backend.check_chat()
    start = time.monotonic()
    rows: list[dict] = []
    if task.kind == "mc":
        scores = _run_mc(backend, task, examples, cfg.chat, rows)
    else:
        scores = _run_gen(backend, task, examples, cfg, rows)
    extra = {}
    if scores and "__passk__" in scores[-1]:
        extra = scores.pop()["__passk__"]
    entry = {"metrics": _aggregate(scores, task.metrics), "primary": task.metrics[0], "n": len(examples),
             "num_fewshot": task.default_fewshot if cfg.num_fewshot is None else cfg.num_fewshot,
             "seconds": time.monotonic() - start, "kind": task.kind, "description": task.description}
    for k, v in extra.items():
        entry["metrics"][k] = {"value": v, "stderr": None}
    unscored = sum(1 for sc in scores if task.metrics[0] not in sc)
    if unscored:  # items the task's scorer cannot judge on this machine (IFBench offline)
        entry["n_scored"] = len(scores) - unscored
    if cfg.train_data:
        entry["contamination"] = _contamination(examples, cfg.train_data)
    return entry, rows


def run_eval(backend, cfg: EvalConfig, model_info: dict, progress: bool = True) -> dict:
    """Run every task of `cfg` on `backend`; write results.json, samples/ and report.md."""
    cfg.validate()
    out = Path(cfg.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    results = {"model": model_info, "config": asdict(cfg), "tasks": {}}
    if any(n in ("humaneval", "mbpp") for n in cfg.tasks):
        from qwen25.eval.sandbox import isolation

        results["sandbox"] = isolation()
    for name in cfg.tasks:
        entry, rows = run_task(backend, name, cfg)
        results["tasks"][name] = entry
        _write_jsonl(out / "samples" / f"{name}.jsonl", rows)
        if progress:
            m = entry["metrics"].get(entry["primary"], {})
            print(f"{name}: {entry['primary']} = {m.get('value', float('nan')):.4f} "
                  f"(n={entry['n']}, {entry['seconds']:.1f} s)", flush=True)
    _write_json(out / "results.json", results)
    from qwen25.eval.report import write_report

    write_report(results, out)
    return results


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    tmp.replace(path)


def load_results(path: str | Path) -> dict:
    """A results.json (or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"{p} not found; give a results.json or the folder `qwen25 eval run` wrote")
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is not valid JSON; rerun `qwen25 eval run`") from None

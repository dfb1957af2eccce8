"""Long-context retrieval probes: passkey retrieval and needle-in-a-haystack.

Both hide a number in `length` tokens of filler at a relative `depth` (0 = right after the
instruction, 1 = just before the question) and ask for it back at the end:

- passkey (Mohtashami & Jaggi 2023): a five-digit key in repetitive filler; the needle
  states the key twice. The instruction says what to look for.
- needle: a key-value fact ("the magic number for <word> is <7 digits>") in real prose
  (default: Shakespeare), optionally among `distractors` facts about other words; the
  question names the word (RULER's multi-key needle, without a judge model).

Every probe is exactly `length` tokens: the filler is cut to fit around the instruction, the
needle(s) and the question. Prompts come from a seeded RNG per (length, depth, trial), so
two models, or one model with and without YaRN/DCA, see the same prompts.

Scoring, per probe:
- exact: greedy generation; the first run of digits in the output equals the number;
- ll (log-likelihood, informative for tiny models): with the true answer fed in, is each of
  its tokens the argmax (`ll_exact` when all are, `token_acc` the fraction that are), and
  the answer's total log-probability.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from qwen25.errors import UserError
from qwen25.files import atomic_write

TASKS = ("passkey", "needle")
SCORINGS = ("exact", "ll", "both")
_KEYS = ("amber", "falcon", "harbour", "lantern", "meadow", "orchid", "pepper", "quartz", "raven",
         "saddle", "thimble", "velvet", "walnut", "willow", "cobalt", "juniper", "marble", "nutmeg")


@dataclass(frozen=True)
class Probe:
    """One prompt with a number to retrieve."""

    task: str
    length: int  # prompt tokens
    depth: float  # relative position of the needle in the filler, 0..1
    trial: int
    prompt: list[int] = field(repr=False)
    answer: str  # the digits the model must produce
    answer_ids: list[int] = field(repr=False)  # the expected continuation, tokenised


@dataclass
class ProbeResult:
    task: str
    length: int
    depth: float
    trial: int
    answer: str
    output: str | None = None  # greedy text (exact scoring)
    exact: bool | None = None
    ll_exact: bool | None = None
    token_acc: float | None = None
    logprob: float | None = None  # log p(answer tokens | prompt), nats

    def correct(self, scoring: str) -> bool | None:
        return self.exact if scoring == "exact" else self.ll_exact


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


def _passkey_parts(rng: random.Random) -> tuple[str, list[str], str, str]:
    key = str(rng.randrange(10_000, 100_000))
    intro = "There is a pass key hidden in the text below. Remember it.\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    return intro, [needle], question, key


def _needle_parts(rng: random.Random, distractors: int) -> tuple[str, list[str], str, str]:
    keys = rng.sample(_KEYS, 1 + distractors)
    values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
    intro = "Some magic numbers are hidden in the text below. Memorise them.\n"
    needles = [f" The magic number for {k} is {v}. " for k, v in zip(keys, values)]
    question = f"\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is"
    return intro, needles, question, values[0]


def make_probe(task: str, tokenizer, pool, length: int, depth: float, trial: int, seed: int = 0,
               distractors: int = 0) -> Probe:
    """A probe of exactly `length` tokens; needle 0 (the asked one) sits at `depth`."""
    rng = random.Random(f"{task}:{seed}:{length}:{depth:.6f}:{trial}")
    if task == "passkey":
        intro, needles, question, answer = _passkey_parts(rng)
    elif task == "needle":
        intro, needles, question, answer = _needle_parts(rng, distractors)
    else:
        raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    intro_ids, q_ids = tokenizer.encode(intro), tokenizer.encode(question)
    needle_ids = [tokenizer.encode(n) for n in needles]
    fixed = len(intro_ids) + len(q_ids) + sum(map(len, needle_ids))
    n_filler = length - fixed
    if n_filler < 0:
        raise UserError(f"length {length} is too short for the {task} template ({fixed} tokens "
                        "without filler); use longer --lengths")
    filler = pool.window(n_filler, rng)
    # The asked needle at `depth`, distractors at random depths; insert deepest first so
    # earlier cut points stay valid.
    cuts = [round(depth * n_filler)] + [rng.randint(0, n_filler) for _ in needle_ids[1:]]
    body = list(filler)
    for cut, ids in sorted(zip(cuts, needle_ids), key=lambda c: -c[0]):
        body[cut:cut] = ids
    prompt = intro_ids + body + q_ids
    assert len(prompt) == length
    return Probe(task, length, depth, trial, prompt, answer, tokenizer.encode(" " + answer))


def make_probes(task: str, tokenizer, pool, lengths: Sequence[int], depths: Sequence[float],
                trials: int, seed: int = 0, distractors: int = 0) -> list[Probe]:
    return [make_probe(task, tokenizer, pool, n, d, t, seed, distractors)
            for n in lengths for d in depths for t in range(trials)]


# --------------------------------------------------------------------------------------
# Running and scoring
# --------------------------------------------------------------------------------------


def first_number(text: str) -> str | None:
    """The first run of digits in `text` (None when there is none)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def run_probes(engine, tokenizer, probes: Sequence[Probe], scoring: str = "exact",
               progress: bool = True) -> list[ProbeResult]:
    """Score every probe with the engine (greedy; no sampling anywhere).

    Generation runs the probes through the engine's continuous batching, as many at once
    as it has slots; log-likelihood scoring is one forward per probe.
    """
    from tqdm import tqdm

    if scoring not in SCORINGS:
        raise UserError(f"scoring={scoring!r}; use one of {', '.join(SCORINGS)}")
    longest = max(p.length + len(p.answer_ids) + 2 for p in probes)
    if longest > engine.max_seq_len:
        raise UserError(f"the longest probe needs {longest} positions but the engine holds "
                        f"max_seq_len={engine.max_seq_len}")
    results = [ProbeResult(p.task, p.length, p.depth, p.trial, p.answer) for p in probes]
    bar = tqdm(total=len(probes) * (2 if scoring == "both" else 1), disable=not progress,
               desc="probes", unit="probe")
    if scoring in ("exact", "both"):
        # Keep the engine's slots full without queueing every long prompt at once.
        from qwen25.engine import SamplingParams
        from qwen25.engine.dispatch import Dispatcher

        dispatcher = Dispatcher(engine, tokenizer)
        queue = list(enumerate(probes))
        running: dict[int, object] = {}
        while queue or running:
            while queue and len(running) < engine.max_batch_size:
                i, p = queue.pop(0)
                params = SamplingParams(max_new_tokens=len(p.answer_ids) + 2, temperature=0.0, stop_token_ids=())
                running[i] = dispatcher.submit(p.prompt, params, skip_special_tokens=False)
            dispatcher.step()
            for i, sub in list(running.items()):
                if sub.finished:
                    results[i].output = sub.text(0)
                    results[i].exact = first_number(sub.text(0)) == probes[i].answer
                    del running[i]
                    bar.update()
    if scoring in ("ll", "both"):
        for p, r in zip(probes, results):
            score = engine.score(p.prompt, p.answer_ids)
            r.ll_exact = score.is_greedy
            r.token_acc = sum(score.greedy) / len(score.greedy)
            r.logprob = score.total
            bar.update()
    bar.close()
    return results


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------


def accuracy_grid(results: Sequence[ProbeResult], scoring: str) -> dict[tuple[int, float], float]:
    """Mean accuracy per (length, depth) cell for `scoring` ("exact" or "ll")."""
    cells: dict[tuple[int, float], list[bool]] = {}
    for r in results:
        ok = r.correct(scoring)
        if ok is not None:
            cells.setdefault((r.length, r.depth), []).append(ok)
    return {k: sum(v) / len(v) for k, v in cells.items()}


def accuracy_by_length(results: Sequence[ProbeResult], scoring: str) -> dict[int, float]:
    per: dict[int, list[bool]] = {}
    for r in results:
        ok = r.correct(scoring)
        if ok is not None:
            per.setdefault(r.length, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(per.items())}


def summary(results: Sequence[ProbeResult]) -> dict:
    """JSON-ready: the records and, per scoring that ran, the grid and per-length accuracy."""
    out: dict = {"records": [asdict(r) for r in results]}
    for scoring in ("exact", "ll"):
        grid = accuracy_grid(results, scoring)
        if grid:
            out[scoring] = {"by_length": {str(k): v for k, v in accuracy_by_length(results, scoring).items()},
                            "grid": [{"length": n, "depth": d, "accuracy": a}
                                     for (n, d), a in sorted(grid.items())]}
    acc = [r.token_acc for r in results if r.token_acc is not None]
    if acc:
        out["mean_token_acc"] = sum(acc) / len(acc)
    return out


def markdown_grid(grid: dict[tuple[int, float], float], title: str) -> str:
    """Depths as rows, lengths as columns, accuracy in %; a last row averages the depths."""
    lengths = sorted({n for n, _ in grid})
    depths = sorted({d for _, d in grid})
    lines = [f"**{title}**", "", "| depth | " + " | ".join(str(n) for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for d in depths:
        cells = [f"{100 * grid[(n, d)]:.0f}" if (n, d) in grid else "" for n in lengths]
        lines.append(f"| {d:g} | " + " | ".join(cells) + " |")
    means = []
    for n in lengths:
        vals = [grid[(n, d)] for d in depths if (n, d) in grid]
        means.append(f"{100 * sum(vals) / len(vals):.0f}" if vals else "")
    lines.append("| **all** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def heatmap(grid: dict[tuple[int, float], float], path, title: str) -> None:
    """PNG heat map: depth (rows) x length (columns), accuracy 0..100%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for n, _ in grid})
    depths = sorted({d for _, d in grid})
    data = [[100 * grid.get((n, d), float("nan")) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(data):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# The whole evaluation: config, run, report files
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeConfig:
    """`qwen25 eval passkey|needle`: what to probe and where to write the results."""

    lengths: tuple[int, ...] = (4096, 8192, 16384, 32768)  # prompt lengths, in tokens
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle position in the filler: 0 start, 1 end
    trials: int = 2  # prompts per (length, depth) cell, each with its own number and filler
    scoring: str = "exact"  # exact (greedy digits), ll (answer tokens are the argmax), or both
    filler: str = ""  # generated, shakespeare, milton, or a text file/folder ("": the task's default)
    distractors: int = 0  # needle only: facts about other words hidden in the same text
    seed: int = 0  # picks numbers, filler windows and distractor places
    batch_size: int = 4  # probes decoded at once (engine slots)
    out: str = "runs/eval"  # folder for <task>.json, <task>.md and <task>_<scoring>.png

    def validate(self, task: str) -> None:
        if task not in TASKS:
            raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        if not self.lengths or any(n < 8 for n in self.lengths):
            raise UserError(f"lengths={list(self.lengths)}: give prompt lengths of at least 8 tokens")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise UserError(f"depths={list(self.depths)}: give depths between 0 and 1")
        if self.trials < 1 or self.batch_size < 1:
            raise UserError("trials and batch_size must be at least 1")
        if self.scoring not in SCORINGS:
            raise UserError(f"scoring={self.scoring!r}; use one of {', '.join(SCORINGS)}")
        if self.distractors and task != "needle":
            raise UserError("distractors apply to the needle task only")
        if not 0 <= self.distractors < len(_KEYS):
            raise UserError(f"distractors={self.distractors} must be in [0, {len(_KEYS) - 1}]")


DEFAULT_FILLER = {"passkey": "generated", "needle": "shakespeare"}


def evaluate_retrieval(model, tokenizer, task: str, cfg: ProbeConfig, progress: bool = True,
                       engine=None) -> dict:
    """Build the probes, run them on `model` (as configured: YaRN/DCA included), summarise.

    Returns `summary(results)` plus the settings under "settings". `engine` may be given
    (it must hold max(lengths) + a few positions); by default one is built for the run.
    """
    from qwen25.engine import Engine
    from qwen25.eval.filler import filler_pool
    from qwen25.model.context import context_limit

    cfg.validate(task)
    filler = cfg.filler or DEFAULT_FILLER[task]
    longest = max(cfg.lengths)
    pool = filler_pool(tokenizer, filler, min_tokens=2 * longest + 4096, seed=cfg.seed)
    probes = make_probes(task, tokenizer, pool, sorted(cfg.lengths), sorted(cfg.depths), cfg.trials,
                         cfg.seed, cfg.distractors)
    if engine is None:
        engine = Engine(model, max_batch_size=cfg.batch_size,
                        max_seq_len=longest + max(len(p.answer_ids) for p in probes) + 2)
    results = run_probes(engine, tokenizer, probes, cfg.scoring, progress)
    out = summary(results)
    out["settings"] = {"task": task, **asdict(cfg), "filler": filler,
                       "context_limit": context_limit(model.config),
                       "rope_scaling": model.config.rope_scaling.to_hf() if model.config.rope_scaling else None,
                       "dual_chunk_attention": (model.config.dual_chunk_attention.to_hf()
                                                if model.config.dual_chunk_attention else None)}
    return out


def write_report(result: dict, out_dir, task: str, title: str) -> list:
    """<task>.json, <task>.md and one heat map per scoring that ran; returns the paths."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_write_atomic(out / f"{task}.json", json.dumps(result, indent=1))]
    sections = [f"# {task}: {title}", ""]
    for scoring in ("exact", "ll"):
        if scoring not in result:
            continue
        grid = {(g["length"], g["depth"]): g["accuracy"] for g in result[scoring]["grid"]}
        name = "greedy exact match" if scoring == "exact" else "answer is the argmax continuation"
        sections += [markdown_grid(grid, f"{name} (% of probes)"), ""]
        png = out / f"{task}_{scoring}.png"
        heatmap(grid, png, f"{task} ({name}): {title}")
        paths.append(png)
    if "mean_token_acc" in result:
        sections.append(f"mean answer-token accuracy: {100 * result['mean_token_acc']:.1f}%")
    paths.insert(1, _write_atomic(out / f"{task}.md", "\n".join(sections) + "\n"))
    return paths


def _write_atomic(path, text: str):
    return atomic_write(path, text)

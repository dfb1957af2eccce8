"""`qwen25 reward score`: a jsonl of conversations in, the same rows with a "score" out.

Rows are tokenised exactly like one side of a training pair (`conversation_ids`), so a
score here is the number the reward model was trained to produce; rows that cannot be read
(malformed, empty, too long, ids outside the vocabulary) are skipped and counted, never
guessed at. Scoring runs in length-sorted batches (`score_batches`), whose results do not
depend on the batch size (the head reads the last real token through the attention mask).
The output is written to a temporary file and renamed, so a killed run leaves no half file.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from qwen25.data.preference import PairError, conversation_ids, read_rows
from qwen25.errors import UserError
from qwen25.files import atomic_write
from qwen25.train.pair_stage import load_stage_tokenizer
from qwen25.train.reward_model import load_reward_model, score_batches


def score_file(model_dir: str, data: str, out: str, *, tokenizer: str | None = None, batch_size: int = 8,
               max_length: int = 4096, device: str = "cpu") -> dict:
    """Score every readable row of `data` into `out`; returns counts."""
    if batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    model = load_reward_model(model_dir, device=device)
    tok = load_stage_tokenizer(model_dir, tokenizer)
    vocab = model.config.vocab_size
    rows, seqs, stats = [], [], {"rows": 0, "scored": 0, "skipped": 0, "first_skip": None}
    for n, row in read_rows(data):
        stats["rows"] += 1
        try:
            if isinstance(row, PairError):
                raise row
            ids = conversation_ids(tok, row)
            if len(ids) > max_length:
                raise PairError("too_long", f"{len(ids)} tokens > --max-length {max_length}")
            if max(ids) >= vocab:
                raise PairError("vocab", f"token id {max(ids)} >= the model's vocabulary of {vocab}")
        except PairError as e:
            stats["skipped"] += 1
            stats["first_skip"] = stats["first_skip"] or f"line {n}: {e}"
            continue
        rows.append(row)
        seqs.append(ids)
    if not seqs:
        raise UserError(f"{data} has no row to score ({stats['first_skip'] or 'the file is empty'})")
    with tqdm(total=len(seqs), unit="seq", desc="scoring") as bar:
        scores = score_batches(model, seqs, batch_size, progress=bar.update)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(row | {"score": s}, ensure_ascii=False) + "\n"
                               for row, s in zip(rows, scores)))
    stats["scored"] = len(scores)
    return stats


def load_reward_scorer(model_dir: str, *, tokenizer: str | None = None, device: str = "cpu",
                       max_length: int = 4096):
    """A GRPO reward `fn(prompt, completion, example) -> float` backed by a trained reward model.

    The query's chat messages (`example.messages`) and the completion as one assistant turn
    are tokenised exactly as one side of a training pair (`conversation_ids`), so the value
    is the score the model was trained to produce. An empty completion (the policy ended its
    turn at once) is scored as the empty assistant turn the template renders: it is an answer
    the policy gave and should be ranked, not dropped. A completion the model cannot read
    (too long, ids outside its vocabulary) raises, which GRPO counts and drops.
    """
    import torch

    model = load_reward_model(model_dir, device=device).eval()
    tok = load_stage_tokenizer(model_dir, tokenizer)
    vocab = model.config.vocab_size

    def score(prompt: str, completion: str, example) -> float:
        messages = list(getattr(example, "messages", None) or [{"role": "user", "content": prompt}])
        reply = [{"role": "assistant", "content": completion}]
        if completion:
            ids = conversation_ids(tok, {"prompt": messages, "completion": reply})
        else:  # training pairs never hold an empty side, so conversation_ids refuses one
            ids = tok.apply_chat_template(messages + reply)
            ids = ids[:len(ids) - ids[::-1].index(tok.token_to_id("<|im_end|>"))]  # through <|im_end|>
        if len(ids) > max_length or max(ids) >= vocab:
            raise PairError("too_long" if len(ids) > max_length else "vocab", "the reward model cannot score this")
        with torch.no_grad():
            return score_batches(model, [ids], 1)[0]

    return score

"""Preference pairs: `{prompt, chosen, rejected}` jsonl -> token ids -> padded batches.

Accepted rows (the forms TRL documents, so datasets users already have load unchanged):

- standard: `{"prompt": str, "chosen": str, "rejected": str}`: raw text, no template. The
  prompt and each response are encoded *separately* and concatenated, and the responses
  end with EOS, so no BPE merge can join prompt and answer (TRL encodes prompt+answer
  together and cuts where the ids diverge, trl#2054).
- conversational: `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`,
  the responses being the assistant turn(s) that follow the prompt. The prompt renders with
  the chat template and a generation prompt; prompt + response renders as one conversation,
  whose first tokens must be exactly the prompt's (otherwise the template renders the prompt
  differently alone, and the pair is dropped as a template mismatch). Response tokens count
  where the template's assistant mask is 1 (the reply and its `<|im_end|>`; tool results
  inside a multi-turn response are context, not targets); the `\\n` the template adds after
  the final `<|im_end|>` is never generated and is cut off.
- implicit prompt: `{"chosen": [messages], "rejected": [messages]}`: the prompt is the
  longest common prefix of the two conversations (it must end before an assistant turn).

Other keys (provenance from `qwen25 pairs build`, ids, scores) ride along untouched in
`PreferencePair.meta`.

Bad rows never stop a load: each is dropped and counted by reason (`PairStats`), so a user
sees "dropped 12: 7 identical chosen/rejected, 5 empty response" and can decide. An
unreadable file, or a file with no usable pair, is a `UserError`.

Batches (`collate_pairs`): the chosen sequences of the B pairs, then their rejected ones,
right-padded into one [2B, T] tensor, so one forward pass scores both sides; `labels` are
already shifted (labels[b, t] is the token after input t) and IGNORE_INDEX on the prompt and
padding. Right padding needs no attention mask in a causal model: every real token only
attends to earlier, real tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwen25.chat.template import ChatError
from qwen25.errors import UserError

if TYPE_CHECKING:
    from qwen25.tokenizer import Tokenizer

IGNORE_INDEX = -100

# reason -> how it reads in the summary line
DROP_REASONS = {
    "malformed": "malformed row",
    "empty": "empty response",
    "identical": "identical chosen/rejected",
    "template": "prompt does not match the chat template",
    "too_long": "longer than max_length",
    "vocab": "token ids outside the model's vocabulary",
}


class PairError(ValueError):
    """Why one row cannot become a pair; `reason` is a key of DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens after the prompt
    rejected_ids: list[int]
    chosen_mask: list[int]  # 1 where a response token is a target (same length as chosen_ids)
    rejected_mask: list[int]
    meta: dict = field(default_factory=dict)  # the row's other keys (provenance)


@dataclass
class PairStats:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> first "line N: detail"

    def summary(self) -> str:
        if not self.dropped:
            return f"{self.kept} pairs from {self.rows} rows"
        parts = ", ".join(f"{n} {DROP_REASONS[r]}" for r, n in self.dropped.most_common())
        return f"{self.kept} pairs from {self.rows} rows; dropped {sum(self.dropped.values())}: {parts}"

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
                "examples": dict(self.examples)}


# --------------------------------------------------------------------------------------
# One row -> one pair
# --------------------------------------------------------------------------------------


def _is_messages(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m for m in x)


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1].get("role") == "assistant":
        n -= 1  # the shared prefix may include identical assistant turns; responses start at one
    if n == 0:
        raise PairError("malformed", "chosen and rejected share no prompt messages")
    return chosen[:n], chosen[n:], rejected[n:]


def encode_pair(tokenizer: Tokenizer, row: Any, max_length: int | None = None,
                vocab_size: int | None = None) -> PreferencePair:
    """Token ids of one row (any accepted form); raises PairError with a reason."""
    if not isinstance(row, dict):
        raise PairError("malformed", f"a row must be a JSON object, not {type(row).__name__}")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    prompt = row.get("prompt")
    if chosen is None or rejected is None:
        raise PairError("malformed", "a row needs 'chosen' and 'rejected'")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    if prompt is None and _is_messages(chosen) and _is_messages(rejected):
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    p, c, cm = encode_response(tokenizer, prompt, chosen)
    _, r, rm = encode_response(tokenizer, prompt, rejected)
    pair = PreferencePair(p, c, r, cm, rm, meta)
    if pair.chosen_ids == pair.rejected_ids:
        raise PairError("identical", "chosen and rejected are the same tokens")
    longest = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
    if max_length is not None and longest > max_length:
        raise PairError("too_long", f"{longest} tokens > max_length {max_length}")
    if vocab_size is not None:
        top = max(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
        if top >= vocab_size:
            raise PairError("vocab", f"token id {top} >= the model's vocabulary of {vocab_size}")
    return pair


def encode_response(tokenizer, prompt: str | list, response: str | list) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response target mask) of one side of a pair: raw text
    (`str` prompt and response; EOS appended) or messages (the chat template). PairError
    ("empty", "template", "malformed") when it cannot be built."""
    if isinstance(prompt, str) and isinstance(response, str):
        if not response.strip():
            raise PairError("empty", "a response is empty")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise PairError("malformed", "text pairs need a tokenizer with an EOS token")
        ids = tokenizer.encode(response) + [eos]
        return tokenizer.encode(prompt), ids, [1] * len(ids)
    if not (_is_messages(prompt) and _is_messages(response)):
        raise PairError("malformed", "prompt and response must both be strings or both be lists of "
                                     "{role, content} messages")
    if not response or response[0].get("role") != "assistant":
        raise PairError("malformed", "a conversational response must start with an assistant turn")
    if not any(m.get("content") or m.get("tool_calls") for m in response if m.get("role") == "assistant"):
        raise PairError("empty", "a response has no assistant content")
    try:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        ids, mask = tokenizer.apply_chat_template(prompt + response, return_assistant_mask=True)
    except ChatError as e:
        raise PairError("malformed", str(e)) from None
    ids, mask = _response_after(tokenizer, prompt_ids, ids, mask)
    while mask and not mask[-1]:  # the template's newline after the last <|im_end|>
        ids, mask = ids[:-1], mask[:-1]
    if not any(mask):
        raise PairError("empty", "a response has no assistant tokens")
    return prompt_ids, ids, mask


def _response_after(tokenizer, prompt_ids: list[int], ids: list[int],
                    mask: list[int]) -> tuple[list[int], list[int]]:
    """The response tokens of a rendered conversation `ids` that starts with `prompt_ids`.

    When the reply begins with text that BPE merges with the end of the generation prompt
    (a reply starting with a newline: "assistant\\n" + "\\n..." encodes as one "\\n\\n"
    token), the conversation's tokens leave the prompt's mid-token. The model at inference
    sees the prompt's tokens and then generates, so the straddling plain-text tokens are
    re-encoded: the part that completes the prompt is dropped and the rest is encoded on its
    own. Anything else (a template that renders the prompt differently) is a mismatch.
    """
    n = len(prompt_ids)
    if ids[:n] == prompt_ids:
        return ids[n:], mask[n:]
    k = 0
    while k < min(n, len(ids)) and ids[k] == prompt_ids[k]:
        k += 1
    mismatch = PairError("template", "the prompt alone renders differently from the same turns "
                                     "followed by a reply")
    plain = tokenizer.num_regular_tokens
    tail = b"".join(tokenizer.id_to_bytes(t) for t in prompt_ids[k:])
    got, j = b"", k
    while len(got) < len(tail) and j < len(ids):
        got, j = got + tokenizer.id_to_bytes(ids[j]), j + 1
    if (not got.startswith(tail) or any(t >= plain for t in prompt_ids[k:] + ids[k:j])):
        raise mismatch
    try:
        rest = got[len(tail):].decode("utf-8")
    except UnicodeDecodeError:  # the merge split a character: not a clean token boundary
        raise mismatch from None
    head = tokenizer.encode(rest) if rest else []
    return head + ids[j:], [mask[j - 1]] * len(head) + mask[j:]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or the PairError for that line) for each non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"preference data {p} does not exist; pass a .jsonl file of "
                        "{prompt, chosen, rejected} rows (qwen25 pairs build writes one)")
    try:
        with p.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, PairError("malformed", f"not JSON ({e.msg})")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text; preference data must be jsonl") from None


def load_pairs(path: str | Path, tokenizer: Tokenizer, max_length: int | None = None,
               vocab_size: int | None = None) -> tuple[list[PreferencePair], PairStats]:
    """Every usable pair of a jsonl file, and the counts of what was dropped and why."""
    pairs, stats = [], PairStats()
    for n, row in read_rows(path):
        stats.rows += 1
        try:
            if isinstance(row, PairError):
                raise row
            pairs.append(encode_pair(tokenizer, row, max_length, vocab_size))
            stats.kept += 1
        except PairError as e:
            stats.dropped[e.reason] += 1
            stats.examples.setdefault(e.reason, f"line {n}: {e}")
    if not pairs:
        hint = "; ".join(stats.examples.values()) or "the file is empty"
        raise UserError(f"{path} has no usable preference pair ({stats.summary()}; {hint})")
    return pairs, stats


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def _sequence(prompt: list[int], response: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(input ids, shifted labels) of prompt + response: label t is token t+1 where it is a target."""
    ids = prompt + response
    target = [0] * len(prompt) + mask
    labels = [ids[t + 1] if target[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


def collate_pairs(pairs: list[PreferencePair], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels", "attention_mask"} int64 [2B, T]: rows 0..B-1 chosen, B..2B-1 rejected."""
    seqs = [_sequence(p.prompt_ids, p.chosen_ids, p.chosen_mask) for p in pairs]
    seqs += [_sequence(p.prompt_ids, p.rejected_ids, p.rejected_mask) for p in pairs]
    T = max(len(ids) for ids, _ in seqs)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (ids, lab) in enumerate(seqs):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def collate_shared_prompt(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per pair, [prompt | chosen | rejected], the prompt computed once for both.

    The rejected tokens take the positions that follow the prompt (as chosen's do) and the
    mask hides chosen from them, so every token sees exactly what it sees in its own
    sequence: the same scores as `collate_pairs` rows to float rounding, with the prompt's
    tokens run once instead of twice. Returns {"input_ids", "positions" [B, T] int64,
    "attention_mask" [B, 1, T, T] bool, "chosen_last", "rejected_last" [B] (the index of
    each response's last token)}.
    """
    B = len(pairs)
    T = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 pad
    chosen_last, rejected_last = [], []
    for i, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        ids[i, :P + C + R] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        positions[i, :P + C] = torch.arange(P + C)
        positions[i, P + C:P + C + R] = torch.arange(P, P + R)
        segment[i, :P], segment[i, P:P + C], segment[i, P + C:P + C + R] = 0, 1, 2
        chosen_last.append(P + C - 1)
        rejected_last.append(P + C + R - 1)
    t = torch.arange(T)
    q, k = segment[:, :, None], segment[:, None, :]
    mask = (t[:, None] >= t[None, :]) & ~((q == 2) & (k == 1)) & (k != 3)
    mask |= torch.eye(T, dtype=torch.bool)  # a pad query sees itself (no empty softmax row)
    return {"input_ids": ids, "positions": positions, "attention_mask": mask[:, None],
            "chosen_last": torch.tensor(chosen_last), "rejected_last": torch.tensor(rejected_last)}


# --------------------------------------------------------------------------------------
# Which pairs each step trains on
# --------------------------------------------------------------------------------------


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of n pairs: a seeded shuffle, the first
    round(fraction * n) held out (at least 1 when fraction > 0 and n > 1)."""
    import random

    order = list(range(n))
    random.Random(f"heldout:{seed}").shuffle(order)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full global batches per epoch (a last partial batch is left for the next epoch's
    shuffle: every step then weighs the same number of pairs)."""
    return n_train // batch_size


def step_pairs(train: list[int], step: int, batch_size: int, seed: int, rank: int = 0,
               world_size: int = 1) -> list[int]:
    """The pair indices this rank trains on at optimizer step `step` (0-based).

    Epoch e visits `train` in the order of `random.Random(f"pairs:{seed}:{e}")`; step s takes
    the s-th block of `batch_size` of it, and rank r its r-th equal share. A pure function of
    the step: resuming needs no data-loader state."""
    import random

    per_epoch = steps_per_epoch(len(train), batch_size)
    if per_epoch == 0:
        raise UserError(f"batch_size {batch_size} is larger than the {len(train)} training pairs; "
                        "lower --batch-size")
    if batch_size % world_size:
        raise UserError(f"batch_size {batch_size} must be divisible by the {world_size} processes")
    epoch, k = divmod(step, per_epoch)
    order = list(train)
    random.Random(f"pairs:{seed}:{epoch}").shuffle(order)
    block = order[k * batch_size:(k + 1) * batch_size]
    share = batch_size // world_size
    return block[rank * share:(rank + 1) * share]


# --------------------------------------------------------------------------------------
# One conversation to score (reward models)
# --------------------------------------------------------------------------------------


def conversation_ids(tokenizer: Tokenizer, row: Any) -> list[int]:
    """The token ids a reward model scores for one row, built exactly as one side of a pair:
    `{"messages": [...]}` (the turns after the last user turn are the response),
    `{"prompt": [...], "completion": [...]}` or `{"prompt": str, "completion": str}`.
    PairError for anything else."""
    if not isinstance(row, dict):
        raise PairError("malformed", f"a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not _is_messages(msgs) or not msgs or msgs[-1].get("role") != "assistant":
            raise PairError("malformed", "'messages' must be {role, content} turns ending with an assistant turn")
        k = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1) + 1
        prompt, response = msgs[:k], msgs[k:]
    elif "prompt" in row and "completion" in row:
        prompt, response = row["prompt"], row["completion"]
    else:
        raise PairError("malformed", "a row needs 'messages', or 'prompt' and 'completion'")
    p, r, _ = encode_response(tokenizer, prompt, response)
    return p + r

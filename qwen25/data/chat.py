"""Chat SFT data: conversations -> token rows whose loss covers exactly the assistant turns.

Input: jsonl, one example per line, in the formats TRL and OpenAI use:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
                   "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}, ...],
     "tools": [json schemas]}                                   conversational
    {"prompt": [messages], "completion": [messages], "tools": ...}  prompt / completion, chat
    {"prompt": "text", "completion": "text"}                      prompt / completion, plain text

Conversations are rendered with the tokenizer's chat template (Qwen2.5's, with its default
system prompt when none is given) by `qwen25.chat.encode_chat`, whose assistant mask marks
each reply's content, tool calls and closing `<|im_end|>` but not the `<|im_start|>assistant\\n`
header nor the newline after `<|im_end|>`. `train_on="last"` keeps only the last reply's
tokens (a prompt/completion row always trains on its completion). Plain-text rows are the
prompt's tokens, then the completion's and the tokenizer's eos, the loss on the latter two
(what TRL's `completion_only_loss` does).

Bad rows are not fatal one by one: each is skipped and reported with its line number and
reason (not JSON, unknown role, no assistant turn, tool-call arguments that are not a JSON
object, longer than the sequence length: dropped, not truncated, since a truncated reply
would lose the `<|im_end|>` that teaches the model to stop). More than `max_bad_fraction`
of the file bad, or nothing left, stops the run before training with a `UserError`.

An `Example` is one conversation as model input: `ids` and `labels` of equal length, where
`labels[t]` is the token the model should predict after `ids[t]` or -100 (`IGNORE_INDEX`).
Batching lives in `qwen25.data.chat_batches`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen25.chat import ChatError, encode_chat
from qwen25.errors import UserError

if TYPE_CHECKING:
    from qwen25.tokenizer import Tokenizer

IGNORE_INDEX = -100
TRAIN_ON = ("all", "last")


class BadRow(ValueError):
    """One example that cannot be trained on (the reason is the message)."""


@dataclass(frozen=True)
class Example:
    """One conversation, ready for the model: ids and next-token labels (-100: no loss)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    where: str = ""  # "file:line", for messages

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class LoadReport:
    """What reading a file kept and dropped."""

    rows: int = 0
    kept: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file:line, reason)
    too_long: list[tuple[str, int]] = field(default_factory=list)  # (file:line, tokens)

    def summary(self, limit: int = 5) -> str:
        parts = [f"{self.kept} of {self.rows} examples kept"]
        if self.bad:
            shown = "; ".join(f"{w}: {r}" for w, r in self.bad[:limit])
            more = f" (+{len(self.bad) - limit} more)" if len(self.bad) > limit else ""
            parts.append(f"{len(self.bad)} malformed: {shown}{more}")
        if self.too_long:
            shown = ", ".join(f"{w} ({n} tokens)" for w, n in self.too_long[:limit])
            parts.append(f"{len(self.too_long)} longer than the sequence length dropped: {shown}")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Rows -> conversations
# --------------------------------------------------------------------------------------


def conversation(row: Any) -> tuple[list[dict], list | None, bool] | tuple[str, str]:
    """A row's (messages, tools, completion_only) or, for plain-text rows, (prompt, completion).
    Raises BadRow naming what is wrong."""
    if not isinstance(row, Mapping):
        raise BadRow(f"a row must be a JSON object, not {type(row).__name__}")
    tools = row.get("tools")
    if "messages" in row:
        messages, completion_only = row["messages"], False
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion
        if not (isinstance(prompt, list) and isinstance(completion, list)):
            raise BadRow("prompt and completion must both be strings or both lists of messages")
        messages, completion_only = [*prompt, *completion], True
        if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in completion):
            raise BadRow("the completion has no assistant message")
    else:
        raise BadRow(f"expected 'messages' or 'prompt' + 'completion' keys, got {sorted(row)[:6]}")
    check_messages(messages)
    return list(messages), tools, completion_only


def check_messages(messages: Any) -> None:
    """Roles known, an assistant turn present, tool-call arguments JSON objects (BadRow)."""
    from qwen25.chat.template import ROLES

    if not isinstance(messages, list) or not messages:
        raise BadRow("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise BadRow(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise BadRow(f"messages[{i}]: unknown role {m.get('role')!r} (use {', '.join(ROLES)})")
        for j, call in enumerate(m.get("tool_calls") or []):
            fn = call.get("function", call) if isinstance(call, Mapping) else None
            args = fn.get("arguments", {}) if isinstance(fn, Mapping) else None
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    raise BadRow(f"messages[{i}].tool_calls[{j}]: arguments are not valid JSON "
                                 f"({args[:40]!r})") from None
            if not isinstance(args, Mapping):
                raise BadRow(f"messages[{i}].tool_calls[{j}]: arguments must be a JSON object")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn: nothing to train on")


# --------------------------------------------------------------------------------------
# Conversations -> examples
# --------------------------------------------------------------------------------------


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """A chat tokenizer: ChatML control tokens (the mask needs them). UserError otherwise."""
    controls = {t.content for t in tokenizer.added_tokens}
    if not {"<|im_start|>", "<|im_end|>"} <= controls:
        raise UserError("the tokenizer has no chat template tokens (<|im_start|>, <|im_end|>); "
                        "SFT needs a Qwen2.5 (ChatML) tokenizer: pass --tokenizer with one")


def encode_example(tokenizer: Tokenizer, row: Any, train_on: str = "all", where: str = "") -> Example:
    """One row -> Example (BadRow when it cannot be trained on)."""
    conv = conversation(row)
    if len(conv) == 2:  # plain text
        prompt, completion = conv
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(completion) + [tokenizer.eos_token_id]
        ids, mask = p + c, [0] * len(p) + [1] * len(c)
    else:
        messages, tools, completion_only = conv
        try:
            ids, mask = encode_chat(tokenizer, messages, tools)
        except ChatError as e:
            raise BadRow(str(e)) from None
        if train_on == "last" or completion_only:
            mask = only_last_turns(mask, 1 if train_on == "last" else _turns(row["completion"]))
    if not any(mask[1:]):
        raise BadRow("the assistant turns render to no trainable token")
    return Example(tuple(ids), tuple(shifted_labels(ids, mask)), where)


def _turns(completion: list) -> int:
    return sum(1 for m in completion if isinstance(m, Mapping) and m.get("role") == "assistant")


def only_last_turns(mask: list[int], k: int) -> list[int]:
    """Keep the last `k` runs of 1s of an assistant mask (each run is one reply)."""
    runs = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
    if len(runs) <= k:
        return list(mask)
    start = runs[-k]
    return [0] * start + list(mask[start:])


def shifted_labels(ids: list[int], mask: list[int]) -> list[int]:
    """labels[t] = ids[t + 1] where that token is a target, else -100; the last has none."""
    return [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(file:line, parsed row or a BadRow) for every non-blank line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"SFT data {p} not found; give a .jsonl file of conversations or 'builtin'")
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{p.name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p.name}:{lineno}", BadRow(f"not valid JSON ({e.msg} at column {e.colno})")


def load_examples(rows: Iterable[tuple[str, Any]], tokenizer: Tokenizer, seq_len: int, train_on: str = "all",
                  max_bad_fraction: float = 0.01, what: str = "SFT data") -> tuple[list[Example], LoadReport]:
    """Encode every row; skip and report bad and over-long ones; UserError when too many are bad.

    seq_len: longest example kept (tokens); max_bad_fraction: share of malformed rows
    tolerated (over-long rows are counted apart: they are valid data, just too long).
    """
    if train_on not in TRAIN_ON:
        raise UserError(f"train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
    check_tokenizer(tokenizer)
    report, out = LoadReport(), []
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            ex = encode_example(tokenizer, row, train_on, where)
        except BadRow as e:
            report.bad.append((where, str(e)))
            continue
        if len(ex) > seq_len:
            report.too_long.append((where, len(ex)))
            continue
        out.append(ex)
    report.kept = len(out)
    if report.rows == 0:
        raise UserError(f"{what} has no rows; give a jsonl file with one conversation per line")
    if len(report.bad) > max_bad_fraction * report.rows:
        raise UserError(f"{what}: {len(report.bad)} of {report.rows} rows are malformed, more than the "
                        f"{max_bad_fraction:.0%} allowed ({report.summary()}); fix them or raise "
                        "--max-bad-fraction")
    if not out:
        raise UserError(f"{what}: no example left to train on ({report.summary()})")
    return out, report

"""Tool calls in model output: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Qwen2.5-Instruct answers a tool request with one block per call (hermes style; spec §2.4),
optionally after some text. A block is valid when its body (between the tags, surrounding
whitespace ignored) is a JSON object with a non-empty string "name" and an "arguments"
object (a JSON string holding an object is accepted; missing or null means {}). A final
block without `</tool_call>` (generation stopped) is still parsed, as vLLM's hermes parser does.

Content. Without a valid call the content is the whole text, unchanged. With calls, it is
the text outside the valid blocks (invalid blocks stay, verbatim, as text): the part before
the first call with trailing whitespace removed, then each later part stripped, non-empty
parts joined by "\\n"; None when nothing is left. Nothing raises on malformed output.

`ToolCallStreamParser` gives the same result incrementally; concatenating its ContentDelta
texts equals `parse_tool_calls(text)[0]` (or "" for None) for any split of the text.

Events (frozen dataclasses), in stream order:
* `ContentDelta(text)` - assistant text to show now.
* `ToolCallDelta(index, name, arguments)` - optional early view of call `index` while it is
  generated: the first delta has the name and arguments ""; later ones carry fragments of
  the arguments JSON text (only when the model writes "name" before an object-valued
  "arguments"). Their concatenation is the raw arguments JSON. Speculative: a block can
  still turn out invalid (then ToolCallFailed follows and `index` is reused).
* `ToolCallDone(index, name, arguments)` - a complete, valid call (arguments is a dict).
  Indices count valid calls from 0.
* `ToolCallFailed(index, text)` - the block for `index` was not a valid call; its text is
  re-emitted as ContentDelta. A server streaming ToolCallDelta should send tool calls only
  after ToolCallDone if it cannot retract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ToolCallDone:
    index: int
    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallFailed:
    index: int
    text: str


Event = ContentDelta | ToolCallDelta | ToolCallDone | ToolCallFailed


def parse_call(body: str) -> dict | None:
    """{"name", "arguments"} from a block body, or None if it is not a valid call."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = obj.get("arguments")
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return {"name": obj["name"], "arguments": args}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, [{"name": str, "arguments": dict}, ...]) of a model reply; see module doc."""
    runs = [""]  # text outside valid calls, one run before each call and one after the last
    calls: list[dict] = []
    pos = 0
    while (start := text.find(OPEN, pos)) >= 0:
        close = text.find(CLOSE, start + len(OPEN))
        end = len(text) if close < 0 else close + len(CLOSE)
        body = text[start + len(OPEN):close if close >= 0 else len(text)]
        call = parse_call(body)
        if call is None:
            runs[-1] += text[pos:end]
        else:
            runs[-1] += text[pos:start]
            calls.append(call)
            runs.append("")
        pos = end
    runs[-1] += text[pos:]
    if not calls:
        return text, []
    parts = [runs[0].rstrip()] + [r.strip() for r in runs[1:]]
    return "\n".join(p for p in parts if p) or None, calls


class ToolCallStreamParser:
    """Incremental `parse_tool_calls`: feed text deltas, get events (see module doc)."""

    def __init__(self) -> None:
        self._buf = ""          # unclassified text: possible start of OPEN, or a block body
        self._in_call = False
        self._calls = 0         # valid calls so far
        self._emitted = False   # any content emitted yet
        self._held_ws = ""      # trailing whitespace of the content, not yet emitted
        self._run_started = False  # after a call: non-whitespace seen in the current run
        self._reset_partial()

    def _reset_partial(self) -> None:
        self._named = False
        self._args_pos = -1     # where the arguments value starts in _buf (-1: unknown)
        self._args_done = False
        self._depth = 0
        self._in_str = self._esc = False

    def feed(self, delta: str) -> list[Event]:
        events: list[Event] = []
        self._buf += delta
        while True:
            if self._in_call:
                close = self._buf.find(CLOSE)
                if close < 0:
                    self._stream_partial(events, _safe_end(self._buf, CLOSE))
                    return events
                self._stream_partial(events, close)
                body, self._buf = self._buf[:close], self._buf[close + len(CLOSE):]
                self._end_block(body, OPEN + body + CLOSE, events)
            else:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = _safe_end(self._buf, OPEN)
                    self._content(self._buf[:keep], events)
                    self._buf = self._buf[keep:]
                    return events
                self._content(self._buf[:start], events)
                self._buf = self._buf[start + len(OPEN):]
                self._in_call = True

    def finish(self) -> list[Event]:
        """End of the reply: an open block is parsed as is; held text is settled."""
        events: list[Event] = []
        if self._in_call:
            self._stream_partial(events, len(self._buf))
            body, self._buf = self._buf, ""
            self._end_block(body, OPEN + body, events)
        self._content(self._buf, events)
        self._buf = ""
        if self._calls == 0 and self._held_ws:
            events.append(ContentDelta(self._held_ws))  # no calls: the text is returned as is
        self._held_ws = ""
        return events

    # -- internals -----------------------------------------------------------------
    def _end_block(self, body: str, raw: str, events: list[Event]) -> None:
        self._in_call = False
        call = parse_call(body)
        if call is None:
            events.append(ToolCallFailed(self._calls, raw))
            self._content(raw, events)
        else:
            if not self._named:
                events.append(ToolCallDelta(self._calls, call["name"], ""))
            events.append(ToolCallDone(self._calls, call["name"], call["arguments"]))
            self._calls += 1
            self._held_ws = ""  # whitespace before a call is not content
            self._run_started = False
        self._reset_partial()

    def _content(self, text: str, events: list[Event]) -> None:
        """Text known to be outside any valid block."""
        if not text:
            return
        if self._calls and not self._run_started:
            text = text.lstrip()
            if not text:
                return
            self._run_started = True
            if self._emitted:
                text = "\n" + text
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body):]
        if body:
            events.append(ContentDelta(body))
            self._emitted = True

    def _stream_partial(self, events: list[Event], end: int) -> None:
        """Early ToolCallDelta events from the block body self._buf[:end]."""
        if not self._named:
            m = _HEAD.match(self._buf, 0, end)
            if m is None or m.end() >= end:  # wait for the first character of the value
                return
            try:
                name = json.loads('"' + m.group(1) + '"')
            except ValueError:
                return
            self._named = True
            events.append(ToolCallDelta(self._calls, name, ""))
            self._args_pos = m.end()
        if self._args_done or self._args_pos >= end:
            return
        if self._depth == 0 and self._buf[self._args_pos] != "{":
            self._args_done = True  # not an object: wait for ToolCallDone
            return
        piece = self._scan(self._buf[self._args_pos:end])
        self._args_pos += len(piece)
        if piece:
            events.append(ToolCallDelta(self._calls, None, piece))

    def _scan(self, text: str) -> str:
        """Prefix of `text` that belongs to the arguments object (tracks JSON nesting)."""
        for i, c in enumerate(text):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
            elif c == '"':
                self._in_str = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._args_done = True
                    return text[:i + 1]
        return text


def _safe_end(buf: str, tag: str) -> int:
    """Length of the prefix of `buf` that cannot be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if tag.startswith(buf[-k:]):
            return len(buf) - k
    return len(buf)

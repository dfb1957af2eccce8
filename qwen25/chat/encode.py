"""Conversations -> token ids and an assistant mask, safe against control-token injection.

Injection safety. A template's own control tokens (`<|im_start|>`, `<|im_end|>`,
`<tool_call>`, ...) must become control ids, while the same text inside a message, a tool
result or a tool schema must stay plain text. HF and vLLM render to a string and then parse
control tokens everywhere, so a user can close their turn with "<|im_end|>". Here, before
rendering, every control token's text inside the caller's strings is replaced by a private
placeholder character (one per token, chosen from Unicode's private-use planes so that it
occurs in no input string); the rendered text is split at the control tokens that remain -
the template's own - and each piece between them is encoded as plain text after the
placeholders are turned back into the original text. For benign conversations the ids are
exactly what `tokenizer(render(...))` gives in HF; for hostile ones the hostile text is plain
text. This works the same for the built-in template and for a checkpoint's Jinja template.

Assistant mask (for SFT losses), ChatML templates: 1 for every token that overlaps an
assistant reply, i.e. the text after `<|im_start|>assistant\\n` up to and including its
`<|im_end|>` (content, tool calls, and the end token, so the model learns to stop); 0 for
everything else (system, user, tool turns, the `<|im_start|>assistant\\n` header and the
`\\n` after `<|im_end|>`). A token that straddles the header/reply boundary (content
starting with a newline merges with the header's) counts as assistant, as with HF's
`return_assistant_tokens_mask`. A trailing generation prompt has an empty reply.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from qwen25.chat.template import ChatError, prepare_messages, prepare_tools, render, render_jinja

if TYPE_CHECKING:
    from qwen25.tokenizer import Tokenizer

_ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?)(?:<\|im_end\|>|\Z)", re.DOTALL)
_PRIVATE_USE = (0xF0000, 0x10FFFD)  # Supplementary Private Use Areas A and B
_PRIVATE_RE = re.compile("[\U000F0000-\U0010FFFF]")


class _Escaper:
    """Swaps control-token text in caller strings for private-use placeholders and back."""

    def __init__(self, controls: list[str], values: list[Any]):
        self.controls = sorted(controls, key=len, reverse=True)  # longest first
        strings = list(_strings(values))
        found = re.compile("|".join(map(re.escape, self.controls))) if self.controls else None
        self.active = found is not None and any(found.search(s) for s in strings)
        if not self.active:
            return
        placeholders = _placeholders(len(self.controls), strings)
        self.to_placeholder = dict(zip(self.controls, placeholders))
        self.to_control = {p: c for c, p in self.to_placeholder.items()}
        self._find = found
        back = sorted(self.to_control, key=len, reverse=True)  # a pair before a single character
        self._back = re.compile("|".join(map(re.escape, back)))

    def escape(self, value: Any) -> Any:
        if not self.active:
            return value
        if isinstance(value, str):
            return self._find.sub(lambda m: self.to_placeholder[m.group()], value)
        if isinstance(value, list | tuple):
            return [self.escape(v) for v in value]
        if isinstance(value, dict):
            return {self.escape(k): self.escape(v) for k, v in value.items()}
        return value

    def restore(self, text: str) -> str:
        if not self.active:
            return text
        return self._back.sub(lambda m: self.to_control[m.group()], text)


def _placeholders(n: int, strings: list[str]) -> list[str]:
    """n strings that occur in none of `strings`: private-use characters they do not use,
    then (for a caller who sent every one of them) pairs of private-use characters that
    occur nowhere in them. A text of L characters holds at most L distinct pairs, far fewer
    than the 1.7e10 there are, so the search always ends quickly."""
    used = {c for s in strings for c in _PRIVATE_RE.findall(s)}
    out = [chr(cp) for cp in range(_PRIVATE_USE[0], _PRIVATE_USE[1] + 1) if chr(cp) not in used][:n]
    if len(out) == n:
        return out
    blob = "\0".join(strings)
    cp = _PRIVATE_USE[0]
    while len(out) < n:
        for second in range(_PRIVATE_USE[0], _PRIVATE_USE[1] + 1):
            pair = chr(cp) + chr(second)
            if pair not in blob and not any(pair[0] == p or pair[1] == p for p in out if len(p) == 1):
                out.append(pair)
                break
        cp += 1
    return out


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def uses_builtin_template(tokenizer: Tokenizer) -> bool:
    """True when the tokenizer's template is the official Qwen2.5-Instruct one (or none)."""
    from qwen25.tokenizer.qwen import chat_template

    template = tokenizer.chat_template
    return template is None or template.strip() == chat_template().strip()


def render_text(tokenizer: Tokenizer, messages: list[dict], tools: list | None,
                add_generation_prompt: bool) -> str:
    """Rendered text with the tokenizer's template (the fast Python one when it is Qwen's)."""
    if uses_builtin_template(tokenizer):
        return render(messages, tools, add_generation_prompt)
    # transformers passes the special tokens that are set; unset ones stay undefined ("").
    tokens = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
              "bos_token": tokenizer.bos_token}
    return render_jinja(tokenizer.chat_template, messages, tools, add_generation_prompt,
                        **{k: v for k, v in tokens.items() if v is not None})


def encode_chat(tokenizer: Tokenizer, messages: list[dict], tools: list | None = None,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, assistant_mask) of a conversation; see the module docstring for both.
    The mask needs a ChatML vocabulary (`<|im_start|>`/`<|im_end|>` control tokens)."""
    controls = {t.content for t in tokenizer.added_tokens}
    if not {"<|im_start|>", "<|im_end|>"} <= controls:
        raise ChatError("an assistant mask needs <|im_start|> and <|im_end|> control tokens; "
                        "this tokenizer has none (use apply_chat_template for ids only)")
    return _encode(tokenizer, messages, tools, add_generation_prompt)


def _encode(tokenizer: Tokenizer, messages: list[dict], tools: list | None,
            add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    messages, tools = prepare_messages(messages), prepare_tools(tools)
    controls = [t.content for t in tokenizer.added_tokens]
    escaper = _Escaper(controls, [messages, tools])
    text = render_text(tokenizer, escaper.escape(messages), escaper.escape(tools), add_generation_prompt)
    return _encode_rendered(tokenizer, text, escaper)


def _encode_rendered(tokenizer: Tokenizer, text: str, escaper: _Escaper) -> tuple[list[int], list[int]]:
    spans = [(m.start(1), m.end()) for m in _ASSISTANT_SPAN.finditer(text)]
    starts = [s for s, _ in spans]

    def in_span(pos: int) -> bool:  # is text[pos] inside an assistant reply?
        k = bisect_right(starts, pos) - 1
        return k >= 0 and pos < spans[k][1]

    ids: list[int] = []
    mask: list[int] = []
    for piece, token_id, start in _pieces(tokenizer, text):
        if token_id is not None:
            ids.append(token_id)
            mask.append(int(in_span(start)))
            continue
        plain = escaper.restore(piece)
        piece_ids = tokenizer.encode(plain)
        end = start + len(piece)
        inner = [b for s, e in spans for b in (s, e) if start < b < end]
        if not inner:
            mask += [int(in_span(start))] * len(piece_ids)
        else:
            mask += _mask_inside(tokenizer, piece, piece_ids, start, inner, in_span, escaper)
        ids += piece_ids
    return ids, mask


def _pieces(tokenizer: Tokenizer, text: str):
    """(text, None, offset) for plain pieces and (text, id, offset) for control tokens."""
    pos = 0
    for piece, token_id in tokenizer.split_control(text):
        yield piece, token_id, pos
        pos += len(piece)


def _mask_inside(tokenizer: Tokenizer, piece: str, piece_ids: list[int], start: int,
                 bounds: list[int], in_span, escaper: _Escaper) -> list[int]:
    """Mask of a plain piece that an assistant span starts or ends inside: a token is in
    when any of its bytes lies in a span. Offsets are in bytes of the encoded (restored,
    NFC) text; span bounds sit after a newline, where NFC cannot merge across."""
    def nbytes(s: str) -> int:
        return len(unicodedata.normalize("NFC", escaper.restore(s)).encode("utf-8"))

    cuts = [0] + [nbytes(piece[:b - start]) for b in bounds]  # byte offsets of segment starts
    inside = [in_span(start)] + [in_span(b) for b in bounds]  # state of each segment
    ends = list(accumulate(len(tokenizer.id_to_bytes(i)) for i in piece_ids))
    out = []
    for tok_end, tok_start in zip(ends, [0] + ends[:-1]):
        first = bisect_right(cuts, tok_start) - 1
        last = bisect_right(cuts, max(tok_start, tok_end - 1)) - 1
        out.append(int(any(inside[first:last + 1])))
    return out


def apply_chat_template(tokenizer: Tokenizer, messages: list[dict], tools: list | None = None,
                        add_generation_prompt: bool = False, tokenize: bool = True,
                        return_assistant_mask: bool = False):
    """`Tokenizer.apply_chat_template`: text (tokenize=False), ids, or (ids, mask)."""
    if not tokenize:
        if return_assistant_mask:
            raise ChatError("return_assistant_mask=True needs tokenize=True")
        return render_text(tokenizer, prepare_messages(messages), prepare_tools(tools),
                           add_generation_prompt)
    if return_assistant_mask:
        return encode_chat(tokenizer, messages, tools, add_generation_prompt)
    return _encode(tokenizer, messages, tools, add_generation_prompt)[0]

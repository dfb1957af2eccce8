"""Normalisation: the one canonical form every later stage (and the shards) sees.

- Unicode NFC, as the Qwen tokenizer applies before encoding (qwen25-spec §2.1), so a
  decoded shard reproduces the stored text exactly.
- Line ends: CRLF and lone CR become LF.
- Control characters (Unicode category Cc) are removed except TAB and LF; so are the byte
  order mark and the C1 block. They carry no text and break line-based rules.
- Leading blank lines and trailing whitespace are removed (indentation of the first line is
  kept: it matters for code).

`dedup_key` is a second, lossy form used only for exact-duplicate detection: case-folded with
whitespace runs collapsed, so copies that differ only in spacing or case collide.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The canonical form of a document's text (idempotent: normalize(normalize(t)) == normalize(t))."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Controls go before NFC: removing one between a letter and a combining mark after
    # composing would leave an uncomposed pair behind.
    text = _CONTROL.sub("", text)
    text = unicodedata.normalize("NFC", text)
    text = text.rstrip()
    # Drop whole leading blank lines only, keeping the first line's indentation.
    start = 0
    while True:
        nl = text.find("\n", start)
        if nl < 0 or text[start:nl].strip():
            break
        start = nl + 1
    return text[start:]


_KEY_CHUNK = 1 << 20  # characters folded at a time: memory stays flat for a 200 MB document


def dedup_key(text: str) -> bytes:
    """16-byte digest of the case-folded, whitespace-collapsed text (exact-duplicate key).

    The canonical form is `_SPACE.sub(" ", text.casefold()).strip()`, hashed chunk by chunk
    (case folding maps each character on its own, so chunks fold independently; a blank run
    cut by a chunk boundary is still one space)."""
    h = hashlib.blake2b(digest_size=16)
    started = pending_space = False
    for i in range(0, len(text), _KEY_CHUNK):
        piece = _SPACE.sub(" ", text[i:i + _KEY_CHUNK].casefold())
        core = piece.strip(" ")
        if not core:
            pending_space = pending_space or (started and bool(piece))
            continue
        if started and (pending_space or piece[0] == " "):
            h.update(b" ")
        h.update(core.encode())
        started, pending_space = True, piece[-1] == " "
    return h.digest()

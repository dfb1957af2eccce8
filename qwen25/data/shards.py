"""Token shards: uint32 files of documents separated by EOS, each with a document index.

On disk, for a shard named `NAME`:
  NAME.bin       the token ids as little-endian uint32 (np.memmap(path, np.uint32) reads it);
                 every document is followed by the EOS id, so the file is
                 doc_0 EOS doc_1 EOS ... doc_k EOS
  NAME.idx.npy   int64 [docs, 2]: (end offset in tokens *after* the document's EOS, UTF-8 bytes
                 of the document's text); document i spans [end[i-1], end[i] - 1) plus its EOS
Both are written under temporary names and renamed into place when the shard is closed; the
sha256 of NAME.bin is computed while writing and recorded in the manifest.

Documents never straddle shards: a shard is closed once it holds at least `shard_tokens`.
The separator ("EOS" here and in the manifest's `eos_token_id`) is `<|endoftext|>` when the
vocabulary has it (see `separator_id`).

`tokenize` turns texts into id arrays with the tokenizer's own batched encoder
(`encode_batch`, which releases the GIL and runs on threads); `ShardWriter.add` appends them.
"""

from __future__ import annotations

import array
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen25.errors import UserError

DTYPE = np.uint32
_TYPECODE = "I" if array.array("I").itemsize == 4 else "L"  # a 4-byte unsigned C type
_FLUSH = 1 << 20  # tokens buffered before a write


DOCUMENT_SEPARATOR = "<|endoftext|>"


def separator_id(tok) -> int:
    """The id written after every document: `<|endoftext|>` when the vocabulary has it (Qwen's
    end-of-document token in packed pretraining, qwen25-spec §2.3, even where `eos_token` is
    the chat model's `<|im_end|>`), else the tokenizer's `eos_token_id`.

    Raises `UserError` for an object that is not a usable tokenizer (it needs `encode_batch`,
    `decode` and an EOS / separator id in uint32 range)."""
    missing = [a for a in ("encode_batch", "decode", "eos_token_id") if not hasattr(tok, a)]
    if missing:
        raise UserError(f"tokenizer {type(tok).__name__} lacks {missing}; pass a qwen25 tokenizer "
                        "(qwen25.load_tokenizer)")
    sep = tok.token_to_id(DOCUMENT_SEPARATOR) if hasattr(tok, "token_to_id") else None
    sep = tok.eos_token_id if sep is None else sep
    if sep is None or not 0 <= int(sep) < 2**32:
        raise UserError("the tokenizer has neither <|endoftext|> nor an EOS id; shards need a "
                        "document separator")
    return int(sep)


# Texts longer than this are encoded piece by piece: a Python list of ids costs ~36 bytes per
# token, so one 200 MB document would otherwise need gigabytes at once.
PIECE_CHARS = 1 << 20
# A single space between two non-blank characters: every pre-tokenizer of the Qwen/GPT family
# starts a new piece there (the space joins the next word), so cutting before it changes no id.
_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")


def split_for_encoding(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut before single spaces into pieces of about `size` characters (a text with
    no such space stays whole); encoding the pieces gives the ids of the whole text."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size // 2, start + size)
        if m is None:
            m = _SAFE_CUT.search(text, start + size)
            if m is None:
                break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def tokenize(tok, texts: list[str], num_threads: int | None = None) -> list[np.ndarray]:
    """Token ids of each text, as uint32 arrays (no EOS appended)."""
    if not texts:
        return []
    if any(len(t) > PIECE_CHARS for t in texts):
        return [np.concatenate([_encode(tok, [p], num_threads)[0] for p in split_for_encoding(t)])
                if len(t) > PIECE_CHARS else _encode(tok, [t], num_threads)[0] for t in texts]
    return _encode(tok, texts, num_threads)


def _encode(tok, texts: list[str], num_threads: int | None) -> list[np.ndarray]:
    batches = tok.encode_batch(texts, num_threads=num_threads) if num_threads else tok.encode_batch(texts)
    # array.array converts a list of ints about 3x faster than np.asarray; the view is zero-copy.
    return [np.frombuffer(array.array(_TYPECODE, ids), dtype=DTYPE) for ids in batches]


@dataclass
class ShardInfo:
    """One closed shard as the manifest lists it (paths relative to the manifest's folder)."""

    path: str
    index: str
    tokens: int
    docs: int
    bytes: int
    sha256: str
    split: str = ""
    domain: str = ""
    source: str = ""


class ShardWriter:
    """Appends documents to `folder/<prefix>-00000.bin`, `-00001.bin`, ... (see module doc)."""

    def __init__(self, folder: Path, prefix: str, eos: int, shard_tokens: int, root: Path | None = None,
                 **labels: str):
        self.folder, self.prefix, self.eos, self.shard_tokens = Path(folder), prefix, int(eos), shard_tokens
        self.root = Path(root) if root is not None else self.folder
        self.labels = labels  # split / domain / source recorded in each ShardInfo
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards: list[ShardInfo] = []
        self._eos = np.array([self.eos], dtype=DTYPE)
        self._open()

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.shards):05d}"
        self._tmp = self.folder / f".{self._name}.bin.tmp"
        self._f = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._buf: list[np.ndarray] = []
        self._buffered = 0
        self._tokens = 0
        self._index: list[tuple[int, int]] = []

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        """Append one document (its ids, EOS added here) whose text is `nbytes` UTF-8 bytes."""
        ids = np.asarray(ids, dtype=DTYPE)
        self._buf += [ids, self._eos]
        self._buffered += len(ids) + 1
        self._tokens += len(ids) + 1
        self._index.append((self._tokens, nbytes))
        if self._buffered >= _FLUSH:
            self._flush()
        if self._tokens >= self.shard_tokens:
            self._close_current()
            self._open()

    def _flush(self) -> None:
        if self._buf:
            data = memoryview(np.concatenate(self._buf).astype("<u4", copy=False))  # no extra copy
            self._f.write(data)
            self._sha.update(data)
            self._buf, self._buffered = [], 0

    def _close_current(self) -> None:
        self._flush()
        self._f.close()
        if not self._index:
            self._tmp.unlink()
            return
        bin_path = self.folder / f"{self._name}.bin"
        idx_path = self.folder / f"{self._name}.idx.npy"
        idx_tmp = self.folder / f".{self._name}.idx.tmp.npy"
        np.save(idx_tmp, np.array(self._index, dtype=np.int64))
        os.replace(self._tmp, bin_path)
        os.replace(idx_tmp, idx_path)
        self.shards.append(ShardInfo(
            path=bin_path.relative_to(self.root).as_posix(), index=idx_path.relative_to(self.root).as_posix(),
            tokens=self._tokens, docs=len(self._index), bytes=int(sum(b for _, b in self._index)),
            sha256=self._sha.hexdigest(), **self.labels))

    def roll(self) -> None:
        """Close the open shard (if it holds documents) and open the next: everything added so
        far is then in complete, renamed files (a resume point)."""
        if self._index:
            self._close_current()
            self._open()

    def state(self) -> dict:
        """The closed shards, JSON-ready (call `roll` first so nothing is left open)."""
        return {"shards": [s.__dict__ for s in self.shards]}

    @classmethod
    def resume(cls, state: dict, folder: Path, prefix: str, eos: int, shard_tokens: int, root: Path,
               **labels: str) -> ShardWriter:
        """A writer that continues after the shards of `state` (later files are the caller's to remove)."""
        w = cls.__new__(cls)
        w.folder, w.prefix, w.eos, w.shard_tokens, w.root = Path(folder), prefix, int(eos), shard_tokens, Path(root)
        w.labels = labels
        w.shards = [ShardInfo(**s) for s in state["shards"]]
        w._eos = np.array([w.eos], dtype=DTYPE)
        w._open()
        return w

    def close(self) -> list[ShardInfo]:
        """Finish the open shard (an empty one is discarded) and return every shard written."""
        if self._f is not None:
            self._close_current()
            self._f = None
        return self.shards


def read_index(path: Path) -> np.ndarray:
    """A shard's document index, int64 [docs, 2] (end token offset incl. EOS, text bytes)."""
    return np.load(path, allow_pickle=False)


def read_tokens(path: Path) -> np.ndarray:
    """A shard's tokens as a read-only uint32 memmap (an empty array for an empty file)."""
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r")


def documents(bin_path: Path, idx_path: Path):
    """Yield each document's ids (without EOS) of one shard, in order."""
    tokens, idx = read_tokens(bin_path), read_index(idx_path)
    start = 0
    for end, _ in idx.tolist():
        yield tokens[start:end - 1]
        start = end

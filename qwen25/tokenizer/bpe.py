"""BPE encoding backends: plain text (no control tokens) -> regular token ids.

Two engines sit behind `Tokenizer`, both with `encode(text)` and `encode_batch(texts, n)`:

* `TiktokenEngine` - tiktoken's Rust BPE over the built-in Qwen ranks. Used only for the
  vocabulary whose equivalence with HF BPE is tested (the Qwen2.5 ranks): tiktoken merges
  by the rank of the merged token, HF by the rank of the merge rule, and the two orders can
  disagree on other vocabularies (e.g. ones trained with `tokenizers`).
* `HFEngine` - HF `tokenizers` running a `tokenizer.json` with its added tokens removed.
  Used for every other vocabulary, so their ids are by construction what HF gives.

Robustness of the tiktoken path. fancy-regex (tiktoken's regex engine) backtracks through
`\\s+(?!\\S)` one character at a time and panics with `StackOverflow` on a run of several
hundred thousand whitespace characters without a newline (" " * 1_000_000 kills a plain
tiktoken call). Such runs are cut out and encoded as one BPE piece directly, which gives the
ids the regex would have given (see `_long_blank_runs` for why the cut points are exact).
"""

from __future__ import annotations

import json
import os
import re
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from qwen25.errors import UserError

# Unicode White_Space without \r and \n: the characters of `\s` (regex crate: White_Space)
# that `[\r\n]` does not cover. A run of these is what fancy-regex cannot handle when long.
_BLANK = ("\t\x0b\x0c \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
          "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_BLANK_SET = frozenset(_BLANK)
# Runs of at least 2 * _SAMPLE blank characters are always found (and encoded directly);
# tiktoken itself copes with runs up to ~600k, so this leaves a wide margin.
_SAMPLE = 8192
_BLANK_WINDOW = re.compile(f"[{re.escape(_BLANK)}]+")
_NOT_BLANK = re.compile(f"[^{re.escape(_BLANK)}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: Any) -> None:
    """Raise UserError unless `text` is a str that is valid Unicode (no lone surrogates)."""
    if not isinstance(text, str):
        raise UserError(f"text to encode must be str, not {type(text).__name__}; "
                        "decode bytes first, e.g. data.decode('utf-8', errors='replace')")
    m = _SURROGATE.search(text)
    if m:
        raise UserError(f"text contains a lone surrogate U+{ord(m.group()):04X} at index "
                        f"{m.start()}, which is not valid Unicode; fix the source text or "
                        "decode it with errors='replace'")


@lru_cache(maxsize=1)
def _hf_nfc():
    from tokenizers.normalizers import NFC

    return NFC()


def nfc(text: str) -> str:
    """NFC exactly as HF `tokenizers` computes it (the released tokenizer.json's normaliser).

    Python's `unicodedata` (Unicode 14 on 3.11) and the tables inside `tokenizers` agree
    except on combining marks assigned recently, which the older tables treat as starters
    (e.g. "6\\U00010f82\\u031f" is reordered by Python, kept by HF). Text that Python finds
    normalised is normalised for the older tables too, so the fast `is_normalized` check
    stays valid as a filter.
    """
    return _hf_nfc().normalize_str(text)


def _long_blank_runs(text: str) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of `_BLANK` characters of length >= 2 * _SAMPLE (some
    shorter ones may be reported too) that end at a non-space character or at the end of
    `text`. Runs followed by \\r or \\n are left to the regex: `\\s*[\\r\\n]+` takes them in
    the linear-time engine.

    Why cutting there is exact. Let the run be [a, b). No regex piece crosses `a`: the
    character before is a newline or a non-space, pieces that end in non-spaces stop at a
    space, and a newline-ended piece (`\\s*[\\r\\n]+`, or punctuation with `[\\r\\n]*`) stops
    at the last newline, which is a-1. At `a` every alternative before `\\s+(?!\\S)` fails
    (the next characters are blanks and the run holds no newline), so the piece is
    text[a:b-1] when text[b] exists (the last blank joins the next word) and text[a:b] at
    the end of the text. The regex restarts from the piece end, it never looks behind, and
    pieces before `a` look at most one character ahead (still before `a`), so the text
    before and after encode on their own exactly as in the whole.
    """
    runs: list[tuple[int, int]] = []
    n = len(text)
    last_end = 0
    # Any run of length >= 2*_SAMPLE contains a window [i*_SAMPLE, (i+1)*_SAMPLE) entirely.
    for i, ch in enumerate(text[::_SAMPLE]):
        pos = i * _SAMPLE
        if ch not in _BLANK_SET or pos < last_end:
            continue
        if pos + _SAMPLE > n:
            break
        window = _BLANK_WINDOW.match(text, pos, pos + _SAMPLE)
        if window is None or window.end() < pos + _SAMPLE:
            continue
        stop = _NOT_BLANK.search(text, pos)
        end = stop.start() if stop else n
        start = pos
        while start > last_end and text[start - 1] in _BLANK_SET:
            start -= 1  # bounded by the run length, which the caller pays for anyway
        last_end = end
        if end < n and text[end] in "\r\n":
            continue
        runs.append((start, end))
    return runs


class TiktokenEngine:
    """tiktoken BPE with NFC normalisation and the long-blank-run guard (see module doc)."""

    def __init__(self, ranks: dict[bytes, int], pattern: str):
        import tiktoken

        self._ranks, self._pattern = ranks, pattern
        # The encoding is built without special tokens: control tokens are handled by
        # `Tokenizer`, so this engine only ever sees plain text.
        self._core = tiktoken.Encoding("qwen25", pat_str=pattern, mergeable_ranks=ranks,
                                       special_tokens={})._core_bpe
        self._pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> pool
        self._lock = threading.Lock()

    # Picklable (DataLoader workers under spawn): ship the ranks, rebuild the rest.
    def __getstate__(self) -> dict:
        return {"ranks": self._ranks, "pattern": self._pattern}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ranks"], state["pattern"])

    def encode(self, text: str) -> list[int]:
        """Regular ids of `text` (a str; NFC is applied here)."""
        try:
            if not unicodedata.is_normalized("NFC", text):
                text = nfc(text)
            if len(text) < 2 * _SAMPLE:
                return self._core.encode_ordinary(text)
            runs = _long_blank_runs(text)
            if not runs:
                return self._core.encode_ordinary(text)
            ids: list[int] = []
            pos = 0
            for start, end in runs:
                piece_end = end - 1 if end < len(text) else end
                ids += self._core.encode_ordinary(text[pos:start])
                ids += self._core.encode_single_piece(text[start:piece_end].encode("utf-8"))
                pos = piece_end
            ids += self._core.encode_ordinary(text[pos:])
            return ids
        except (UnicodeEncodeError, TypeError):  # Rust cannot take lone surrogates
            check_text(text)  # names the lone surrogate
            raise

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        """`encode` on each text, on `num_threads` threads (tiktoken releases the GIL)."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(t) for t in texts]
        pool = self._get_pool(num_threads)
        # A few chunks per thread, contiguous and balanced by length: one future per text
        # would cost more than encoding a short text.
        chunks = _balanced_chunks(texts, 4 * num_threads)
        out: list[list[int]] = []
        for part in pool.map(lambda chunk: [self.encode(t) for t in chunk], chunks):
            out += part
        return out

    def _get_pool(self, num_threads: int) -> ThreadPoolExecutor:
        # Keyed by pid: a forked child (e.g. a DataLoader worker) inherits the pool object
        # but not its threads, and would wait forever on it.
        key = (os.getpid(), num_threads)
        with self._lock:
            if key not in self._pools:
                self._pools[key] = ThreadPoolExecutor(num_threads, thread_name_prefix="qwen25-tok")
            return self._pools[key]


def _balanced_chunks(texts: list[str], n_chunks: int) -> list[list[str]]:
    total = sum(len(t) for t in texts) or 1
    target = total / n_chunks
    chunks: list[list[str]] = [[]]
    size = 0
    for t in texts:
        if size >= target and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += len(t)
    return chunks


class HFEngine:
    """HF `tokenizers` on a tokenizer.json with its added tokens removed, so that control
    token text in the input stays plain text (Tokenizer handles control tokens itself)."""

    def __init__(self, tokenizer_json: dict):
        from tokenizers import Tokenizer as HFTokenizer

        plain = dict(tokenizer_json)
        plain["added_tokens"] = []
        plain["post_processor"] = None  # never add BOS/EOS templates
        plain["truncation"] = None
        plain["padding"] = None
        self._hf = HFTokenizer.from_str(json.dumps(plain))

    def encode(self, text: str) -> list[int]:
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except (UnicodeEncodeError, TypeError, ValueError):
            check_text(text)
            raise

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # tokenizers parallelises with its own thread pool (RAYON_NUM_THREADS).
        for t in texts:
            if _SURROGATE.search(t):
                check_text(t)
        return [e.ids for e in self._hf.encode_batch_fast(texts, add_special_tokens=False)]


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

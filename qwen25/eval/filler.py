"""Filler text for long-context probes and position-wise perplexity, as a pool of token ids.

Three sources, all offline and deterministic:

- "generated": plain sentences drawn from small word lists with a seeded RNG. Low
  entropy, like the repeated filler of the original passkey test, and needs nothing on disk;
  the long-context demo trains on it.
- "shakespeare" (or "milton"): real prose from the built-in corpora that `qwen25 data fetch`
  puts in the data cache; the files are read in sorted order and concatenated.
- a path: any UTF-8 text file (or a folder of .txt files, read in sorted order).

A `FillerPool` encodes enough text once and hands out windows of it: `window(n, rng)` gives
n consecutive tokens from a random offset, so trials differ but every run with the same seed
sees the same text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from qwen25.errors import UserError

CORPORA = ("shakespeare", "milton")
SOURCES = ("generated", *CORPORA)

# Word lists of the generator: everyday nouns, verbs and places; no digits (digits are what
# the probes ask for, so filler must never contain a competing number).
_SUBJECTS = ("the farmer", "a child", "the old man", "my neighbour", "the baker", "a traveller",
             "the teacher", "her brother", "the captain", "a young girl", "the miller", "our guest")
_VERBS = ("carried", "painted", "found", "lost", "watched", "mended", "sold", "opened", "cleaned",
          "counted", "praised", "borrowed", "followed", "remembered", "washed", "forgot")
_OBJECTS = ("a basket of apples", "the red door", "an old map", "the garden gate", "a small boat",
            "the brown horse", "a letter", "the kitchen table", "a pair of boots", "the lantern",
            "a loaf of bread", "the wooden bridge", "a blue kite", "the church bell")
_PLACES = ("by the river", "in the morning", "near the market", "after the rain", "on the hill",
           "before supper", "in the village", "at the harbour", "under the oak tree",
           "in the quiet lane", "beside the mill", "during the fair")
_CLOSERS = ("The sky was grey.", "The wind was cold.", "Nobody said a word.", "It was a long day.",
            "The birds were singing.", "The grass was wet.", "Everyone went home.", "The sun came out.")


def generated_text(n_sentences: int, seed: int = 0) -> str:
    """Deterministic simple prose: `n_sentences` sentences from the word lists above."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        if rng.random() < 0.2:
            out.append(rng.choice(_CLOSERS))
        else:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            out.append(s[0].upper() + s[1:])
    return " ".join(out)


def corpus_files(source: str, root: Path | None = None) -> list[Path]:
    """Text files of a built-in corpus or of a user path, in sorted order."""
    if source in CORPORA:
        from qwen25.data import builtin

        folder = Path(root or builtin.cache_dir()) / source
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if not files:
            raise UserError(f"filler {source!r}: no built-in corpus in {folder}; run `qwen25 data "
                            "fetch` first, or use --filler generated or a text file")
        return files
    path = Path(source)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"filler folder {path} holds no .txt files")
        return files
    if path.is_file():
        return [path]
    raise UserError(f"filler {source!r} is neither {', '.join(SOURCES)} nor an existing text file "
                    "or folder")


@dataclass
class FillerPool:
    """Token ids of filler text, long enough for the longest window asked of it."""

    ids: list[int]
    source: str

    def window(self, n: int, rng: random.Random) -> list[int]:
        """n consecutive filler tokens from a random offset (the pool repeats if short)."""
        if n <= 0:
            return []
        if len(self.ids) >= n:
            start = rng.randrange(len(self.ids) - n + 1)
            return self.ids[start:start + n]
        reps = -(-n // len(self.ids))
        return (self.ids * reps)[:n]


def filler_pool(tokenizer, source: str, min_tokens: int, seed: int = 0,
                root: Path | None = None) -> FillerPool:
    """Encode at least `min_tokens` tokens of filler (or all of a smaller corpus).

    Text is encoded in pieces of ~64 KB, so a few MB of corpus is not read for a short probe.
    """
    ids: list[int] = []
    if source == "generated":
        piece = 0
        while len(ids) < min_tokens:
            ids += tokenizer.encode(generated_text(400, seed=seed * 100_003 + piece) + " ")
            piece += 1
        return FillerPool(ids, source)
    for path in corpus_files(source, root):
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise UserError(f"cannot read filler file {path}: {e.strerror}") from None
        for i in range(0, len(text), 1 << 16):
            ids += tokenizer.encode(text[i:i + (1 << 16)])
            if len(ids) >= min_tokens:
                return FillerPool(ids, source)
    if not ids:
        raise UserError(f"filler {source!r} is empty")
    return FillerPool(ids, source)

"""Shared references and corpora for the tokenizer and chat tests (no tests here).

References, all independent of the engine `qwen25` encodes the built-in vocabulary with
(tiktoken with the regex written as `qwen.FAST_PATTERN`):
* `hf_plain()` / `hf_full()`: HF `tokenizers` loading the tokenizer.json we export (its
  vocab/merges are checked against the official Qwen2 files in test_tokenizer_vectors.py),
  without / with the 22 added tokens.
* `auto_tokenizer()`: `transformers.AutoTokenizer` on the exported folder.
* `tiktoken_reference()`: tiktoken with the canonical Qwen regex and the ranks read straight
  from the asset file by code written here.
"""

from __future__ import annotations

import atexit
import base64
import json
import random
import shutil
import sysconfig
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from qwen25.tokenizer import load_tokenizer

# The canonical pre-tokenisation regex, as written in qwen25-spec.md §2.1.
SPEC_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# qwen25-spec.md §2.3: (id, text, special) of the 22 control tokens.
SPEC_CONTROL = [(151643 + i, t, i < 14) for i, t in enumerate([
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>"])]


@lru_cache(maxsize=1)
def builtin():
    return load_tokenizer("qwen2.5")


@lru_cache(maxsize=1)
def exported_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qwen25-tok-export-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    builtin().save_pretrained(folder)
    return folder


@lru_cache(maxsize=1)
def hf_full():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(exported_dir() / "tokenizer.json"))


@lru_cache(maxsize=1)
def hf_plain():
    from tokenizers import Tokenizer

    data = json.loads((exported_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(data))


@lru_cache(maxsize=1)
def auto_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(exported_dir()))


@lru_cache(maxsize=1)
def tiktoken_reference():
    import tiktoken

    ranks = {}
    raw = resources.files("qwen25").joinpath("assets", "qwen.tiktoken").read_bytes()
    for line in raw.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen-reference", pat_str=SPEC_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})


def hf_ids(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf_plain().encode_batch_fast(texts, add_special_tokens=False)]


def stdlib_texts(limit_bytes: int) -> list[str]:
    """Python standard library sources (not site-packages), ~limit_bytes: first the prose
    of the Python documentation's topics (pydoc_data) and the licence, then code by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    prose = [root / "pydoc_data" / "topics.py", root / "LICENSE.txt"]
    for path in [p for p in prose if p.exists()] + sorted(set(root.rglob("*.py")) - set(prose)):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= limit_bytes:
            break
    return texts


# Character pools for generated multilingual text.
_POOLS = {
    "cjk": [chr(c) for c in range(0x4E00, 0x9FFF)],
    "kana": [chr(c) for c in range(0x3041, 0x30FF)],
    "hangul": [chr(c) for c in range(0xAC00, 0xD7A3)],
    "cyrillic": [chr(c) for c in range(0x0410, 0x0450)],
    "arabic": [chr(c) for c in range(0x0621, 0x064B)],
    "devanagari": [chr(c) for c in range(0x0905, 0x0940)],
    "emoji": [chr(c) for c in [*range(0x1F300, 0x1F5FF), *range(0x1F600, 0x1F64F),
                               *range(0x1F900, 0x1F9FF)]],
    "digits": list("0123456789") + ["١", "٢", "३", "４", "½", "²"],
    "punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~，。！？「」…—"),
    "combining": ["\u0301", "\u0300", "\u0308", "\u0323", "\u031b", "\u0338", "\u3099"],
    "latin": list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéàüßøñ"),
}
_SPACES = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "   ", "\u3000", "\xa0", " \n ", "\t\t\n",
           "\u2003", " " * 9, "\n" * 5, "\x0b", "\x0c", "\u2028"]
_EMOJI_SEQ = ["👨‍👩‍👧", "👍🏽", "🏳️‍🌈", "🇯🇵", "❤️", "1️⃣"]


def generated_texts(seed: int, n_bytes: int) -> list[str]:
    """Deterministic multilingual text: words from each pool, digits runs, emoji sequences,
    combining marks (so NFC has work) and every kind of whitespace run."""
    rng = random.Random(seed)
    names = sorted(_POOLS)
    texts, total = [], 0
    while total < n_bytes:
        parts = []
        for _ in range(rng.randrange(50, 400)):
            kind = rng.random()
            if kind < 0.7:
                pool = _POOLS[rng.choice(names)]
                word = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 12)))
                if rng.random() < 0.1:
                    word += rng.choice(_POOLS["combining"])
                parts.append(word)
            elif kind < 0.8:
                parts.append(rng.choice(_EMOJI_SEQ))
            elif kind < 0.9:
                parts.append(str(rng.randrange(10 ** rng.randrange(1, 15))))
            else:
                parts.append(rng.choice(["'s", "'T", "'re", "'ll", "'d", "'VE", "'m", "'x"]))
            parts.append(rng.choice(_SPACES) if rng.random() < 0.5 else " ")
        text = "".join(parts)
        texts.append(text)
        total += len(text.encode("utf-8"))
    return texts

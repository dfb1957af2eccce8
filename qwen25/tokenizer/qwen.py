"""Facts of the Qwen2.5 vocabulary (qwen25-spec.md §2) and the files that ship them.

* `qwen25/assets/qwen.tiktoken`: the 151,643 byte-level BPE ranks, `base64(bytes) rank` per
  line, taken unchanged from the `dashscope` 2.0.2 wheel (Apache-2.0; see assets/NOTICE).
* `qwen25/assets/qwen2.5-instruct.jinja`: the official Qwen2.5-Instruct `chat_template`.
* 22 control tokens at ids 151643..151664 (spec §2.3), with their `special` flags.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

from qwen25.errors import UserError

# The pre-tokenisation regex of Qwen2/2.5 (HF `tokenization_qwen2.PRETOKENIZE_REGEX`, equal to
# `PAT_STR` in dashscope's tokenizer; spec §2.1). Note `\p{N}`: every digit is its own piece.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The same language, written so that tiktoken's regex engine (fancy-regex) runs faster: the
# five alternatives without look-around are grouped, so fancy-regex hands them to the
# linear-time `regex` crate as one sub-matcher instead of trying them one by one in its
# backtracking VM. Leftmost-first alternation is associative ((A|B)|C matches what A|B|C
# matches), so the pieces are identical; tests check ids against HF `tokenizers`, which
# runs `PATTERN` itself.
FAST_PATTERN = (r"(?:(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+)|\s+(?!\S)|\s+")

NUM_REGULAR = 151_643

# (text, special) for ids 151643.. in order. `special` tokens are dropped by
# decode(skip_special_tokens=True); tool-call and FIM tokens are not (spec §2.3).
CONTROL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# tokenizer_config.json of the Instruct models (spec §2.3).
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 131_072

RANKS_FILE = "qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
TEMPLATE_FILE = "qwen2.5-instruct.jinja"

# sha256 of the official Qwen2 vocabulary and merge list, each written as its HF strings in id
# (merge) order joined by "\n". Computed from `models/ggml-vocab-qwen2.gguf` of llama.cpp
# (converted from the released Qwen2 tokenizer.json; shipped in the llama-cpp-python 0.3.36
# sdist). Used to recognise a tokenizer folder that holds exactly this vocabulary.
OFFICIAL_VOCAB_SHA256 = "36c3749fd3c87e2402f612459b45ae4e6ce5488a3ecde47a8a3ea3ed3d5dda5a"
OFFICIAL_MERGES_SHA256 = "bbeef245f0b03a9613753068e5799c2496290005594c68f09eed68feedbe6d1f"


def _asset(name: str) -> bytes:
    try:
        return resources.files("qwen25").joinpath("assets", name).read_bytes()
    except FileNotFoundError:
        raise UserError(f"package data file qwen25/assets/{name} is missing; "
                        "reinstall qwen25 (pip install --force-reinstall qwen25)") from None


@lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """The built-in ranks {token bytes: rank}, checked against their published sha256."""
    data = _asset(RANKS_FILE)
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise UserError(f"qwen25/assets/{RANKS_FILE} is corrupted (sha256 mismatch); "
                        "reinstall qwen25")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def chat_template() -> str:
    """The official Qwen2.5-Instruct Jinja chat template, exactly as released."""
    return _asset(TEMPLATE_FILE).decode("utf-8")


def strings_sha256(strings: list[str]) -> str:
    """sha256 of strings joined by newlines (how the OFFICIAL_* digests are computed)."""
    return hashlib.sha256("\n".join(strings).encode("utf-8")).hexdigest()

"""Tokenizers from GGUF metadata: byte-level BPE (`tokenizer.ggml.model = "gpt2"`).

A GGUF carries the vocabulary (`tokenizer.ggml.tokens`, already in the byte-to-character
spelling of GPT-2), the merges, a type per token (control / user-defined / normal), the
bos/eos/pad ids and the chat template, but not the pre-tokenizer: `tokenizer.ggml.pre` only
names it. `PRE_TOKENIZERS` turns the names we know into HF `tokenizers` pipelines (the
regexes llama.cpp uses for them); an unknown name is an error, since a wrong split gives
wrong ids without any other sign.

A `qwen2` file whose vocabulary and merges are exactly Qwen2's (hashes in `qwen.py`) gets the
built-in Qwen2.5 tokenizer (tiktoken fast path), keeping the file's chat template and eos.
Everything else is encoded by HF `tokenizers` (`HFEngine`), so the ids are what transformers'
own GGUF tokenizer gives. Like every tokenizer here, `encode` never adds a BOS token, even
when the file's `add_bos_token` is set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import qwen25.formats.gguf_names as names
from qwen25.formats.gguf_file import GGUFError, GGUFFile, open_gguf
from qwen25.tokenizer import qwen
from qwen25.tokenizer.bytelevel import str_to_token
from qwen25.tokenizer.core import AddedToken, Tokenizer
from qwen25.tokenizer.bpe import HFEngine
from qwen25.tokenizer.hf import JsonSource, builtin_tokenizer

# GPT-2's split (also HF ByteLevel's built-in regex).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's split (llama.cpp "llama-bpe"): case-insensitive contractions, numbers in threes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}


# tokenizer.ggml.pre -> HF pre-tokenizer (tokenizer.json form). Each then maps bytes to the
# GPT-2 characters; only the split differs.
PRE_TOKENIZERS: dict[str, dict] = {
    "gpt2": _byte_level(use_regex=True),
    # SmolLM / StarCoder: every digit on its own, then GPT-2's split
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(use_regex=True)]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(qwen.PATTERN), _byte_level(False)]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT), _byte_level(False)]},
}
PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "starcoder": "smollm",
               "deepseek-r1-qwen": "qwen2"}


def load_gguf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a GGUF file describes (see the module docstring)."""
    return tokenizer_from_gguf(open_gguf(path))


def tokenizer_from_gguf(g: GGUFFile) -> Tokenizer:
    model = g.get(names.TOKENIZER_MODEL)
    if model is None:
        raise GGUFError(f"{g.path}: has no tokenizer metadata ({names.TOKENIZER_MODEL}); use the "
                        "model's HF tokenizer folder instead (--tokenizer)")
    if model != "gpt2":
        raise GGUFError(f"{g.path}: {names.TOKENIZER_MODEL}={model!r} is not supported; only "
                        "byte-level BPE vocabularies ('gpt2') load; use the model's HF tokenizer "
                        "folder instead (--tokenizer)")
    pre = g.get(names.TOKENIZER_PRE)
    pre = PRE_ALIASES.get(pre, pre)
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{g.path}: {names.TOKENIZER_PRE}={pre!r} is not a pre-tokenizer this "
                        f"package knows ({', '.join(PRE_TOKENIZERS)}); use the model's HF tokenizer "
                        "folder instead (--tokenizer)")
    tokens: list[str] = g.get(names.TOKENS) or []
    merges: list[str] = g.get(names.MERGES) or []
    types: list[int] = g.get(names.TOKEN_TYPE) or [names.TOKEN_NORMAL] * len(tokens)
    if not tokens or len(types) != len(tokens):
        raise GGUFError(f"{g.path}: {names.TOKENS} is missing or does not match "
                        f"{names.TOKEN_TYPE}; the file's vocabulary is corrupted")

    def token_text(key: str) -> str | None:
        i = g.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    eos, pad, bos = token_text(names.EOS_ID), token_text(names.PAD_ID), token_text(names.BOS_ID)
    template = g.get(names.CHAT_TEMPLATE)
    if pre == "qwen2" and _is_qwen2_vocab(tokens, merges):
        tok = builtin_tokenizer()
        if template is not None:
            tok.chat_template = template
        tok.eos_token, tok.pad_token, tok.bos_token = eos or tok.eos_token, pad or tok.pad_token, None
        return tok
    added = _added_tokens(tokens, types)
    data = _tokenizer_json(tokens, merges, added, PRE_TOKENIZERS[pre])
    regular = []
    for t in tokens:
        try:
            regular.append(str_to_token(t))
        except ValueError:  # a control token spelled outside the byte alphabet
            regular.append(t.encode("utf-8"))
    return Tokenizer(engine=HFEngine(data), regular=regular, added=added, eos_token=eos,
                     pad_token=pad, bos_token=bos, chat_template=template,
                     model_max_length=g.arch_get(names.CONFIG_KEYS["max_position_embeddings"]),
                     source=JsonSource(data), name_or_path=str(g.path),
                     hf_class="PreTrainedTokenizerFast")


def _is_qwen2_vocab(tokens: list[str], merges: list[str]) -> bool:
    """Exactly the released Qwen2 vocabulary, merges and control tokens (padding rows after
    them, which llama.cpp adds to reach the embedding size, are allowed)."""
    n, controls = qwen.NUM_REGULAR, [text for text, _ in qwen.CONTROL_TOKENS]
    return (len(tokens) >= n + len(controls) and len(merges) == n - 256
            and tokens[n:n + len(controls)] == controls
            and qwen.strings_sha256(tokens[:n]) == qwen.OFFICIAL_VOCAB_SHA256
            and qwen.strings_sha256(merges) == qwen.OFFICIAL_MERGES_SHA256)


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control tokens (special) and user-defined ones (not special) are matched whole, as
    transformers and llama.cpp do. A "control" token spelled outside the byte alphabet is a
    converter's mislabel that transformers skips; so do we."""
    out = []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind == names.TOKEN_CONTROL:
            try:
                str_to_token(text)
            except ValueError:
                continue
            out.append(AddedToken(i, text, True))
        elif kind == names.TOKEN_USER_DEFINED:
            out.append(AddedToken(i, text, False))
    return out


def _tokenizer_json(tokens: list[str], merges: list[str], added: list[AddedToken],
                    pre_tokenizer: dict) -> dict[str, Any]:
    """tokenizer.json (as a dict): BPE over the file's vocabulary and merges, the named
    pre-tokenizer, a byte-level decoder, no normaliser (llama.cpp applies none)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                     merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False)
    tok = HFTokenizer(bpe)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = pre_tokenizer
    data["added_tokens"] = [{"id": t.id, "content": t.content, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": t.special} for t in added]
    return data

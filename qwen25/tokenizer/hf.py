"""Hugging Face tokenizer folders: load any Qwen-style byte-level BPE folder, write ours.

A folder holds `tokenizer.json` (or the slow pair `vocab.json` + `merges.txt`) and usually
`tokenizer_config.json` (eos/pad/bos, `added_tokens_decoder`, `chat_template`); newer
transformers also write the template to `chat_template.jinja`, which wins when present.

Engine choice (see engine.py): a folder whose pipeline is Qwen's (NFC, the Qwen regex,
byte-level BPE) and whose vocabulary and merges hash to the official Qwen2 ones is encoded
by tiktoken over the built-in ranks; anything else by HF `tokenizers` itself.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from qwen25.errors import UserError
from qwen25.files import atomic_write
from qwen25.tokenizer import qwen
from qwen25.tokenizer.bytelevel import derive_merges, str_to_token, token_to_str
from qwen25.tokenizer.core import AddedToken, Tokenizer
from qwen25.tokenizer.engine import HFEngine, TiktokenEngine

BUILTIN_NAMES = ("qwen2.5",)


class TokenizerFileError(UserError):
    """A tokenizer folder or file that cannot be read."""


# ---- building tokenizer.json ---------------------------------------------------------
def build_tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]],
                         added: list[AddedToken], pattern: str = qwen.PATTERN) -> dict:
    """tokenizer.json (as a dict) of a Qwen-style pipeline: NFC, Split(pattern, isolated),
    ByteLevel without its own regex, BPE(vocab, merges), ByteLevel decoder."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    data = json.loads(tok.to_str())
    data["added_tokens"] = _added_json(added)
    return data


def _added_json(added: list[AddedToken] | tuple[AddedToken, ...]) -> list[dict]:
    return [{"id": t.id, "content": t.content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": t.special} for t in added]


class BuiltinSource:
    """The built-in ranks; vocab/merges for export are derived from them on demand."""

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        return _builtin_vocab_and_merges()

    def tokenizer_json(self, added: tuple[AddedToken, ...]) -> dict:
        vocab, merges = _builtin_vocab_and_merges()
        return build_tokenizer_json(vocab, merges, list(added))


@lru_cache(maxsize=1)
def _builtin_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = qwen.load_ranks()
    vocab = {token_to_str(t): r for t, r in ranks.items()}
    merges = [(token_to_str(a), token_to_str(b)) for a, b in derive_merges(ranks)]
    return vocab, merges


class JsonSource:
    """A tokenizer.json read from (or built for) a folder."""

    def __init__(self, data: dict):
        self.data = data

    def vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        model = self.data["model"]
        return dict(model["vocab"]), _merge_pairs(model["merges"])

    def tokenizer_json(self, added: tuple[AddedToken, ...]) -> dict:
        return {**self.data, "added_tokens": _added_json(added)}


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    # tokenizers >= 0.20 writes [a, b] pairs; older files hold "a b" strings.
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


# ---- loading -------------------------------------------------------------------------
def load_tokenizer(path_or_name: str | os.PathLike = "qwen2.5") -> Tokenizer:
    """`"qwen2.5"`: the built-in Qwen2.5 vocabulary and chat template (no files needed).
    Otherwise an HF tokenizer folder (or its tokenizer.json): see the module docstring."""
    name = str(path_or_name)
    if name.lower() in BUILTIN_NAMES and not Path(name).exists():
        return builtin_tokenizer()
    path = Path(name)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise TokenizerFileError(f"tokenizer {name!r} not found: give an HF tokenizer folder "
                                 f"or one of {', '.join(BUILTIN_NAMES)}")
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    tj_path = path if path.is_file() else folder / "tokenizer.json"
    if tj_path.exists():
        data = _read_json(tj_path)
        added = [AddedToken(int(t["id"]), t["content"], bool(t.get("special", False)))
                 for t in data.get("added_tokens", [])]
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        data, added = _json_from_slow_files(folder, config)
    else:
        raise TokenizerFileError(f"{folder} has no tokenizer.json and no vocab.json + merges.txt")
    return _tokenizer_from_json(data, added, config, folder)


@lru_cache(maxsize=1)
def _builtin_engine() -> TiktokenEngine:
    return TiktokenEngine(qwen.load_ranks(), qwen.FAST_PATTERN)


@lru_cache(maxsize=1)
def _builtin_regular() -> tuple[bytes, ...]:
    ranks = qwen.load_ranks()
    return tuple(sorted(ranks, key=ranks.__getitem__))


def builtin_tokenizer() -> Tokenizer:
    """A new `Tokenizer` over the shared built-in engine (cheap after the first call; each
    caller may change its own chat_template without affecting others)."""
    added = [AddedToken(qwen.NUM_REGULAR + i, text, special)
             for i, (text, special) in enumerate(qwen.CONTROL_TOKENS)]
    return Tokenizer(engine=_builtin_engine(), regular=_builtin_regular(), added=added,
                     eos_token=qwen.EOS_TOKEN, pad_token=qwen.PAD_TOKEN, bos_token=None,
                     chat_template=qwen.chat_template(), model_max_length=qwen.MODEL_MAX_LENGTH,
                     source=BuiltinSource(), name_or_path="qwen2.5")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"cannot read {path}: {e}") from None


def _json_from_slow_files(folder: Path, config: dict) -> tuple[dict, list[AddedToken]]:
    cls = config.get("tokenizer_class")
    if cls not in (None, "Qwen2Tokenizer", "Qwen2TokenizerFast"):
        raise TokenizerFileError(f"{folder}: tokenizer_class {cls!r} with only vocab.json + "
                                 "merges.txt is not supported; provide tokenizer.json")
    vocab = _read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ", 1)) for line in lines if line and not line.startswith("#version")]
    added = [AddedToken(int(i), t["content"], bool(t.get("special", False)))
             for i, t in config.get("added_tokens_decoder", {}).items()]
    return build_tokenizer_json(vocab, merges, added), added


def _config_token(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": ..., "__type": "AddedToken"}
        return value.get("content")
    return value


def _chat_template(config: dict, folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _is_qwen_pipeline(data: dict) -> bool:
    try:
        pre = data["pre_tokenizer"]
        split, byte_level = pre["pretokenizers"]
        return (data["normalizer"]["type"] == "NFC" and pre["type"] == "Sequence"
                and split["type"] == "Split" and split["pattern"].get("Regex") == qwen.PATTERN
                and split["behavior"] == "Isolated" and not split.get("invert")
                and byte_level["type"] == "ByteLevel" and not byte_level.get("use_regex", True)
                and data["model"]["type"] == "BPE" and not data["model"].get("ignore_merges"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _is_builtin_vocab(data: dict) -> bool:
    model = data["model"]
    vocab, merges = model["vocab"], _merge_pairs(model["merges"])
    if len(vocab) != qwen.NUM_REGULAR or len(merges) != qwen.NUM_REGULAR - 256:
        return False
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in (tokens[0], tokens[-1])] != [0, qwen.NUM_REGULAR - 1]:
        return False
    return (qwen.strings_sha256(tokens) == qwen.OFFICIAL_VOCAB_SHA256
            and qwen.strings_sha256([f"{a} {b}" for a, b in merges]) == qwen.OFFICIAL_MERGES_SHA256)


def _is_byte_level(data: dict) -> bool:
    dec = data.get("decoder") or {}
    decs = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return (data.get("model", {}).get("type") == "BPE"
            and any(d.get("type") == "ByteLevel" for d in decs)
            and "ByteLevel" in json.dumps(data.get("pre_tokenizer")))


def _tokenizer_from_json(data: dict, added: list[AddedToken], config: dict, folder: Path) -> Tokenizer:
    if not _is_byte_level(data):
        raise TokenizerFileError(f"{folder}: only byte-level BPE tokenizers (GPT-2/Qwen style) "
                                 "are supported")
    vocab = data["model"]["vocab"]
    try:
        regular = [b""] * len(vocab)
        for s, i in vocab.items():
            regular[i] = str_to_token(s)
    except (ValueError, IndexError) as e:
        raise TokenizerFileError(f"{folder}: bad vocabulary ({e}); ids must be 0..n-1") from None
    if _is_qwen_pipeline(data) and _is_builtin_vocab(data):
        engine: Any = _builtin_engine()
    else:
        engine = HFEngine(data)
    return Tokenizer(engine=engine, regular=regular, added=added,
                     eos_token=_config_token(config.get("eos_token")),
                     pad_token=_config_token(config.get("pad_token")),
                     bos_token=_config_token(config.get("bos_token")),
                     chat_template=_chat_template(config, folder),
                     model_max_length=config.get("model_max_length"),
                     source=JsonSource(data), name_or_path=str(folder))


# ---- saving --------------------------------------------------------------------------
def tokenizer_config(added: tuple[AddedToken, ...] | list[AddedToken], eos_token: str | None,
                     pad_token: str | None, bos_token: str | None, chat_template: str | None,
                     model_max_length: int | None = None) -> dict:
    """tokenizer_config.json in the released Qwen2.5 style (spec §2.3)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(t.id): {"content": t.content, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": t.special}
            for t in added},
        "additional_special_tokens": [t.content for t in added if t.special and t.content != pad_token],
        "bos_token": bos_token,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length or qwen.MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def save_folder(tok: Tokenizer, path: str | os.PathLike) -> list[str]:
    """`Tokenizer.save_pretrained`: see `write_folder`."""
    config = tokenizer_config(tok.added_tokens, tok.eos_token, tok.pad_token, tok.bos_token,
                              tok.chat_template, tok.model_max_length)
    return write_folder(path, tok._source, tok.added_tokens, config)


def write_folder(path: str | os.PathLike, source: BuiltinSource | JsonSource,
                 added: tuple[AddedToken, ...] | list[AddedToken], config: dict) -> list[str]:
    """Write tokenizer.json, vocab.json, merges.txt, tokenizer_config.json into `path`.
    Each file goes to a temporary name first and is renamed into place."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenizerFileError(f"cannot create {folder}: {e.strerror}") from None
    vocab, merges = source.vocab_and_merges()
    files = {
        "tokenizer.json": json.dumps(source.tokenizer_json(tuple(added)), ensure_ascii=False),
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2),
    }
    for name, text in files.items():
        atomic_write(folder / name, text)
    return [str(folder / name) for name in files]



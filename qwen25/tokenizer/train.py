"""Train a new byte-level BPE vocabulary the way Qwen's was built.

Same pipeline as the released tokenizer: NFC, the Qwen pre-tokenisation regex, GPT-2
byte-level alphabet (all 256 bytes are tokens, so any text encodes), BPE merges learned by
HF `tokenizers`' BpeTrainer. The 22 Qwen control tokens are appended after the regular
tokens, so a vocabulary of `vocab_size` ids has `vocab_size - 22` regular tokens.

The result is an HF folder (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json
with the Qwen2.5 chat template) that `load_tokenizer` and `transformers.AutoTokenizer`
load. Such vocabularies are encoded by HF `tokenizers` (see bpe.py for why not tiktoken).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from qwen25.errors import UserError
from qwen25.tokenizer import qwen
from qwen25.tokenizer.core import AddedToken, Tokenizer
from qwen25.tokenizer.hf import (JsonSource, build_tokenizer_json, load_tokenizer, tokenizer_config,
                                write_folder)

_CHUNK_CHARS = 1 << 20  # text handed to the trainer per item


def _read_texts(files: Sequence[str | os.PathLike]) -> Iterator[str]:
    """File contents in ~1 MiB pieces cut after a newline (newlines are kept: they are
    tokens too, and the trainer would otherwise never see them inside a piece)."""
    for name in files:
        path = Path(name)
        try:
            with path.open(encoding="utf-8", errors="replace", newline="") as f:
                rest = ""
                while chunk := f.read(_CHUNK_CHARS):
                    chunk = rest + chunk
                    cut = chunk.rfind("\n") + 1 or len(chunk)
                    rest = chunk[cut:]
                    yield chunk[:cut]
                if rest:
                    yield rest
        except OSError as e:
            raise UserError(f"cannot read training file {path}: {e.strerror}") from None


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike,
                    min_frequency: int = 2, show_progress: bool = True) -> Tokenizer:
    """Learn merges from `files` (UTF-8 text) and write an HF folder to `out`.

    `vocab_size` counts every id: 256 byte tokens + learned merges + 22 control tokens.
    Returns the tokenizer loaded back from `out`.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers, trainers

    n_controls = len(qwen.CONTROL_TOKENS)
    if vocab_size < 256 + n_controls:
        raise UserError(f"--vocab-size {vocab_size} is too small: it must hold 256 byte tokens "
                        f"and {n_controls} control tokens (at least {256 + n_controls})")
    if not files:
        raise UserError("give at least one training text file")
    for name in files:
        if not Path(name).is_file():
            raise UserError(f"training file {name} not found")

    hf = HFTokenizer.from_str(json.dumps(build_tokenizer_json({}, [], [])))  # empty BPE, Qwen pipeline
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_controls, min_frequency=min_frequency,
                                  show_progress=show_progress, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_read_texts(files), trainer=trainer)

    data = json.loads(hf.to_str())
    n_regular = len(data["model"]["vocab"])
    added = [AddedToken(n_regular + i, text, special)
             for i, (text, special) in enumerate(qwen.CONTROL_TOKENS)]
    config = tokenizer_config(added, qwen.EOS_TOKEN, qwen.PAD_TOKEN, None, qwen.chat_template())
    write_folder(out, JsonSource(data), added, config)
    return load_tokenizer(out)


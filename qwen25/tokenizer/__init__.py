"""The Qwen2.5 tokenizer: byte-level BPE with 22 control tokens (qwen25-spec.md §2).

    from qwen25.tokenizer import load_tokenizer
    tok = load_tokenizer("qwen2.5")          # built-in vocabulary, works offline
    tok.encode("Hello world")                # [9707, 1879]
    tok = load_tokenizer("path/to/hf_folder")  # tokenizer.json or vocab.json + merges.txt

Modules: `qwen` (vocabulary facts and package data), `bytelevel` (byte<->character map,
merges from ranks), `bpe` (the tiktoken / HF tokenizers encoding backends), `core` (`Tokenizer`),
`hf` (HF folders in and out), `train` (new vocabularies).
"""

from qwen25.tokenizer.core import AddedToken, StreamDecoder, Tokenizer
from qwen25.tokenizer.hf import TokenizerFileError, load_tokenizer

__all__ = ["AddedToken", "StreamDecoder", "Tokenizer", "TokenizerFileError", "load_tokenizer"]

"""`Tokenizer`: byte-level BPE ids <-> text, control tokens, streaming detokenisation.

Contract (Qwen2/2.5 semantics, qwen25-spec.md §2):
* `encode(text)` applies NFC, splits with the Qwen regex and runs BPE. Control-token text in
  `text` (e.g. "<|im_end|>") is plain text unless `allow_special=True`; then every added
  token's text is matched atomically (longest first) before normalisation, as HF does.
* `decode(ids)` joins the tokens' bytes and decodes UTF-8 with errors="replace"; ids that
  are not in the vocabulary (e.g. the padded embedding rows 151665..151935) decode to
  nothing, as in HF. `skip_special_tokens=True` drops tokens flagged `special` only.
* No BOS is ever added.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from qwen25.tokenizer.bytelevel import token_to_str
from qwen25.tokenizer.bpe import check_text, default_threads

if TYPE_CHECKING:
    from pathlib import Path


@dataclass(frozen=True)
class AddedToken:
    """A control token: matched atomically in text when allowed, never split by BPE."""

    id: int
    content: str
    special: bool  # dropped by decode(skip_special_tokens=True)


class StreamDecoder:
    """Incremental detokeniser: `push(id)` returns the text completed by that token.

    Bytes of an unfinished UTF-8 character are held back until the character completes, so
    the pieces never contain half a character; invalid bytes become U+FFFD exactly as in
    `Tokenizer.decode`. `"".join(pushes) + flush() == tokenizer.decode(all ids)`.
    """

    def __init__(self, id_bytes: Sequence[bytes | None], skip_ids: frozenset[int]):
        self._id_bytes = id_bytes
        self._skip = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; returns the new complete text (possibly "")."""
        if token_id in self._skip or not 0 <= token_id < len(self._id_bytes):
            return ""
        data = self._id_bytes[token_id]
        return self._utf8.decode(data) if data else ""

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join([self.push(int(i)) for i in token_ids])

    def flush(self) -> str:
        """End of stream: an unfinished character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A byte-level BPE vocabulary plus control tokens. Build with `load_tokenizer`."""

    def __init__(self, *, engine: Any, regular: Sequence[bytes], added: Sequence[AddedToken],
                 eos_token: str | None, pad_token: str | None, bos_token: str | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 source: Any = None, name_or_path: str = "", hf_class: str = "Qwen2Tokenizer"):
        self._engine = engine
        size = max([len(regular)] + [t.id + 1 for t in added])
        id_bytes: list[bytes | None] = list(regular) + [None] * (size - len(regular))
        for t in added:
            id_bytes[t.id] = t.content.encode("utf-8")
        self._id_bytes = id_bytes
        self._num_regular = len(regular)
        self.added_tokens: tuple[AddedToken, ...] = tuple(sorted(added, key=lambda t: t.id))
        self._added_ids = {t.content: t.id for t in self.added_tokens}
        self.special_ids = frozenset(t.id for t in self.added_tokens if t.special)
        self.control_ids = frozenset(self._added_ids.values())
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self._source = source  # how save_pretrained rebuilds tokenizer.json (see hf.py)
        # tokenizer_class written by save_pretrained: Qwen2Tokenizer for Qwen's pipeline;
        # "PreTrainedTokenizerFast" makes transformers run tokenizer.json exactly as written
        self.hf_class = hf_class

    # ---- sizes and ids -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, control tokens included (151,665 for Qwen2.5)."""
        return len(self._id_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def num_regular_tokens(self) -> int:
        """Ids below this are BPE tokens; control tokens follow."""
        return self._num_regular

    @property
    def eos_token_id(self) -> int | None:
        return self._added_or_regular_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._added_or_regular_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._added_or_regular_id(self.bos_token)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos plus `<|im_end|>` and `<|endoftext|>` when present
        (Qwen2.5-Instruct's generation_config stops on [151645, 151643])."""
        ids = [self.eos_token_id, self._added_ids.get("<|im_end|>"),
               self._added_ids.get("<|endoftext|>")]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def _added_or_regular_id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """Id of a control token's text or of a regular token in HF string form ("Ġhi")."""
        if token in self._added_ids:
            return self._added_ids[token]
        return self._str_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        """HF string form of a regular token, or a control token's text."""
        data = self.id_to_bytes(token_id)
        return token_to_str(data) if token_id < self._num_regular else data.decode("utf-8")

    def id_to_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a control token's bytes are its UTF-8 text)."""
        if not 0 <= token_id < len(self._id_bytes) or self._id_bytes[token_id] is None:
            raise KeyError(f"token id {token_id} is not in the vocabulary (0..{self.vocab_size - 1})")
        return self._id_bytes[token_id]  # type: ignore[return-value]

    @cached_property
    def _str_to_id(self) -> dict[str, int]:
        return {token_to_str(b): i for i, b in enumerate(self._id_bytes[:self._num_regular])
                if b is not None}

    def get_vocab(self) -> dict[str, int]:
        """{HF token string: id} for every id, control tokens included (HF `get_vocab`)."""
        return {**self._str_to_id, **self._added_ids}

    # ---- encoding ------------------------------------------------------------------
    @cached_property
    def _added_re(self) -> re.Pattern[str]:
        # Longest first, so that a token that is a prefix of another never wins.
        alts = sorted(self._added_ids, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, alts))) if alts else re.compile(r"(?!x)x")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With allow_special=False control-token text is plain text."""
        if not isinstance(text, str):
            check_text(text)
        if not allow_special:
            return self._engine.encode(text)
        ids: list[int] = []
        for piece, token_id in self.split_control(text):
            if token_id is None:
                ids += self._engine.encode(piece)
            else:
                ids.append(token_id)
        return ids

    def split_control(self, text: str) -> list[tuple[str, int | None]]:
        """Cut `text` at control-token text: [(plain text, None) | (control text, id)], in
        order (what encode(allow_special=True) does before encoding the plain parts)."""
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._added_re.finditer(text):
            if m.start() > pos:
                out.append((text[pos:m.start()], None))
            out.append((m.group(), self._added_ids[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """`encode` on many texts, in parallel over `num_threads` (default: all CPUs)."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                check_text(t)
        n = default_threads() if num_threads is None else max(1, int(num_threads))
        if not allow_special:
            return self._engine.encode_batch(texts, n)
        splits = [self.split_control(t) for t in texts]
        plain = [p for parts in splits for p, i in parts if i is None]
        encoded = iter(self._engine.encode_batch(plain, n))
        return [[x for p, i in parts for x in (next(encoded) if i is None else [i])]
                for parts in splits]

    # ---- decoding ------------------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (HF semantics: unknown ids dropped, bytes decoded errors="replace")."""
        if hasattr(ids, "tolist"):  # torch / numpy
            ids = ids.tolist()
        table, n = self._id_bytes, len(self._id_bytes)
        skip = self.special_ids if skip_special_tokens else ()
        chunks = [table[i] for i in ids if 0 <= i < n and i not in skip]
        return b"".join([c for c in chunks if c]).decode("utf-8", errors="replace")

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A fresh incremental detokeniser (one per generated sequence)."""
        return StreamDecoder(self._id_bytes, self.special_ids if skip_special_tokens else frozenset())

    # ---- chat and files ------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            return_assistant_mask: bool = False):
        """Render a conversation with this tokenizer's chat template (see `qwen25.chat`).

        tokenize=False -> str; tokenize=True -> ids, or (ids, assistant_mask) when
        return_assistant_mask=True. Message content is always encoded as plain text.
        """
        # The one reference from this layer (1) up to the chat layer (2), which owns the
        # template: a thin wrapper that imports it at call time, so importing
        # `qwen25.tokenizer` never loads `qwen25.chat` and the module graph stays acyclic.
        from qwen25 import chat

        return chat.apply_chat_template(self, messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt,
                                        tokenize=tokenize,
                                        return_assistant_mask=return_assistant_mask)

    def save_pretrained(self, path: str | Path) -> list[str]:
        """Write an HF tokenizer folder (tokenizer.json, vocab.json, merges.txt,
        tokenizer_config.json) that `transformers.AutoTokenizer` loads. Returns the files."""
        from qwen25.tokenizer.hf import save_folder

        return save_folder(self, path)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"engine={type(self._engine).__name__})")


"""Byte-level BPE bookkeeping: the GPT-2 byte<->character map and merges derived from ranks.

Byte-level BPE works on UTF-8 bytes. Hugging Face files (`vocab.json`, `merges.txt`,
`tokenizer.json`) cannot hold raw bytes, so every byte is written as one printable
character by GPT-2's `bytes_to_unicode` table: the 188 printable bytes (33-126, 161-172,
174-255) stand for themselves, the other 68 bytes map to U+0100, U+0101, ... in byte order.
A token's "HF string form" is its bytes spelled with that table (`b" hello"` -> `"Ġhello"`).

`tiktoken`-style files instead store `base64(bytes) rank`. With Qwen's ranks the two views
are the same vocabulary: HF id == rank, and merge line k creates the token of rank 256 + k
(qwen25-spec.md §2.2). `derive_merges` rebuilds that merge list from the ranks alone.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_char() -> tuple[str, ...]:
    """The GPT-2 table: `byte_to_char()[b]` is the one-character stand-in for byte `b`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return tuple(table[b] for b in range(256))


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    """Inverse of `byte_to_char`."""
    return {c: b for b, c in enumerate(byte_to_char())}


def token_to_str(token: bytes) -> str:
    """HF string form of a byte token (`b" hi"` -> `"Ġhi"`)."""
    table = byte_to_char()
    return "".join([table[b] for b in token])


def str_to_token(text: str) -> bytes:
    """Bytes of a token given in HF string form; ValueError if a character is not in the table."""
    table = char_to_byte()
    try:
        return bytes([table[c] for c in text])
    except KeyError as e:
        raise ValueError(f"{text!r} is not a byte-level token (character {e.args[0]!r})") from None


def bpe_split(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token` using only ranks below `max_rank`: repeatedly merge the
    adjacent pair whose concatenation has the lowest rank (leftmost on ties).

    Iterative and quadratic in `len(token)`; only used on single vocabulary entries.
    """
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The HF merge list equivalent to tiktoken `ranks`: one merge per token of rank >= 256,
    in rank order; the merge for token t is the last step of `bpe_split(t, ranks, rank(t))`.

    Raises ValueError if the ranks are not a BPE vocabulary (the first 256 ranks must be the
    single bytes; every longer token must reduce to exactly two lower-ranked tokens).
    """
    by_rank = sorted(ranks, key=ranks.__getitem__)
    if sorted(len(t) for t in by_rank[:256]) != [1] * 256:
        raise ValueError("the 256 lowest ranks must be the 256 single bytes")
    merges: list[tuple[bytes, bytes]] = []
    missing = len(by_rank)  # rank of "not in vocabulary" for the comparisons below
    for token in by_rank[256:]:
        rank = ranks[token]
        # Most tokens have a single split into two lower-ranked tokens; then it is the merge
        # and the (slow) BPE simulation is unnecessary.
        splits = [i for i in range(1, len(token))
                  if ranks.get(token[:i], missing) < rank and ranks.get(token[i:], missing) < rank]
        if len(splits) == 1:
            i = splits[0]
            merges.append((token[:i], token[i:]))
            continue
        parts = bpe_split(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        merges.append((parts[0], parts[1]))
    return merges

"""`PackedLoader`: fixed-length training sequences from token shards, resumable exactly.

Packing. The selected shards are read as one token stream (or one stream per domain when a
`mix` is given) of N tokens. Window k covers tokens [k*T, k*T + T] (T + 1 tokens): inputs
are the first T, labels the last T, so every label is the true next token and each token is
an input exactly once per epoch. A stream has (N - 1) // T windows; the tail is unused.

Order. Epoch e of a stream visits its windows in the permutation
`default_rng([seed, e, stream]).permutation(n)` (identity when `shuffle=False`); the
epochs are concatenated into one endless sequence of windows, so an epoch boundary is just
a position in it and every rank computes the same sequence.

Global batches and ranks. Step s takes the next G = batch_size * world_size windows of that
sequence; rank r keeps slots [r*B, (r+1)*B). Ranks therefore see disjoint windows, and the
union over ranks is what one process with batch G would see. With `mix={domain: weight}`,
the G slots of step s get domains drawn from `default_rng([seed, s, 1])` with the weights,
and each domain's stream advances by the number of its slots (the report's staged mixtures
can be switched per stage without re-tokenising).

State. `state_dict()` is {step, cursors: {stream: [epoch, position]}, fingerprint}: small,
JSON-ready, independent of batch size and world size (a resume may change either as long as
each rank passes the same values). `load_state_dict` continues with exactly the next batch.

Output of each step: {"input_ids", "labels", "position_ids"}: int64 [B, T] tensors. With
`reset_position_ids=True` positions restart at 0 after every EOS (and at each window
start), and the label at an EOS position is -100: after a document ends there is no next
token of the same document to predict. Without it positions are 0..T-1 and labels are the
plain next tokens (the GPT convention, where EOS also acts as the next document's BOS).

Held-out data: `split="val"` reads the held-out documents (natural mixture, no repeats),
typically with `shuffle=False, epochs=1, drop_last=False`. `bytes_per_token` of the
selection turns a mean loss in nats into bits per byte: bpb = loss / (bytes_per_token * ln 2).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from qwen25.data.manifest import load_manifest, select_shards
from qwen25.data.shards import read_tokens
from qwen25.errors import UserError

IGNORE_INDEX = -100
_STATE_VERSION = 1


class _Stream:
    """Shards read as one token sequence; `read(start, n)` crosses shard boundaries."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.tokens = [read_tokens(p) for p in paths]
        self.ends = np.cumsum([len(t) for t in self.tokens])
        self.size = int(self.ends[-1]) if len(self.ends) else 0

    def read(self, start: int, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.ends, start, side="right"))
        while filled < n:
            begin = int(self.ends[i - 1]) if i else 0
            part = self.tokens[i][start + filled - begin:start + n - begin]
            out[filled:filled + len(part)] = part
            filled += len(part)
            i += 1
        return out


class PackedLoader:
    """Packed pretraining batches from a manifest (or a list of .bin shards); see module doc.

    source: manifest path / folder, or a list of uint32 shard paths.
    seq_len, batch_size: T and per-rank B. rank, world_size: this process among the ranks.
    seed, shuffle: window order. reset_position_ids: document-aware positions (see above).
    mix: {domain: weight} drawn per batch slot (manifest only); None reads all shards as one
      stream in manifest order. split / domains / sources: which shards (manifest only).
    epochs: stop after this many passes (None: endless; mix requires None).
    drop_last: with finite epochs, drop the final partial batch (False: yield it; single rank).
    eos_token_id: the document separator, for a list of shards (a manifest records its own).

    Every rank computes the same global order, so `state_dict()` is identical on all ranks:
    saving rank 0's is enough.
    """

    def __init__(self, source, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, reset_position_ids: bool = False,
                 mix: dict[str, float] | None = None, split: str = "train",
                 domains: list[str] | None = None, sources: list[str] | None = None,
                 epochs: int | None = None, drop_last: bool = True, eos_token_id: int | None = None):
        if seq_len < 1 or batch_size < 1:
            raise UserError("seq_len and batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if mix is not None and epochs is not None:
            raise UserError("a mix samples domains endlessly; use epochs=None with mix")
        if epochs is not None and not drop_last and world_size > 1:
            raise UserError("drop_last=False needs world_size 1 (ranks must take the same number of steps)")
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.shuffle, self.reset_position_ids = seed, shuffle, reset_position_ids
        self.epochs, self.drop_last, self.split = epochs, drop_last, split
        self.bytes_per_token: float | None = None
        self.eos = eos_token_id
        if isinstance(source, (list, tuple)):
            if mix:
                raise UserError("mix needs a manifest (domains are recorded there), not a list of shards")
            streams = {"all": [Path(p) for p in source]}
            shard_ids = [str(p) for p in source]
        else:
            m = load_manifest(source)
            root = Path(m["_root"])
            shards = select_shards(m, split, domains, sources)
            tokens, nbytes = sum(s["tokens"] for s in shards), sum(s["bytes"] for s in shards)
            self.bytes_per_token = nbytes / tokens if tokens else None
            self.eos = int(m["eos_token_id"])
            if mix:
                unknown = sorted(set(mix) - {s["domain"] for s in shards})
                if unknown:
                    raise UserError(f"mix weight for domain(s) {unknown} that have no {split} shards; "
                                    f"domains: {sorted({s['domain'] for s in shards})}")
                streams = {d: [root / s["path"] for s in shards if s["domain"] == d] for d in sorted(mix)}
            else:
                streams = {"all": [root / s["path"] for s in shards]}
            shard_ids = [s["sha256"] for s in shards]
        # One digest of the shards read, so a state never resumes on different data.
        self._shards_digest = hashlib.sha256("\n".join(shard_ids).encode()).hexdigest()
        self.streams = {name: _Stream(paths) for name, paths in streams.items()}
        if reset_position_ids and self.eos is None:
            raise UserError("reset_position_ids needs the document separator: pass eos_token_id "
                            "with a list of shards (a manifest records it)")
        for name, st in self.streams.items():
            if (st.size - 1) // seq_len < 1:
                raise UserError(f"stream {name!r} of split {split!r} has {st.size} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self.names = list(self.streams)
        self.n_windows = {n: (s.size - 1) // seq_len for n, s in self.streams.items()}
        if mix:
            w = np.array([float(mix[n]) for n in self.names])
            if (w < 0).any() or w.sum() <= 0:
                raise UserError("mix weights must be >= 0 with a positive sum")
            self.mix = dict(zip(self.names, (w / w.sum()).tolist()))
        else:
            self.mix = None
        self.step = 0
        self.cursors = {n: [0, 0] for n in self.names}  # [epoch, position within the epoch]
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    # ---- order ---------------------------------------------------------------------------

    def _order(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        if key not in self._orders:
            n = self.n_windows[name]
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, self.names.index(name)]).permutation(n)
            else:
                order = np.arange(n)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != name or k[1] >= epoch - 1}
            self._orders[key] = order
        return self._orders[key]

    def _take(self, name: str, count: int, cursor: list[int]) -> list[int]:
        """The next `count` windows of stream `name` from `cursor` (advanced in place)."""
        out: list[int] = []
        n = self.n_windows[name]
        while len(out) < count:
            if self.epochs is not None and cursor[0] >= self.epochs:
                break
            order = self._order(name, cursor[0])
            k = min(count - len(out), n - cursor[1])
            out += order[cursor[1]:cursor[1] + k].tolist()
            cursor[1] += k
            if cursor[1] == n:
                cursor[0], cursor[1] = cursor[0] + 1, 0
        return out

    def _global_batch(self) -> tuple[list[tuple[str, int]], dict[str, list[int]]]:
        """(stream, window) for the G slots of the current step, and the advanced cursors."""
        g = self.batch_size * self.world_size
        cursors = {n: list(c) for n, c in self.cursors.items()}
        if self.mix is None:
            name = self.names[0]
            return [(name, w) for w in self._take(name, g, cursors[name])], cursors
        rng = np.random.default_rng([self.seed, self.step, 1])
        labels = rng.choice(len(self.names), size=g, p=[self.mix[n] for n in self.names])
        taken = {n: iter(self._take(n, int((labels == i).sum()), cursors[n])) for i, n in enumerate(self.names)}
        return [(self.names[i], next(taken[self.names[i]])) for i in labels.tolist()], cursors

    # ---- iteration ---------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        slots, cursors = self._global_batch()
        g = self.batch_size * self.world_size
        if len(slots) < g and (self.drop_last or not slots):
            raise StopIteration
        mine = slots[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.cursors, self.step = cursors, self.step + 1
        t = self.seq_len
        windows = np.stack([self.streams[name].read(w * t, t + 1) for name, w in mine])
        return self._tensors(windows)

    def _tensors(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        inputs, labels = windows[:, :-1], windows[:, 1:].copy()
        b, t = inputs.shape
        idx = np.tile(np.arange(t, dtype=np.int64), (b, 1))
        if self.reset_position_ids:
            at_eos = inputs == self.eos
            starts = np.concatenate([np.ones((b, 1), bool), at_eos[:, :-1]], axis=1)
            last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
            positions = idx - last_start
            labels[at_eos] = IGNORE_INDEX
        else:
            positions = idx
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(inputs)),
                "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions)}

    def batches_per_epoch(self) -> int:
        """Full global batches in one pass over the (single) stream."""
        return self.n_windows[self.names[0]] // (self.batch_size * self.world_size)

    # ---- state ---------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        return {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "split": self.split, "mix": self.mix, "epochs": self.epochs,
                "streams": {n: self.streams[n].size for n in self.names},
                "shards": self._shards_digest}

    def state_dict(self) -> dict:
        """Where the loader is: JSON-serialisable, a few hundred bytes."""
        return {"version": _STATE_VERSION, "step": self.step,
                "cursors": {n: list(c) for n, c in self.cursors.items()},
                "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict` of a loader over the same data and order)."""
        if state.get("version") != _STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')} is not {_STATE_VERSION}")
        mine, theirs = self._fingerprint(), json.loads(json.dumps(state["fingerprint"]))
        diff = sorted(k for k in mine if json.loads(json.dumps(mine[k])) != theirs.get(k))
        if diff:
            raise UserError(f"loader state does not match this loader ({', '.join(diff)} differ); "
                            "resume with the same data, seq_len, seed, shuffle, split and mix")
        self.step = int(state["step"])
        self.cursors = {n: [int(e), int(p)] for n, (e, p) in state["cursors"].items()}

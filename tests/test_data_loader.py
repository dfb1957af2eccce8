"""PackedLoader: exact resume (hypothesis), rank partition, windows/labels/positions vs an explicit
computation, epochs, mixtures, held-out split, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen25.data.loader import IGNORE_INDEX, PackedLoader
from qwen25.data.manifest import write_manifest
from qwen25.data.shards import ShardWriter
from qwen25.errors import UserError

EOS = 7


def build(root: Path, domains: dict[str, int], val_docs: int = 6, shard_tokens: int = 1024, seed: int = 0) -> Path:
    """A manifest over synthetic documents. Token values are unique per position (domain k uses
    10^6 * (k + 1) + position), except EOS, so every window can be identified."""
    rng = np.random.default_rng(seed)
    shards = []
    for k, (domain, n_docs) in enumerate(sorted(domains.items())):
        for split, count in (("train", n_docs), ("val", val_docs)):
            w = ShardWriter(root / split, domain, EOS, shard_tokens, root=root, split=split, domain=domain,
                            source=f"src-{domain}")
            base = 1_000_000 * (k + 1) + (500_000 if split == "val" else 0)
            pos = 0
            for _ in range(count):
                n = int(rng.integers(1, 60))
                w.add(np.arange(base + pos, base + pos + n, dtype=np.uint32), nbytes=3 * n)
                pos += n
            shards += w.close()
    m = {"format": "qwen25-shards", "version": 1, "eos_token_id": EOS, "shards": [s.__dict__ for s in shards]}
    return write_manifest(root, m)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("loader"), {"a": 40, "b": 25})


def stream(manifest: Path, split="train", domains=None) -> np.ndarray:
    m = json.loads(manifest.read_text())
    parts = [np.fromfile(manifest.parent / s["path"], dtype=np.uint32) for s in m["shards"]
             if s["split"] == split and (domains is None or s["domain"] in domains)]
    return np.concatenate(parts).astype(np.int64)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "labels", "position_ids"))


@given(seq_len=st.integers(1, 40), batch=st.integers(1, 4), world=st.integers(1, 3), shuffle=st.booleans(),
       reset=st.booleans(), mix=st.booleans(), stop=st.integers(0, 25), seed=st.integers(0, 3))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_resume_gives_exactly_the_next_batches(manifest, seq_len, batch, world, shuffle, reset, mix, stop, seed):
    kw = dict(seq_len=seq_len, batch_size=batch, world_size=world, seed=seed, shuffle=shuffle,
              reset_position_ids=reset, mix={"a": 0.6, "b": 0.4} if mix else None)
    for rank in range(world):
        reference = take(PackedLoader(manifest, rank=rank, **kw), stop + 3)
        first = PackedLoader(manifest, rank=rank, **kw)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        assert len(json.dumps(state)) < 4096
        resumed = PackedLoader(manifest, rank=rank, **kw)
        resumed.load_state_dict(state)
        assert same(take(resumed, 3), reference[stop:])


@pytest.mark.parametrize("mix", [None, {"a": 0.5, "b": 0.5}])
def test_ranks_partition_the_global_batch(manifest, mix):
    single = take(PackedLoader(manifest, 16, batch_size=6, seed=1, mix=mix), 12)
    ranks = [take(PackedLoader(manifest, 16, batch_size=2, rank=r, world_size=3, seed=1, mix=mix), 12)
             for r in range(3)]
    for step in range(12):
        joined = torch.cat([ranks[r][step]["input_ids"] for r in range(3)])
        assert torch.equal(joined, single[step]["input_ids"])
        firsts = [set(ranks[r][step]["input_ids"][:, 0].tolist()) for r in range(3)]
        assert not (firsts[0] & firsts[1] or firsts[1] & firsts[2] or firsts[0] & firsts[2])


@pytest.mark.parametrize("reset", [False, True])
def test_windows_labels_and_positions_match_explicit_computation(manifest, reset):
    t = 13
    tokens = stream(manifest)
    loader = PackedLoader(manifest, t, batch_size=3, shuffle=False, reset_position_ids=reset)
    for step, batch in enumerate(take(loader, 5)):
        for row in range(3):
            k = step * 3 + row
            window = tokens[k * t:k * t + t + 1]
            assert batch["input_ids"][row].tolist() == window[:-1].tolist()
            labels, positions, pos = [], [], 0
            for i in range(t):  # slow reference, one token at a time
                if reset and i > 0 and window[i - 1] == EOS:
                    pos = 0
                positions.append(pos if reset else i)
                pos += 1
                labels.append(IGNORE_INDEX if reset and window[i] == EOS else int(window[i + 1]))
            assert batch["labels"][row].tolist() == labels
            assert batch["position_ids"][row].tolist() == positions
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, t)


def test_each_epoch_visits_every_window_once(manifest):
    t = 11
    loader = PackedLoader(manifest, t, batch_size=4, seed=5)
    n = loader.n_windows["all"]
    tokens = stream(manifest)
    all_windows = sorted(int(tokens[k * t]) for k in range(n))
    seen = [int(x) for b in take(loader, (2 * n) // 4 + 1) for x in b["input_ids"][:, 0]]
    assert sorted(seen[:n]) == all_windows and sorted(seen[n:2 * n]) == all_windows
    assert seen[:n] != seen[n:2 * n]  # a new order each epoch


def test_mixture_proportions(manifest):
    loader = PackedLoader(manifest, 8, batch_size=8, seed=2, mix={"a": 0.8, "b": 0.2})
    firsts = torch.cat([b["input_ids"][:, 0] for b in take(loader, 150)])
    share = float(((firsts >= 1_000_000) & (firsts < 2_000_000)).float().mean())
    n = len(firsts)
    assert abs(share - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5


def test_held_out_split_single_pass_and_bytes_per_token(manifest):
    t = 9
    tokens = stream(manifest, "val")
    loader = PackedLoader(manifest, t, batch_size=4, split="val", shuffle=False, epochs=1, drop_last=False)
    batches = list(loader)
    n = (len(tokens) - 1) // t
    assert sum(len(b["input_ids"]) for b in batches) == n
    assert torch.cat([b["input_ids"] for b in batches]).flatten().tolist() == tokens[:n * t].tolist()
    m = json.loads(manifest.read_text())
    val = [s for s in m["shards"] if s["split"] == "val"]
    assert loader.bytes_per_token == sum(s["bytes"] for s in val) / sum(s["tokens"] for s in val)
    only_a = PackedLoader(manifest, t, batch_size=2, split="val", domains=["a"], shuffle=False, epochs=1)
    assert all(int(x) < 2_000_000 for b in only_a for x in b["input_ids"].flatten() if x != EOS)


def test_shard_list_source_and_errors(manifest, tmp_path):
    m = json.loads(manifest.read_text())
    paths = [manifest.parent / s["path"] for s in m["shards"] if s["split"] == "train"]
    from_list = take(PackedLoader(paths, 10, 2, seed=3, reset_position_ids=True, eos_token_id=EOS), 4)
    assert same(from_list, take(PackedLoader(manifest, 10, 2, seed=3, reset_position_ids=True), 4))
    with pytest.raises(UserError, match="eos_token_id"):
        PackedLoader(paths, 10, 2, reset_position_ids=True)
    with pytest.raises(UserError, match="mix"):
        PackedLoader(manifest, 8, 2, mix={"a": 1.0}, epochs=1)
    with pytest.raises(UserError, match="no train shards|domain"):
        PackedLoader(manifest, 8, 2, mix={"zzz": 1.0})
    with pytest.raises(UserError, match="fewer than"):
        PackedLoader(manifest, 10**6, 2)
    with pytest.raises(UserError, match="not found"):
        PackedLoader(tmp_path / "nothing", 8, 2)
    state = PackedLoader(manifest, 8, 2).state_dict()
    with pytest.raises(UserError, match="seq_len"):
        PackedLoader(manifest, 9, 2).load_state_dict(state)

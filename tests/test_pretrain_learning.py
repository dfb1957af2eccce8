"""A tiny run on real built-in text learns: held-out loss far below the unigram entropy.

Data: the Python standard library's own sources (one of the project's built-in corpora),
as UTF-8 bytes (token = byte, so the test needs no trained tokenizer). The threshold is
computed from the data: the entropy of the held-out split's own byte distribution, the
best any model that ignores context can do. A model that uses context must get well below
it (we ask for 25% below) in 150 steps of 2,048 tokens.
"""

import math
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from qwen25.train.config import PretrainConfig, Stage
from qwen25.train.pretrain import pretrain
from train_fakes import fake_factory, write_fake_manifest


def _stdlib_bytes(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):  # deterministic order, top-level modules only
        out += path.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _entropy_nats(tokens: np.ndarray) -> float:
    counts = Counter(tokens.tolist())
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts.values())


@pytest.mark.slow
def test_tiny_run_beats_the_unigram_entropy_of_held_out_text(tmp_path):
    data = np.frombuffer(_stdlib_bytes(600_000), dtype=np.uint8).astype(np.uint32)
    train, val = data[:550_000], data[550_000:]
    manifest = write_fake_manifest(tmp_path / "data", train, val, bytes_per_token=1.0)
    unigram = _entropy_nats(val)
    cfg = PretrainConfig(
        out=str(tmp_path / "run"), model="tiny",
        model_overrides={"vocab_size": 256, "hidden_size": 96, "intermediate_size": 256,
                         "num_attention_heads": 4, "num_key_value_heads": 2},
        data=str(manifest), seq_len=64, batch_tokens=2048, micro_batch=32, lr=4e-3,
        warmup_steps=10, schedule="wsd", decay_frac=0.3, eval_every=0, eval_tokens=16384,
        checkpoint_every=0, peak_flops=1e12, stages=(Stage("main", steps=150),))
    summary = pretrain(cfg, loader_factory=fake_factory)
    held_out = summary["eval"]["all"]["loss"]
    assert held_out < 0.75 * unigram, f"held-out {held_out:.3f} nats vs unigram entropy {unigram:.3f}"
    assert summary["eval"]["all"]["bpb"] == pytest.approx(held_out / math.log(2))

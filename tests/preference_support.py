"""Shared set-up of the preference tests: a small ChatML tokenizer trained on the fly and tiny
random HF Qwen2 checkpoints sized to it (a 151k vocabulary would make every TRL step slow)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import randomize_

CORPUS = """What is 2+2? 4. 5, I think. Be brief. Name a colour. Blue. Seven. Say hi. hi again, louder.
HI! Capital of France? Paris is the capital of France. Lyon. The answer is 12. The answer is 7.
You are Qwen, created by Alibaba Cloud. You are a helpful assistant. system user assistant

"""  # the blank line teaches the "\n\n" merge (a reply starting with a newline hits it)


def train_small_tokenizer(root: Path, vocab_size: int = 400):
    from qwen25.tokenizer.train import train_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text(CORPUS * 20)
    return train_tokenizer([root / "corpus.txt"], vocab_size, root / "tok", show_progress=False)


def hf_config(vocab_size: int, **kw):
    from transformers import Qwen2Config

    base = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                max_position_embeddings=512)
    return Qwen2Config(**(base | kw))


def save_hf_lm(path: Path, vocab_size: int, seed: int, std: float = 0.3, **kw):
    """A random HF Qwen2ForCausalLM saved at `path`; returns the (eval-mode) HF model."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = randomize_(Qwen2ForCausalLM(hf_config(vocab_size, **kw)), seed, std)
    model.save_pretrained(path)
    return model.eval()


def lm_folder(root: Path, tok, seed: int = 0, **kw) -> Path:
    """A tiny random HF LM at root/lm-SEED with the tokenizer's files beside its weights
    (the layout of an SFT checkpoint)."""
    path = root / f"lm-{seed}"
    save_hf_lm(path, kw.pop("vocab_size", len(tok)), seed, std=0.1, **kw)
    tok.save_pretrained(path)
    return path


def write_pairs(path: Path, n: int, bad: bool = True) -> Path:
    """n good conversational pairs ("the answer is A" vs a wrong number), then (bad=True)
    one row of each kind the loader must drop: identical, empty, malformed, not JSON."""
    import json
    import random

    rnd = random.Random(0)
    rows = []
    for i in range(n):
        a, b = rnd.randint(1, 9), rnd.randint(1, 9)
        wrong = a + b + rnd.choice([-2, -1, 1, 2])
        rows.append({"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}],
                     "chosen": [{"role": "assistant", "content": f"The answer is {a + b}."}],
                     "rejected": [{"role": "assistant", "content": f"The answer is {wrong}."}],
                     "id": i})
    lines = [json.dumps(r) for r in rows]
    if bad:
        same = {"prompt": "Say hi", "chosen": "hi", "rejected": "hi"}
        empty = {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": ""}],
                 "rejected": [{"role": "assistant", "content": "y"}]}
        lines += [json.dumps(same), json.dumps(empty), json.dumps({"prompt": "x"}), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    return path


def records(out: Path, kind: str) -> list[dict]:
    """The `kind` rows of a run's metrics.jsonl (a last line cut by kill -9 is skipped)."""
    recs = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r["kind"] == kind:
            recs.append(r)
    return recs

"""Shared pieces of the SFT tests: a small trained ChatML tokenizer and a tiny model folder.

The tokenizer is learned from the built-in SFT text (so conversations are a few hundred
tokens, not thousands of bytes) and carries Qwen's 22 control tokens and chat template;
the model is the `tiny` preset with that vocabulary, saved as an HF folder. Both are built
once per test session.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from qwen25.checkpoint import save_model
from qwen25.config import ModelConfig
from qwen25.data import mathgen
from qwen25.model.model import build_model

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def conversations() -> list[dict]:
    """Multi-turn rows with a system prompt, the default one, tool calls and tool results."""
    rows = []
    for i, p in enumerate(mathgen.problems("train", 12)):
        row = {"messages": [{"role": "user", "content": p["question"]},
                            {"role": "assistant", "content": p["solution"]},
                            {"role": "user", "content": "And the final number?"},
                            {"role": "assistant", "content": f"It is {p['answer']}."}]}
        if i % 3 == 1:
            row["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
        if i % 3 == 2:
            row["tools"] = [WEATHER_TOOL]
            row["messages"] += [
                {"role": "user", "content": "Is it raining in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
                {"role": "tool", "content": json.dumps({"rain": True})},
                {"role": "assistant", "content": "Yes, it is raining in Oslo."}]
        rows.append(row)
    return rows


@lru_cache(maxsize=1)
def workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="qwen25-sft-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    from qwen25.tokenizer.train import train_tokenizer

    text = workdir() / "corpus.txt"
    lines = [p["text"] for p in mathgen.problems("train", 300)] + [p["text"] for p in mathgen.problems("test", 50)]
    lines += [json.dumps(r) for r in conversations()]
    text.write_text("\n".join(lines))
    out = workdir() / "tokenizer"
    train_tokenizer([text], 600, out, show_progress=False)
    return out


def tokenizer():
    from qwen25.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir())


@lru_cache(maxsize=4)
def model_dir(seed: int = 0) -> Path:
    """A tiny random model with the test tokenizer's vocabulary (eos <|endoftext|>, as a base model)."""
    tok = tokenizer()
    eot = tok.token_to_id("<|endoftext|>")
    cfg = ModelConfig.preset("tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64, eos_token_id=eot,
                                            bos_token_id=eot, max_position_embeddings=2048)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():  # larger weights than the init: logits that differ clearly per position
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08, generator=torch.Generator().manual_seed(seed + p.numel()))
    out = workdir() / f"model-{seed}"
    save_model(model, out)
    for f in tokenizer_dir().iterdir():
        shutil.copyfile(f, out / f.name)
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path

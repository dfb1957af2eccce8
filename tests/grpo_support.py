"""Shared pieces of the GRPO tests: a tiny random chat model and a reward that varies.

`build_chat_checkpoint(root)`: a random tiny model with a small trained chat tokenizer (a
400-token BPE with the Qwen control tokens and chat template), saved as an HF folder, so a
GRPO step takes a fraction of a second on a CPU. `parity` rewards the completion's length
mod 2, so the answers of a group differ and the advantages are not all zero.

Run as a script, it is a GRPO run in a process of its own (under torchrun in the DDP tests)
with the parity reward registered: `python tests/grpo_support.py CONFIG.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def build_chat_checkpoint(root: Path) -> Path:
    from qwen25 import ModelConfig, build_model, load_tokenizer, save_model
    from qwen25.data import mathgen
    from qwen25.tokenizer.train import train_tokenizer

    text = root / "corpus.txt"
    text.write_text("\n".join(p["text"] for p in mathgen.problems("train", 300)) +
                    "\nSolve the problem step by step. End your answer with \"The answer is N.\"\n")
    tok_dir = root / "tok"
    train_tokenizer([text], 400, tok_dir)
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size, max_position_embeddings=1024,
                                             tie_word_embeddings=False, eos_token_id=tok.token_to_id("<|im_end|>"))
    model = build_model(cfg, init=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    ck = root / "ck"
    save_model(model, ck)
    for f in tok_dir.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    return ck


def parity(prompt, completion, example):  # a reward that varies within a group
    return float(len(completion) % 2)


def register_parity() -> None:
    from qwen25.train import rewards

    rewards.BUILTIN["parity"] = (parity, "test reward")


def main(config: str) -> int:
    from qwen25.errors import UserError
    from qwen25.train.grpo import grpo
    from qwen25.train.grpo_config import GRPOConfig

    register_parity()
    cfg = json.loads(Path(config).read_text())
    if "lora_targets" in cfg:
        cfg["lora_targets"] = tuple(cfg["lora_targets"])
    try:
        grpo(GRPOConfig(**cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""SFT throughput and peak memory: our step vs TRL's `SFTTrainer`, padded and packed.

Both sides train the same model (a transformers `Qwen2ForCausalLM` built from one config and
its weights copied into ours), on the same built-in conversations already tokenized with the
same assistant-only loss mask, with the same batch (conversations per step), precision,
AdamW settings and gradient clip. Each measurement runs in its own subprocess, so peak
memory (resident set on the CPU, `max_memory_allocated` on a GPU) belongs to one side only.

    padded: one conversation per row, padded to the longest of the micro-batch
            (ours: layout "pad"; TRL: packing=False, padding_free=False)
    packed: no padding, attention kept inside each conversation
            (ours: layout "padding_free"; TRL: packing=True, bfd, position_ids)

Tokens/s: the real (non-pad) tokens of one pass over the conversations / the summed step
times (collation, forward, backward, clip, AdamW; nothing before the first step). The goal is >= 1.3x
TRL with equal or lower memory. Run once and read the ratios; on a shared machine absolute
numbers move between runs.

    python benchmarks/sft.py                         # CPU, the tiny preset with Qwen's vocabulary
    python benchmarks/sft.py --device cuda --preset 0.5B --batch 16 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR, CLIP, WD = 1e-4, 1.0, 0.1


def _examples(n: int, seq_len: int):
    """Built-in math and instruction conversations (a benchmark needs no decontamination)."""
    from qwen25.data import mathgen
    from qwen25.data.chat import load_examples
    from qwen25.data.sft_builtin import instruction_row, math_row
    from qwen25.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen2.5")
    rows = [math_row("train", 0, p) if i % 3 else instruction_row("train", i)
            for i, p in enumerate(mathgen.problems("train", n))]
    examples, _ = load_examples([(str(i), r) for i, r in enumerate(rows)], tok, seq_len)
    return examples[:n]


def _config(preset: str):
    from qwen25.config import ModelConfig

    return ModelConfig.preset(preset)


def run_ours(args) -> dict:
    from qwen25.data.chat_batches import layout
    from qwen25.model.model import build_model
    from qwen25.train.loop import train_step
    from qwen25.train.optim import build_optimizer
    from qwen25.train.parallel import World
    from qwen25.train.sft import sft_loss

    device = torch.device(args.device)
    examples = _examples(args.batch * args.steps, args.seq_len)
    model = build_model(_config(args.preset), device=device, seed=0).train()
    opt = build_optimizer(model, LR, (0.9, 0.999), 1e-8, WD)
    world = World(device=device)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    how = "padding_free" if args.packed else "pad"
    times, tokens = [], []
    for s in range(args.steps):
        chunk = examples[s * args.batch:(s + 1) * args.batch]
        _sync(device)
        t0 = time.perf_counter()  # collation counts, as it does inside TRL's step
        micro = [{k: v.to(device) for k, v in b.items()} for b in
                 layout(chunk, how, args.micro_batch, args.seq_len)]
        train_step(model, opt, micro, lambda m, b: sft_loss(m, b, m.config), lr=LR, world=world, grad_clip=CLIP,
                   autocast_dtype=autocast)
        _sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(e) for e in chunk))
    return _result(times, tokens, device)


def run_trl(args) -> dict:
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from qwen25.tokenizer import load_tokenizer

    device = torch.device(args.device)
    examples = _examples(args.batch * args.steps, args.seq_len)
    rows = [{"input_ids": list(e.ids), "completion_mask": [0] + [int(t != -100) for t in e.labels[:-1]]}
            for e in examples]
    hf_cfg = Qwen2Config(**{k: v for k, v in _config(args.preset).to_hf().items()
                            if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf_cfg).to(device)
    tok_dir = Path(args.workdir) / "tok"
    if not tok_dir.exists():
        load_tokenizer("qwen2.5").save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

    # One pass over the same conversations: padded, `batch` of them per step; packed, one
    # row of up to seq_len tokens per step (TRL packs the whole set before training).
    cfg = SFTConfig(output_dir=str(Path(args.workdir) / "trl"), num_train_epochs=1,
                    per_device_train_batch_size=1 if args.packed else args.micro_batch,
                    gradient_accumulation_steps=1 if args.packed else args.batch // args.micro_batch,
                    learning_rate=LR, optim="adamw_torch",
                    weight_decay=WD, max_grad_norm=CLIP, lr_scheduler_type="constant", warmup_steps=0,
                    logging_steps=10_000, save_strategy="no", report_to=[], max_length=args.seq_len,
                    packing=args.packed, padding_free=args.packed, completion_only_loss=True,
                    use_cpu=device.type == "cpu", bf16=args.precision == "bf16", dataloader_num_workers=0,
                    seed=0, disable_tqdm=True, shuffle_dataset=False)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Clock()])
    trainer.train()
    total = sum(len(r["input_ids"]) for r in rows)
    return _result(times, [total], device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _result(times, tokens, device) -> dict:
    t, n = sum(times), sum(tokens)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"tokens_per_s": n / t if t else 0.0, "peak_bytes": peak, "steps": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8, help="conversations per step")
    p.add_argument("--micro-batch", type=int, default=4, help="conversations (padded) per forward pass")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workdir", default="/tmp/qwen25-bench-sft")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.side:
        print(json.dumps((run_ours if args.side == "ours" else run_trl)(args)))
        return
    results = {}
    for packed in (False, True):
        for side in ("ours", "trl"):
            cmd = [sys.executable, __file__, "--side", side, "--device", args.device, "--preset", args.preset,
                   "--precision", args.precision, "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--workdir", args.workdir]
            out = subprocess.run(cmd + (["--packed"] if packed else []), capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[(packed, side)] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {args.preset}, {args.precision}, {args.batch} conversations/step, device {args.device}")
    print("| layout | ours tok/s | TRL tok/s | speed-up | ours peak MB | TRL peak MB |")
    print("|---|---|---|---|---|---|")
    for packed in (False, True):
        o, t = results[(packed, "ours")], results[(packed, "trl")]
        print(f"| {'packed' if packed else 'padded'} | {o['tokens_per_s']:,.0f} | {t['tokens_per_s']:,.0f} | "
              f"{o['tokens_per_s'] / t['tokens_per_s']:.2f}x | {o['peak_bytes'] / 2**20:,.0f} | "
              f"{t['peak_bytes'] / 2**20:,.0f} |")


if __name__ == "__main__":
    main()

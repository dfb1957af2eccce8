"""Training throughput: our trainer vs a transformers `Qwen2ForCausalLM` + `torch.optim.AdamW` loop.

Both sides train the same config from the same weights on the same token batches, with the
same batch, sequence length, precision (fp32, or bf16 autocast over fp32 weights), gradient
clipping and AdamW hyper-parameters. Rounds alternate between the two so that drifts in
machine speed (other processes on a shared box) hit both alike; the medians are compared.
MFU is relative to the machine's matmul peak measured in the same run (a large square
matmul in the compute dtype), with 6N + attention FLOPs per token.

    python benchmarks/train.py                                   # CPU, the speedrun's model
    python benchmarks/train.py --precision bf16 --compile        # our best CPU settings
    python benchmarks/train.py --device cuda --preset 0.5B --precision bf16 --compile \\
        --seq-len 2048 --batch 16 --micro-batch 4 --no-reference  # MFU of the 0.5B on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen25.config import ModelConfig, count_parameters  # noqa: E402
from qwen25.model.model import build_model  # noqa: E402
from qwen25.train.loop import flops_per_token, lm_loss, measure_matmul_flops, train_step  # noqa: E402
from qwen25.train.optim import build_optimizer  # noqa: E402
from qwen25.train.parallel import World, apply_compile  # noqa: E402

# The speedrun's CPU model (see qwen25/recipes/speedrun.py): small enough for 2 cores.
SPEEDRUN = dict(hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=3,
                num_key_value_heads=1, vocab_size=8192, tie_word_embeddings=True, rope_theta=10_000.0)


def model_config(preset: str) -> ModelConfig:
    if preset == "speedrun":
        return ModelConfig(**SPEEDRUN)
    return ModelConfig.preset(preset)


def batches(cfg: ModelConfig, n: int, micro: int, seq: int, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].contiguous().to(device),
                    "position_ids": torch.arange(seq, device=device).expand(micro, seq)})
    return out


def ours(cfg, args, device, micro_batches):
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0).train()
    if args.compile:
        apply_compile(model)
    opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    world = World(device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    loss_fn = lambda m, b: lm_loss(m, b, cfg, compiled=args.compile)  # noqa: E731

    def step():
        train_step(model, opt, micro_batches, loss_fn, lr=1e-4, world=world, grad_clip=1.0, autocast_dtype=dtype)
    return step


def reference(cfg, args, device, micro_batches):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf_cfg).to(device).train()
    model.load_state_dict(build_model(cfg, device=device, seed=0).state_dict(), strict=False)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    n = len(micro_batches)

    def step():
        for b in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                logits = model(input_ids=b["input_ids"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten()) / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="speedrun", help="speedrun (the CPU speedrun's model) or a ModelConfig preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds (one step each side)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    p.add_argument("--compile", action="store_true", help="torch.compile our decoder blocks and loss")
    p.add_argument("--no-reference", action="store_true", help="skip transformers (e.g. MFU only, on a GPU)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = model_config(args.preset)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, args.seq_len))
    micro = batches(cfg, args.batch // args.micro_batch, args.micro_batch, args.seq_len, device)
    tokens = args.batch * args.seq_len
    contenders = {"ours": ours(cfg, args, device, micro)}
    if not args.no_reference:
        contenders["transformers"] = reference(cfg, args, device, micro)
    for step in contenders.values():
        for _ in range(args.warmup):
            timed(step, device)
    samples = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            samples[name].append(timed(step, device))
    compute = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_matmul_flops(device, compute, seconds=2.0)
    fpt = flops_per_token(cfg, args.seq_len)
    result = {"preset": args.preset, "device": str(device), "precision": args.precision, "compile": args.compile,
              "seq_len": args.seq_len, "batch": args.batch, "micro_batch": args.micro_batch,
              "params_M": count_parameters(cfg)["total"] / 1e6, "threads": torch.get_num_threads(),
              "matmul_peak_tflops": peak / 1e12}
    for name, ts in samples.items():
        tps = tokens / statistics.median(ts)
        result[f"{name}_tokens_per_s"] = round(tps, 1)
        result[f"{name}_mfu"] = round(tps * fpt / peak, 4)
    if "transformers" in samples:
        result["ratio"] = round(result["ours_tokens_per_s"] / result["transformers_tokens_per_s"], 3)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.preset} ({result['params_M']:.1f}M params), {device}, {args.precision}"
          f"{' + compile' if args.compile else ''}, batch {args.batch} x {args.seq_len} tokens, "
          f"{result['threads']} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
    for name in samples:
        print(f"  {name:13s} {result[f'{name}_tokens_per_s']:10.1f} tokens/s   MFU {result[f'{name}_mfu'] * 100:5.1f}%")
    if "ratio" in result:
        print(f"  ratio ours / transformers: {result['ratio']:.2f}x  (median of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()

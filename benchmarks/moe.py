"""MoE training throughput: our trainer vs transformers `Qwen2MoeForCausalLM` + `torch.optim.AdamW`.

Both sides train the same MoE config from the same weights on the same token batches, in the
same precision, with the load-balancing loss (coefficient from the config), gradient
clipping at 1.0 and the same AdamW hyper-parameters. Ours runs the grouped expert path
(`qwen25.model.moe.grouped_mm`); transformers 5 runs its own grouped_mm path by default,
and its per-expert Python loop with `--eager-reference` (another contender). Ours is timed
eager and, as `qwen25 pretrain --compile` runs it, with each block and the cross entropy
compiled (`--no-compile` skips that; the warmup step pays the compilation). Rounds
alternate between the contenders, the medians are compared. A micro-benchmark of the expert
layer alone (forward + backward, each backend) is printed too.

    python benchmarks/moe.py                       # CPU, fp32, the default small MoE
    python benchmarks/moe.py --precision bf16      # bf16 autocast over fp32 weights, both sides
    python benchmarks/moe.py --device cuda --precision bf16 --hidden 1024 --experts 64 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate  # noqa: E402
from qwen25.config import ModelConfig, count_parameters  # noqa: E402
from qwen25.model.model import build_model  # noqa: E402
from qwen25.model.moe import Experts, route  # noqa: E402
from qwen25.train.loop import lm_loss, train_step  # noqa: E402
from qwen25.train.optim import build_optimizer  # noqa: E402
from qwen25.train.parallel import World, parallelize  # noqa: E402


def moe_config(args) -> ModelConfig:
    h = args.hidden
    return ModelConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=args.layers,
                       num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 128),
                       vocab_size=args.vocab, tie_word_embeddings=False, rope_theta=10_000.0,
                       max_position_embeddings=args.seq_len, num_experts=args.experts,
                       num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width or h // 2,
                       shared_expert_intermediate_size=2 * h, router_aux_loss_coef=0.01)


def batches(cfg, n, micro, seq, device):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (micro, seq + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].contiguous().to(device),
                    "position_ids": torch.arange(seq, device=device).expand(micro, seq)})
    return out


def ours(cfg, args, device, micro, compile: bool = False):
    """Our trainer's step as `qwen25 pretrain` runs it; compile: its `--compile` option
    (`parallel.parallelize(..., compile=True)` compiles each block, and `lm_loss(...,
    compiled=True)` the cross entropy)."""
    model = build_model(cfg, device=device, dtype=torch.float32, seed=0).train()
    world = World(device=device)
    model = parallelize(model, world, mode="none", compile=compile)
    opt = build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step():
        train_step(model, opt, micro, lambda m, b: lm_loss(m, b, cfg, compiled=compile), lr=1e-4, world=world,
                   grad_clip=1.0, aux_coef=cfg.router_aux_loss_coef, autocast_dtype=dtype)
    return step


def reference(cfg, args, device, micro, experts: str | None = None):
    """transformers' model; experts: None (its default, grouped_mm in transformers 5) or "eager"
    (its per-expert Python loop)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    hf_cfg = Qwen2MoeConfig(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    model = Qwen2MoeForCausalLM(hf_cfg).to(device).train()
    if experts:
        model.set_experts_implementation(experts)
    missing, unexpected = model.load_state_dict(build_model(cfg, device=device, seed=0).state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95))
    n = len(micro)

    def step():
        for b in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model(input_ids=b["input_ids"], output_router_logits=True)
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), b["labels"].flatten())
            loss = (loss + cfg.router_aux_loss_coef * out.aux_loss) / n
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def expert_layer(cfg, tokens, device, backend):
    torch.manual_seed(0)
    ex = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, backend=backend).to(device)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.02)
    torch.nn.init.normal_(ex.down_proj, std=0.02)
    x = torch.randn(tokens, cfg.hidden_size, device=device, requires_grad=True)
    w, idx = route(torch.randn(tokens, cfg.num_experts, device=device), cfg.num_experts_per_tok, False)

    def run():
        ex(x, idx, w).square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-width", type=int, default=0, help="routed expert width (0: hidden / 2)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eager-reference", action="store_true",
                   help="also time transformers with experts_implementation='eager' (its per-expert loop)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip timing ours with `qwen25 pretrain --compile` (torch.compile of blocks and loss)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = moe_config(args)
    micro = batches(cfg, args.batch // args.micro_batch, args.micro_batch, args.seq_len, device)
    tokens = args.batch * args.seq_len

    def synced(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    t0 = time.perf_counter()
    contenders = {"ours": synced(ours(cfg, args, device, micro)),
                  "transformers": synced(reference(cfg, args, device, micro))}
    if not args.no_compile:
        contenders["ours_compiled"] = synced(ours(cfg, args, device, micro, compile=True))
    if args.eager_reference:
        contenders["transformers_eager"] = synced(reference(cfg, args, device, micro, "eager"))
    med = alternate(contenders, rounds=args.rounds, warmup=1)
    layer = alternate({b: expert_layer(cfg, args.micro_batch * args.seq_len, device, b)
                       for b in ("segment", "padded", "grouped", "loop")}, rounds=3, warmup=1)
    n = count_parameters(cfg)
    result = {"device": str(device), "precision": args.precision, "threads": torch.get_num_threads(),
              "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "hidden": cfg.hidden_size,
              "layers": cfg.num_hidden_layers, "total_params_M": round(n["total"] / 1e6, 2),
              "active_params_M": round(n["active"] / 1e6, 2), "tokens_per_step": tokens,
              "ours_tokens_per_s": round(tokens / med["ours"], 1),
              "transformers_tokens_per_s": round(tokens / med["transformers"], 1),
              "ratio": round(med["transformers"] / med["ours"], 3),
              **({"ours_compiled_tokens_per_s": round(tokens / med["ours_compiled"], 1),
                  "ratio_compiled": round(med["transformers"] / med["ours_compiled"], 3)}
                 if "ours_compiled" in med else {}),
              **({"transformers_eager_tokens_per_s": round(tokens / med["transformers_eager"], 1),
                  "ratio_vs_eager": round(med["transformers_eager"] / med["ours"], 3)}
                 if "transformers_eager" in med else {}),
              "expert_layer_s": {k: round(v, 4) for k, v in layer.items()},
              "wall_s": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result))
        return
    print(f"MoE {cfg.num_experts} experts top-{cfg.num_experts_per_tok}, {result['total_params_M']}M total / "
          f"{result['active_params_M']}M active, {device}, {args.precision}, {tokens} tokens/step, "
          f"{result['threads']} threads")
    print(f"  ours          {result['ours_tokens_per_s']:10.1f} tokens/s")
    if "ratio_compiled" in result:
        print(f"  ours compiled {result['ours_compiled_tokens_per_s']:10.1f} tokens/s  (qwen25 pretrain --compile)")
    print(f"  transformers  {result['transformers_tokens_per_s']:10.1f} tokens/s")
    if "ratio_vs_eager" in result:
        print(f"  transformers (eager experts) {result['transformers_eager_tokens_per_s']:10.1f} tokens/s")
    print(f"  ratio ours / transformers: {result['ratio']:.2f}x  (median of {args.rounds} alternating rounds)")
    if "ratio_compiled" in result:
        print(f"  ratio ours compiled / transformers: {result['ratio_compiled']:.2f}x")
    if "ratio_vs_eager" in result:
        print(f"  ratio ours / transformers with its per-expert loop: {result['ratio_vs_eager']:.2f}x")
    print("  expert layer fwd+bwd (s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["expert_layer_s"].items()))


if __name__ == "__main__":
    main()

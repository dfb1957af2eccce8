"""The report's MoE cost claim in miniature: dense vs MoE at matched active and total parameters.

Three models share attention, depth, data, tokens, batch and learning rate:

    dense-active  the dense model; its FFN width I is what one token uses in the MoE
    moe           fine-grained experts (spec §1.6): a shared expert of width I_s plus E routed
                  experts of width I_e = (I - I_s) / k, top-k routing, load-balancing loss:
                  per token it runs I_s + k * I_e = I FFN columns, the same as dense-active
    dense-total   a dense model whose FFN width I_s + E * I_e holds as many FFN parameters
                  as the MoE in total

Each trains through the pretraining entry point (a normal run folder), and the study
reports the final held-out loss against training FLOPs (6 x active non-embedding params +
attention, `flops_per_token`) and against wall time (per-step time from the logged
throughput), as a table (study.md) and plots, plus the MoE's expert utilisation per layer
on held-out tokens (counts, and their entropy: log E is perfectly even).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen25.config import ModelConfig, count_parameters
from qwen25.errors import UserError
from qwen25.model.moe import expert_counts, utilisation_entropy
from qwen25.train.config import PretrainConfig, Stage
from qwen25.train.loop import flops_per_token
from qwen25.train.metrics import read_metrics

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "router_aux_loss_coef", "router_z_loss_coef",
                "router_aux_loss_per_layer")


@dataclass(frozen=True)
class StudyConfig:
    """Dense vs MoE on the same data and budget."""

    out: str = "runs/moe-study"  # study folder: one run folder per model, study.md/json, plots/
    data: str = ""  # training data: a manifest.json from `qwen25 data prepare`
    tokenizer: str | None = None  # HF tokenizer folder, as for pretrain
    model: str = "tiny"  # preset of the dense model (attention, depth, FFN width I)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig changes to the dense model
    num_experts: int = 8  # routed experts E
    top_k: int = 2  # experts per token k
    shared_fraction: float = 0.5  # share of the active FFN width I in the shared expert
    aux_loss_coef: float = 0.01  # load-balancing loss weight of the MoE
    aux_loss_per_layer: bool = True  # balance each MoE layer (False: all layers pooled, as transformers does)
    tokens: int = 500_000  # training tokens per model
    seq_len: int = 128  # tokens per sequence
    batch_tokens: int = 8192  # global batch in tokens
    micro_batch: int = 16  # sequences per forward pass
    lr: float = 3e-3  # peak learning rate (all three models)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_tokens: int = 65536  # held-out tokens per evaluation (and for the utilisation counts)
    threads: int = 0  # CPU threads (0: torch's default)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    seed: int = 0  # weights init and data order


def study_configs(dense: ModelConfig, num_experts: int, top_k: int, shared_fraction: float = 0.5,
                  aux_loss_coef: float = 0.01, aux_loss_per_layer: bool = True) -> dict[str, ModelConfig]:
    """{"dense-active", "moe", "dense-total"} shapes (see the module docstring)."""
    inter = dense.intermediate_size
    if not 0 < top_k <= num_experts:
        raise UserError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if not 0 <= shared_fraction < 1:
        raise UserError(f"shared_fraction={shared_fraction} must be in [0, 1)")
    shared = round(inter * shared_fraction)
    routed = inter - shared
    if routed % top_k:
        raise UserError(f"the routed FFN width {routed} (intermediate_size {inter} minus the shared expert's "
                        f"{shared}) is not divisible by top_k={top_k}; change top_k, shared_fraction or "
                        "intermediate_size so that it divides")
    width = routed // top_k
    moe = dense.replace(num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                        shared_expert_intermediate_size=shared, router_aux_loss_coef=aux_loss_coef,
                        router_aux_loss_per_layer=aux_loss_per_layer)
    return {"dense-active": dense, "moe": moe,
            "dense-total": dense.replace(intermediate_size=shared + num_experts * width)}


def _dense_shape(cfg: StudyConfig) -> ModelConfig:
    mc = ModelConfig.preset(cfg.model)
    return mc.replace(**cfg.model_overrides) if cfg.model_overrides else mc


def run_configs(cfg: StudyConfig) -> dict[str, PretrainConfig]:
    shapes = study_configs(_dense_shape(cfg), cfg.num_experts, cfg.top_k, cfg.shared_fraction, cfg.aux_loss_coef,
                            cfg.aux_loss_per_layer)
    runs = {}
    for name, mc in shapes.items():
        overrides = {**cfg.model_overrides, **{k: getattr(mc, k) for k in SHAPE_FIELDS}}
        runs[name] = PretrainConfig(
            out=str(Path(cfg.out) / name), model=cfg.model, model_overrides=overrides, tokenizer=cfg.tokenizer,
            data=cfg.data, seq_len=cfg.seq_len, batch_tokens=cfg.batch_tokens, micro_batch=cfg.micro_batch,
            lr=cfg.lr, warmup_steps=max(1, cfg.tokens // cfg.batch_tokens // 10), eval_every=cfg.eval_every,
            eval_tokens=cfg.eval_tokens, checkpoint_every=0, keep_checkpoints=1, sample_prompts=(),
            threads=cfg.threads, device=cfg.device, seed=cfg.seed, stages=(Stage("main", tokens=cfg.tokens),))
    return runs


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def curves(run_dir: Path, mc: ModelConfig, seq_len: int) -> dict[str, list[float]]:
    """Per train step: cumulative tokens, FLOPs, estimated seconds, and the loss."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    fpt = flops_per_token(mc, seq_len)
    out = {"tokens": [], "flops": [], "seconds": [], "loss": []}
    prev_tokens, seconds = 0, 0.0
    for r in rows:
        step_tokens = r["tokens"] - prev_tokens
        prev_tokens = r["tokens"]
        seconds += step_tokens / r["tokens_per_s"] if r.get("tokens_per_s") else 0.0
        out["tokens"].append(r["tokens"])
        out["flops"].append(r["tokens"] * fpt)
        out["seconds"].append(seconds)
        out["loss"].append(r["loss"])
    return out


@torch.no_grad()
def expert_utilisation(model, batches) -> torch.Tensor:
    """Assignments per (MoE layer, expert) [layers, E] over `batches` (top-k of the router)."""
    cfg = model.config
    total = None
    for b in batches:
        _, router = model(b["input_ids"], positions=b.get("position_ids"), output_router_logits=True)
        counts = torch.stack([expert_counts(r, cfg.num_experts_per_tok) for r in router])
        total = counts if total is None else total + counts
    return total


def held_out(cfg: PretrainConfig, loader_factory, limit_tokens: int):
    from qwen25.train.data import open_loader
    from qwen25.train.parallel import World

    factory = loader_factory or open_loader
    loader = factory(cfg.data, split="val", seq_len=cfg.seq_len, batch_size=cfg.micro_batch, world=World(),
                     seed=0, shuffle=False, epochs=1)
    n = max(1, limit_tokens // (cfg.seq_len * cfg.micro_batch)) if limit_tokens else None
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        yield b


def run_study(cfg: StudyConfig, *, loader_factory=None, say=print) -> dict[str, Any]:
    """Train the three models (resuming finished/partial runs), measure, write study.md/json + plots."""
    from qwen25.checkpoint import load_model
    from qwen25.train.pretrain import pretrain

    if not Path(cfg.data).exists():
        raise UserError(f"data manifest {cfg.data} not found; create it with `qwen25 data prepare`")
    runs = run_configs(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"models": {}}
    for name, run in runs.items():
        say(f"training {name}")
        kwargs = {"loader_factory": loader_factory} if loader_factory is not None else {}
        summary = pretrain(run, **kwargs)
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        mc = ModelConfig.from_hf(summary["model_config"])
        n = count_parameters(mc)
        c = curves(Path(run.out), mc, run.seq_len)
        ev = summary["eval"].get("all") or next(iter(summary["eval"].values()))
        results["models"][name] = {
            "total_params": n["non_embedding"], "active_params": n["active_non_embedding"],
            "flops_per_token": flops_per_token(mc, run.seq_len), "tokens": summary["tokens"],
            "train_flops": c["flops"][-1] if c["flops"] else 0.0, "train_seconds": c["seconds"][-1] if c["seconds"] else 0.0,
            "final_train_loss": c["loss"][-1] if c["loss"] else math.nan, "held_out_loss": ev["loss"], "curves": c}
    moe_final = Path(runs["moe"].out) / "final"
    model = load_model(moe_final, dtype=torch.float32).eval()
    counts = expert_utilisation(model, held_out(runs["moe"], loader_factory, cfg.eval_tokens))
    ent = [utilisation_entropy(row) for row in counts]
    results["utilisation"] = {"counts": counts.tolist(), "entropy": ent,
                              "entropy_max": math.log(cfg.num_experts),
                              "unused_experts": int((counts == 0).sum())}
    (out / "study.json").write_text(json.dumps(results, indent=1))
    (out / "study.md").write_text(table(results, cfg))
    from qwen25.train.sweep_plots import plot_study

    plot_study(results, out / "plots")
    say(table(results, cfg))
    return results


def table(results: dict[str, Any], cfg: StudyConfig) -> str:
    lines = [f"# Dense vs MoE ({cfg.num_experts} experts, top-{cfg.top_k}, shared {cfg.shared_fraction:.0%} of "
             f"the active FFN; {cfg.tokens:,} tokens each, lr {cfg.lr:g})", "",
             "| model | total non-emb. params | active non-emb. params | FLOPs/token | train FLOPs | "
             "train s | final train loss | held-out loss |", "| --- | --: | --: | --: | --: | --: | --: | --: |"]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {m['total_params']:,} | {m['active_params']:,} | {m['flops_per_token']:.3g} | "
                     f"{m['train_flops']:.3g} | {m['train_seconds']:.0f} | {m['final_train_loss']:.4f} | "
                     f"{m['held_out_loss']:.4f} |")
    u = results["utilisation"]
    lines += ["", f"MoE expert utilisation on held-out tokens: entropy per layer "
              f"{', '.join(f'{e:.3f}' for e in u['entropy'])} nats (max log E = {u['entropy_max']:.3f}); "
              f"unused experts: {u['unused_experts']}.", "",
              "Train seconds are summed from the logged per-step throughput (training steps only) and "
              "depend on what else the machine ran."]
    return "\n".join(lines) + "\n"

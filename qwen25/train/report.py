"""`report.md` of a speedrun: result, timings, model, stages, curves, samples, what to run next.

Everything is read back from the run folder (`metrics.jsonl`, `summary.json`, the final
`config.json`), so the report of a resumed run describes the whole run, not the last leg.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from qwen25.train.config import PretrainConfig, stage_seq_len
from qwen25.train.metrics import plot_metrics, read_metrics

GOAL_BPB = 2.3  # the speedrun's goal on held-out Shakespeare (nanoGPT's CPU example: ~2.7 bits/char)


def stage_rows(records: list[dict], cfg: PretrainConfig) -> list[dict[str, Any]]:
    """Per stage: steps, tokens, seq_len, RoPE base, median tokens/s and MFU, last loss."""
    rows = []
    theta = None
    for stage in cfg.stages:
        rec = [r for r in records if r.get("kind") == "train" and r.get("stage") == stage.name]
        theta = stage.rope_theta or theta or cfg.model_overrides.get("rope_theta")
        if not rec:
            continue
        tps = [r["tokens_per_s"] for r in rec if r.get("tokens_per_s")]
        mfu = [r["mfu"] for r in rec if r.get("mfu") is not None]
        rows.append({"stage": stage.name, "steps": len(rec), "seq_len": stage_seq_len(cfg, stage),
                     "rope_theta": theta, "tokens": rec[-1]["tokens"] - (rec[0]["tokens"] - _step_tokens(rec)),
                     "tokens_per_s": statistics.median(tps) if tps else None,
                     "mfu": statistics.median(mfu) if mfu else None, "loss": rec[-1]["loss"],
                     "skipped": sum(1 for r in rec if r.get("skipped"))})
    return rows


def _step_tokens(rec: list[dict]) -> int:
    return rec[1]["tokens"] - rec[0]["tokens"] if len(rec) > 1 else rec[0]["tokens"]


def _fmt_s(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def write_report(out: Path, prof, cfg: PretrainConfig, summary: dict[str, Any], timings: dict[str, float],
                 machine: dict[str, Any], plan: dict[str, Any] | None = None,
                 post: list[str] | None = None) -> Path:
    """Write OUT/report.md (and refresh the plots); return its path.

    post: the post-training section (the report card), placed after the headline; the
    chat command then names the aligned model rather than the base one."""
    records = read_metrics(out / "metrics.jsonl")
    plot_metrics(out / "metrics.jsonl", out / "plots")
    evals = summary.get("eval") or {}
    shakespeare = evals.get("shakespeare", {}).get("bpb")
    params = summary.get("parameters", {})
    mc = summary.get("model_config", {})
    lines = [f"# qwen25 speedrun — profile `{prof.name}`", ""]
    if shakespeare is not None:
        verdict = "meets" if shakespeare <= GOAL_BPB else "misses"
        lines += [f"**Held-out Shakespeare: {shakespeare:.3f} bits per byte** ({verdict} the goal of "
                  f"<= {GOAL_BPB}; nanoGPT's CPU Shakespeare example ends near 2.7 bits per character).", ""]
    if post:
        lines += post + ["## Pretraining", ""]
    last = cfg.stages[-1]
    lines += [f"Held-out documents are scored in windows of {stage_seq_len(cfg, last)} tokens (the last "
              "stage's sequence length); bits per byte = nats per token / ln 2 / UTF-8 bytes per token.", "",
              "| held-out set | loss (nats/token) | bits per byte |", "|---|---|---|"]
    for name, r in evals.items():
        bpb = f"{r['bpb']:.3f}" if r.get("bpb") is not None else "n/a"
        lines.append(f"| {name} | {r['loss']:.4f} | {bpb} |")
    total = sum(timings.values())
    lines += ["", "## Time", "", "| phase | time (m:s) |", "|---|---|"]
    lines += [f"| {k} | {_fmt_s(v)} |" for k, v in timings.items()]
    lines += [f"| **total** | **{_fmt_s(total)}** |", ""]
    if prof.budget_s:
        lines += [f"Budget: {_fmt_s(prof.budget_s)} for the whole run, set-up included.", ""]
    if plan:
        rates = ", ".join(f"{k}: {v:,.0f}" for k, v in plan["rates_tokens_per_s"].items())
        lines += [f"Plan: timed on this machine before training (tokens/s by precision/micro-batch[/compile]: "
                  f"{rates}), {plan['precision']} with micro-batches of {plan['micro_batch']}"
                  f"{' and torch.compile' if plan.get('compile') else ''} was chosen; "
                  f"after the first steps ran at {plan.get('measured_tokens_per_s', 0):,.0f} tokens/s with "
                  f"{_fmt_s(plan.get('seconds_left', 0))} left, the run was set to "
                  f"{' + '.join(map(str, plan['steps']))} steps ({plan.get('tokens', 0):,} tokens).", ""]
    lines += ["## Model", "",
              f"Qwen2.5 architecture (GQA, SwiGLU, RMSNorm, RoPE, q/k/v biases, tied embeddings): "
              f"{mc.get('num_hidden_layers')} layers, hidden {mc.get('hidden_size')}, "
              f"{mc.get('num_attention_heads')} heads / {mc.get('num_key_value_heads')} KV heads, "
              f"FFN {mc.get('intermediate_size')}, vocabulary {mc.get('vocab_size')}; "
              f"{params.get('total', 0) / 1e6:.2f}M parameters ({params.get('non_embedding', 0) / 1e6:.2f}M "
              f"non-embedding).", "", prof.notes, "",
              f"Optimizer: AdamW (betas {cfg.beta1}, {cfg.beta2}, weight decay {cfg.weight_decay} on "
              f"matrices), peak LR {cfg.lr:g}, {cfg.schedule} schedule ({cfg.warmup_steps} warmup steps), "
              f"gradient clip {cfg.grad_clip}, global batch {cfg.batch_tokens:,} tokens, precision "
              f"{cfg.precision}.", "",
              "## Stages", "",
              "| stage | steps | seq len | RoPE base | tokens | tokens/s (median) | MFU | last loss | skipped |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in stage_rows(records, cfg):
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "n/a"
        lines.append(f"| {r['stage']} | {r['steps']} | {r['seq_len']} | {r['rope_theta']:g} | {r['tokens']:,} | "
                     f"{tps} | {mfu} | {r['loss']:.3f} | {r['skipped']} |")
    lines += ["", "MFU is relative to this machine's measured matmul peak in the training dtype.", "",
              "## Curves", "", "![loss](plots/loss.png)", "", "![bits per byte](plots/bpb.png)", "",
              "![learning rate](plots/lr.png)", "", "## Samples (temperature "
              f"{cfg.sample_temperature})", ""]
    for s in summary.get("samples", []):
        lines += [f"- **{s['prompt']}** {s['completion']!r}"]
    lines += ["", "## Machine", "", ", ".join(f"{k}: {v}" for k, v in machine.items() if v is not None), ""]
    if not post:
        lines += ["## Next", "", "Chat with the result:", "", "```bash", f"qwen25 chat {out / 'final'}", "```", ""]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path

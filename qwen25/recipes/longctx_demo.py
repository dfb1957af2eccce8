"""The long-context demonstration: train short, read long.

    qwen25 eval longctx-demo --out runs/longctx-demo          (a few minutes on 2 CPU cores)

1. A byte-level BPE vocabulary (Qwen's pre-tokeniser, `vocab_size` ids) is learned on
   generated prose plus the probe templates.
2. A small Qwen2.5-shaped model is trained from scratch on rows of exactly L = `seq_len`
   tokens, each a passkey example (the evaluation's template, its own filler) of random
   length and depth, then filler to the end of the row. Every token is a target; the six
   answer tokens weigh `answer_weight` (5) times the others, without which the copy circuit
   does not form within this budget. The optimizer step is the trainer's own
   (`qwen25.train.loop.train_step`, AdamW groups, warmup + cosine); metrics.jsonl and
   loss plots are written as for any training run.
3. The trained model is probed at L, 2L and 4L with plain RoPE, YaRN (factor 4 over L),
   DCA (chunk L, local window L/8) and YaRN + DCA: passkey accuracy (greedy exact match, and
   whether the true answer is the argmax continuation) over depths x trials, and the
   next-token loss against position on held-out text of length 4L.

Everything is seeded: the same command gives the same tables. Results go to `out`:
report.md, results.json, accuracy.png, loss_by_position.png, metrics.jsonl, loss.png and the
trained model (an HF folder with its tokenizer, usable with `qwen25 eval passkey`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qwen25.errors import UserError
from qwen25.files import atomic_write


@dataclass(frozen=True)
class DemoConfig:
    """`qwen25 eval longctx-demo`: model, training and probe settings."""

    out: str = "runs/longctx-demo"  # output folder (report.md, results.json, plots, model/)
    seq_len: int = 128  # L: the training length; probes run at L, 2L and 4L
    steps: int = 1600  # optimizer steps (retrieval appears between steps ~900 and ~1400, by seed)
    batch_size: int = 16  # rows of L tokens per step
    lr: float = 1e-2  # peak AdamW learning rate (warmup, then cosine to 10%)
    warmup: int = 100  # warmup steps
    answer_weight: float = 5.0  # loss weight of the answer tokens (6 of L); 1 = plain LM loss
    hidden_size: int = 64  # model width
    layers: int = 2  # decoder layers (two suffice for the copy circuit retrieval needs)
    heads: int = 4  # query heads (head_dim = hidden_size / heads)
    kv_heads: int = 2  # key/value heads (GQA)
    rope_theta: float = 10000.0  # RoPE base
    vocab_size: int = 512  # BPE vocabulary (256 bytes + merges + 22 control tokens)
    yarn_factor: float = 4.0  # YaRN factor over L for the "yarn" modes
    dca_local: int = 0  # DCA local window (0: L / 8); the chunk is L
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depths probed
    trials: int = 20  # probes per (length, depth, mode)
    ppl_sequences: int = 8  # held-out sequences of 4L tokens for loss against position
    threads: int = 1  # torch threads: a tiny model gains nothing from more, and loses on a busy machine
    seed: int = 0  # model init, training data and probes


MODES = {  # name -> (--rope-scaling, --dca) given L; "none" switches a feature off
    "plain": (None, None),
    "yarn": ("yarn", None),
    "dca": (None, "dca"),
    "yarn+dca": ("yarn", "dca"),
}


def _corpus(path: Path, seed: int) -> None:
    """Tokenizer training text: generated prose and the probe templates with numbers."""
    from qwen25.eval.filler import generated_text
    from qwen25.eval.longctx import _passkey_parts

    rng = random.Random(seed)
    parts = [generated_text(20_000, seed=seed + 7)]
    for _ in range(2000):
        intro, needles, question, key = _passkey_parts(rng)
        parts.append(intro + needles[0] + question + " " + key)
    path.write_text("\n".join(parts))


def _training_row(tokenizer, pool, L: int, rng: random.Random, eos: int) -> tuple[list[int], range]:
    """(L + 1 tokens, the label indices of the answer): one passkey example of random length
    and depth, its answer, eos, then filler to the end of the row."""
    from qwen25.eval.longctx import make_probe

    hi = L - 8  # room for the answer (" " + 5 digits) and the eos
    lo = min(hi, max(L // 2, 64))  # the template alone is ~50 tokens with the demo's vocabulary
    length = rng.randint(lo, hi)
    probe = make_probe("passkey", tokenizer, pool, length, rng.random(), rng.randrange(1 << 30),
                       seed=-1)  # seed -1: a stream of keys the evaluation (seed >= 0) never draws
    row = probe.prompt + probe.answer_ids + [eos]
    answer = range(len(probe.prompt) - 1, len(probe.prompt) - 1 + len(probe.answer_ids))
    return (row + pool.window(L + 1 - len(row), rng))[:L + 1], answer


def weighted_lm_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Summed next-token loss with per-position weights (`batch["weights"]` [B, T]), in the
    `train_step` loss-function protocol: (sum, count, no aux loss)."""
    from qwen25.model.logprobs import token_logprobs

    logp = token_logprobs(model(batch["input_ids"]), batch["labels"])  # [B, T] float32
    return -(logp * batch["weights"]).sum(), torch.tensor(logp.numel()), None


def _mode_overrides(mode: str, cfg: DemoConfig) -> tuple[str, str]:
    rope, dca = MODES[mode]
    local = cfg.dca_local or max(1, cfg.seq_len // 8)
    return (f"yarn:{cfg.yarn_factor:g}" if rope else "none",
            f"{cfg.seq_len}:{local}" if dca else "none")


def train_model(cfg: DemoConfig, tokenizer, out: Path, progress: bool = True):
    """Train the demo model; returns it (fp32, eval mode). Writes metrics.jsonl and plots."""
    from tqdm import tqdm

    from qwen25.config import ModelConfig
    from qwen25.eval.filler import filler_pool
    from qwen25.model.model import build_model
    from qwen25.train.loop import train_step
    from qwen25.train.metrics import MetricsLog, plot_metrics
    from qwen25.train.optim import build_optimizer, warmup_cosine
    from qwen25.train.parallel import World

    L = cfg.seq_len
    vocab = -(-len(tokenizer) // 64) * 64  # embedding rows padded to a multiple of 64
    eos = tokenizer.eos_token_id
    mcfg = ModelConfig(hidden_size=cfg.hidden_size, intermediate_size=-(-cfg.hidden_size * 11 // 4 // 16) * 16,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, vocab_size=vocab, max_position_embeddings=L,
                       rope_theta=cfg.rope_theta, tie_word_embeddings=True, torch_dtype="float32",
                       bos_token_id=None, eos_token_id=eos)
    model = build_model(mcfg, seed=cfg.seed).train()
    opt = build_optimizer(model, cfg.lr, weight_decay=0.1)
    world = World()
    pool = filler_pool(tokenizer, "generated", min_tokens=200_000, seed=cfg.seed + 1)
    rng = random.Random(f"train:{cfg.seed}")
    log = MetricsLog(out / "metrics.jsonl")
    (out / "metrics.jsonl").unlink(missing_ok=True)
    tokens = 0
    bar = tqdm(range(cfg.steps), desc=f"train L={L}", unit="step", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        rows, answers = zip(*(_training_row(tokenizer, pool, L, rng, eos) for _ in range(cfg.batch_size)))
        rows = torch.tensor(rows)
        weights = torch.ones(cfg.batch_size, L)
        for i, span in enumerate(answers):
            weights[i, span.start:span.stop] = cfg.answer_weight
        batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "weights": weights}
        lr = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup, min_ratio=0.1)
        res = train_step(model, opt, [batch], weighted_lm_loss, lr=lr, world=world)
        tokens += res.tokens
        log.log({"kind": "train", "step": step, "loss": res.loss, "lr": lr, "tokens": tokens,
                 "grad_norm": res.grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0),
                 "skipped": res.skipped})
        bar.set_postfix(loss=f"{res.loss:.3f}")
    plot_metrics(out / "metrics.jsonl", out)
    return model.eval()


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """Train, probe every mode at L, 2L, 4L, write the report; returns results + markdown."""
    if cfg.seq_len < 96:
        raise UserError(f"seq_len={cfg.seq_len}: the passkey template needs L >= 96 tokens")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, progress: bool) -> dict:
    from qwen25.checkpoint import save_model
    from qwen25.eval.filler import filler_pool
    from qwen25.eval.longctx import ProbeConfig, evaluate_retrieval
    from qwen25.eval.position_ppl import held_out_sequences, nll_by_position
    from qwen25.model.context import extend_context
    from qwen25.tokenizer.train import train_tokenizer

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _corpus(out / "tokenizer_corpus.txt", cfg.seed)
    tokenizer = train_tokenizer([out / "tokenizer_corpus.txt"], cfg.vocab_size, out / "tokenizer",
                                show_progress=False)
    t0 = time.perf_counter()
    model = train_model(cfg, tokenizer, out, progress)
    train_s = time.perf_counter() - t0
    save_model(model, out / "model")
    tokenizer.save_pretrained(out / "model")

    L = cfg.seq_len
    # A context of n tokens holds the prompt, the answer and the two tokens generated past it,
    # so "at L" never reads a position the model was not trained on.
    margin = len(tokenizer.encode(" 12345")) + 2
    contexts = (L, 2 * L, 4 * L)
    probe_cfg = ProbeConfig(lengths=tuple(n - margin for n in contexts), depths=cfg.depths, trials=cfg.trials, scoring="both",
                            filler="generated", seed=cfg.seed, batch_size=8)
    ppl_pool = filler_pool(tokenizer, "generated", min_tokens=4 * L * (cfg.ppl_sequences + 1),
                           seed=cfg.seed + 2)
    ppl_seqs = held_out_sequences(ppl_pool, 4 * L, cfg.ppl_sequences, cfg.seed)
    results: dict = {"settings": asdict(cfg), "train_seconds": train_s, "prompt_margin": margin,
                     "modes": {}}
    t1 = time.perf_counter()
    for mode in MODES:
        rope, dca = _mode_overrides(mode, cfg)
        extend_context(model, rope, dca)
        r = evaluate_retrieval(model, tokenizer, "passkey", probe_cfg, progress=progress)
        bins = nll_by_position(model, ppl_seqs, bins=16, chunk=L, batch_size=cfg.ppl_sequences,
                               progress=False)
        by_context = {str(n - margin): str(n) for n in contexts}  # prompt length -> context
        results["modes"][mode] = {
            "rope_scaling": rope, "dca": dca,
            "exact": {by_context[k]: v for k, v in r["exact"]["by_length"].items()},
            "ll": {by_context[k]: v for k, v in r["ll"]["by_length"].items()},
            "token_acc": {by_context[k]: v for k, v in _token_acc_by_length(r["records"]).items()},
            "grid_exact": r["exact"]["grid"], "loss_by_position": bins}
    results["eval_seconds"] = time.perf_counter() - t1
    extend_context(model, "none", "none")
    markdown = _report(results, L)
    _write(out / "results.json", json.dumps(results, indent=1))
    _write(out / "report.md", markdown + "\n")
    _plots(results, out, L)
    results["markdown"] = markdown
    return results


def _token_acc_by_length(records: list[dict]) -> dict[str, float]:
    per: dict[int, list[float]] = {}
    for r in records:
        per.setdefault(r["length"], []).append(r["token_acc"])
    return {str(k): sum(v) / len(v) for k, v in sorted(per.items())}


def _report(results: dict, L: int) -> str:
    s = results["settings"]
    modes = results["modes"]
    lengths = list(next(iter(modes.values()))["exact"])
    head = "| mode | " + " | ".join(f"{int(n) // L}L = {n}" for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    lines = [f"# Long-context demo: trained at L = {L}, probed at L, 2L, 4L", "",
             f"Model: {s['layers']} layers x {s['hidden_size']} wide, {s['heads']} heads, RoPE base "
             f"{s['rope_theta']:g}, BPE vocabulary {s['vocab_size']}; {s['steps']} steps of "
             f"{s['batch_size']} x {L} tokens, answer tokens weighted x{s['answer_weight']:g} "
             f"({results['train_seconds'] / 60:.1f} min on {s['threads'] or 'default'} thread(s)). "
             f"YaRN factor {s['yarn_factor']:g} over L; DCA chunk L, local window "
             f"{s['dca_local'] or L // 8}. A context of n tokens is a prompt of n - "
             f"{results['prompt_margin']} tokens, the answer and two more generated tokens; "
             f"{len(s['depths'])} depths x {s['trials']} trials per cell.", ""]
    for key, title in (("exact", "Passkey accuracy, greedy exact match (%)"),
                       ("ll", "Passkey accuracy, true answer is the argmax continuation (%)"),
                       ("token_acc", "Answer tokens that are the argmax (%)")):
        lines += [f"**{title}**", "", head, rule]
        for mode, r in modes.items():
            lines.append(f"| {mode} | " + " | ".join(f"{100 * r[key][n]:.0f}" for n in lengths) + " |")
        lines.append("")
    lines += [f"**Held-out next-token loss (nats) by position, sequences of 4L = {4 * L}**", "",
              "| positions | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    first = next(iter(modes.values()))["loss_by_position"]
    for i, b in enumerate(first):
        lines.append(f"| {b['start']}-{b['end'] - 1} | "
                     + " | ".join(f"{modes[m]['loss_by_position'][i]['nll']:.3f}" for m in modes) + " |")
    return "\n".join(lines)


def _plots(results: dict, out: Path, L: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = results["modes"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for mode, r in modes.items():
        xs = [int(n) for n in r["exact"]]
        ax.plot(xs, [100 * v for v in r["exact"].values()], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xticks([L, 2 * L, 4 * L], ["L", "2L", "4L"])
    ax.set(xlabel=f"context length (L = {L})", ylabel="passkey accuracy (%)", ylim=(-3, 103),
           title="passkey retrieval, greedy exact match")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    from qwen25.eval.position_ppl import plot_bins

    plot_bins({m: r["loss_by_position"] for m, r in modes.items()}, out / "loss_by_position.png",
              "held-out loss against position", trained=L)


def _write(path: Path, text: str) -> None:
    atomic_write(path, text)


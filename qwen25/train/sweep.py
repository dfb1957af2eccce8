"""`sweep(cfg)`: a grid of short pretraining runs -> optimal LR and batch per (N, D) -> laws.

    validate the grid (enough points for every fit, before any run) -> one run folder per
    (size, tokens, lr, batch) under OUT/runs/, each a normal resumable `pretrain` run
    -> OUT/sweep.jsonl (one row per finished run) -> optima per (N, D) -> power laws
    lr(N, D), batch(D) and loss L(N, D) with 95% intervals -> OUT/law.json, OUT/plots/*.png

Re-running the same command skips finished runs and resumes interrupted ones. Runs go
through the pretraining entry point (`qwen25.train.pretrain.pretrain`): in this process
(`workers` 1), as `workers` child processes (`python -m qwen25.train.sweep RUN/run.json`,
each pinned to `threads` CPU threads or to one GPU), or, under torchrun, rank r takes runs
r, r + world, ... on its own GPU and rank 0 fits once every run is done.

N is the active non-embedding parameter count, D the training tokens of a run. The loss a
run contributes is its final held-out loss (all sets, nats/token). `resolve_auto` is what
`qwen25 pretrain --lr auto --batch auto --law FILE` uses: the saved laws at the run's N, D.

`search="halving"` (`--search halving --eta 3`) replaces the full grid by successive
halving in each (size, tokens) cell (`qwen25.train.halving`): every (lr, batch) candidate
first trains a fraction D / eta^K of the cell's tokens, the best 1/eta by final held-out
loss go on to eta times the tokens, and the last rung trains one winner at the full D; that
winner is the cell's optimum for the fits. Each rung is its own run folder, trained from
scratch, not a resumed folder with a larger budget: the harness could continue a finished
run to more steps, but its schedule is a function of the run's total steps (WSD decays over
the last `decay_frac`, cosine over all of them, warmup is a share of the steps), so a rung
that has already decayed would be re-warmed to the peak lr, and its final loss would not be
that of a run trained at the larger budget. A rung folder is named like the grid point
with the same tokens (the same config), so the last rung's folder is the grid's own run and
a rung whose budget equals another cell's D shares that run. sweep.jsonl holds every rung's
rows with `rung` and `rungs`; the fits and lr plots use the last rung's rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen25.config import ModelConfig, count_parameters
from qwen25.errors import UserError
from qwen25.train import halving, scaling
from qwen25.train.config import PretrainConfig, Stage, stage_steps, validate

SEARCHES = ("grid", "halving")


@dataclass(frozen=True)
class SweepConfig:
    """A hyper-parameter sweep: the grid, the run settings every point shares, the workers."""

    out: str = "runs/sweep"  # sweep folder: runs/<name>/ (pretrain run folders), sweep.jsonl, law.json, plots/
    data: str = ""  # training data: a manifest.json written by `qwen25 data prepare`
    tokenizer: str | None = None  # HF tokenizer folder (sets vocab and eos), as for pretrain
    model: str = "tiny"  # preset every size starts from (its other fields, e.g. MoE experts, are kept)
    sizes: tuple[str, ...] = ()  # model sizes: "HIDDENxLAYERS" (e.g. 64x2, heads of 32 dims, MLP 3x) or preset names
    tokens: tuple[int, ...] = ()  # training tokens per run (D)
    lr: tuple[float, ...] = ()  # peak learning rates to try
    batch: tuple[int, ...] = ()  # global batch sizes to try, in tokens (multiples of seq_len)
    seq_len: int = 128  # tokens per training sequence
    micro_batch: int = 8  # sequences per forward pass (capped by the batch)
    warmup_frac: float = 0.1  # warmup as a share of each run's steps
    schedule: str = "wsd"  # learning-rate schedule of every run (see pretrain)
    eval_tokens: int = 65536  # held-out tokens scored at the end of each run (0: the whole split)
    base: dict[str, Any] = field(default_factory=dict)  # other PretrainConfig fields for every run, e.g. {"weight_decay": 0.0}
    search: str = "grid"  # "grid": every (lr, batch) per (size, tokens); "halving": successive halving of them
    eta: int = 3  # halving: each rung keeps the best 1/eta and trains them on eta x the tokens
    workers: int = 1  # runs at once (1: in this process; more: child processes)
    threads: int = 1  # CPU threads per run
    device: str = "auto"  # "auto", "cpu" or "cuda" (with workers > 1: one GPU per worker, round robin)
    seed: int = 0  # weights init and data order of every run


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------


def size_overrides(spec: str, base: ModelConfig) -> dict[str, Any]:
    """ModelConfig changes for one size: "HxL" scales width and depth, a preset name copies
    that preset's shape. MoE experts scale with the width (same count and top-k)."""
    if "x" not in spec:
        p = ModelConfig.preset(spec)
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")
        return {k: getattr(p, k) for k in keys}
    try:
        h, layers = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise UserError(f"size {spec!r}: write HIDDENxLAYERS such as 128x4, or a preset name") from None
    if h < 32 or h % 32 or layers < 1:
        raise UserError(f"size {spec!r}: the hidden size must be a positive multiple of 32 and layers >= 1")
    heads = h // 32
    kv = heads // 2 if heads % 2 == 0 else heads
    changes: dict[str, Any] = {"hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
                               "num_key_value_heads": kv, "intermediate_size": 3 * h, "head_dim": None}
    if base.is_moe:
        scale = h / base.hidden_size
        changes["moe_intermediate_size"] = max(8, round(base.moe_intermediate_size * scale / 8) * 8)
        if base.shared_expert_intermediate_size:
            changes["shared_expert_intermediate_size"] = max(8, round(base.shared_expert_intermediate_size * scale / 8) * 8)
    return changes


def model_size(model: str, overrides: dict[str, Any]) -> int:
    """N of a run: active non-embedding parameters of the shape it trains."""
    mc = ModelConfig.preset(model)
    return count_parameters(mc.replace(**overrides) if overrides else mc)["active_non_embedding"]


@dataclass(frozen=True)
class Point:
    name: str  # the run folder's name
    size: str
    N: int
    D: int
    lr: float
    batch: int
    config: PretrainConfig


def grid(cfg: SweepConfig) -> list[Point]:
    """Every run of the sweep (validated: the fits get enough points before anything runs)."""
    check(cfg)
    base_overrides = dict(cfg.base.get("model_overrides", {}))
    base_mc = ModelConfig.preset(cfg.model)
    base_mc = base_mc.replace(**base_overrides) if base_overrides else base_mc
    extra = {k: v for k, v in cfg.base.items() if k != "model_overrides"}
    points = []
    for size, D, lr, B in itertools.product(cfg.sizes, cfg.tokens, cfg.lr, cfg.batch):
        overrides = {**base_overrides, **size_overrides(size, base_mc)}
        points.append(make_point(cfg, size, overrides, D, lr, B, extra))
    return points


def make_point(cfg: SweepConfig, size: str, overrides: dict[str, Any], D: int, lr: float, B: int,
               extra: dict[str, Any]) -> Point:
    """The run of one (size, D, lr, batch); a pure function of them, so equal points share a folder."""
    steps = max(1, math.ceil(D / B))
    name = f"{size}-D{D}-lr{lr:g}-B{B}"
    run = dataclasses.replace(
        PretrainConfig(**extra), out=str(Path(cfg.out) / "runs" / name), model=cfg.model,
        model_overrides=overrides, tokenizer=cfg.tokenizer, data=cfg.data, seq_len=cfg.seq_len,
        batch_tokens=B, micro_batch=_micro(cfg, B), lr=lr, schedule=cfg.schedule,
        warmup_steps=max(1, round(cfg.warmup_frac * steps)), eval_every=0, eval_tokens=cfg.eval_tokens,
        checkpoint_every=max(1, steps // 4), keep_checkpoints=1, sample_every=0, sample_prompts=(),
        device=cfg.device, threads=cfg.threads, seed=cfg.seed, stages=(Stage("main", tokens=D),))
    validate(run)
    return Point(name, size, model_size(cfg.model, overrides), D, lr, B, run)


def rung_point(cfg: SweepConfig, p: Point, tokens: int) -> Point:
    """Grid point `p` trained on `tokens` instead of its D (a halving rung)."""
    extra = {k: v for k, v in cfg.base.items() if k != "model_overrides"}
    return make_point(cfg, p.size, dict(p.config.model_overrides), tokens, p.lr, p.batch, extra)


def _micro(cfg: SweepConfig, batch: int) -> int:
    seqs = batch // cfg.seq_len
    return max(m for m in range(1, min(cfg.micro_batch, seqs) + 1) if seqs % m == 0)


def check(cfg: SweepConfig) -> None:
    """One-line errors for a grid that cannot give a fit, before any run starts."""
    for name in ("sizes", "tokens", "lr", "batch"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is empty: give the values to sweep, e.g. --{name} "
                            + {"sizes": "64x2 128x2", "tokens": "200000 400000", "lr": "1e-3 3e-3 1e-2",
                               "batch": "4096 8192"}[name])
    if len(set(cfg.sizes)) * len(set(cfg.tokens)) * len(set(cfg.lr)) * len(set(cfg.batch)) == 1:
        raise UserError("the sweep grid has one point (one size, token count, lr and batch); a scaling "
                        "law needs several: give more values to --lr and to --sizes or --tokens")
    if cfg.search not in SEARCHES:
        raise UserError(f"search={cfg.search!r}: use one of {', '.join(SEARCHES)}")
    if cfg.search == "halving":
        halving.check_halving(len(set(cfg.lr)) * len(set(cfg.batch)), cfg.eta)
    if cfg.workers < 1 or cfg.threads < 0:
        raise UserError("workers must be >= 1 and threads >= 0")
    if not 0 <= cfg.warmup_frac < 1:
        raise UserError(f"warmup_frac={cfg.warmup_frac} must be in [0, 1)")
    bad = [b for b in cfg.batch if b % cfg.seq_len]
    if bad:
        raise UserError(f"batch sizes {bad} are not multiples of seq_len={cfg.seq_len} tokens")
    unknown = sorted(set(cfg.base) - {f.name for f in dataclasses.fields(PretrainConfig)})
    owned = sorted(set(cfg.base) & {"out", "data", "lr", "batch_tokens", "stages", "seq_len", "model"})
    if unknown or owned:
        raise UserError(f"base: {'unknown' if unknown else 'sweep-owned'} PretrainConfig field(s) "
                        f"{unknown or owned}; set those with the sweep's own flags")
    pairs = len(set(cfg.sizes)) * len(set(cfg.tokens))
    varying = (len(set(cfg.sizes)) > 1) + (len(set(cfg.tokens)) > 1)
    if varying == 0:
        raise UserError("the grid has one size and one token count: the laws are functions of N and D, "
                        "so give several --sizes or --tokens")
    if pairs < varying + 2:
        raise UserError(f"the LR law over {'N and D' if varying == 2 else 'N or D'} has {varying + 1} "
                        f"parameters and needs at least {varying + 2} (size, tokens) points, the grid "
                        f"gives {pairs}; add sizes or token counts")


# --------------------------------------------------------------------------------------
# Running the grid
# --------------------------------------------------------------------------------------


def _result(p: Point) -> dict | None:
    """The sweep row of a finished (or diverged) run, or None when it has not finished."""
    folder = Path(p.config.out)
    row = {"name": p.name, "size": p.size, "N": p.N, "D": p.D, "lr": p.lr, "batch": p.batch}
    if (folder / DIVERGED).is_file():  # a too-high learning rate: worse than any finite loss
        return {**row, "loss": math.inf, "tokens": 0, "elapsed_s": 0.0, "steps": 0, "diverged": True}
    path = folder / "summary.json"
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    if "final" not in s:
        return None
    ev = (s.get("eval") or {}).get("all") or next(iter((s.get("eval") or {}).values()), {})
    loss = ev.get("loss")
    return {**row, "loss": loss if loss is not None and math.isfinite(loss) else math.inf,
            "tokens": s["tokens"], "elapsed_s": s["elapsed_s"], "steps": s["step"]}


DIVERGED = "diverged.json"


def run_point(config_path: str | Path, loader_factory=None) -> dict[str, Any]:
    """Train one grid point from its run.json; a diverged run leaves RUN/diverged.json
    (its loss counts as infinite) instead of failing the sweep."""
    from qwen25.train.loop import TrainingDiverged
    from qwen25.train.pretrain import pretrain

    config_path = Path(config_path)
    cfg = _load_run_config(config_path)
    try:
        return pretrain(cfg, **({"loader_factory": loader_factory} if loader_factory is not None else {}))
    except TrainingDiverged as e:
        (config_path.parent / DIVERGED).write_text(json.dumps({"reason": str(e)}))
        return {"diverged": str(e)}


def _load_run_config(path: Path) -> PretrainConfig:
    """The PretrainConfig a sweep wrote with `config_to_dict` (JSON lists back to tuples)."""
    def tuples(d: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    d = tuples(json.loads(path.read_text()))
    d["stages"] = tuple(Stage(**tuples(s)) for s in d["stages"])
    return PretrainConfig(**d)


def _write_run_config(p: Point) -> Path:
    from qwen25.train.pretrain import config_to_dict

    folder = Path(p.config.out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.json"
    path.write_text(json.dumps(config_to_dict(p.config), indent=1))
    return path


def _run_inline(points: list[Point], loader_factory, say) -> None:
    for i, p in enumerate(points):
        say(f"[{i + 1}/{len(points)}] {p.name} (N={p.N:,}, {stage_steps(p.config, p.config.stages[0])} steps)")
        s = run_point(_write_run_config(p), loader_factory)
        if s.get("interrupted"):
            raise KeyboardInterrupt
        if s.get("diverged"):
            say(f"{p.name} diverged: its loss counts as infinite")


def _child_env(slot: int, cfg: SweepConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")}
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    gpus = _gpu_count() if cfg.device != "cpu" else 0
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_children(points: list[Point], cfg: SweepConfig, say, first_slot: int = 0) -> None:
    """Each run as `python -m qwen25.train.sweep RUN/run.json`, `workers` at a time."""
    queue = list(points)
    running: dict[int, tuple[subprocess.Popen, Point, Any]] = {}
    failed = []
    while queue or running:
        while queue and len(running) < cfg.workers:
            slot = next(s for s in range(cfg.workers) if s not in running)
            p = queue.pop(0)
            cmd = [sys.executable, "-m", "qwen25.train.sweep", str(_write_run_config(p))]
            log = open(Path(p.config.out) / "log.txt", "a")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env=_child_env(first_slot + slot, cfg))
            running[slot] = (proc, p, log)
            say(f"started {p.name} (N={p.N:,}) [{len(points) - len(queue)}/{len(points)}]")
        time.sleep(0.5)
        for slot, (proc, p, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[slot]
                if proc.returncode != 0:
                    failed.append(p.name)
                say(f"{'finished' if proc.returncode == 0 else 'FAILED'} {p.name}")
    if failed:
        raise UserError(f"{len(failed)} run(s) failed ({', '.join(failed[:3])}); see OUT/runs/NAME/log.txt, "
                        "fix the cause and re-run the sweep (finished runs are kept)")


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def sweep(cfg: SweepConfig, *, loader_factory=None, say=print) -> dict[str, Any]:
    """Run (or continue) the sweep and fit; returns the fit summary written to OUT/law.json."""
    points = grid(cfg)
    if not Path(cfg.data).exists():
        raise UserError(f"data manifest {cfg.data} not found; create it with `qwen25 data prepare`")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.search == "halving":
        rows = _halving(cfg, points, loader_factory, say)
    else:
        todo = [p for p in points if _result(p) is None]
        say(f"sweep: {len(points)} runs, {len(points) - len(todo)} already done")
        _run_points(todo, cfg, loader_factory, say, wait=_rank() == 0)
        rows = [_result(p) for p in points]
    if _rank() != 0:  # torchrun: rank 0 fits once every run is done
        return {}
    with open(out / "sweep.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    result = fit_sweep(rows)
    scaling.save_laws(out / "law.json", result["lr"], result["batch"], result["loss"], result["optima"],
                      notes=result["notes"])
    from qwen25.train.sweep_plots import plot_halving, plot_sweep

    plot_sweep(fit_rows(rows), result, out / "plots")
    if cfg.search == "halving":
        plot_halving(rows, out / "plots" / "halving.png")
    say(describe(result))
    return result


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _run_points(points: list[Point], cfg: SweepConfig, loader_factory, say, wait: bool) -> None:
    """Train the unfinished `points`: in this process, as child processes, or under torchrun
    this rank's share (every world-th point, on its own GPU); wait: then block until every
    rank's share has finished."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        # Share out the list as given and drop finished points afterwards: every rank then
        # agrees on who trains what, even when another rank has already finished one.
        mine = [p for p in points[_rank()::world] if _result(p) is None]
        _run_children(mine, dataclasses.replace(cfg, workers=1), say, first_slot=int(os.environ.get("LOCAL_RANK", 0)))
        while wait and any(_result(p) is None for p in points):
            time.sleep(2)
        return
    todo = [p for p in points if _result(p) is None]
    if cfg.workers == 1:
        _run_inline(todo, loader_factory, say)
    else:
        _run_children(todo, cfg, say)


def _halving(cfg: SweepConfig, points: list[Point], loader_factory, say) -> list[dict]:
    """Successive halving in every (size, tokens) cell; the rows of every rung's runs.

    The cells go through the rungs together (all of rung r's runs, then the cut), so the
    workers and ranks are busy with every cell's runs at once. Every rank waits for each
    rung and cuts the same way (the cut reads only the run folders)."""
    alive: dict[tuple[str, int], list[Point]] = {}
    for p in points:  # a repeated --lr or --batch value is one candidate
        cell = alive.setdefault((p.size, p.D), [])
        if all(q.name != p.name for q in cell):
            cell.append(p)
    sizes = halving.rung_sizes(len(next(iter(alive.values()))), cfg.eta)
    shortest = min(halving.rung_budgets(D, cfg.eta, len(sizes))[0] for _, D in alive)
    if shortest < max(cfg.batch):  # a run trains at least one step, whatever its budget
        say(f"note: the first rung trains {shortest} tokens, less than one batch of {max(cfg.batch)}: "
            "such runs are one step and their losses say little; raise --tokens or lower --eta")
    rows = []
    for r, count in enumerate(sizes):
        runs = {(size, D): [rung_point(cfg, p, halving.rung_budgets(D, cfg.eta, len(sizes))[r]) for p in ps]
                for (size, D), ps in alive.items()}
        unique = list({p.name: p for ps in runs.values() for p in ps}.values())  # cells may share a run
        done = sum(_result(p) is not None for p in unique)
        say(f"halving rung {r + 1}/{len(sizes)}: {count} candidate(s) per cell, {len(unique)} runs, "
            f"{done} already done")
        _run_points(unique, cfg, loader_factory, say, wait=True)
        for (size, D), ps in runs.items():
            got = [{**_result(p), "search": "halving", "rung": r, "rungs": len(sizes), "cell_D": D} for p in ps]
            rows += got
            if r + 1 < len(sizes):
                keep = halving.survivors([g["loss"] for g in got], sizes[r + 1])
                alive[(size, D)] = [alive[(size, D)][i] for i in keep]
    return rows


def fit_rows(rows: list[dict]) -> list[dict]:
    """The rows the laws are fitted on: every grid row; of a halving search, its last rung."""
    return [r for r in rows if r.get("rung", 0) == r.get("rungs", 1) - 1]


def fit_sweep(rows: list[dict]) -> dict[str, Any]:
    """Optima per (N, D), then the laws over the variables that vary in the grid.

    Rows of a halving search (with `rung`) fit on the last rung's winners; a winner is
    bracketed only when its lr, and its batch when several were tried, lie inside the range
    of the cell's first-rung candidates (a single run cannot show a curve)."""
    optima = scaling.sweep_optima(fit_rows(rows))
    first = [r for r in rows if r.get("rung") == 0]
    for o in optima if first else ():
        cands = [r for r in first if r["N"] == o["N"] and r["cell_D"] == o["D"]]
        for key in ("lr", "batch"):
            values = sorted({r[key] for r in cands})
            if len(values) > 1 and not values[0] < o[key] < values[-1]:
                o["bracketed"] = False
    vary = [v for v in ("N", "D") if len({o[v] for o in optima}) > 1]
    notes: dict[str, Any] = {}
    edge = [f"N={o['N']:.3g} D={o['D']:.3g}" for o in optima if not o["bracketed"]]
    if edge:
        notes["unbracketed"] = (f"the grid's lr or batch range does not bracket the optimum at {', '.join(edge)}; "
                                "the law leans on grid-edge values there: widen the grid")
    lr_law = scaling.fit_power_law(optima, [o["lr"] for o in optima], vary, "lr")
    b_vars = ["D"] if "D" in vary else vary
    batch_law = scaling.fit_power_law(optima, [o["batch"] for o in optima], b_vars, "batch")
    for key in ("lr", "batch"):
        if len({o[key] for o in optima}) == 1:  # the exact fit's zero-width interval would claim certainty
            notes[key] = (f"every optimum has the same {key} ({optima[0][key]:.4g}, one grid value): the {key} "
                          f"law is flat and its exponents are undetermined; refine the {key} grid")
    loss_law = None
    try:
        loss_law = scaling.fit_loss_law(optima, [o["loss"] for o in optima], vary)
    except scaling.FitError as e:
        notes["loss"] = f"loss law not fitted: {e}"
    return {"optima": optima, "lr": lr_law, "batch": batch_law, "loss": loss_law, "notes": notes}


def describe(result: dict[str, Any]) -> str:
    lines = []
    for key in ("lr", "batch", "loss"):
        law = result[key]
        if law is None:
            continue
        if key in result["notes"] and key != "loss":
            lines.append(f"{law.formula()}   (95%: undetermined, see the note)")
            continue
        ci = law.parameter_intervals(0.95)
        spans = ", ".join(f"{k} {v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]" for k, v in ci.items())
        lines.append(f"{law.formula()}   (95%: {spans})")
    lines += [f"note: {v}" for v in result["notes"].values()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# `qwen25 pretrain --lr auto --batch auto --law FILE`
# --------------------------------------------------------------------------------------


def resolve_auto(cfg: PretrainConfig, law_path: str | None, lr_auto: bool, batch_auto: bool,
                 world_size: int = 1) -> tuple[PretrainConfig, str]:
    """The config with lr and/or batch_tokens taken from the laws at this run's N and D.

    D is the run's total training tokens as configured; stages given in steps are turned
    into tokens first, so a new batch size keeps D (and changes the steps). The batch is
    rounded to a multiple of seq_len x micro_batch x world_size (the trainer's unit)."""
    if not (lr_auto or batch_auto):
        return cfg, ""
    if not law_path:
        raise UserError("--lr auto / --batch auto need --law FILE (the law.json a `qwen25 sweep` wrote)")
    laws = scaling.load_laws(law_path)
    overrides = dict(cfg.model_overrides)
    N = model_size(cfg.model, overrides) if not Path(cfg.model).exists() and not cfg.init_from else \
        count_parameters(_shape_of(cfg))["active_non_embedding"]
    stages = tuple(dataclasses.replace(s, steps=0, tokens=s.steps * cfg.batch_tokens) if s.steps else s
                   for s in cfg.stages)
    D = sum(s.tokens for s in stages)
    x = {"N": N, "D": D}
    changes: dict[str, Any] = {"stages": stages}
    said = []
    if lr_auto:
        if laws["lr"] is None:
            raise UserError(f"{law_path} has no lr law")
        changes["lr"] = laws["lr"](**x)
        lo, hi = laws["lr"].interval(**x)
        said.append(f"lr {changes['lr']:.3g} (95% {lo:.3g}..{hi:.3g})")
    if batch_auto:
        if laws["batch"] is None:
            raise UserError(f"{law_path} has no batch law")
        unit = cfg.seq_len * cfg.micro_batch * world_size
        changes["batch_tokens"] = max(unit, round(laws["batch"](**x) / unit) * unit)
        said.append(f"batch {changes['batch_tokens']:,} tokens")
    return dataclasses.replace(cfg, **changes), f"from {law_path} at N={N:,}, D={D:,}: " + ", ".join(said)


def _shape_of(cfg: PretrainConfig) -> ModelConfig:
    from qwen25.checkpoint import load_config

    mc = load_config(cfg.init_from) if cfg.init_from else ModelConfig.from_hf(cfg.model)
    return mc.replace(**cfg.model_overrides) if cfg.model_overrides and not cfg.init_from else mc


if __name__ == "__main__":  # a sweep's child process: train one grid point
    try:
        run_point(sys.argv[1])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""The run harness every training stage shares: folder, resume, steps, checkpoints, export.

A stage (pretraining, SFT, DPO, reward modelling, GRPO) is a short function that checks
its input, builds its model, optimizer, batches and loss, and hands the rest to a `Run`:

    def my_stage(cfg) -> dict:
        world = parallel.init_world(cfg.device)
        try:
            validate(cfg)                                   # every input check first (UserError)
            run = Run(cfg.out, world, config=config_dict(cfg), total_steps=N,
                      settings=RunSettings(keep_checkpoints=cfg.keep_checkpoints, ...),
                      check_resume=lambda ck: ...)          # raise ResumeError if ck cannot continue
            model = ... (from run.resume.path when run.resume, else the starting weights)
            model = parallel.parallelize(model, world, ...)
            run.attach(model, inner, build_optimizer(inner, ...), guard=SpikeGuard())
            loader = ...                                     # restore run.state["data"][world.rank]
            run.checkpoint_state(lambda: {"my_counter": ...}, data=loader.state_dict)
            with run:                                        # stop flag (SIGTERM/SIGINT) + progress bar
                run.train(N, next_batch=lambda: [next(it) for _ in range(accum)], loss_fn=...,
                          lr_at=lambda step: ..., evaluate=..., sample=...)
            return run.finish(evaluate=..., sample=..., export=...)
        finally:
            parallel.shutdown_world(world)

What the harness does, so that no stage does it again:

- `Run(...)`: finds the newest complete checkpoint under OUT/checkpoints (`run.resume`,
  its trainer state in `run.state`, `run.step` / `run.tokens` restored), removes temporaries
  of a killed save, writes OUT/config.json, cuts metrics.jsonl back to the resumed step.
- `attach`: restores AdamW moments, every rank's RNG state and the spike guard on resume
  (a fresh run seeds torch's generators from `settings.seed` and the rank instead).
- `train(n_steps, ...)`: the step loop. Stops at a step boundary on SIGTERM/SIGINT (agreed
  by all ranks; `summary["interrupted"]`) or at `stop_after_step` (`summary["paused"]`);
  one `train_step` per step (loss functions follow `qwen25.train.loop.LossFn`); logs a
  "train" record per step (loss, lr, tokens, grad norm, tokens/s, MFU) and a progress bar
  (a plain line every `log_every` steps when stderr is not a terminal); calls `evaluate`
  every `eval_every` steps and at the end, `sample` every `sample_every` steps, and saves a
  checkpoint every `checkpoint_every` steps and at the end. Call it once per phase (the
  pretraining stages each call it); the step counter runs on across calls.
- `save()`: an atomic checkpoint (`qwen25.train.checkpointing`) holding the weights, the
  full optimizer state, every rank's data-loader state and RNG state, the guard, the
  stage's own counters (`checkpoint_state`) and the run's config. Collective: all ranks call.
- `finish(...)`: on a stop, saves and returns; otherwise evaluates again if the run had
  nothing left to do, exports the last checkpoint (default: its HF files to OUT/final),
  draws OUT/plots/*.png from metrics.jsonl and writes OUT/summary.json.

Callbacks get `final=True` when called from `finish` (evaluate there must not log, sample
may print nothing). LoRA and other wrappers replace what a checkpoint stores through
`checkpoint_weights` (weights, model config, extra files).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qwen25.config import ModelConfig
from qwen25.train import checkpointing as ckpt_io
from qwen25.train import parallel
from qwen25.train.loop import LossFn, SpikeGuard, StopFlag, Throughput, train_step
from qwen25.train.metrics import MetricsLog, plot_metrics

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RunSettings:
    """The bookkeeping knobs every stage's config carries under these names."""

    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    checkpoint_every: int = 200  # steps between checkpoints (0: only at the end of each `train` call)
    eval_every: int = 100  # steps between evaluations (0: only at the end of each `train` call)
    sample_every: int = 0  # steps between sample generations (0: only in `finish`)
    log_every: int = 10  # steps between plain progress lines when stderr is not a terminal
    stop_after_step: int = 0  # pause: checkpoint and return after this global step (0: never)
    seed: int = 0  # a fresh run seeds torch's generators with seed + rank (dropout draws from them)

    @classmethod
    def of(cls, cfg: Any) -> RunSettings:
        """The settings of a stage config that has fields of these names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})


def config_dict(cfg: Any) -> dict[str, Any]:
    """JSON form of a frozen config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class Run:
    """One training run in OUT: see the module docstring for the life cycle."""

    def __init__(self, out: str | Path, world: parallel.World, *, config: dict[str, Any], total_steps: int,
                 settings: RunSettings, check_resume: Callable[[ckpt_io.Checkpoint], None] | None = None):
        self.out, self.world, self.settings = Path(out), world, settings
        self.config, self.total_steps = config, total_steps
        self.ckpt_root = self.out / "checkpoints"
        self.resume = ckpt_io.latest_checkpoint(self.ckpt_root)
        if self.resume is not None and check_resume is not None:
            check_resume(self.resume)
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temporaries(self.ckpt_root)
            (self.out / "config.json").write_text(json.dumps(config, indent=1))
        parallel.barrier(world)
        self.state: dict[str, Any] = dict(self.resume.state) if self.resume else {}
        self.step: int = self.state.get("step", 0)
        self.tokens: int = self.state.get("tokens", 0)
        self.stage_step = 0  # steps done in the current `train` call's phase (for checkpoint_state)
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=world.is_main)
        self.log.truncate_after(self.step)
        self._elapsed0, self._t0 = self.state.get("elapsed_s", 0.0), time.perf_counter()
        self.summary: dict[str, Any] = {"interrupted": None,
                                        "resumed_from": self.resume.step if self.resume else None}
        self.last_path: Path | None = self.resume.path if self.resume else None
        self.model: nn.Module | None = None
        self.inner: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.guard: SpikeGuard | None = None
        self._stage_state: Callable[[], dict] = dict
        self._data_state: Callable[[], Any] = lambda: None
        self._weights: Callable[[], tuple[dict, ModelConfig, list[Path]]] | None = None
        self._stop = StopFlag()
        self.bar: tqdm | None = None

    # ---- set-up --------------------------------------------------------------------

    def attach(self, model: nn.Module, inner: nn.Module, optimizer: torch.optim.Optimizer,
               guard: SpikeGuard | None = None, extra_files: Sequence[Path] = ()) -> None:
        """The module to call (maybe DDP-wrapped), the model inside it (whose `config` the
        checkpoint records), the optimizer and guard; restores their states on resume.
        extra_files: copied into every checkpoint (tokenizer files)."""
        self.model, self.inner, self.optimizer, self.guard = model, inner, optimizer, guard
        files = [Path(f) for f in extra_files]
        if self._weights is None:
            self._weights = lambda: (parallel.full_model_state(self.model), self.inner.config, files)
        if self.resume is None:
            torch.manual_seed(self.settings.seed + self.world.rank)
        else:
            parallel.load_full_optimizer_state(model, optimizer, ckpt_io.load_optimizer_state(self.resume))
            ckpt_io.set_rng_state(ckpt_io.load_rng_state(self.resume, self.world.rank), self.world.device)
            if guard is not None and "guard" in self.state:
                guard.load_state_dict(self.state["guard"])

    def checkpoint_state(self, stage: Callable[[], dict], data: Callable[[], Any] | None = None) -> None:
        """What a checkpoint stores besides the harness's own: the stage's counters (JSON)
        and this rank's data position (`data()`; every rank's is kept, in rank order)."""
        self._stage_state = stage
        if data is not None:
            self._data_state = data

    def checkpoint_weights(self, weights: Callable[[], tuple[dict, ModelConfig, list[Path]]]) -> None:
        """Replace what a checkpoint writes as its model: (state dict, config, extra files).
        Collective like `parallel.full_model_state` when the model is sharded."""
        self._weights = weights

    def __enter__(self) -> Run:
        self._stop.__enter__()
        self.bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                        disable=not self.world.is_main or None, file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        self._stop.__exit__(*exc)

    # ---- the loop ------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        """Interrupted by a signal or paused at `stop_after_step`."""
        return bool(self.summary["interrupted"]) or "paused" in self.summary

    @property
    def stop_flag(self) -> StopFlag:
        """The SIGTERM/SIGINT flag (`evaluate` takes it to cut a long evaluation short)."""
        return self._stop

    @property
    def stop_requested(self) -> bool:
        """A signal arrived on this rank (long evaluations check this to cut themselves short)."""
        return self._stop.requested is not None

    def write(self, message: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if self.world.is_main:
            (self.bar.write if self.bar is not None else print)(message)

    def train(self, n_steps: int, *, next_batch: Callable[[], list[Batch]], loss_fn: LossFn,
              lr_at: Callable[[int], float], start: int = 0, grad_clip: float = 1.0, aux_coef: float = 0.0,
              autocast: torch.dtype | None = None, meter: Throughput | None = None, label: str | None = None,
              evaluate: Callable[..., dict] | None = None, sample: Callable[..., Any] | None = None) -> bool:
        """Steps `start` .. `n_steps` of one phase; True when the phase is complete.

        next_batch(): this rank's micro-batches for the next step; lr_at(global step index):
        the learning rate; evaluate(final=False) -> results stored as summary["eval"];
        sample(final=False) logs samples; label: the phase's name in records and the bar.
        """
        s, world = self.settings, self.world
        meter = meter or Throughput(0.0, None)
        self.stage_step = start
        plain = world.is_main and self.bar is not None and self.bar.disable
        extra = {"stage": label} if label is not None else {}
        while self.stage_step < n_steps:
            if self._stop.agreed(world):
                self.summary["interrupted"] = self._stop.requested or "signal on another rank"
                return False
            if s.stop_after_step and self.step >= s.stop_after_step:
                self.summary["paused"] = self.step
                return False
            micro = next_batch()
            lr = lr_at(self.step)
            res = train_step(self.model, self.optimizer, micro, loss_fn, lr=lr, world=world, grad_clip=grad_clip,
                             aux_coef=aux_coef, autocast_dtype=autocast, guard=self.guard)
            self.step, self.stage_step, self.tokens = self.step + 1, self.stage_step + 1, self.tokens + res.tokens
            meter.update(res.tokens)
            self.log.log({"kind": "train", "step": self.step, **extra, "loss": res.loss, "lr": lr,
                          "tokens": self.tokens, "grad_norm": res.grad_norm, "tokens_per_s": meter.tokens_per_s,
                          "mfu": meter.mfu, "skipped": res.skipped, "aux_loss": res.aux_loss})
            if res.skipped:
                self.write(f"step {self.step}: update skipped: {res.skipped}")
            if self.bar is not None:
                self.bar.update(1)
                mfu = {} if meter.mfu is None else {"mfu": f"{meter.mfu * 100:.1f}%"}  # unknown peak: no MFU
                self.bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{meter.tokens_per_s:.0f}", **mfu, **extra)
            if plain and self.step % s.log_every == 0:
                where = f" [{label}]" if label else ""
                print(f"step {self.step}/{self.total_steps}{where} loss {res.loss:.4f} lr {lr:.2e} "
                      f"{meter.tokens_per_s:.0f} tok/s{'' if meter.mfu is None else f' mfu {meter.mfu * 100:.1f}%'} "
                      f"eta {meter.eta_s(n_steps - self.stage_step) / 60:.1f} min", flush=True)
            end = self.stage_step == n_steps
            if evaluate is not None and (end or (s.eval_every and self.step % s.eval_every == 0)):
                self.summary["eval"] = evaluate(final=False)
            if sample is not None and s.sample_every and self.step % s.sample_every == 0:
                sample(final=False)
            if end or (s.checkpoint_every and self.step % s.checkpoint_every == 0):
                self.save()
            meter.reset_clock()
        return True

    # ---- checkpoints and the end -----------------------------------------------------

    def save(self) -> Path:
        """Checkpoint the current step (a no-op on disk when it is already saved). All ranks."""
        world = self.world
        data = _gather(self._data_state(), world)
        rngs = _gather_rng(world)
        trainer_state = self._stage_state() | {
            "tokens": self.tokens, "world_size": world.world_size, "data": data,
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "elapsed_s": self.elapsed_s, "config": self.config}
        model_state, model_config, files = self._weights()
        optim_state = parallel.full_optimizer_state(self.model, self.optimizer)
        path = self.ckpt_root / ckpt_io.step_dir_name(self.step)
        if world.is_main:
            path = ckpt_io.save_checkpoint(
                self.ckpt_root, self.step, model_state=model_state, model_config=model_config,
                optimizer_state=optim_state, trainer_state=trainer_state, rng_states=rngs,
                keep=self.settings.keep_checkpoints, extra_files=[f for f in files if Path(f).exists()])
        parallel.barrier(world)
        self.last_path = path
        return path

    @property
    def elapsed_s(self) -> float:
        """Training wall time of the whole run, earlier legs of a resumed run included."""
        return self._elapsed0 + time.perf_counter() - self._t0

    def finish(self, *, evaluate: Callable[..., dict] | None = None, sample: Callable[..., Any] | None = None,
               export: Callable[[Path], Path] | None = None, plots: bool = True,
               extra: Callable[[], dict] | None = None) -> dict[str, Any]:
        """Save on a stop, else export the last checkpoint; plots; OUT/summary.json (rank 0).

        export(checkpoint folder) -> exported folder (rank 0 only; default: the checkpoint's
        HF files to OUT/final); evaluate/sample are called with final=True on every rank
        (under FSDP their forwards are collective); extra() adds keys to the summary.
        """
        world = self.world
        if self.stopped:
            path = self.save()
            if world.is_main and self.summary["interrupted"]:
                print(f"{self.summary['interrupted']}: saved {path}; run the same command to resume",
                      file=sys.stderr)
        elif self.last_path is not None:
            if "eval" not in self.summary and evaluate is not None:  # a finished run re-run
                self.summary["eval"] = evaluate(final=True)
            if world.is_main:
                dest = export(self.last_path) if export else ckpt_io.export_model(self.last_path, self.out / "final")
                self.summary["final"] = str(dest)
            if sample is not None:
                self.summary["samples"] = sample(final=True)
        if world.is_main:
            if plots:
                plot_metrics(self.out / "metrics.jsonl", self.out / "plots")
            self.summary |= {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed_s}
            self.summary |= extra() if extra is not None else {}
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))
        return self.summary


def _gather(obj, world: parallel.World) -> list:
    """Every rank's JSON-able object, in rank order (all ranks receive the list)."""
    return parallel.all_gather_object(obj, world)


def _gather_rng(world: parallel.World) -> list[dict[str, torch.Tensor]]:
    mine = {k: v.tolist() for k, v in ckpt_io.rng_state(world.device).items()}
    return [{k: torch.tensor(v, dtype=torch.uint8) for k, v in d.items()} for d in _gather(mine, world)]

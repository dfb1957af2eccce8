"""The optimizer step every training stage shares, and the small state machines around it.

`train_step` runs one optimizer step over a list of micro-batches: forward/backward each
one (gradient sync only on the last), normalise by what the loss function says it summed
over (target tokens for language modelling and SFT, pairs for DPO), added up over the whole
step across all ranks, measure the gradient norm, and then either clip and step or
*skip*: a non-finite loss or gradient norm, or a loss / gradient-norm spike (z-score over a
recent window, as OLMo-core's SkipStepOptimizer does), zeroes the gradients and leaves the
weights and the optimizer state untouched. The caller logs why.

`StopFlag` turns SIGTERM/SIGINT into a flag checked at step boundaries (agreed on by all
ranks) so the trainer can save and exit cleanly; `Throughput` gives tokens/s, MFU and ETA.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qwen25.config import ModelConfig, count_parameters
from qwen25.model.moe import config_balance_loss, router_z_loss
from qwen25.train import parallel
from qwen25.train.losses import IGNORE_INDEX, cross_entropy_sum
from qwen25.train.optim import set_lr
from qwen25.train.parallel import World

Batch = dict[str, torch.Tensor]  # "input_ids", "labels", "position_ids": [B, T]


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped steps: the run is not recovering on its own."""


# --------------------------------------------------------------------------------------
# Forward + loss for causal LM batches
# --------------------------------------------------------------------------------------


def lm_loss(model: nn.Module, batch: Batch, cfg: ModelConfig, ce_chunk: int | None = None,
            compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed CE in nats, target count, MoE load-balancing loss or None) for one batch.
    compiled: the cross entropy through `torch.compile` (see `cross_entropy_sum`).
    An MoE config with `router_z_loss_coef` adds coef x z-loss x count to the summed CE."""
    ids, labels = batch["input_ids"], batch["labels"]
    positions = batch.get("position_ids")
    z = None
    if cfg.is_moe:
        logits, router_logits = model(ids, positions=positions, output_router_logits=True)
        mask = labels != IGNORE_INDEX
        aux = config_balance_loss(router_logits, cfg, mask)
        if cfg.router_z_loss_coef:
            z = router_z_loss(router_logits, mask)
    else:
        logits, aux = model(ids, positions=positions), None
    ce, count = cross_entropy_sum(logits, labels, ce_chunk, compiled=compiled)
    if z is not None:
        # The z-loss joins the objective per target token, so after the step's division by the
        # token count it is router_z_loss_coef x the token-weighted mean z-loss (ST-MoE).
        ce = ce + cfg.router_z_loss_coef * z * count
    return ce, count, aux


LossFn = Callable[[nn.Module, Batch], tuple]
"""The loss-function protocol of `train_step` and `evaluate`: `loss_fn(model, batch)` returns

    (loss_sum, normaliser)            or  (loss_sum, normaliser, aux)

loss_sum: a differentiable float scalar, the loss *summed* over the units it counts, with any
  auxiliary loss the stage wants already folded in; normaliser: how many units that is (a
  tensor or number: target tokens, pairs, sequences). The step's objective is
  sum(loss_sum) / sum(normaliser) over all micro-batches and ranks. aux (optional, MoE
  pretraining): a load-balancing loss value that `train_step` folds in with `aux_coef`
  (weighted by the micro-batch's normaliser) and reports separately."""


# --------------------------------------------------------------------------------------
# Spike / NaN guard
# --------------------------------------------------------------------------------------


@dataclass
class SpikeGuard:
    """Skip a step whose loss is non-finite or an outlier, or whose gradient is non-finite.

    A loss is an outlier when (x - mean) / std > z over the last `window` accepted steps,
    checked once `min_history` of them are in the window (early training moves fast), and
    the history restarts at each stage (a new sequence length or RoPE base moves the loss
    legitimately). `max_consecutive` skips in a row abort the run: it is diverging, not
    spiking. The state is plain lists and ints: it checkpoints as JSON and resumes exactly.

    OLMo-core also skips on gradient-norm outliers. We do not: in our sweeps the norm's
    z-score over a settled window flagged ordinary jumps (2x after a quiet stretch) often
    enough to abort healthy runs, and clipping already bounds what a large norm can do.
    A non-finite norm is still skipped, and every norm is logged.
    """

    window: int = 128
    z: float = 6.0
    min_history: int = 20
    max_consecutive: int = 5
    losses: deque = field(default_factory=deque)
    consecutive: int = 0
    total_skipped: int = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Reason to skip this step (and count it), or None to accept it (and record it)."""
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        else:
            z = _zscore(loss, self.losses, self.min_history)
            if z is not None and z > self.z:
                reason = f"loss spike ({loss:.4g}, z={z:.1f} over the last {len(self.losses)} steps)"
        if reason is None:
            self.consecutive = 0
            self.losses.append(loss)
            while len(self.losses) > self.window:
                self.losses.popleft()
            return None
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"{self.consecutive} consecutive steps skipped (last: {reason}); the run is "
                "diverging: lower the learning rate or inspect the data, then resume from the "
                "last checkpoint")
        return reason

    def new_stage(self) -> None:
        """Forget the loss history (a stage changes what a normal loss is)."""
        self.losses.clear()
        self.consecutive = 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "consecutive": self.consecutive,
                "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"])
        self.consecutive, self.total_skipped = state["consecutive"], state["total_skipped"]


def _zscore(x: float, hist: Sequence[float], min_history: int) -> float | None:
    n = len(hist)
    if n < min_history:
        return None
    mean = sum(hist) / n
    std = math.sqrt(sum((h - mean) ** 2 for h in hist) / max(n - 1, 1))
    # A floor of 1% of the mean: a perfectly flat history must not turn noise into "spikes".
    return (x - mean) / max(std, 0.01 * abs(mean), 1e-12)


# --------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    loss: float  # sum(loss_sum) / sum(normaliser) over the whole step (all ranks), aux excluded
    grad_norm: float  # before clipping
    tokens: int  # the step's normaliser, all ranks (target tokens for LM / SFT losses)
    skipped: str | None  # why the update was skipped, or None
    aux_loss: float | None = None  # MoE load-balancing loss (mean over micro-batches)


def _terms(out: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss_sum, normaliser as a float64 tensor, aux or None) of a loss function's output."""
    loss_sum, normaliser = out[0], out[1]
    aux = out[2] if len(out) > 2 else None
    norm = torch.as_tensor(normaliser, device=loss_sum.device).detach().to(torch.float64)
    return loss_sum, norm, aux


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Batch],
               loss_fn: LossFn, *, lr: float, world: World, grad_clip: float = 1.0,
               aux_coef: float = 0.0, autocast_dtype: torch.dtype | None = None,
               guard: SpikeGuard | None = None) -> StepResult:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).

    Each micro-batch's `loss_sum` (see `LossFn`) is differentiated as it is; once the step's
    normalisers are summed over micro-batches and ranks, the gradients are multiplied by
    world_size / that total. DDP and FSDP average gradients over ranks, so the result is
    the gradient of sum(loss_sum) / sum(normaliser) over the global batch, however it is
    split, and a loss function need not know the other micro-batches' sizes. MoE models
    add `aux_coef x aux x normaliser` per micro-batch: after the division that is the
    normaliser-weighted mean of the load-balancing loss times `aux_coef`.
    """
    device = world.device
    count = torch.zeros((), dtype=torch.float64, device=device)
    ce_total = torch.zeros((), dtype=torch.float32, device=device)
    aux_total = torch.zeros((), dtype=torch.float32, device=device)
    n = len(micro_batches)
    for i, mb in enumerate(micro_batches):
        with parallel.grad_sync(model, enabled=i == n - 1):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss_sum, norm, aux = _terms(loss_fn(model, mb))
            objective = loss_sum
            if aux is not None and aux_coef:
                objective = objective + aux_coef * aux * norm.float()
                aux_total += aux.detach().float()
            objective.backward()
        ce_total += loss_sum.detach().float()
        count += norm
    stats = torch.stack([ce_total.double(), aux_total.double(), count])
    parallel.all_reduce_sum(stats, world)
    total = stats[2]
    mean_loss = float(stats[0] / total.clamp(min=1))
    aux_mean = float(stats[1]) / (n * world.world_size) if aux_coef else None

    params = [p for g in optimizer.param_groups for p in g["params"]]
    scale_grads(params, world.world_size / float(total.clamp(min=1)))
    norm = float(parallel.grad_norm(params))
    reason = guard.check(mean_loss, norm) if guard is not None else (
        None if math.isfinite(mean_loss) and math.isfinite(norm) else "non-finite loss or gradient")
    if reason is None:
        if grad_clip > 0:
            parallel.clip_grads(params, grad_clip, torch.tensor(norm, device=device))
        set_lr(optimizer, lr)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(mean_loss, norm, int(round(float(total))), reason, aux_mean)


@torch.no_grad()
def scale_grads(params: Sequence[nn.Parameter], factor: float) -> None:
    """Multiply every gradient by `factor` in place (plain or sharded tensors)."""
    if factor == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


@torch.no_grad()
def evaluate(model: nn.Module, batches, loss_fn: LossFn, world: World,
             autocast_dtype: torch.dtype | None = None, stop: StopFlag | None = None) -> dict[str, float]:
    """Summed loss and normaliser over `batches` (all ranks) -> their ratio, e.g. loss per token."""
    was_training = model.training
    model.eval()
    ce_total = torch.zeros((), dtype=torch.float64, device=world.device)
    count = torch.zeros((), dtype=torch.float64, device=world.device)
    for mb in batches:
        if stop is not None and stop.requested:
            break  # a preemption signal must not wait for a long evaluation
        with torch.autocast(world.device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            ce, n, _ = _terms(loss_fn(model, mb))
        ce_total += ce.double()
        count += n
    stats = parallel.all_reduce_sum(torch.stack([ce_total, count]), world)
    model.train(was_training)
    return {"loss_sum": float(stats[0]), "tokens": float(stats[1]),
            "loss": float(stats[0] / stats[1].clamp(min=1))}


# --------------------------------------------------------------------------------------
# Signals, throughput
# --------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves and exits at the next step boundary.

    The handler only records the request (never saves from inside a signal handler); a
    second SIGINT restores the default behaviour so an impatient Ctrl-C still stops.
    Installed only in the main thread (signals cannot be caught elsewhere).
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = signal.Signals(signum).name

    def agreed(self, world: World) -> bool:
        """True on every rank when any rank was asked to stop (one tiny all-reduce)."""
        return parallel.all_reduce_max(1.0 if self.requested else 0.0, world) > 0


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + attention scores.

    The attention term 12 x layers x heads x head_dim x seq_len counts QK^T and AV in
    forward and backward without causal savings (PaLM appendix B; nanochat uses the same).
    The lm_head matmul is included (it is not an embedding lookup).
    """
    n = count_parameters(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    dense = n["active_non_embedding"] + head
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6 * dense + attn


class Throughput:
    """Tokens/s and MFU over a sliding window of steps, and the ETA of the stage."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, window: int = 20):
        self.fpt, self.peak = flops_per_token, peak_flops
        self.times: deque = deque(maxlen=window)
        self.tokens: deque = deque(maxlen=window)
        self._last = time.perf_counter()

    def update(self, tokens: int) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self.tokens.append(tokens)
        self._last = now

    def reset_clock(self) -> None:
        """Exclude time spent outside training steps (eval, checkpoints) from the rate."""
        self._last = time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        t = sum(self.times)
        return sum(self.tokens) / t if t > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        return self.tokens_per_s * self.fpt / self.peak if self.peak else None

    def eta_s(self, steps_left: int) -> float:
        return steps_left * (sum(self.times) / len(self.times)) if self.times else float("nan")


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32,
                         n: int | None = None, seconds: float = 0.5) -> float:
    """The machine's practical peak: FLOP/s of a large square matmul in `dtype` (best call).

    MFU relative to this number says how well the model uses what the hardware actually
    delivers here (a vendor's datasheet peak is rarely reachable). The fastest call is
    taken, not the median: on a shared machine other processes only ever slow a call down.
    """
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    deadline = time.perf_counter() + seconds
    for i in range(50):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if i >= 3 and time.perf_counter() > deadline:
            break
    return 2 * n ** 3 / min(times[1:])  # the first call pays for allocation and kernel selection

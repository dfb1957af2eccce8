"""Distributed set-up and the transformations a trainer applies to an unmodified model.

Order matters and follows torchtitan's `parallelize`: activation checkpointing, then
compilation (per block, in place so parameter names do not change), then data
parallelism (DDP, or FSDP2 `fully_shard` per block and then on the root). The model code
itself knows nothing about any of it.

The same command runs on one process or under `torchrun --nproc_per_node N` (multi-node
via torchrun's rendezvous flags): `init_world` reads the environment torchrun sets and
picks NCCL on GPUs, gloo on CPUs. Every collective helper here is a no-op on one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qwen25.errors import UserError
from qwen25.host_memory import keep_freed_memory

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """Where this process sits: rank among `world_size`, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when CUDA is present, else the CPU."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device='cuda' but this machine has no CUDA GPU; use --device cpu or auto")
        return torch.device(f"cuda:{local_rank}")
    if device == "cpu":
        return torch.device("cpu")
    raise UserError(f"device={device!r} is unknown; use auto, cpu or cuda")


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cpu":
        keep_freed_memory()  # the same large arrays every micro-batch: reuse them, no page faults
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return World(rank, world_size, local_rank, dev)


def shutdown_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Collectives (identity on one process)
# --------------------------------------------------------------------------------------


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: float, world: World) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_gather_object(obj, world: World) -> list:
    """Every rank's picklable object, in rank order, on every rank (JSON-like data only)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    """Rank 0's Python object on every rank (JSON-like data only)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------
# Model transformations, in the order they must be applied
# --------------------------------------------------------------------------------------


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (composable API: names kept)."""
    from torch.distributed._composable import checkpoint

    for block in model.model.layers:
        checkpoint(block)


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each block in place (same module tree, same parameter names).

    Blocks are identical, so one compiled graph serves them all. The loss is compiled on
    its own (`lm_loss(..., compiled=True)`), where fusing the log-softmax pays most.
    """
    for block in model.model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, reshard_after_forward: bool = True) -> None:
    """FSDP2: shard every block's parameters, then the root's (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, world: World) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def parallelize(model: nn.Module, world: World, *, mode: str = "auto",
                activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply AC -> compile -> DDP/FSDP to `model` (already on `world.device`).

    mode: "auto" (FSDP2 when distributed, else nothing), "none", "ddp" or "fsdp".
    Returns the module to call: the model itself (FSDP2 and the composable APIs modify it
    in place) or a DDP wrapper around it.
    """
    if mode not in PARALLEL_MODES:
        raise UserError(f"parallel={mode!r} is unknown; use one of {', '.join(PARALLEL_MODES)}")
    if mode == "auto":
        mode = "fsdp" if world.distributed else "none"
    if mode != "none" and not world.distributed:
        mode = "none"  # one process: nothing to shard or replicate
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mode == "fsdp":
        apply_fsdp(model)
        return model
    if mode == "ddp":
        return apply_ddp(model, world)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under a DDP wrapper (FSDP2 and compile-in-place add none)."""
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------
# Gradient synchronisation, norms and state dicts that work under every mode
# --------------------------------------------------------------------------------------


@contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter for all but the last micro-batch."""
    if enabled:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients (a plain tensor also when they are sharded)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # sum of the shards' squares, across ranks
    return total


def clip_grads(params: list[nn.Parameter], max_norm: float, total_norm: torch.Tensor) -> None:
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm, foreach=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded model weights on the CPU, keyed by the model's own parameter names.

    Collective under FSDP2: every rank must call it; rank 0 receives the tensors.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name (collective; rank 0 receives)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `full_optimizer_state`: every rank passes the full state, keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))

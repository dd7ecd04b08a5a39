"""``torchrun`` jobs (DDP and FSDP2; gloo on CPU, NCCL on CUDA) and full state dicts of sharded modules."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from dalle.errors import CheckpointError, ConfigError
from dalle.loading import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    pass


@dataclass
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - an immutable default

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = "auto") -> DistInfo:
    """Join the ``torchrun`` job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK), if any.

    Uses NCCL with one GPU per process when the device is CUDA, gloo on CPU. Without torchrun this returns
    a one-process :class:`DistInfo` and touches nothing.
    """
    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def close_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a one-process job). The collective runs on the rank's device (NCCL
    reduces CUDA tensors only); the result comes back on the input's device."""
    if info.distributed:
        moved = values.to(info.device, copy=True)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(values.device)
    return values


def main_decides(info: DistInfo, check: Callable[[], Any]) -> Any:
    """Run ``check`` on rank 0 only and let every rank share its verdict: a CheckpointError or ConfigError it
    raises is raised on every rank (not only on rank 0, which would leave the others waiting at their next
    collective). Returns ``check()``'s result on rank 0, None elsewhere."""
    result, error = None, None
    if info.is_main:
        try:
            result = check()
        except (CheckpointError, ConfigError) as exc:
            error = (type(exc).__name__, str(exc))
    if info.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise {"CheckpointError": CheckpointError, "ConfigError": ConfigError}[error[0]](error[1])
    return result


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a one-process job)."""
    if info.distributed:
        dist.barrier()


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules are their own module)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def is_dtensor(t: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _owned_cpu(value: torch.Tensor) -> torch.Tensor:
    """``value`` on the CPU in storage of its own: a gathered shard can be a view into a larger buffer, which
    safetensors refuses to save and which would keep the whole buffer alive."""
    value = value.detach().cpu()
    if value.untyped_storage().nbytes() != value.numel() * value.element_size():
        value = value.clone()
    return value


def full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict; collective under FSDP2 (every rank must call it).

    Tensors are gathered one at a time and moved to the CPU at once, so the device never holds more than one
    unsharded tensor. ``keep=False`` takes part in the gathers but keeps nothing (an empty dict): the ranks
    that do not write the export need not hold a full CPU copy of the model.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in unwrap(module).state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()
        if keep:
            out[key] = _owned_cpu(value)
    return out


def load_full_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load full tensors into a plain or FSDP2-sharded module (strict)."""
    target = unwrap(module)
    current = target.state_dict()
    missing = set(current) - set(state)
    unexpected = set(state) - set(current)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; was it written with a different model configuration?"
        )
    with torch.no_grad():
        for key, dst in current.items():
            src = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, the model expects "
                    f"{tuple(dst.shape)}; was it written with a different model configuration?"
                )
            if is_dtensor(dst):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
                dst.to_local().copy_(src.to_local())
            else:
                dst.copy_(src)

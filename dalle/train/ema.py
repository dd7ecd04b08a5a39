"""Exponential moving average of a module's parameters (plain or FSDP2-sharded)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from dalle.errors import CheckpointError, ConfigError
from dalle.train.distributed import _owned_cpu, full_state_dict, is_dtensor, unwrap

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed.tensor import DTensor


class EMA:
    """Exponential moving average of a module's floating-point parameters.

    The shadow tensors mirror the parameters (DTensors under FSDP2, so they are sharded too). The decay is
    warmed up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so that a short run's average
    is not dominated by the random initial weights.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999, every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ConfigError(f"EMA update interval must be >= 1, got {every}")
        self.decay = float(decay)
        self.every = int(every)
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in unwrap(module).named_parameters() if p.is_floating_point()
        }

    def current_decay(self) -> float:
        """The decay the next update uses (warmed up)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Fold the module's parameters into the average after optimizer step ``step`` (1-based)."""
        if step % self.every:
            return
        d = self.current_decay()
        for name, p in unwrap(module).named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    def full_state(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """Full CPU tensors, keyed like the module's parameters (collective under FSDP2; ``keep`` as in
        :func:`full_state_dict`)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in self.shadow.items():
            if is_dtensor(value):
                value = cast("DTensor", value).full_tensor()
            if keep:
                out[key] = _owned_cpu(value)
        return out

    def load_full_state(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        """Restore from :meth:`full_state` output."""
        if set(state) != set(self.shadow):
            raise CheckpointError("the checkpoint's EMA weights do not match this model's parameters")
        with torch.no_grad():
            for key, dst in self.shadow.items():
                src = state[key]
                if is_dtensor(dst):
                    from torch.distributed.tensor import distribute_tensor

                    sharded = cast("DTensor", dst)
                    src = distribute_tensor(
                        src.to(dst.device, dst.dtype), sharded.device_mesh, sharded.placements
                    )
                    sharded.to_local().copy_(src.to_local())
                else:
                    dst.copy_(src)
        self.updates = int(updates)

    def model_state(self, module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        """A full state dict of ``module`` with the averaged parameters in place of the raw ones; the raw ones
        while no update has happened yet (a run shorter than ``every`` steps), since the average would still
        be the initial weights. Collective under FSDP2; ``keep`` as in :func:`full_state_dict`."""
        if not self.updates:
            return full_state_dict(module, keep)
        averaged = self.full_state(keep)
        # the raw tensors the average replaces are not gathered at all (only buffers and frozen parameters)
        state: dict[str, torch.Tensor] = {}
        for key, value in unwrap(module).state_dict().items():
            if key in self.shadow:
                if keep:
                    state[key] = averaged[key]
                continue
            if is_dtensor(value):
                value = value.full_tensor()
            if keep:
                state[key] = _owned_cpu(value)
        return state

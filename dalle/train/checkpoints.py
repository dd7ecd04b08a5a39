"""Atomic training checkpoints: one directory per checkpoint, renamed into place when complete, the last K
kept.

Checkpoint layout::

    <run>/checkpoints/step-00001000/
        <name>.safetensors   one per weight group (e.g. encoder, decoder, ema_encoder, ...): full tensors
        state.pt             torch.save: optimizer, RNG states, data position, counters, trainer state
                             (plain containers and tensors only: read back with weights_only=True)
        meta.json            {"step", "time", "files", "format": 1}; written last
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dalle._files import ordinary_permissions
from dalle.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    pass

CHECKPOINT_FORMAT = 1


def _saveable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointManager:
    """Atomic checkpoints in ``root``: each is written to a temporary directory, then renamed into place.

    A crash or a failing disk at any moment leaves the earlier checkpoints untouched; an incomplete
    temporary directory is removed by the next run. Only the newest ``keep`` checkpoints are kept.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ConfigError(f"keep must be >= 1 checkpoints, got {keep}")
        self.root = Path(root)
        self.keep = int(keep)

    def _complete(self) -> list[tuple[int, Path]]:
        found: list[tuple[int, Path]] = []
        if not self.root.is_dir():
            return found
        for entry in self.root.iterdir():
            if entry.is_dir() and entry.name.startswith("step-") and ".tmp" not in entry.name:
                if (entry / "meta.json").is_file():
                    with contextlib.suppress(ValueError):
                        found.append((int(entry.name[5:]), entry))
        return sorted(found)

    def clean_stale(self) -> None:
        """Remove temporary directories left by a run that died while writing."""
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.is_dir() and ".tmp" in entry.name:
                    shutil.rmtree(entry, ignore_errors=True)

    def newer_than(self, step: int) -> list[Path]:
        """Complete checkpoints of steps after ``step``, oldest first."""
        return [p for s, p in self._complete() if s > step]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self._complete()
        return found[-1][1] if found else None

    def save(
        self, step: int, weights: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]
    ) -> Path:
        """Write checkpoint ``step``; raises CheckpointError (earlier checkpoints intact) if writing fails."""
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            files = []
            for name, tensors in weights.items():
                save_file(_saveable(tensors), str(tmp / f"{name}.safetensors"))
                files.append(f"{name}.safetensors")
            torch.save(dict(state), tmp / "state.pt")
            files.append("state.pt")
            meta = {"format": CHECKPOINT_FORMAT, "step": int(step), "time": time.time(), "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            for name in files + ["meta.json"]:
                ordinary_permissions(tmp / name)  # safetensors writes 0600; checkpoints get shared too
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. a resumed run interrupted at once)
                old = self.root / f"step-{step:08d}.tmp-old-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            prev = self.latest()
            where = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
            with contextlib.suppress(OSError):
                where += f"; {shutil.disk_usage(self.root).free / 2**20:.0f} MiB are free on its disk"
            raise CheckpointError(
                f"could not write the checkpoint for step {step} to {self.root} "
                f"({type(exc).__name__}: {exc}); "
                f"{where}. Free disk space or fix the directory, then run again with --resume."
            ) from exc
        for _, old_path in self._complete()[: -self.keep]:
            shutil.rmtree(old_path, ignore_errors=True)
        return final

    @staticmethod
    def load(path: str | os.PathLike[str]) -> tuple[int, dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Read a checkpoint directory: (step, weight groups, state); CheckpointError when corrupt."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            weights = {}
            for name in meta["files"]:
                if name.endswith(".safetensors"):
                    weights[name[: -len(".safetensors")]] = load_file(str(path / name))
            # weights_only=True: a checkpoint from elsewhere cannot run code when it is resumed
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except (
            OSError,
            KeyError,
            ValueError,
            SafetensorError,
            RuntimeError,
            EOFError,
            pickle.UnpicklingError,
        ) as exc:
            raise CheckpointError(
                f"checkpoint {path} is unreadable or incomplete ({type(exc).__name__}: {exc}); "
                "delete it to resume from the one before"
            ) from exc
        return int(meta["step"]), weights, state

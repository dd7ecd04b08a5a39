"""Training infrastructure shared by the dVAE and transformer trainers.

What lives here:

* schedules (cosine, warm-up) as pure functions of the step, so resuming needs nothing but the step;
* :class:`EMA`, an exponential moving average of parameters (plain or FSDP-sharded);
* :class:`CheckpointManager`: atomic checkpoints, the last K kept;
* :class:`DistInfo` / :func:`init_distributed`: ``torchrun`` (DDP and FSDP2), gloo on CPU, NCCL on CUDA;
* :class:`MetricsLogger` (JSON lines), :func:`plot_loss_curve`, :func:`save_image_grid`;
* :class:`StopSignal`: SIGTERM / Ctrl-C turn into "save a checkpoint and stop";
* :class:`Trainer`: the loop both trainers share (accumulation, clipping, non-finite skipping, logging,
  checkpoints, signals);
* :func:`write_model_dir`, the model directory that :meth:`dalle.pipeline.DALLE.from_pretrained` reads, and
  :func:`save_dvae_dir` / :func:`load_dvae`, the directory the dVAE trainer writes.

Checkpoint layout (one directory per checkpoint, renamed into place when complete)::

    <run>/checkpoints/step-00001000/
        <name>.safetensors   one per weight group (e.g. encoder, decoder, ema_encoder, ...): full tensors
        state.pt             torch.save: optimizer, RNG states, data position, counters, trainer state
                             (plain containers and tensors only: read back with weights_only=True)
        meta.json            {"step", "time", "files", "format": 1}; written last

Randomness that shapes a step (augmentation, gumbel noise, caption dropout, data order) is drawn from
generators seeded by ``(seed, step, position in the global batch)``, never from a per-rank global stream.
So a resumed run repeats an uninterrupted one exactly on CPU, and ``torchrun`` with N ranks sees the same
samples and noise as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dalle._files import ordinary_permissions, publish
from dalle.errors import CheckpointError, ConfigError, ModelLoadError
from dalle.loading import resolve_device
from dalle.train.config import LoopConfig

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from dalle.dvae import Decoder, Encoder
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer

MODEL_FORMAT_VERSION = 1
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------- seeds
def derive_seed(*keys: Any) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (same on every machine and Python run)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(device: torch.device | str, *keys: Any) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded by :func:`derive_seed` of ``keys``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*keys))
    return gen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (initial weights; everything per-step uses :func:`derive_seed`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA), for checkpoints."""
    # Only plain containers, numbers, strings and tensors, so that checkpoints load with weights_only=True:
    # NumPy's key array travels as an int64 tensor.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different GPU count: keep the fresh states
            torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- schedules
def cosine_schedule(step: float, total: float, start: float, end: float) -> float:
    """Cosine from ``start`` (step 0) to ``end`` (step ``total``), then held at ``end``."""
    if total <= 0 or step >= total:
        return float(end)
    frac = max(step, 0) / total
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def warmup_lr(step: float, base_lr: float, warmup: int, total: int, min_lr: float, decay: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps to ``base_lr``, then ``decay`` ("cosine", "linear", "constant")
    down to ``min_lr`` at ``total``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "constant":
        return base_lr
    span = max(total - warmup, 1)
    frac = min(max(step - warmup, 0) / span, 1.0)
    if decay == "linear":
        return base_lr + (min_lr - base_lr) * frac
    if decay == "cosine":
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ConfigError(f"unknown learning-rate decay {decay!r}: use cosine, linear or constant")


# ----------------------------------------------------------------------------------------------- distributed
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


# ----------------------------------------------------------------------------------------------- EMA
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
                value = value.full_tensor()
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

                    src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
                    dst.to_local().copy_(src.to_local())
                else:
                    dst.copy_(src)
        self.updates = int(updates)

    def model_state(self, module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
        """A full state dict of ``module`` with the averaged parameters in place of the raw ones; the raw ones
        while no update has happened yet (a run shorter than ``every`` steps), since the average would still be
        the initial weights. Collective under FSDP2; ``keep`` as in :func:`full_state_dict`."""
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


# ----------------------------------------------------------------------------------------------- checkpoints
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
        found = []
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

    def save(self, step: int, weights: Mapping[str, Mapping[str, torch.Tensor]], state: Mapping[str, Any]) -> Path:
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
                f"could not write the checkpoint for step {step} to {self.root} ({type(exc).__name__}: {exc}); "
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
        except (OSError, KeyError, ValueError, SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"checkpoint {path} is unreadable or incomplete ({type(exc).__name__}: {exc}); "
                "delete it to resume from the one before"
            ) from exc
        return int(meta["step"]), weights, state


# ----------------------------------------------------------------------------------------------- signals
class StopSignal:
    """Turns SIGTERM and SIGINT into a flag the training loop checks after each step.

    The first signal asks for "checkpoint and stop"; a second SIGINT raises KeyboardInterrupt at once.
    Use as a context manager; the previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def requested(self) -> bool:
        """True once a signal arrived."""
        return self.signum is not None

    def __enter__(self) -> StopSignal:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because of SIGTERM / Ctrl-C."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum
        super().__init__(f"stopped by signal {signum} after step {step}; checkpoint {checkpoint}")


# ----------------------------------------------------------------------------------------------- outputs
class MetricsLogger:
    """Appends one JSON object per line to ``path`` (main rank only)."""

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that died before its next checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if int(rec.get("step", 0)) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(dict(record), default=float) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a JSON-lines metrics file (lines cut short by a crash are ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


# The training loop's clock (seconds), for --time-limit and the logged rates; a module attribute so that tests
# can substitute a deterministic one.
_clock = time.perf_counter

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Emit a warning only the first time this message is seen in the process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def plot_loss_curve(
    metrics_path: str | os.PathLike[str], out_png: str | os.PathLike[str], keys: tuple[str, ...] = ("loss",)
) -> Path | None:
    """Plot ``keys`` of the training records (and any ``eval_*`` records) against the step; None when
    matplotlib is missing (a warning says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn_once("matplotlib is not installed, so no loss-curve PNG is written (pip install matplotlib)")
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_keys = sorted({k for r in evals for k in r if k not in ("step", "kind", "time")})
    nplots = len(keys) + len(eval_keys)
    if not train or nplots == 0:
        return None
    fig, axes = plt.subplots(nplots, 1, figsize=(7, 2.4 * nplots), squeeze=False)
    for ax, key in zip(axes[:, 0], list(keys) + eval_keys):
        rows = train if key in keys else evals
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, lw=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def save_image_grid(
    images: list[Image.Image], path: str | os.PathLike[str], ncols: int | None = None, captions: list[str] | None = None
) -> Path:
    """Write a grid of PIL images as PNG (uses :func:`dalle.images.make_grid` when it is available)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from dalle.images import make_grid

        grid = make_grid(images, ncols=ncols, captions=captions)
    except ImportError:
        grid = _simple_grid(images, ncols)
    tmp = out.with_name(out.stem + ".tmp.png")
    grid.save(tmp)
    os.replace(tmp, out)
    return out


def _simple_grid(images: list[Image.Image], ncols: int | None) -> Image.Image:
    from PIL import Image

    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * (w + 2) + 2, nrows * (h + 2) + 2), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, (2 + (i % ncols) * (w + 2), 2 + (i // ncols) * (h + 2)))
    return grid


# ----------------------------------------------------------------------------------------------- model dirs
def _write_safetensors(module_or_state: nn.Module | Mapping[str, torch.Tensor], file: Path) -> None:
    """safetensors weights written atomically; shared (tied) tensors are stored once (``save_model``)."""
    from safetensors.torch import save_file, save_model

    tmp = file.with_name(file.name + ".tmp")
    if isinstance(module_or_state, nn.Module):
        module_or_state.to(memory_format=torch.contiguous_format)  # channels-last weights are not contiguous
        save_model(module_or_state, str(tmp))
    else:
        save_file(_saveable(module_or_state), str(tmp))
    publish(tmp, file)  # safetensors writes 0600 files


def _write_json(obj: Any, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, file)


def write_model_dir(
    out_dir: str | os.PathLike[str],
    tokenizer: BPETokenizer,
    encoder: Encoder,
    decoder: Decoder,
    transformer: DALLETransformer,
    image_size: int,
    name: str,
    trained_with_caption_dropout: bool,
    weights_dtype: str = "float32",
) -> Path:
    """Write the model directory :meth:`dalle.pipeline.DALLE.from_pretrained` loads.

    ``weights_dtype`` ("float32", "float16" or "bfloat16") is the precision of ``transformer.safetensors``;
    loading casts it back to the model's float32 parameters (half precision halves the file).

    Files: ``config.json`` (``{"format_version": 1, "transformer", "encoder", "decoder", "image_size",
    "text_len", "name", "trained_with_caption_dropout"}``), ``transformer.safetensors``,
    ``encoder.safetensors``, ``decoder.safetensors`` and ``tokenizer.model``. Each file is replaced
    atomically and ``config.json`` is written last, so a directory with a config is complete.
    """
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tcfg = transformer.config
    if int(image_size) != 8 * int(tcfg.image_grid):
        raise ConfigError(f"image_size {image_size} does not match the {tcfg.image_grid}x{tcfg.image_grid} token grid")
    if weights_dtype == "float32":
        _write_safetensors(transformer, path / "transformer.safetensors")
    else:
        dtype = getattr(torch, weights_dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in transformer.state_dict().items()}
        _write_safetensors(state, path / "transformer.safetensors")
    _write_safetensors(encoder, path / "encoder.safetensors")
    _write_safetensors(decoder, path / "decoder.safetensors")
    tmp = path / "tokenizer.model.tmp"
    tokenizer.save(tmp)
    os.replace(tmp, path / "tokenizer.model")
    config = {
        "format_version": MODEL_FORMAT_VERSION,
        "name": str(name),
        "image_size": int(image_size),
        "text_len": int(tcfg.text_len),
        "trained_with_caption_dropout": bool(trained_with_caption_dropout),
        "transformer": tcfg.to_dict(),
        "encoder": encoder.config(),
        "decoder": decoder.config(),
    }
    _write_json(config, path / "config.json")
    return path


def save_dvae_dir(
    out_dir: str | os.PathLike[str],
    encoder: Encoder,
    decoder: Decoder,
    image_size: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trained dVAE: ``config.json`` (``{"format_version": 1, "kind": "dvae", "encoder", "decoder",
    "image_size", ...extra}``), ``encoder.safetensors``, ``decoder.safetensors`` (same names as a model dir)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(encoder, path / "encoder.safetensors")
    _write_safetensors(decoder, path / "decoder.safetensors")
    config = {
        "format_version": MODEL_FORMAT_VERSION,
        "kind": "dvae",
        "image_size": int(image_size),
        "encoder": encoder.config(),
        "decoder": decoder.config(),
        **dict(extra or {}),
    }
    _write_json(config, path / "config.json")
    return path


def _load_module_weights(module: nn.Module, file: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, str(file), strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load weights from {file}: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(f"weights in {file} do not fit its config: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")


def _lock_run_dir(out: Path) -> IO[str] | None:
    """An exclusive lock on ``out/.lock`` for the life of the returned file; CheckpointError when another run
    holds it. (No lock where ``fcntl`` is missing, e.g. on Windows.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    fh = open(out / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise CheckpointError(f"another run (process {holder}) is training into {out}; wait for it to end or "
                              "choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


#: the exported results a run leaves in its --out (beside its checkpoints): a model or a dVAE directory
_RESULT_DIRS = ("model", "dvae")


def model_path(spec: str | os.PathLike[str]) -> Path:
    """The directory a model flag names: an existing path as it is, else a registered model's directory
    (``shapes``, ``shapes-128``: the bundled ones), else the path as given (so that the caller's error names it).
    A directory wins over a registered name of the same spelling."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from dalle.pipeline import REGISTRY, resolve_model

    return resolve_model(str(spec)) if str(spec) in REGISTRY else path


def load_dvae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Encoder, Decoder, int]:
    """Load (encoder, decoder, image_size) from a dVAE directory (:func:`save_dvae_dir`), a model directory
    (:func:`write_model_dir`), a registered model's name (e.g. ``shapes``: its dVAE) or a training run's output
    holding one of them (``dvae/`` or ``model/``). For OpenAI's ``encoder.pkl``/``decoder.pkl`` use
    :func:`dalle.load_model`."""
    from dalle.dvae import Decoder, Encoder

    root = model_path(path)
    if not (root / "config.json").is_file():
        inner = [root / name for name in _RESULT_DIRS if (root / name / "config.json").is_file()]
        if len(inner) == 1:  # `dalle train-dvae --out RUN` writes RUN/dvae; `dalle train` writes RUN/model
            root = inner[0]
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{root} is not a dVAE directory (no config.json); pass the output directory of "
            "`dalle train-dvae` or a model directory"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
        encoder = Encoder(**cfg["encoder"])
        decoder = Decoder(**cfg["decoder"])
        image_size = int(cfg["image_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file} does not describe a dVAE: {exc}") from exc
    _load_module_weights(encoder, root / "encoder.safetensors")
    _load_module_weights(decoder, root / "decoder.safetensors")
    return encoder.to(device), decoder.to(device), image_size


# ----------------------------------------------------------------------------------------------- the loop

def estimated_last_step(steps_done: int, seconds_spent: float, step: int, train_seconds: float, loop: Any) -> int:
    """The step a run under ``loop.time_limit`` will end at, at the rate of ``steps_done`` steps in
    ``seconds_spent`` seconds (this process's share of the run): at most ``loop.steps``, at least ``step``."""
    remaining = max(loop.time_limit * 60.0 - train_seconds, 0.0)
    rate = steps_done / seconds_spent if seconds_spent > 0 else 0.0
    return int(min(loop.steps, max(step, step + round(rate * remaining))))


class Trainer:
    """The loop the dVAE and transformer trainers share.

    Subclasses build ``self.net`` (the module whose weights are checkpointed and whose ``forward`` returns
    ``(loss, parts)``), ``self.model`` (``net`` or its DDP wrapper; FSDP2 shards ``net`` in place),
    ``self.optimizer``, ``self.ema`` (or None) and implement :meth:`forward`, :meth:`schedule`,
    :meth:`evaluate`, :meth:`write_samples` and :meth:`finish` (and :meth:`checkpoint_weights` /
    :meth:`load_checkpoint_weights` when more than ``net`` and the EMA must be saved).
    """

    kind = "base"

    def __init__(self, loop: LoopConfig, info: DistInfo) -> None:
        self.loop = loop
        self.info = info
        self.out = Path(loop.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; a run writes a directory there, so give a new path")
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.skipped_images = 0
        self.skipped_names: set[str] = set()
        self.samples_seen = 0
        self.train_seconds = 0.0  # time spent in the training loop, over all resumptions (for time_limit)
        self.ckpt = CheckpointManager(self.out / "checkpoints", keep=loop.keep_checkpoints)
        self.metrics = MetricsLogger(self.out / "metrics.jsonl", enabled=info.is_main)
        self.net: nn.Module  # the unwrapped module whose weights are checkpointed
        self.model: nn.Module  # what the step calls: ``net`` or its DDP wrapper
        self.optimizer: torch.optim.Optimizer
        self.ema: EMA | None = None

    # -------------------------------------------------------------- hooks for subclasses
    # Both trainers read batches the same way: from ``self.source`` with ``self.cfg`` (batch_size, seed,
    # num_workers), a per-sample ``self._transform`` and the held-out samples excluded.
    def batches(self, start_step: int) -> Iterator[Any]:
        """Yield the batches of steps ``start_step, start_step + 1, ...`` for this rank."""
        from dalle.data.datasets import make_batches

        return make_batches(
            self.source, batch_size=self.cfg.batch_size, rank=self.info.rank, world_size=self.info.world_size,
            start_step=start_step, seed=self.cfg.seed, transform=self._transform, num_workers=self.cfg.num_workers,
            exclude_last=self._exclude_last, exclude_keys=self._exclude_keys,
        )

    def split(self, batch: Any, parts: int) -> list[Any]:
        """Split a rank's batch into ``parts`` micro-batches for gradient accumulation."""
        from dalle.data.datasets import split_batch

        return split_batch(batch, parts)

    def forward(self, micro: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        """Loss of one micro-batch and named parts to log."""
        raise NotImplementedError

    def schedule(self, step: float) -> dict[str, float]:  # pragma: no cover - abstract
        """Set step-dependent values (learning rate, ...) for step ``step`` (0-based); return them for logs."""
        raise NotImplementedError

    def checkpoint_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Full weight groups to checkpoint: ``net``'s raw weights and the EMA (collective under FSDP2)."""
        out = {"model": full_state_dict(self.net)}
        if self.ema is not None:
            out["ema"] = self.ema.full_state()
        return out

    def load_checkpoint_weights(self, weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`checkpoint_weights` (the EMA is restored by :meth:`resume`)."""
        load_full_state_dict(self.net, weights["model"])

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (collective; every rank calls it)."""
        return {}

    def write_samples(self, step: int) -> None:
        """Write a sample grid for ``step`` (main rank; other ranks may need to join collectives)."""

    def finish(self) -> Path | None:
        """Write the final artefact (main rank writes; every rank calls)."""
        return None

    def batch_size_of(self, batch: Any) -> int:
        """Samples in this rank's (micro-)batch."""
        return len(batch)

    def after_step(self, record: Mapping[str, Any]) -> None:
        """Called with each step's logged values (global means) on every rank."""

    def extra_state(self) -> dict[str, Any]:
        """Trainer-specific state to checkpoint."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def config_dict(self) -> dict[str, Any]:
        """The resolved configuration, written to run_config.json and compared on resume."""
        return {}

    # -------------------------------------------------------------- optimizer state under FSDP2
    def _optimizer_state(self) -> dict[str, Any] | None:
        if any(is_dtensor(p) for p in self.model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def _load_optimizer_state(self, state: dict[str, Any]) -> None:
        if any(is_dtensor(p) for p in self.model.parameters()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state, options=opts)
        else:
            self.optimizer.load_state_dict(state)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (collective; rank 0 writes)."""
        weights = self.checkpoint_weights()
        opt_state = self._optimizer_state()
        path = None
        error: Exception | None = None
        if self.info.is_main:
            state = {
                "kind": self.kind,
                "step": self.step,
                "optimizer": opt_state,
                "rng": rng_state(),
                "ema_updates": self.ema.updates if self.ema else 0,
                "nonfinite_total": self.nonfinite_total,
                "skipped_images": self.skipped_images,
                "skipped_names": sorted(self.skipped_names)[:1000],
                "samples_seen": self.samples_seen,
                "train_seconds": self.train_seconds,
                "world_size": self.info.world_size,
                "config": self.config_dict(),
                "extra": self.extra_state(),
            }
            try:
                path = self.ckpt.save(self.step, weights, state)
            except CheckpointError as exc:
                error = exc
        # every rank learns whether rank 0 managed, so that all stop together
        failed = all_reduce_sum(torch.tensor([1.0 if error else 0.0]), self.info)
        if error is not None:
            raise error
        if failed.item() > 0:
            raise CheckpointError("rank 0 could not write a checkpoint; see its error message")
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> int:
        """Continue from ``path`` or the newest checkpoint in the run directory; returns the step."""
        ckpt_path = Path(path) if path else self.ckpt.latest()
        if ckpt_path is None:
            raise CheckpointError(f"--resume was given but {self.ckpt.root} holds no complete checkpoint")
        step, weights, state = CheckpointManager.load(ckpt_path)
        if state.get("kind") != self.kind:
            raise CheckpointError(f"{ckpt_path} is a {state.get('kind')!r} checkpoint, not a {self.kind!r} one")
        saved, now = state.get("config", {}), self.config_dict()
        changed = [k for k in _RESUME_MUST_MATCH if k in saved and k in now and _differs(k, saved[k], now[k])]
        if changed:
            raise CheckpointError(
                f"cannot resume from {ckpt_path}: {', '.join(changed)} differ from the run that wrote it "
                f"(checkpoint {[saved[k] for k in changed]}, now {[now[k] for k in changed]})"
            )
        if saved.get("time_limit") and not now.get("time_limit") and self.info.is_main:
            warnings.warn(
                f"{ckpt_path} comes from a run with --time-limit {saved['time_limit']}, resumed without one: its "
                f"schedules go back to counting steps towards --steps {now.get('steps')} (the learning rate "
                "rises again); pass --time-limit to keep them on the clock", stacklevel=2,
            )
        self.load_checkpoint_weights(weights)
        self._load_optimizer_state(state["optimizer"])
        if self.ema is not None and "ema" in weights:
            self.ema.load_full_state(weights["ema"], state.get("ema_updates", 0))
        set_rng_state(state["rng"])
        self.step = step
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.skipped_images = int(state.get("skipped_images", 0))
        self.skipped_names = set(state.get("skipped_names", []))
        self.samples_seen = int(state.get("samples_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.load_extra_state(state.get("extra", {}))
        self.metrics.truncate_after(step)
        if step >= self.loop.steps and not self.loop.time_limit and self.info.is_main:
            warnings.warn(f"the checkpoint is at step {step}, already at --steps {self.loop.steps}: nothing is "
                          "trained, the result is exported again; raise --steps to train on", stacklevel=2)
        later = self.ckpt.newer_than(step)
        if later and self.info.is_main:  # else a later plain --resume would jump back to the abandoned timeline
            aside = self.ckpt.root / "abandoned"
            aside.mkdir(exist_ok=True)
            for p in later:
                os.replace(p, aside / f"{p.name}-{int(time.time())}")
            warnings.warn(
                f"resuming from step {step}: the later checkpoints ({', '.join(p.name for p in later)}) belong to "
                f"the run this one replaces and were moved to {aside}", stacklevel=2,
            )
        return step

    # -------------------------------------------------------------- the loop
    def _sync_grads_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """The total gradient norm (clipped to ``clip_grad``), a 0-dim tensor left on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.loop.clip_grad if self.loop.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if is_dtensor(norm):
            norm = norm.full_tensor()
        return norm.detach()

    def schedule_position(self) -> float:
        """Where the schedules stand, in steps: the step, or under ``time_limit`` the further of the step and
        the share of the time limit spent times ``steps`` (so that they complete when the time is up)."""
        lp = self.loop
        if not lp.time_limit:
            return float(self.step)
        return max(float(self.step), lp.steps * min(self.train_seconds / (lp.time_limit * 60.0), 1.0))

    def _advance_clock(self, seconds: float) -> bool:
        """Set ``train_seconds``; under ``time_limit`` to the ranks' mean of their ``seconds``, one value on every
        rank, so that their schedules (hence their weights) agree and they stop together. True when time is up."""
        self.train_seconds = seconds
        lp = self.loop
        if not lp.time_limit:
            return False
        total = all_reduce_sum(torch.tensor([seconds], dtype=torch.float64), self.info).item()
        self.train_seconds = total / self.info.world_size
        return self.train_seconds >= lp.time_limit * 60.0

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on this rank's batch (with accumulation); returns global means to log."""
        sched = self.schedule(self.schedule_position())
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = self.split(batch, self.loop.grad_accum)
        total_n = sum(self.batch_size_of(m) for m in micro)
        # metric sums stay on the device: the host reads them once per step (one transfer, which also decides
        # whether the step is finite), not once per metric and micro-batch
        sums: dict[str, torch.Tensor] = {}
        for i, m in enumerate(micro):
            n = self.batch_size_of(m)
            with self._sync_grads_context(i == len(micro) - 1):
                loss, parts = self.forward(m, self.step)
                # weight each micro-batch by its share of the rank's samples: the sum is the rank mean
                (loss * (n / total_n)).backward()
            for key, val in {"loss": loss, **parts}.items():
                weighted = val.detach().double() * n
                sums[key] = sums[key] + weighted if key in sums else weighted
        norm = self._grad_norm()
        keys = sorted(sums)
        dev = norm.device
        packed = torch.stack([sums[k].to(dev) for k in keys] + [norm.double(), torch.tensor(float(total_n), device=dev,
                                                                                              dtype=torch.float64)])
        packed = all_reduce_sum(packed, self.info).tolist()
        n_global = packed[-1]
        means = {k: packed[i] / n_global for i, k in enumerate(keys)}
        grad_norm = packed[-2] / self.info.world_size  # identical on every rank after DDP's all-reduce
        finite = all(math.isfinite(v) for v in means.values()) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_run = 0
            if self.ema is not None:
                self.ema.update(self.model, self.step + 1)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_run += 1
        self.step += 1
        self.samples_seen += int(n_global)
        out = {**means, **sched, "grad_norm": grad_norm, "nonfinite": self.nonfinite_total}
        if not finite and self.nonfinite_run >= self.loop.max_nonfinite:
            last = self.ckpt.latest()
            raise CheckpointError(
                f"the loss or gradient was non-finite for {self.nonfinite_run} steps in a row (up to step "
                f"{self.step}); training stopped without saving, so the last good checkpoint "
                f"{last if last else '(none yet)'} is intact. Lower the learning rate or check the data, then "
                "resume from it with --resume."
            )
        return out

    def _stop_requested(self, stop: StopSignal) -> bool:
        flag = torch.tensor([1.0 if stop.requested else 0.0])
        return all_reduce_sum(flag, self.info).item() > 0

    def _maybe_write_outputs(self, last: bool) -> None:
        lp = self.loop
        if lp.eval_every and (self.step % lp.eval_every == 0 or last):
            metrics = self.evaluate()
            if metrics:
                self.metrics.log({"kind": "eval", "step": self.step, **metrics})
                if self.info.is_main and self._bar is not None:
                    self._bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if lp.sample_every and (self.step % lp.sample_every == 0 or last):
            self.write_samples(self.step)
        if self.info.is_main and lp.plot_every and (self.step % lp.plot_every == 0 or last):
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")

    def refuse_finished_run(self) -> None:
        """Raise when ``--out`` holds another run's checkpoints or results (a new run would overwrite them)."""
        if self.ckpt.latest() is not None:
            raise CheckpointError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run or choose a new --out"
            )
        done = [name for name in _RESULT_DIRS if (self.out / name).exists()]
        if done:
            raise CheckpointError(
                f"{self.out} already holds a trained {' and '.join(d + '/' for d in done)} (with no checkpoint to "
                "resume from); choose a new --out, or move it away to train again there"
            )

    def fit(self, resume: bool | str = False) -> Path | None:
        """Train to ``loop.steps`` (or until ``loop.time_limit``); returns the final artefact's path (rank 0),
        None elsewhere. The run holds a lock on ``--out`` meanwhile: a second run there is refused."""
        def take_out_dir() -> IO[str] | None:
            self.out.mkdir(parents=True, exist_ok=True)
            held = _lock_run_dir(self.out)
            try:
                if not resume:
                    self.refuse_finished_run()
            except CheckpointError:
                if held is not None:
                    held.close()
                raise
            return held

        lock = main_decides(self.info, take_out_dir)
        try:
            return self._fit(resume)
        finally:
            if lock is not None:
                lock.close()  # releases the lock (as the end of the process does, however it ends)

    def _fit(self, resume: bool | str) -> Path | None:
        lp = self.loop
        self._bar = None
        if self.info.is_main:
            self.ckpt.clean_stale()
        barrier(self.info)
        if resume:
            self.resume(resume if isinstance(resume, str) else None)
        elif self.info.is_main and self.metrics.path.exists():
            self.metrics.path.unlink()
        if self.info.is_main:
            _write_json(self.config_dict(), self.out / "run_config.json")
        start = self.step
        bar = None
        if self.info.is_main and lp.progress:
            from dalle._progress import progress_bar

            bar = progress_bar(lp.steps, f"train {self.kind}", "step", initial=start)
        self._bar = bar
        t_last, samples_last = _clock(), self.samples_seen
        t_start, seconds_before = t_last, self.train_seconds
        try:
            with StopSignal() as stop:
                data = self.batches(start)
                last = self.step >= lp.steps or self._advance_clock(self.train_seconds)
                while not last:
                    batch = next(data)
                    self._account_skipped(batch)
                    rec = self.train_step(batch)
                    self.after_step(rec)
                    time_up = self._advance_clock(seconds_before + _clock() - t_start)
                    last = self.step >= lp.steps or time_up
                    if lp.log_every and (self.step % lp.log_every == 0 or last or self.step == start + 1):
                        now = _clock()
                        rate = (self.samples_seen - samples_last) / max(now - t_last, 1e-9)
                        t_last, samples_last = now, self.samples_seen
                        skipped = int(all_reduce_sum(torch.tensor([float(self.skipped_images)]), self.info).item())
                        self.metrics.log({"kind": "train", "step": self.step, **rec, "samples_per_s": rate,
                                          "skipped_images": skipped, "time": time.time()})
                    if bar is not None:
                        if lp.time_limit:  # the bar's end: the step the time limit will stop at, as estimated now
                            bar.total = estimated_last_step(self.step - start, self.train_seconds - seconds_before,
                                                            self.step, self.train_seconds, lp)
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                    self._maybe_write_outputs(last)
                    stopping = self._stop_requested(stop)
                    # no periodic checkpoint inside a run of non-finite steps: the last good one stays newest
                    periodic = lp.ckpt_every and self.step % lp.ckpt_every == 0 and not self.nonfinite_run
                    if periodic or last or stopping:
                        path = self.save_checkpoint()
                        if stopping:
                            raise TrainingInterrupted(self.step, path, stop.signum or signal.SIGTERM)
        finally:
            if bar is not None:
                bar.close()
        return self.finish()

    def _account_skipped(self, batch: Any) -> None:
        names = getattr(batch, "skipped", None)
        if names:
            new = [n for n in names if n not in self.skipped_names]
            self.skipped_names.update(new)
            self.skipped_images += len(new)
            if new and self.info.is_main:
                warn_once(f"skipping unreadable images (first: {new[0]}); the count is in metrics.jsonl")


# config keys whose change makes a checkpoint unusable (model shape, data layout)
_RESUME_MUST_MATCH = ("model", "image_size", "global_batch", "seed", "data", "dvae_sha256", "tokenizer_sha256")


def _differs(key: str, saved: Any, now: Any) -> bool:
    """Whether a resume-critical setting changed; the data may be spelled differently (``imgs/``, ``./imgs``)."""
    if saved == now:
        return False
    if key == "data" and isinstance(saved, str) and isinstance(now, str) and "," not in saved + now:
        return Path(saved).expanduser().resolve() != Path(now).expanduser().resolve()
    return True


def check_image_size(asked: int | None, native: int) -> int:
    """The image side to work at: ``asked`` (validated) or the dVAE's ``native`` one. The dVAE is fully
    convolutional, so any multiple of 8 works; the token grid is a eighth of it."""
    if asked is None:
        return int(native)
    if asked < 8 or asked % 8:
        raise ConfigError(f"image_size must be a positive multiple of 8 (the dVAE downsamples by 8), got {asked}")
    return int(asked)


def describe_params(module: nn.Module) -> str:
    """'12.3M parameters' for logs."""
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M parameters"


def deepcopy_module(module: nn.Module) -> nn.Module:
    """A detached copy of a plain module (for EMA export)."""
    return copy.deepcopy(unwrap(module))


__all__ = [
    "CheckpointManager",
    "DistInfo",
    "EMA",
    "LoopConfig",
    "MetricsLogger",
    "StopSignal",
    "Trainer",
    "TrainingInterrupted",
    "close_distributed",
    "check_image_size",
    "cosine_schedule",
    "derive_seed",
    "init_distributed",
    "load_dvae",
    "make_generator",
    "plot_loss_curve",
    "read_metrics",
    "save_dvae_dir",
    "save_image_grid",
    "seed_everything",
    "warmup_lr",
    "write_model_dir",
]


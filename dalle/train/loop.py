"""The training loop both trainers share: accumulation, clipping, non-finite skipping, logging, evaluation and
samples, checkpoints, resuming, signals (SIGTERM / Ctrl-C save a checkpoint and stop) and the run lock."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dalle.errors import CheckpointError, ConfigError
from dalle.seeds import rng_state, set_rng_state
from dalle.train.checkpoints import CheckpointManager
from dalle.train.config import LoopConfig
from dalle.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    full_state_dict,
    is_dtensor,
    load_full_state_dict,
    main_decides,
    unwrap,
)
from dalle.train.ema import EMA
from dalle.train.exports import _RESULT_DIRS, _write_json
from dalle.train.outputs import MetricsLogger, _clock, plot_loss_curve, warn_once

if TYPE_CHECKING:  # pragma: no cover
    import random

    from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class TrainData:
    """The data contract of a training run: everything :meth:`Trainer.batches` reads, given to the
    :class:`Trainer` constructor by each trainer.

    Attributes:
        source: a data source from :func:`dalle.data.datasets.open_source` (folder, tar shards, token shards,
            ``shapes``, ``letters``).
        transform: the per-sample ``(image, rng) -> image`` step (augmentation, resizing).
        batch_size: samples per optimizer step over all ranks.
        seed: the data order's seed (with the step, it fixes every batch, also after resuming).
        num_workers: DataLoader worker processes (0: read in the training process).
        exclude_last: the last ``exclude_last`` samples of ``source`` are held out for evaluation.
        exclude_keys: names of held-out samples (tar shards: the samples are found by name, not position).
    """

    source: Any
    transform: Callable[[Any, random.Random], Any]
    batch_size: int
    seed: int
    num_workers: int = 0
    exclude_last: int = 0
    exclude_keys: frozenset[str] = field(default_factory=frozenset)


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
        raise CheckpointError(
            f"another run (process {holder}) is training into {out}; wait for it to end or "
            "choose another --out"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def estimated_last_step(
    steps_done: int, seconds_spent: float, step: int, train_seconds: float, loop: Any
) -> int:
    """The step a run under ``loop.time_limit`` will end at, at the rate of ``steps_done`` steps in
    ``seconds_spent`` seconds (this process's share of the run): at most ``loop.steps``, at least ``step``."""
    remaining = max(loop.time_limit * 60.0 - train_seconds, 0.0)
    rate = steps_done / seconds_spent if seconds_spent > 0 else 0.0
    return int(min(loop.steps, max(step, step + round(rate * remaining))))


class Trainer:
    """The loop the dVAE and transformer trainers share.

    Subclasses pass the data contract (:class:`TrainData`) to this constructor and build ``self.net`` (the
    module whose weights are checkpointed and whose ``forward`` returns ``(loss, parts)``), ``self.model``
    (``net`` or its DDP wrapper; FSDP2 shards ``net`` in place), ``self.optimizer``, ``self.ema`` (or None)
    and implement :meth:`forward`, :meth:`schedule`, :meth:`evaluate`, :meth:`write_samples` and
    :meth:`finish` (and :meth:`checkpoint_weights` / :meth:`load_checkpoint_weights` when more than ``net``
    and the EMA must be saved).
    """

    kind = "base"

    def __init__(self, loop: LoopConfig, info: DistInfo, data: TrainData) -> None:
        self.loop = loop
        self.info = info
        self.data = data
        self.out = Path(loop.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(
                f"--out {self.out} is a file; a run writes a directory there, so give a new path"
            )
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
    def batches(self, start_step: int) -> Iterator[Any]:
        """Yield the batches of steps ``start_step, start_step + 1, ...`` for this rank, from
        :attr:`data`."""
        from dalle.data.datasets import make_batches

        d = self.data
        return make_batches(
            d.source,
            batch_size=d.batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            start_step=start_step,
            seed=d.seed,
            transform=d.transform,
            num_workers=d.num_workers,
            exclude_last=d.exclude_last,
            exclude_keys=d.exclude_keys,
        )

    def split(self, batch: Any, parts: int) -> list[Any]:
        """Split a rank's batch into ``parts`` micro-batches for gradient accumulation."""
        from dalle.data.datasets import split_batch

        return split_batch(batch, parts)

    def forward(
        self, micro: Any, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # pragma: no cover
        """Loss of one micro-batch and named parts to log."""
        raise NotImplementedError

    def schedule(self, step: float) -> dict[str, float]:  # pragma: no cover - abstract
        """Set step-dependent values (learning rate, ...) for step ``step`` (0-based); return them for
        logs."""
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
            raise CheckpointError(
                f"{ckpt_path} is a {state.get('kind')!r} checkpoint, not a {self.kind!r} one"
            )
        saved, now = state.get("config", {}), self.config_dict()
        changed = [k for k in _RESUME_MUST_MATCH if k in saved and k in now and _differs(k, saved[k], now[k])]
        if changed:
            raise CheckpointError(
                f"cannot resume from {ckpt_path}: {', '.join(changed)} differ from the run that wrote it "
                f"(checkpoint {[saved[k] for k in changed]}, now {[now[k] for k in changed]})"
            )
        if saved.get("time_limit") and not now.get("time_limit") and self.info.is_main:
            warnings.warn(
                f"{ckpt_path} comes from a run with --time-limit {saved['time_limit']}, resumed without one: "
                f"its schedules go back to counting steps towards --steps {now.get('steps')} (the learning "
                "rate rises again); pass --time-limit to keep them on the clock",
                stacklevel=2,
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
            warnings.warn(
                f"the checkpoint is at step {step}, already at --steps {self.loop.steps}: nothing is "
                "trained, the result is exported again; raise --steps to train on",
                stacklevel=2,
            )
        later = self.ckpt.newer_than(step)
        if (
            later and self.info.is_main
        ):  # else a later plain --resume would jump back to the abandoned timeline
            aside = self.ckpt.root / "abandoned"
            aside.mkdir(exist_ok=True)
            for p in later:
                os.replace(p, aside / f"{p.name}-{int(time.time())}")
            warnings.warn(
                f"resuming from step {step}: the later checkpoints ({', '.join(p.name for p in later)}) "
                f"belong to the run this one replaces and were moved to {aside}",
                stacklevel=2,
            )
        return step

    # -------------------------------------------------------------- the loop
    def _sync_grads_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        if not last and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        set_sync = getattr(self.model, "set_requires_gradient_sync", None)
        if set_sync is not None:  # FSDP2
            set_sync(last)
        return contextlib.nullcontext()

    def _grad_norm(self) -> torch.Tensor:
        """The total gradient norm (clipped to ``clip_grad``), a 0-dim tensor left on the device."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.loop.clip_grad if self.loop.clip_grad else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if is_dtensor(norm):
            norm = cast("DTensor", norm).full_tensor()
        return norm.detach()

    def schedule_position(self) -> float:
        """Where the schedules stand, in steps: the step, or under ``time_limit`` the further of the step and
        the share of the time limit spent times ``steps`` (so that they complete when the time is up)."""
        lp = self.loop
        if not lp.time_limit:
            return float(self.step)
        return max(float(self.step), lp.steps * min(self.train_seconds / (lp.time_limit * 60.0), 1.0))

    def _advance_clock(self, seconds: float) -> bool:
        """Set ``train_seconds``; under ``time_limit`` to the ranks' mean of their ``seconds``, one value on
        every rank, so that their schedules (hence their weights) agree and they stop together. True when time
        is up."""
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
        packed = torch.stack(
            [sums[k].to(dev) for k in keys]
            + [norm.double(), torch.tensor(float(total_n), device=dev, dtype=torch.float64)]
        )
        totals = all_reduce_sum(packed, self.info).tolist()
        n_global = totals[-1]
        means = {k: totals[i] / n_global for i, k in enumerate(keys)}
        grad_norm = totals[-2] / self.info.world_size  # identical on every rank after DDP's all-reduce
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
        out: dict[str, float] = {**means, **sched, "grad_norm": grad_norm, "nonfinite": self.nonfinite_total}
        if not finite and self.nonfinite_run >= self.loop.max_nonfinite:
            last = self.ckpt.latest()
            raise CheckpointError(
                f"the loss or gradient was non-finite for {self.nonfinite_run} steps in a row (up to step "
                f"{self.step}); training stopped without saving, so the last good checkpoint "
                f"{last if last else '(none yet)'} is intact. Lower the learning rate or check the data, "
                "then resume from it with --resume."
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
                    self._bar.write(
                        f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    )
        if lp.sample_every and (self.step % lp.sample_every == 0 or last):
            self.write_samples(self.step)
        if self.info.is_main and lp.plot_every and (self.step % lp.plot_every == 0 or last):
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png")

    def refuse_finished_run(self) -> None:
        """Raise when ``--out`` holds another run's checkpoints or results (a new run would overwrite
        them)."""
        if self.ckpt.latest() is not None:
            raise CheckpointError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run or choose a new "
                "--out"
            )
        done = [name for name in _RESULT_DIRS if (self.out / name).exists()]
        if done:
            raise CheckpointError(
                f"{self.out} already holds a trained {' and '.join(d + '/' for d in done)} (with no "
                "checkpoint to resume from); choose a new --out, or move it away to train again there"
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
                        skipped = int(
                            all_reduce_sum(torch.tensor([float(self.skipped_images)]), self.info).item()
                        )
                        self.metrics.log(
                            {
                                "kind": "train",
                                "step": self.step,
                                **rec,
                                "samples_per_s": rate,
                                "skipped_images": skipped,
                                "time": time.time(),
                            }
                        )
                    if bar is not None:
                        if (
                            lp.time_limit
                        ):  # the bar's end: the step the time limit will stop at, as estimated now
                            bar.total = estimated_last_step(
                                self.step - start,
                                self.train_seconds - seconds_before,
                                self.step,
                                self.train_seconds,
                                lp,
                            )
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
_RESUME_MUST_MATCH = (
    "model",
    "image_size",
    "global_batch",
    "seed",
    "data",
    "dvae_sha256",
    "tokenizer_sha256",
)


def _differs(key: str, saved: Any, now: Any) -> bool:
    """Whether a resume-critical setting changed; the data may be spelled differently (``imgs/``,
    ``./imgs``)."""
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
        raise ConfigError(
            f"image_size must be a positive multiple of 8 (the dVAE downsamples by 8), got {asked}"
        )
    return int(asked)


def describe_params(module: nn.Module) -> str:
    """'12.3M parameters' for logs."""
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.2f}M parameters"


def deepcopy_module(module: nn.Module) -> nn.Module:
    """A detached copy of a plain module (for EMA export)."""
    return copy.deepcopy(unwrap(module))

"""Seeds derived from keys, so that every random draw of a run can be repeated: per step, per sample, per
rank.

Randomness that shapes a training step (augmentation, gumbel noise, caption dropout, data order) is drawn from
generators seeded by ``(seed, step, position in the global batch)``, never from a per-rank global stream, so a
resumed run repeats an uninterrupted one exactly on CPU and ``torchrun`` with N ranks sees the same samples
and noise as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    pass


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
    # legacy=True (the default) gives the MT19937 tuple; the stubs also allow the dict form
    kind, keys, pos, has_gauss, gauss = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
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

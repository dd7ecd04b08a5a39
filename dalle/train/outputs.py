"""What a run writes besides checkpoints: metrics (JSON lines), loss plots, sample grids, one-time
warnings."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


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
        pts = [
            (r["step"], r[key])
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
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
    images: list[Image.Image],
    path: str | os.PathLike[str],
    ncols: int | None = None,
    captions: list[str] | None = None,
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

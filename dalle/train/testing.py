"""Tiny fixtures for the training tests and for trying the trainers quickly: a random dVAE directory, image
folders and tar shards (with optionally corrupt members), and small config dictionaries."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY_DVAE: dict[str, Any] = {
    "data": "shapes",
    "image_size": 32,
    "batch_size": 4,
    "n_hid": 8,
    "n_blk_per_group": 1,
    "n_init": 8,
    "vocab_size": 32,
    "steps": 12,
    "lr": 3e-3,
    "ckpt_every": 4,
    "log_every": 1,
    "eval_every": 0,
    "sample_every": 0,
    "plot_every": 0,
    "eval_images": 4,
    "progress": False,
}

TINY_TRANSFORMER: dict[str, Any] = {
    "data": "shapes",
    "tokenizer_vocab": 64,
    "tokenizer_samples": 2000,
    "text_len": 16,
    "preset": "tiny",
    "batch_size": 8,
    "steps": 12,
    "lr": 3e-3,
    "warmup_steps": 3,
    "ckpt_every": 4,
    "log_every": 1,
    "eval_every": 0,
    "sample_every": 0,
    "plot_every": 0,
    "eval_samples": 8,
    "bpe_dropout": 0.0,
    "ema_decay": 0.9,
    "ema_every": 1,
    "progress": False,
}


def make_tiny_dvae_dir(
    path: str | os.PathLike[str], image_size: int = 32, vocab_size: int = 32, seed: int = 0
) -> Path:
    """A randomly initialised tiny dVAE saved like ``dalle train-dvae`` output."""
    import torch

    from dalle.dvae import Decoder, Encoder
    from dalle.train.exports import save_dvae_dir

    torch.manual_seed(seed)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=vocab_size)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=vocab_size)
    return save_dvae_dir(path, enc, dec, image_size)


def random_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A blocky random RGB image of ``size`` (w, h)."""
    w, h = size
    small = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.NEAREST)


def make_image_folder(
    path: str | os.PathLike[str],
    n: int = 8,
    corrupt: tuple[int, ...] = (),
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = ((40, 32), (32, 48), (64, 64)),
) -> Path:
    """``n`` PNGs ``img_000.png ...`` with captions ``caption number i``; indices in ``corrupt`` hold
    garbage."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        stem = root / f"img_{i:03d}"
        if i in corrupt:
            stem.with_suffix(".png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        else:
            random_image(rng, sizes[i % len(sizes)]).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(f"caption number {i}\n")
    return root


def make_tar_shards(
    path: str | os.PathLike[str],
    n_shards: int = 2,
    per_shard: int = 4,
    corrupt: tuple[int, ...] = (),
    seed: int = 0,
) -> list[Path]:
    """WebDataset-style shards ``shard-00000.tar ...``: ``KEY.png`` + ``KEY.txt`` (global indices in
    ``corrupt`` get garbage image bytes)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    k = 0
    for s in range(n_shards):
        fname = root / f"shard-{s:05d}.tar"
        with tarfile.open(fname, "w") as tf:
            for _ in range(per_shard):
                if k in corrupt:
                    data = b"not an image at all"
                else:
                    buf = io.BytesIO()
                    random_image(rng, (48, 40)).save(buf, format="PNG")
                    data = buf.getvalue()
                for name, payload in (
                    (f"sample{k:05d}.png", data),
                    (f"sample{k:05d}.txt", f"tar caption {k}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                k += 1
        files.append(fname)
    return files

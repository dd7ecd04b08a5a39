"""Encoding an image dataset into dVAE token shards once, for transformer training (``dalle encode-dataset``).

:func:`encode_dataset` centre-crops every image of a source (a folder of images with ``.txt`` captions,
``.tar`` shards, or the shapes world) to the dVAE's side, encodes it to argmax tokens and writes memory-mapped
token shards with the captions (:class:`dalle.data.datasets.TokenShardWriter`). ``workers`` processes read,
render and crop whole batches while the encoder runs; the output is the same for any number of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, cast


@dataclasses.dataclass
class EncodeConfig:
    """Settings of ``dalle encode-dataset``."""

    data: str = ""
    dvae: str = ""
    out_dir: str = ""
    limit: int | None = None
    batch_size: int = 32
    shard_size: int = 50_000
    image_size: int | None = None
    workers: int = 0
    device: str = "auto"
    progress: bool = True


def encode_dataset(cfg: EncodeConfig) -> tuple[Path, int, int]:
    """Encode ``cfg.data`` with the dVAE into token shards; returns (directory, samples, skipped images)."""
    from dalle.data.datasets import TarShards, TokenShards, TokenShardWriter, count_once, open_source
    from dalle.errors import ConfigError
    from dalle.loading import resolve_device
    from dalle.train.loop import check_image_size
    from dalle.train.transformer import encode_images, encoder_digest, load_dvae_any, prepare_encoder

    if not (cfg.data and cfg.dvae and cfg.out_dir):
        raise ConfigError("encode-dataset needs --data, --dvae and --out")
    if cfg.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise ConfigError(
            f"--batch-size and --shard-size must be >= 1, got {cfg.batch_size} and {cfg.shard_size}"
        )
    device = resolve_device(cfg.device)
    encoder, _, image_size = load_dvae_any(cfg.dvae, device)
    image_size = check_image_size(cfg.image_size, image_size)
    prepare_encoder(encoder)
    source = open_source(cfg.data, require_captions=True, size=image_size)
    if isinstance(source, TokenShards):
        raise ConfigError(f"{cfg.data} is already token shards")
    if not isinstance(source, TarShards):
        count_once(source, cfg.limit)  # an endless source without --limit fails here, before --out is made
    grid = image_size // 8
    writer = TokenShardWriter(
        cfg.out_dir,
        grid=grid,
        image_size=image_size,
        vocab_size=encoder.vocab_size,
        shard_size=cfg.shard_size,
        meta={
            "encoder": encoder.config(),
            "encoder_sha256": encoder_digest(encoder),
            "source": str(cfg.data),
        },
    )
    skipped: list[str] = []
    empty_captions = 0
    bar = None
    if cfg.progress:
        from dalle._progress import progress_bar

        bar = progress_bar(cfg.limit, "encoding", "img")

    # closing() shuts the loader's worker processes down at once should encoding fail
    batches = contextlib.closing(
        _prepared_batches(source, cfg.limit, image_size, cfg.batch_size, cfg.workers)
    )
    try:
        with batches as stream:
            for pixels, caps, bad in stream:
                skipped.extend(bad)
                if pixels is not None:
                    writer.add(encode_images(encoder, pixels).cpu(), caps)
                    empty_captions += sum(not c.strip() for c in caps)
                    if bar is not None:
                        bar.update(len(caps))
    finally:
        if bar is not None:
            bar.close()
    if writer.added == 0:  # no meta.json: the directory is not taken for (empty) token shards
        raise ConfigError(
            f"no readable image with a caption in {cfg.data} ({len(skipped)} unreadable"
            + (f", e.g. {skipped[0]}" if skipped else "")
            + f"); nothing was written to {cfg.out_dir}"
        )
    if empty_captions:
        import warnings

        warnings.warn(
            f"{empty_captions} of {writer.added} samples have an empty caption; they train as caption-free "
            "samples (the model's unconditional mode)",
            UserWarning,
            stacklevel=2,
        )
    writer.meta["skipped_images"] = len(skipped)
    writer.meta["skipped_examples"] = skipped[:20]
    out = writer.close()
    return out, writer.count, len(skipped)


class _PreparedBatches:
    """Batch ``k`` of an index-addressable source: samples ``k * batch ... `` centre-cropped to ``size`` as
    (uint8 [n, 3, size, size] or None, captions, names of unreadable images). A map-style dataset, so that
    DataLoader workers render or decode whole batches (one transfer per batch), in order."""

    def __init__(self, source: Any, count: int, batch: int, size: int) -> None:
        self.source, self.count, self.batch, self.size = source, count, batch, size

    def __len__(self) -> int:
        return -(-self.count // self.batch)

    def __getitem__(self, k: int) -> tuple[Any, list[str], list[str], list[str]]:
        """Batch ``k`` and the warnings noted while preparing it (handed over when in a DataLoader worker)."""
        from dalle.data.datasets import get_once, take_worker_notes

        stop = min((k + 1) * self.batch, self.count)
        batch = _stack((get_once(self.source, i) for i in range(k * self.batch, stop)), self.size)
        return (*batch, take_worker_notes())


def _stack(samples: Any, size: int) -> tuple[Any, list[str], list[str]]:
    """(uint8 pixels or None, captions, skipped names) of raw (image, caption, name) samples,
    centre-cropped."""
    import torch

    from dalle.data.datasets import center_crop, to_uint8_tensor

    pixels, captions, skipped = [], [], []
    for img, caption, name in samples:
        if img is None:
            skipped.append(name)
            continue
        pixels.append(to_uint8_tensor(center_crop(img, size)))
        captions.append(caption)
    return (torch.stack(pixels) if pixels else None), captions, skipped


def _prepared_batches(source: Any, limit: int | None, size: int, batch: int, workers: int) -> Any:
    """Yield (pixels or None, captions, skipped names) batches covering every sample once, in order."""
    import itertools

    import torch

    from dalle.data.datasets import (
        TarShards,
        count_once,
        iter_source_once,
        route_worker_notes,
        show_worker_notes,
    )

    if isinstance(source, TarShards):  # a stream: read in this process
        samples = iter_source_once(source, limit)
        while chunk := list(itertools.islice(samples, batch)):
            yield _stack(chunk, size)
        return
    dataset = _PreparedBatches(source, count_once(source, limit), batch, size)
    if workers == 0:
        yield from (dataset[k][:3] for k in range(len(dataset)))
        return
    # Workers hand the upscale warning over with their batch, so that it is shown once, not once per worker.
    loader: Any = torch.utils.data.DataLoader(
        cast(Any, dataset),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2,
        worker_init_fn=route_worker_notes,
    )
    for pixels, captions, skipped, notes in loader:
        show_worker_notes(notes)
        yield pixels, captions, skipped


__all__ = ["EncodeConfig", "encode_dataset"]

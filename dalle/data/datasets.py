"""Caption/image datasets for training: folders, WebDataset-style tar shards, pre-tokenized token shards and
the built-in shapes world, plus the deterministic batching both trainers use.

Sources (all yield ``(image or None, caption, name)``; ``None`` marks an unreadable image):

* :class:`ImageTextFolder` - ``photo.jpg`` + ``photo.txt`` in one directory tree. A caption file with several
  lines holds alternative captions; one is picked per sample (deterministically from the seed).
* :class:`TarShards` - WebDataset-style ``.tar`` files: members ``KEY.jpg|png|...`` and ``KEY.txt`` next to
  each other, read as a stream (never unpacked to disk).
* :class:`ShapesSource` - :func:`dalle.data.shapes.sample`, an endless index-addressable stream.
* :class:`LettersSource` - :func:`dalle.data.letters.sample`: 360 coloured letters on white, a fixed tiny
  dataset (map-style, like a folder).
* :class:`TokenShards` - what ``dalle encode-dataset`` writes: image tokens in memory-mapped ``.npy`` files
  plus the captions, so that transformer training never runs the dVAE encoder.

Token shard directory::

    meta.json               {"format": 1, "kind": "dalle-token-shards", "count", "grid", "image_size",
                             "image_vocab_size", "dtype", "shards": [{"tokens", "captions", "count"}],
                             "encoder": {...}, "skipped_images", "source"}
    tokens-00000.npy        uint16 (int32 for vocabularies > 65536) [count, grid * grid], raster order
    captions-00000.json     JSON list of count captions

Batching. Sample ``j`` of rank ``r``'s batch at step ``s`` has the global position
``p = s * global_batch + r * batch + j``; map-style sources turn positions into indices through a seeded
per-epoch permutation, and every random choice for the sample (augmentation, caption pick) is seeded by
``(seed, p)``. So batches depend only on the step: resuming needs no data-loader state, and N ranks see
exactly what one process with the same global batch sees. Tar shards are split between ranks by shard (by
sample when there are fewer shards than ranks) and resume by skipping ``step * batch`` samples.

Unreadable images are skipped and counted, never fatal: a map-style source takes the next index instead, a
tar stream repeats another sample of the same batch; the names land in ``Batch.skipped``.

Images smaller than the training size are upscaled (bicubic) with a one-time warning; everything else follows
the paper's augmentation (:func:`dvae_augment`, :func:`transformer_augment`) or a centre crop
(:func:`center_crop`), the deterministic transform ``encode-dataset`` uses.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from dalle.errors import ConfigError, ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TOKEN_SHARDS_FORMAT = 1

RawSample = tuple[Image.Image | None, str, str]  # (image or None when unreadable, caption, name)


def _derive_seed(*keys: Any) -> int:
    from dalle.seeds import derive_seed

    return derive_seed(*keys)


def _pick_caption(text: str, rng: random.Random) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] if len(lines) == 1 else rng.choice(lines)


def _open_image(data: bytes | str | os.PathLike[str]) -> Image.Image | None:
    """Decode an image to RGB as inference does (:func:`dalle.images.load_image`: first frame, EXIF rotation,
    16-bit and float modes scaled to 8 bits, transparency on white), or None when it is unreadable (truncated,
    not an image, a mode that cannot be converted, ...)."""
    from dalle.images import to_rgb

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.seek(0)
            im.load()
            return to_rgb(ImageOps.exif_transpose(im).copy(), "training image")
    except (OSError, ValueError, SyntaxError, EOFError, ImageError, Image.DecompressionBombError):
        return None


# ------------------------------------------------------------------------------------------------ sources
class ImageTextFolder:
    """Images with same-name ``.txt`` captions under ``root`` (recursively), sorted by path.

    Args:
        root: the directory.
        require_captions: if True, images without a caption file are left out (with a warning giving the
            count); if False they get the empty caption (enough for dVAE training).
    """

    def __init__(self, root: str | os.PathLike[str], require_captions: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConfigError(f"dataset folder {str(self.root)!r} does not exist or is not a directory")
        files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if require_captions:
            kept = [p for p in files if p.with_suffix(".txt").is_file()]
            if len(kept) < len(files):
                warnings.warn(
                    f"{len(files) - len(kept)} images in {self.root} have no .txt caption and are left out",
                    stacklevel=2,
                )
            files = kept
        if not files:
            raise ConfigError(
                f"no images{' with .txt captions' if require_captions else ''} found in {self.root} "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def get(self, index: int, rng: random.Random | None = None) -> RawSample:
        """Image ``index`` (None if unreadable), its caption and its path."""
        path = self.files[index]
        txt = path.with_suffix(".txt")
        caption = ""
        if txt.is_file():
            caption = _pick_caption(
                txt.read_text(encoding="utf-8", errors="replace"), rng or random.Random(0)
            )
        return _open_image(path), caption, str(path)


class ShapesSource:
    """The shapes world (:mod:`dalle.data.shapes`) as an endless source: index ``i`` is
    ``sample(i, seed)``."""

    def __init__(self, seed: int = 0, size: int = 128, offset: int = 0, dense: bool = False) -> None:
        self.seed = int(seed)
        self.size = int(size)
        self.offset = int(offset)
        self.dense = bool(dense)

    def __len__(self) -> int:  # pragma: no cover - endless; callers check `is_endless`
        raise TypeError("the shapes stream is endless")

    def get(self, index: int, rng: random.Random | None = None) -> tuple[Image.Image, str, str]:
        """Rendered scene ``offset + index`` of stream ``seed`` (always readable: a RawSample with an
        image)."""
        from dalle.data import shapes

        draw = shapes.dense_sample if self.dense else shapes.sample
        image, caption = draw(self.offset + index, seed=self.seed, size=self.size)
        name = "shapes-dense" if self.dense else "shapes"
        return image, caption, f"{name}:{self.seed}:{self.offset + index}"


class LettersSource:
    """The fixed letters dataset (:mod:`dalle.data.letters`): items ``0 .. count-1`` of seed ``seed``,
    rendered at ``size``. Map-style with a length, so it is batched and held out like a folder of images."""

    def __init__(self, seed: int = 0, size: int = 64, count: int | None = None) -> None:
        from dalle.data import letters

        self.seed = int(seed)
        self.size = int(size)
        self.count = int(count if count is not None else letters.COUNT)

    def __len__(self) -> int:
        return self.count

    def get(self, index: int, rng: random.Random | None = None) -> RawSample:
        """Letter image ``index`` and its caption."""
        from dalle.data import letters

        if not 0 <= index < self.count:
            raise IndexError(f"letters index {index} out of range 0..{self.count - 1}")
        image, caption = letters.sample(index, seed=self.seed, size=self.size)
        return image, caption, f"letters:{self.seed}:{index}"


class TokenShards:
    """Pre-tokenized data written by :class:`TokenShardWriter` (``dalle encode-dataset``), memory-mapped."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        meta_file = self.root / "meta.json"
        if not meta_file.is_file():
            raise ConfigError(
                f"{self.root} is not a token-shard directory (no meta.json); run `dalle encode-dataset`"
            )
        try:
            self.meta = json.loads(meta_file.read_text())
            if self.meta.get("kind") != "dalle-token-shards":
                raise ValueError("meta.json is not of kind dalle-token-shards")
            self.tokens = [np.load(self.root / s["tokens"], mmap_mode="r") for s in self.meta["shards"]]
            self.captions: list[list[str]] = [
                json.loads((self.root / s["captions"]).read_text()) for s in self.meta["shards"]
            ]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"token shards in {self.root} are unreadable: {exc}") from exc
        self.grid = int(self.meta["grid"])
        self.image_size = int(self.meta["image_size"])
        self.image_vocab_size = int(self.meta["image_vocab_size"])
        sizes = [len(t) for t in self.tokens]
        for t, c in zip(self.tokens, self.captions):
            if len(t) != len(c) or t.shape[1:] != (self.grid * self.grid,):
                raise ConfigError(
                    f"token shards in {self.root} are inconsistent (tokens vs captions); re-encode"
                )
        self.offsets = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, index: int, rng: random.Random | None = None) -> tuple[np.ndarray, str, str]:
        """(tokens [grid*grid] int64, caption, name) of sample ``index``."""
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - int(self.offsets[shard])
        caption = self.captions[shard][local]
        if rng is not None and "\n" in caption:
            caption = _pick_caption(caption, rng)
        tokens = np.asarray(self.tokens[shard][local], dtype=np.int64)
        # checked here, on the host: the transformer does not read ids back from an accelerator in training
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.image_vocab_size):
            raise ConfigError(
                f"token shard {shard} of {self.root}, sample {local}, holds ids in [{int(tokens.min())}, "
                f"{int(tokens.max())}], outside the vocabulary of {self.image_vocab_size} codes: "
                "the shard is corrupt; encode the dataset again with dalle encode-dataset"
            )
        return tokens, caption, f"{shard}:{local}"


class TarShards:
    """WebDataset-style tar shards streamed member by member (``KEY.jpg`` + ``KEY.txt``; any image extension).

    Args:
        paths: tar files, or glob patterns / brace-free directory names that expand to them.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        files: list[str] = []
        for p in paths:
            p = str(p)
            if os.path.isdir(p):
                files.extend(sorted(glob.glob(os.path.join(p, "*.tar"))))
            elif any(ch in p for ch in "*?["):
                files.extend(sorted(glob.glob(p)))
            else:
                files.append(p)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing or not files:
            raise ConfigError(f"tar shards not found: {missing[:3] if missing else paths}")
        self.files = files

    def iter_raw(self, files: Sequence[str]) -> Iterator[tuple[bytes | None, str, str]]:
        """(image bytes or None, caption text, key) per sample, in stream order, for the given files."""
        for fname in files:
            try:
                tf = tarfile.open(fname, mode="r|*")
            except (tarfile.TarError, OSError) as exc:
                warnings.warn(f"skipping unreadable tar shard {fname}: {exc}", stacklevel=2)
                continue
            current: str | None = None
            image: bytes | None = None
            text = ""
            try:
                for member in tf:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
                    ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                    if key != current:
                        if current is not None:
                            yield image, text, f"{fname}:{current}"
                        current, image, text = key, None, ""
                    fh = tf.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    if ext in IMAGE_EXTENSIONS:
                        image = data
                    elif ext in (".txt", ".caption", ".text"):
                        text = data.decode("utf-8", errors="replace")
                if current is not None:
                    yield image, text, f"{fname}:{current}"
            except (tarfile.TarError, OSError) as exc:
                warnings.warn(
                    f"tar shard {fname} is truncated or corrupt ({exc}); using what was read", stacklevel=2
                )
            finally:
                tf.close()


def is_endless(source: Any) -> bool:
    """True for sources without a length (the shapes stream)."""
    return isinstance(source, ShapesSource)


def open_source(spec: str | os.PathLike[str], *, require_captions: bool = True, size: int = 128) -> Any:
    """Turn a data argument into a source.

    ``shapes`` or ``shapes:SEED`` -> :class:`ShapesSource`; ``shapes-dense[:SEED]`` -> the dense scenes of
    :func:`dalle.data.shapes.dense_scene` (uncaptioned, dVAE only); ``letters[:SEED]`` ->
    :class:`LettersSource` (360 coloured letters on white, :mod:`dalle.data.letters`; a folder of that name
    wins, with a warning); a directory with ``meta.json`` -> :class:`TokenShards`; a directory with ``.tar``
    files, a ``.tar`` path or a glob -> :class:`TarShards` (several separated by commas); any other
    directory -> :class:`ImageTextFolder`.
    """
    text = str(spec)
    for name, dense in (("shapes", False), ("shapes-dense", True)):
        if text == name or text.startswith(name + ":"):
            seed_text = text.split(":", 1)[1] if ":" in text else "0"
            try:
                seed = int(seed_text)
            except ValueError:
                raise ConfigError(f"{text!r}: the seed after '{name}:' must be an integer") from None
            if dense and require_captions:
                raise ConfigError(
                    "'shapes-dense' has no captions (dense scenes are for `dalle train-dvae`); "
                    "train the transformer on 'shapes[:SEED]' or on its encoded tokens"
                )
            return ShapesSource(seed=seed, size=size, dense=dense)
    if (text == "letters" or text.startswith("letters:")) and not Path(text).is_dir():
        seed_text = text.split(":", 1)[1] if ":" in text else "0"
        try:
            return LettersSource(seed=int(seed_text), size=size)
        except ValueError:
            raise ConfigError(f"{text!r}: the seed after 'letters:' must be an integer") from None
    if text == "letters" or text.startswith("letters:"):
        warnings.warn(
            f"--data {text!r}: using the folder {text!r}, not the built-in letters dataset", stacklevel=2
        )
    parts = [s for s in text.split(",") if s]
    if len(parts) > 1 or text.endswith(".tar") or any(ch in text for ch in "*?["):
        return TarShards(parts)
    path = Path(text)
    if path.is_dir():
        if (path / "meta.json").is_file():
            return TokenShards(path)
        if any(path.glob("*.tar")) and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
            return TarShards([text])
        return ImageTextFolder(path, require_captions=require_captions)
    raise ConfigError(
        f"cannot use {text!r} as training data: give a folder of images with .txt captions, .tar shards "
        "(a file, a folder of them or a glob), a token-shard folder from `dalle encode-dataset`, 'shapes' "
        "or 'letters'"
    )


# ------------------------------------------------------------------------------------------------ transforms
_upscale_warned = False
# True in a DataLoader worker started with route_worker_notes (make_batches', encode-dataset's): the upscale
# warning then waits in _worker_notes to travel to the main process with the next batch (Batch.notes in
# training), so that it is shown once per process, not once per worker.
_hand_notes_over = False
_worker_notes: list[str] = []


def route_worker_notes(worker_id: int) -> None:
    """``worker_init_fn`` of loaders whose workers hand their warnings over (see
    :func:`take_worker_notes`)."""
    global _hand_notes_over
    _hand_notes_over = True


def take_worker_notes() -> list[str]:
    """The warnings this DataLoader worker noted since the last call, for the main process to show with
    :func:`show_worker_notes` (empty outside a worker started with ``worker_init_fn=route_worker_notes``)."""
    notes = list(_worker_notes)
    _worker_notes.clear()
    return notes


def show_worker_notes(notes: list[str]) -> None:
    """Show warnings handed over by DataLoader workers, once per process as without workers."""
    for note in notes:
        _warn_upscale(note, 3)


def _warn_upscale(message: str, stacklevel: int) -> None:
    global _upscale_warned
    if _upscale_warned:
        return
    _upscale_warned = True
    if _hand_notes_over:
        _worker_notes.append(message)
    else:
        warnings.warn(message, stacklevel=stacklevel + 1)


def _resize(img: Image.Image, w: int, h: int) -> Image.Image:
    if (w, h) == img.size:
        return img
    if w > img.width or h > img.height:
        if not _upscale_warned:  # the message is built once, not for every small image
            _warn_upscale(
                f"an image ({img.width}x{img.height} after its square crop) is smaller than the training "
                f"size ({w}x{h}) and is upscaled (bicubic); more may follow, this is said once",
                3,
            )
        return img.resize((w, h), Image.Resampling.BICUBIC)
    return img.resize((w, h), Image.Resampling.BOX)  # area averaging, as the paper's AREA resize


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Deterministic: resize the shorter side to ``size`` (area averaging), then the centre square."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return _resize(img, size, size)


def dvae_augment(img: Image.Image, size: int, rng: random.Random, flip: bool = True) -> Image.Image:
    """The paper's dVAE augmentation (Listing 1), scaled from 256 to ``size``.

    Random square crop of side ``s = min(h, w)``; area resize to a random ``t`` in
    ``[min(s, 9/8 size), min(s, 12/8 size)]``; random ``size`` crop; random horizontal flip.
    """
    w, h = img.size
    s = min(w, h)
    left, top = rng.randint(0, w - s), rng.randint(0, h - s)
    img = img.crop((left, top, left + s, top + s))
    lo, hi = min(s, round(9 * size / 8)), min(s, round(12 * size / 8))
    t = max(rng.randint(lo, hi), size)
    img = _resize(img, t, t)
    x, y = rng.randint(0, t - size), rng.randint(0, t - size)
    img = img.crop((x, y, x + size, y + size))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def transformer_augment(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """The paper's transformer augmentation (Listing 2), scaled from 256 to ``size``; no flip.

    Near-centre square crop of side ``s = min(h, w)`` with offsets drawn from
    ``[3 (h - s) // 8, max(3 (h - s) // 8 + 1, 5 (h - s) // 8))``; area resize to a random ``t`` in
    ``[size, min(s, 9/8 size)]``; random ``size`` crop.
    """
    w, h = img.size
    s = min(w, h)

    def offset(extent: int) -> int:
        lo = 3 * (extent - s) // 8
        hi = max(lo + 1, 5 * (extent - s) // 8)
        return rng.randrange(lo, hi)

    left, top = offset(w), offset(h)
    img = img.crop((left, top, left + s, top + s))
    t = max(size, rng.randint(size, max(size, min(s, round(9 * size / 8)))))
    img = _resize(img, t, t)
    x, y = rng.randint(0, t - size), rng.randint(0, t - size)
    return img.crop((x, y, x + size, y + size))


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def uint8_to_mapped(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 mapped pixels (``map_pixels`` of [0, 1] values)."""
    from dalle.dvae import map_pixels

    return map_pixels(images.float().div_(255.0))


# ------------------------------------------------------------------------------------------------ batching
@dataclass
class Batch:
    """One rank's batch: uint8 images [B, 3, S, S] or image tokens [B, N] (int64), captions, positions."""

    captions: list[str]
    positions: list[int]
    images: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(
        default_factory=list
    )  # warnings from a DataLoader worker, shown by the main process

    def __len__(self) -> int:
        return len(self.captions)

    def slice(self, start: int, stop: int) -> Batch:
        """Samples ``start:stop`` (for gradient accumulation)."""
        return Batch(
            self.captions[start:stop],
            self.positions[start:stop],
            None if self.images is None else self.images[start:stop],
            None if self.tokens is None else self.tokens[start:stop],
            [],
        )


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split into ``parts`` nearly equal micro-batches (none empty)."""
    n = len(batch)
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [batch.slice(bounds[i], bounds[i + 1]) for i in range(parts)]


Transform = Callable[[Image.Image, random.Random], Image.Image]


def _collate(items: list[tuple[Any, str, int, list[str]]]) -> Batch:
    payloads = [it[0] for it in items]
    batch = Batch(captions=[it[1] for it in items], positions=[it[2] for it in items])
    for it in items:
        batch.skipped.extend(it[3])
    batch.notes = take_worker_notes()
    if payloads and isinstance(payloads[0], np.ndarray):
        batch.tokens = torch.from_numpy(np.stack(payloads))
    else:
        batch.images = torch.stack(payloads)
    return batch


class _PositionDataset(torch.utils.data.Dataset):
    """Map-style view: global position -> processed sample (index chosen by the seeded epoch permutation)."""

    def __init__(
        self, source: Any, transform: Transform | None, seed: int, shuffle: bool, exclude: int = 0
    ) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.endless = is_endless(source)
        self.n = None if self.endless else len(source) - exclude  # the last `exclude` are held out
        if self.n is not None and self.n <= 0:
            raise ConfigError(
                "the dataset has no training samples left after holding out the evaluation images"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def index_of(self, position: int) -> int:
        if self.n is None:
            return position
        epoch, k = divmod(position, self.n)
        if not self.shuffle:
            return k
        if epoch != self._perm_epoch:
            rs = np.random.default_rng(_derive_seed(self.seed, "perm", epoch))
            self._perm, self._perm_epoch = rs.permutation(self.n), epoch
        assert self._perm is not None
        return int(self._perm[k])

    def __len__(self) -> int:  # positions are unbounded; DataLoader only needs this for its own checks
        return 2**62

    def __getitem__(self, position: int) -> tuple[Any, str, int, list[str]]:
        rng = random.Random(_derive_seed(self.seed, "sample", position))
        index = self.index_of(position)
        skipped: list[str] = []
        tries = 64 if self.n is None else min(64, self.n)
        for attempt in range(tries):
            idx = index + attempt
            if self.n is not None:
                idx %= self.n
            payload, caption, name = self.source.get(idx, rng)
            if payload is None:
                skipped.append(name)
                continue
            if isinstance(payload, Image.Image):
                if self.transform is not None:
                    payload = self.transform(payload, rng)
                payload = to_uint8_tensor(payload)
            return payload, caption, position, skipped
        if self.n is not None and tries == self.n:
            raise ImageError(
                f"none of the {self.n} training images is readable (e.g. {skipped[0]}); is the "
                "dataset corrupt?"
            )
        raise ImageError(
            f"{tries} images in a row were unreadable, starting at {skipped[0]}; is the dataset corrupt?"
        )


class _StepSampler(torch.utils.data.Sampler):
    """Position lists of steps start, start+1, ... for one rank."""

    def __init__(self, start_step: int, global_batch: int, batch: int, rank: int) -> None:
        self.start, self.gb, self.b, self.rank = start_step, global_batch, batch, rank

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            base = step * self.gb + self.rank * self.b
            yield list(range(base, base + self.b))
            step += 1

    def __len__(self) -> int:
        return 2**62


class _TarBatches(torch.utils.data.IterableDataset):
    """Batches from tar shards for one rank; with DataLoader workers, worker w decodes batches k = w mod W."""

    def __init__(
        self,
        source: TarShards,
        transform: Transform | None,
        seed: int,
        start_step: int,
        global_batch: int,
        batch: int,
        rank: int,
        world: int,
        exclude_keys: frozenset[str],
    ) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self.start, self.gb, self.b, self.rank, self.world = start_step, global_batch, batch, rank, world
        self.exclude = exclude_keys

    def _rank_stream(self) -> Iterator[tuple[bytes | None, str, str]]:
        files = self.source.files
        per_file = len(files) >= self.world
        mine = files[self.rank :: self.world] if per_file else files
        epoch = 0
        while True:
            order = list(mine)
            random.Random(_derive_seed(self.seed, "shards", self.rank, epoch)).shuffle(order)
            produced = 0
            for i, sample in enumerate(self.source.iter_raw(order)):
                if sample[2] in self.exclude or (not per_file and i % self.world != self.rank):
                    continue
                produced += 1
                yield sample
            if produced == 0:
                held = len(self.exclude)
                raise ConfigError(
                    f"rank {self.rank} got no samples from the tar shards {files[:3]}"
                    + (
                        f" after {held} were held out for evaluation (taken from the last shard); lower "
                        "--eval-samples or add shards"
                        if held
                        else ""
                    )
                )
            epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        stream = self._rank_stream()
        for _ in range(self.start * self.b):  # resume: skip what earlier steps consumed, without decoding
            next(stream)
        step = self.start
        while True:
            raw = [next(stream) for _ in range(self.b)]
            if (step - self.start) % nw == wid:
                items: list[tuple[Any, str, int, list[str]] | None] = []
                skipped: list[str] = []
                for j, (data, text, key) in enumerate(raw):
                    pos = step * self.gb + self.rank * self.b + j
                    rng = random.Random(_derive_seed(self.seed, "sample", pos))
                    img = _open_image(data) if data is not None else None
                    if img is None:
                        skipped.append(key)
                        items.append(None)
                        continue
                    if self.transform is not None:
                        img = self.transform(img, rng)
                    items.append((to_uint8_tensor(img), _pick_caption(text, rng), pos, []))
                good = [it for it in items if it is not None]
                if not good:
                    raise ImageError(
                        f"every image of a batch was unreadable (e.g. {skipped[0]}); is the shard corrupt?"
                    )
                # unreadable samples are replaced by readable ones of the same batch, so batches stay full
                filled = [it if it is not None else good[k % len(good)] for k, it in enumerate(items)]
                batch = _collate(filled)
                batch.skipped = skipped
                yield batch
            step += 1


def make_batches(
    source: Any,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    seed: int = 0,
    transform: Transform | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    exclude_last: int = 0,
    exclude_keys: frozenset[str] = frozenset(),
) -> Iterator[Batch]:
    """Endless batches of ``batch_size`` samples for ``rank``, from step ``start_step`` on (see module doc).

    ``exclude_last`` holds out the last samples of a map-style source, ``exclude_keys`` names tar samples to
    hold out (both for evaluation).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    global_batch = batch_size * world_size
    ds: torch.utils.data.Dataset[Any]
    if isinstance(source, TarShards):
        ds = _TarBatches(
            source, transform, seed, start_step, global_batch, batch_size, rank, world_size, exclude_keys
        )
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            worker_init_fn=route_worker_notes,
        )
    else:
        ds = _PositionDataset(source, transform, seed, shuffle, exclude=exclude_last)
        sampler = _StepSampler(start_step, global_batch, batch_size, rank)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_collate,
            persistent_workers=num_workers > 0,
            worker_init_fn=route_worker_notes,
        )
    return _show_worker_notes(iter(loader)) if num_workers > 0 else iter(loader)


def _show_worker_notes(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Pass batches through, warning (once per process, as without workers) about what the workers noted."""
    for batch in batches:
        show_worker_notes(batch.notes)
        yield batch


def held_out(source: Any, n: int, size: int) -> tuple[list[Image.Image], list[str], int, frozenset[str]]:
    """``n`` evaluation images (centre-cropped to ``size``) and captions drawn from ``source`` itself.

    Returns (images, captions, exclude_last, exclude_keys) to pass on to :func:`make_batches` so that the
    training batches never contain them: the last ``n`` items of a folder, the first ``n`` of the last tar
    shard, or samples from a separate seed of the shapes stream.
    """
    images: list[Image.Image] = []
    captions: list[str] = []
    if n <= 0:
        return images, captions, 0, frozenset()
    if isinstance(source, ShapesSource):
        other = ShapesSource(seed=source.seed + 7919, size=source.size)
        for i in range(n):
            scene, cap, _ = other.get(i)
            images.append(center_crop(scene, size))
            captions.append(cap)
        return images, captions, 0, frozenset()
    if isinstance(source, TarShards):
        keys = []
        for data, text, key in source.iter_raw(source.files[-1:]):
            img = _open_image(data) if data is not None else None
            keys.append(key)
            if img is not None:
                images.append(center_crop(img, size))
                captions.append(_pick_caption(text, random.Random(0)))
            if len(keys) >= n:
                break
        return images, captions, 0, frozenset(keys)
    if isinstance(source, TokenShards):
        raise ConfigError("token shards hold no images to evaluate a dVAE on")
    n = min(n, max(len(source) // 10, 1)) if len(source) < 10 * n else n
    for idx in range(len(source) - n, len(source)):
        img, cap, _ = source.get(idx, random.Random(0))
        if img is not None:
            images.append(center_crop(img, size))
            captions.append(cap)
    return images, captions, n, frozenset()


# ----------------------------------------------------------------------------------------------- token shards
class TokenShardWriter:
    """Writes image tokens + captions in the :class:`TokenShards` layout; each file appears atomically."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        grid: int,
        image_size: int,
        vocab_size: int,
        shard_size: int = 50_000,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root} is a file; choose a new output directory")
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / "meta.json").exists():
            raise ConfigError(f"{self.root} already holds token shards; choose an empty output directory")
        if any(self.root.iterdir()):  # an interrupted encode's shards (no meta.json yet) or anything else
            raise ConfigError(
                f"{self.root} is not empty (an interrupted encode leaves its shards without meta.json);"
                " delete it or choose an empty output directory"
            )
        self.grid, self.image_size, self.vocab_size = int(grid), int(image_size), int(vocab_size)
        self.dtype = np.uint16 if vocab_size <= 65536 else np.int32
        self.shard_size = int(shard_size)
        self.meta = dict(meta or {})
        self.shards: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._captions: list[str] = []
        self.count = 0

    def add(self, tokens: torch.Tensor | np.ndarray, captions: Sequence[str]) -> None:
        """Append a batch: tokens [B, grid, grid] or [B, grid*grid], captions of length B."""
        arr = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens).reshape(
            len(captions), -1
        )
        if arr.shape[1] != self.grid * self.grid:
            raise ConfigError(f"expected {self.grid}x{self.grid} tokens per image, got {arr.shape[1]}")
        for row, cap in zip(arr, captions):
            self._tokens.append(row.astype(self.dtype))
            self._captions.append(str(cap))
            if len(self._tokens) >= self.shard_size:
                self._flush()

    @property
    def added(self) -> int:
        """Samples added so far (written to shards or pending)."""
        return self.count + len(self._tokens)

    def _flush(self) -> None:
        if not self._tokens:
            return
        i = len(self.shards)
        tok_name, cap_name = f"tokens-{i:05d}.npy", f"captions-{i:05d}.json"
        tmp = self.root / (tok_name + ".tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.stack(self._tokens))
        os.replace(tmp, self.root / tok_name)
        tmp = self.root / (cap_name + ".tmp")
        tmp.write_text(json.dumps(self._captions))
        os.replace(tmp, self.root / cap_name)
        self.shards.append({"tokens": tok_name, "captions": cap_name, "count": len(self._tokens)})
        self.count += len(self._tokens)
        self._tokens, self._captions = [], []

    def close(self) -> Path:
        """Write the last shard and meta.json (the marker of a complete directory)."""
        self._flush()
        meta = {
            "format": TOKEN_SHARDS_FORMAT,
            "kind": "dalle-token-shards",
            "count": self.count,
            "grid": self.grid,
            "image_size": self.image_size,
            "image_vocab_size": self.vocab_size,
            "dtype": np.dtype(self.dtype).name,
            "shards": self.shards,
            **self.meta,
        }
        tmp = self.root / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, self.root / "meta.json")
        return self.root


def iter_source_once(source: Any, limit: int | None = None) -> Iterator[RawSample]:
    """Every sample of a finite source once, in order (tar: stream order); ``limit`` caps endless ones."""
    if isinstance(source, TarShards):
        for k, (data, text, key) in enumerate(source.iter_raw(source.files)):
            if limit is not None and k >= limit:
                return
            yield (
                (_open_image(data) if data is not None else None),
                _pick_caption(text, random.Random(0)),
                key,
            )
        return
    for i in range(count_once(source, limit)):
        yield get_once(source, i)


def count_once(source: Any, limit: int | None = None) -> int:
    """How many samples :func:`iter_source_once` yields for an index-addressable (non-tar) source."""
    if is_endless(source):
        if limit is None:
            raise ConfigError("the shapes stream is endless: give --limit N to encode N samples")
        return limit
    return len(source) if limit is None else min(limit, len(source))


def get_once(source: Any, index: int) -> RawSample:
    """Sample ``index`` of an index-addressable source as :func:`iter_source_once` yields it (a folder's
    sample keeps all of its caption lines, so transformer training can pick one per sample)."""
    img, cap, name = source.get(index, random.Random(0))
    if isinstance(source, ImageTextFolder):
        txt = Path(name).with_suffix(".txt")
        cap = (
            "\n".join(line.strip() for line in txt.read_text(errors="replace").splitlines() if line.strip())
            if txt.is_file()
            else ""
        )
    return img, cap, name


__all__ = [
    "Batch",
    "ImageTextFolder",
    "ShapesSource",
    "TarShards",
    "TokenShardWriter",
    "TokenShards",
    "center_crop",
    "count_once",
    "dvae_augment",
    "get_once",
    "held_out",
    "iter_source_once",
    "make_batches",
    "open_source",
    "split_batch",
    "to_uint8_tensor",
    "transformer_augment",
    "uint8_to_mapped",
]

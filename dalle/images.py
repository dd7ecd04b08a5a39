"""Images in and out: loading, the dVAE's preprocessing, PIL conversion, grids, PNG metadata.

Conversion rules (documented here because nothing is converted silently):

* Files are opened with Pillow; EXIF orientation is applied; animated images use their first frame.
* Modes with transparency (RGBA, LA, PA, P with a transparent colour) are composited on white.
* L, 1, P, CMYK, YCbCr, LAB, HSV become RGB through Pillow's conversions.
* 16-bit and 32-bit modes (I;16*, I, F) are rescaled to 8 bits: I;16 by 255/65535; I and F by their
  value range (0..255 kept, 0..65535 scaled like I;16, floats in [0, 1] scaled by 255); others raise.
* numpy arrays are HWC or HW: uint8 as is; bool as black/white; floats must lie in [0, 1].
* torch tensors are CHW or HW (or 1CHW): uint8 as is, floats in [0, 1]; 1, 3 or 4 channels.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from dalle.dvae import Decoder, Encoder, map_pixels, unmap_pixels
from dalle.errors import ImageError

__all__ = [
    "load_image",
    "to_rgb",
    "preprocess",
    "to_tensor",
    "to_pil",
    "make_grid",
    "save_png",
    "read_png_metadata",
    "reconstruct",
    "sample_image_path",
]

ImageLike = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor

_WHITE = (255, 255, 255)


def sample_image_path() -> Path:
    """Path of the bundled 256x256 sample photograph (see ``dalle/assets/README.md``)."""
    return Path(__file__).resolve().parent / "assets" / "sample.png"


# ------------------------------------------------------------------------------------------------ loading
def _open_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.seek(0)  # first frame of animations
            img.load()  # decode now, so truncated or corrupt data fails here, naming the file
            img = ImageOps.exif_transpose(img)
            return img.copy()
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{path}: corrupt or truncated image ({exc})") from None


def _high_depth_to_8bit(img: Image.Image, where: str) -> Image.Image:
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) * (255.0 / 65535.0)
    else:  # "I" (int32) or "F" (float32)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0:
            raise ImageError(f"{where}: {img.mode}-mode image has negative values; cannot map them to 8 bits")
        if img.mode == "F" and hi <= 1.0:
            scaled = arr.astype(np.float64) * 255.0
        elif hi <= 255:
            scaled = arr.astype(np.float64)
        elif hi <= 65535:
            scaled = arr.astype(np.float64) * (255.0 / 65535.0)
        else:
            raise ImageError(f"{where}: {img.mode}-mode image has values up to {hi}; expected at most 65535")
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image, where: str = "image") -> Image.Image:
    """Any Pillow mode as 8-bit RGB: 16-bit, 32-bit and float modes scaled, transparency composited on
    white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_8bit(img, where).convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{where}: cannot convert a {mode}-mode image to RGB ({exc})") from None


def _array_to_pil(arr: np.ndarray, where: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{where}: expected an HxW or HxWxC array with C in 1, 3, 4, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ImageError(f"{where}: empty image of shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        pass
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{where}: float images must have finite values in [0, 1]")
        arr = np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ImageError(
            f"{where}: unsupported array dtype {arr.dtype}; use uint8 (0..255) or float (0..1) pixels"
        )
    arr = np.ascontiguousarray(arr)
    return Image.fromarray(arr)  # mode follows from the shape: HW -> L, HWx3 -> RGB, HWx4 -> RGBA


def _tensor_to_array(t: torch.Tensor, where: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 3:
        if t.shape[0] not in (1, 3, 4):
            raise ImageError(
                f"{where}: expected a CxHxW tensor with C in 1, 3, 4, got shape {tuple(t.shape)}"
            )
        t = t.permute(1, 2, 0)
    elif t.dim() != 2:
        raise ImageError(f"{where}: expected a CxHxW or HxW tensor, got shape {tuple(t.shape)}")
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.float()
    return t.numpy()


def load_image(src: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, PIL image, numpy array (HWC/HW) or tensor (CHW/HW).

    Modes are converted by the rules in the module docstring. Raises :class:`~dalle.errors.ImageError`
    naming the file (or the input kind) when it cannot be read.
    """
    if isinstance(src, str | os.PathLike):
        path = Path(src).expanduser()
        return to_rgb(_open_file(path), str(path))
    if isinstance(src, Image.Image):
        try:
            src.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"PIL image could not be decoded ({exc})") from None
        return to_rgb(src, "PIL image")
    if isinstance(src, np.ndarray):
        return to_rgb(_array_to_pil(src, "numpy image"), "numpy image")
    if isinstance(src, torch.Tensor):
        return to_rgb(_array_to_pil(_tensor_to_array(src, "tensor image"), "tensor image"), "tensor image")
    raise ImageError(
        f"cannot load an image from {type(src).__name__}; pass a path, PIL image, numpy array or tensor"
    )


# ---------------------------------------------------------------------------------------------- preprocessing
def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W] in [0, 1] (what torchvision's ``ToTensor`` does)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)


def preprocess(image: ImageLike, size: int = 256, allow_upscale: bool = False) -> torch.Tensor:
    """The dVAE input for an image: FloatTensor [1, 3, size, size] of mapped pixels.

    Follows OpenAI's usage notebook: scale so that the shorter side is ``size`` (LANCZOS, sides rounded),
    crop the centre ``size`` x ``size`` square (torchvision's rounding), convert to [0, 1], ``map_pixels``.
    Images whose shorter side is below ``size`` raise :class:`~dalle.errors.ImageError` (as the notebook
    does) unless ``allow_upscale`` is true. ``size`` must be a positive multiple of 8.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 8:
        raise ImageError(f"size must be a positive multiple of 8 (the dVAE downsamples by 8), got {size!r}")
    img = load_image(image)
    w, h = img.size
    s = min(w, h)
    if s < size and not allow_upscale:
        raise ImageError(
            f"image is {w}x{h}; its shorter side {s} is below {size} (pass allow_upscale=True, "
            "on the command line --allow-upscale, to enlarge it)"
        )
    r = size / s
    new_w, new_h = max(size, round(r * w)), max(size, round(r * h))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return map_pixels(to_tensor(img).unsqueeze(0))


# ------------------------------------------------------------------------------------------------- output
def to_pil(x: torch.Tensor) -> Image.Image | list[Image.Image]:
    """PIL image(s) from a float tensor in [0, 1]: [3, H, W] -> Image, [B, 3, H, W] -> list of Images.

    Values are clamped to [0, 1] and rounded to 8 bits; 1-channel tensors give L-mode images; uint8 tensors
    are taken as is.
    """
    if not isinstance(x, torch.Tensor):
        raise ImageError(f"to_pil expects a tensor, got {type(x).__name__}")
    if x.dim() == 4:
        return [_one_to_pil(t) for t in x]
    if x.dim() == 3:
        return _one_to_pil(x)
    raise ImageError(f"to_pil expects [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")


def _one_to_pil(t: torch.Tensor) -> Image.Image:
    t = t.detach().cpu()
    if t.shape[0] not in (1, 3, 4):
        raise ImageError(f"to_pil expects 1, 3 or 4 channels, got {t.shape[0]}")
    if t.dtype != torch.uint8:
        t = t.float().clamp(0, 1).mul(255).round().to(torch.uint8)
    arr = t.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]))
    return Image.fromarray(np.ascontiguousarray(arr))


def _font(tile_width: int = 256) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at a size that reads well under a tile (16 px under 256-px tiles, 12 px at
    least); older Pillows (before 10.1) have only the fixed 11-px bitmap font."""
    try:
        return ImageFont.load_default(size=max(12, tile_width // 16))
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to a pixel width (words longer than a line are cut into pieces)."""
    avg = max(1, int(draw.textlength("x", font=font)))
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        chars = max(1, width // avg)
        for line in textwrap.wrap(paragraph, chars, break_long_words=True) or [""]:
            while line and draw.textlength(line, font=font) > width and len(line) > 1:
                cut = len(line) - 1
                while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
            lines.append(line)
    return lines


def make_grid(
    images: list[Image.Image],
    ncols: int | None = None,
    padding: int = 2,
    captions: list[str] | None = None,
    background: tuple[int, int, int] = _WHITE,
) -> Image.Image:
    """Tile images into one RGB image, row by row, ``padding`` pixels apart (and around the border).

    ``ncols`` defaults to ceil(sqrt(n)). Cells are as large as the largest image; smaller images sit in the
    top-left of their cell. With ``captions`` (one per image) each caption is drawn under its tile in
    Pillow's default font, wrapped to the tile width.
    """
    if not images:
        raise ImageError("make_grid needs at least one image")
    images = [load_image(im) if not isinstance(im, Image.Image) or im.mode != "RGB" else im for im in images]
    n = len(images)
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ImageError(f"ncols must be a positive int, got {ncols!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ImageError(f"padding must be an int >= 0, got {padding!r}")
    if captions is not None and len(captions) != n:
        raise ImageError(f"got {len(captions)} captions for {n} images")
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)

    font = _font(cell_w)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[list[str]] = []
    line_h = 0
    if captions is not None:
        ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
        line_h = ascent + descent + 2
        wrapped = [_wrap(measure, str(c), font, cell_w) for c in captions]
    caption_h = (max(len(lines) for lines in wrapped) * line_h + 2) if wrapped else 0

    width = ncols * cell_w + (ncols + 1) * padding
    height = nrows * (cell_h + caption_h) + (nrows + 1) * padding
    grid = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        row, col = divmod(i, ncols)
        x = padding + col * (cell_w + padding)
        y = padding + row * (cell_h + caption_h + padding)
        grid.paste(im, (x, y))
        if wrapped:
            for k, line in enumerate(wrapped[i]):
                draw.text((x, y + cell_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def save_png(
    image: Image.Image | torch.Tensor, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Save ``image`` (PIL, or a [3, H, W] tensor in [0, 1]) as PNG with ``metadata`` as text chunks.

    Latin-1 text goes into tEXt chunks, anything else into iTXt (Pillow's choice). Returns the path.
    """
    if isinstance(image, torch.Tensor):
        pil = to_pil(image)
        if isinstance(pil, list):
            raise ImageError("save_png takes one image; use make_grid for a batch")
        image = pil
    if not isinstance(image, Image.Image):
        raise ImageError(f"save_png expects a PIL image or a tensor, got {type(image).__name__}")
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not 1 <= len(key) <= 79:
            raise ImageError(f"PNG metadata keys must be strings of 1 to 79 characters, got {key!r}")
        info.add_text(key, str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read PNG metadata ({exc})") from None


# --------------------------------------------------------------------------------------------- reconstruction
@torch.no_grad()
def reconstruct(
    image: ImageLike, encoder: Encoder, decoder: Decoder, size: int = 256, allow_upscale: bool = False
) -> tuple[Image.Image, Image.Image]:
    """(preprocessed original, reconstruction) of ``image`` through the dVAE, both ``size`` x ``size`` RGB.

    The original is the centre crop the encoder sees; the reconstruction is ``decoder.decode(encoder.encode
    (x))``. An image smaller than ``size`` is an ImageError unless ``allow_upscale`` (as in :func:`preprocess`
    and ``DALLE.reconstruct``; the ``dalle reconstruct`` command enlarges unless ``--no-upscale``).
    """
    if encoder.vocab_size != decoder.vocab_size:
        raise ImageError(
            f"encoder and decoder do not belong together: vocab sizes {encoder.vocab_size} and "
            f"{decoder.vocab_size}"
        )
    x = preprocess(image, size=size, allow_upscale=allow_upscale)
    original = to_pil(unmap_pixels(x)[0])
    tokens = encoder.encode(x.to(encoder.device))
    rec = decoder.decode(tokens.to(decoder.device))
    return original, to_pil(rec[0].cpu())  # type: ignore[return-value]

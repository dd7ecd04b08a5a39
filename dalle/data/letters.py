"""A tiny, fixed dataset of coloured capital letters on white: the smoke test for training a dVAE on sparse,
flat-colour images (letters, icons, emoji on white), where most 8x8 cells of an image are background.

**Images.** A white background (255, 255, 255) with one capital letter A-Z drawn in one colour with Pillow's
built-in default font (``ImageFont.load_default(size=...)``: Aileron Regular, bundled with Pillow >= 10.1 and
drawn by FreeType, antialiased), so its edges blend into the white:

==========  ===============
colour      RGB
==========  ===============
red         (220, 40, 40)
green       (40, 170, 70)
blue        (40, 90, 220)
orange      (245, 140, 30)
purple      (140, 60, 190)
==========  ===============

Sizes: ``small`` letters have a font size of 0.40-0.50 of the image side ``S``, ``large`` ones 0.70-0.85; the
letter's ink box is placed at a uniformly random position that keeps 0.05 S from every border.

**Captions**: ``a red letter k``, ``a large blue letter q`` (lowercase, as all captions are normalised; a
third of them state the size).

**The dataset.** :func:`sample` ``(index, seed, size) -> (image, caption)`` is a pure function of its
arguments (Python's ``random.Random`` seeded with a string, so identical on every platform for a given Pillow
and FreeType). The letter cycles with the index (``index % 26``) so that any 26 consecutive items hold every
letter once; colour, size and position are drawn at random. ``dalle train-dvae --data letters`` (or
``letters:SEED``) trains on the first :data:`COUNT` = 360 items, the size of the dataset in issue 22; as for
any folder, the last 36 of them are held out for evaluation. :func:`write_folder` (or
``python -m dalle.data.letters OUT``) writes the same images as PNG files with ``.txt`` captions.
"""

from __future__ import annotations

import argparse
import random
import string
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
}
LETTERS = string.ascii_uppercase
COUNT = 360  # images in the `letters` source
DEFAULT_SIZE = 64
SIZES = {"small": (0.40, 0.50), "large": (0.70, 0.85)}  # font size as a fraction of the image side
MARGIN = 0.05  # of the image side, kept free around the letter's ink


@lru_cache(maxsize=64)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at ``px`` pixels (needs Pillow >= 10.1 built with FreeType)."""
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):  # an old bitmap fallback would ignore the size
        raise RuntimeError(
            "the letters dataset needs Pillow >= 10.1 with FreeType (ImageFont.load_default(size=...)); "
            f"this Pillow gave a {type(font).__name__}"
        )
    return font


def render(
    letter: str,
    colour: str,
    size: int = DEFAULT_SIZE,
    font_frac: float = 0.75,
    pos: tuple[float, float] = (0.5, 0.5),
) -> Image.Image:
    """Draw capital ``letter`` in ``colour`` (a :data:`COLOURS` name) on white at font size
    ``font_frac * size``.

    ``pos`` in [0, 1]^2 places the ink box between the margins: (0, 0) top-left, (1, 1) bottom-right.
    """
    if len(letter) != 1 or letter.upper() not in LETTERS:
        raise ValueError(f"letter must be one of A-Z, got {letter!r}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose one of {', '.join(COLOURS)}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    letter = letter.upper()
    font = _font(max(4, round(font_frac * size)))
    left, top, right, bottom = font.getbbox(letter)  # the ink box relative to the drawing origin
    margin = round(MARGIN * size)
    free_x = max(size - 2 * margin - (right - left), 0)
    free_y = max(size - 2 * margin - (bottom - top), 0)
    x = margin + round(pos[0] * free_x) - left
    y = margin + round(pos[1] * free_y) - top
    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).text((x, y), letter, fill=COLOURS[colour], font=font)
    return img


def sample(index: int, seed: int = 0, size: int = DEFAULT_SIZE) -> tuple[Image.Image, str]:
    """Item ``index`` of dataset ``seed``: (RGB image ``size`` x ``size``, caption). Deterministic."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = random.Random(f"dalle-letters:{int(seed)}:{int(index)}")
    letter = LETTERS[index % len(LETTERS)]
    colour = rng.choice(list(COLOURS))
    size_name = rng.choice(list(SIZES))
    frac = rng.uniform(*SIZES[size_name])
    pos = (rng.random(), rng.random())
    img = render(letter, colour, size, frac, pos)
    caption = (f"a {size_name} " if rng.random() < 1 / 3 else "a ") + f"{colour} letter {letter.lower()}"
    return img, caption


def write_folder(out: str | Path, count: int = COUNT, seed: int = 0, size: int = DEFAULT_SIZE) -> Path:
    """Write items ``0 .. count-1`` as ``letter-00000.png`` + ``letter-00000.txt`` into ``out`` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, caption = sample(i, seed, size)
        img.save(out / f"letter-{i:05d}.png")
        (out / f"letter-{i:05d}.txt").write_text(caption + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m dalle.data.letters OUT [--count N] [--seed S] [--size PX]``."""
    p = argparse.ArgumentParser(prog="python -m dalle.data.letters", description=write_folder.__doc__)
    p.add_argument("out", help="folder to write the PNG + TXT pairs into (created)")
    p.add_argument("--count", type=int, default=COUNT, help=f"number of images (default {COUNT})")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})"
    )
    args = p.parse_args(argv)
    print(write_folder(args.out, args.count, args.seed, args.size))


if __name__ == "__main__":
    main()


__all__ = ["COLOURS", "COUNT", "LETTERS", "render", "sample", "write_folder"]

"""The shapes world: a procedurally rendered image domain whose captions can be checked by a program.

It is the training data of the bundled ``shapes`` model and the ground truth of ``dalle evaluate``.

**Images.** A white background (255, 255, 255) with one or two non-overlapping objects drawn in flat colour
(no antialiasing, so every pixel is white or exactly one palette colour):

==========  ===============
colour      RGB
==========  ===============
red         (220, 40, 40)
green       (40, 170, 70)
blue        (40, 90, 220)
yellow      (240, 210, 40)
purple      (140, 60, 190)
orange      (245, 140, 30)
==========  ===============

Shapes: ``circle``, ``square`` (axis-aligned) and ``triangle`` (isosceles, pointing up, base = height).
Every object fills a square bounding box of side ``L``; its *centre* is the centre of that box.

**Sizes** scale with the image side ``S`` (pixel ranges at S = 128 in brackets):
``small`` has L in [0.16, 0.22]·S (20.5-28.2 px), ``large`` has L in [0.34, 0.42]·S (43.5-53.8 px), so the
smallest large object is 1.5 times the largest small one. The checker splits them at L = 0.28·S (35.8 px).

**Coordinates.** Centres are fractions of the image side: x from the left, y from the top, both in [0, 1].
Every object keeps 0.03·S from the image border.

**Captions** (lowercase, no final period)::

    caption  := [prefix] object [position]
              | [prefix] object relation object
    prefix   := "a drawing of " | "a picture of " | "an image of "
    object   := article [size] colour shape         (article "an" before a vowel: "an orange circle")
    size     := "small" | "large"
    position := "on the left" | "on the right" | "at the top" | "at the bottom"
    relation := "above" | "below" | "to the left of" | "to the right of"

Examples: ``a large red circle on the left``, ``a drawing of an orange triangle``,
``a blue square to the left of a yellow circle``. Training captions never give sizes in two-object captions
(the parser accepts them). When a caption leaves the size or position open the renderer draws it at random.

**Positions** (one object): "on the left" means cx < 0.4, "on the right" cx > 0.6, "at the top" cy < 0.4,
"at the bottom" cy > 0.6. The renderer keeps a margin inside these limits (cx <= 0.35 for "on the left", and
so on), so reconstructions that shift an object a little still pass. The other coordinate is free.

**Relations** ("A REL B", with dx = B.cx - A.cx and dy = B.cy - A.cy, y pointing down): "A above B" holds when
dy > 0.1 and dy > |dx|; "below" when -dy > 0.1 and -dy > |dx|; "to the left of" when dx > 0.1 and dx > |dy|;
"to the right of" when -dx > 0.1 and -dx > |dy|. At most one relation holds for a pair, so captions are never
ambiguous. The renderer separates the two bounding boxes by at least 0.06·S along the relation's axis and
keeps the offset on the other axis at most half the main offset.

**Held out.** The colour-shape pairs green triangle, purple circle and orange square (:data:`HELD_OUT`) never
appear in a training caption or image (:func:`sample`, :func:`stream`, :func:`captions`); :func:`render` draws
them for evaluation.

**Training stream.** :func:`sample` ``(index, seed, size) -> (image, caption)`` is a pure function of its
arguments (random access, so any position can be resumed); :func:`stream` iterates it for one shard of
``world_size`` ranks. Half the scenes have two objects with a relation; a one-object caption states the size
and the position each with probability 1/2; 70% of captions use the plain template. Randomness comes from
Python's ``random.Random(...).random()`` seeded by a hash of ``(seed, index)``, which Python keeps stable
across versions and platforms. :data:`EVAL_SETS` holds the fixed evaluation prompts (plain template only).

**Dense scenes** (dVAE only). :func:`dense_scene` / :func:`dense_sample` draw up to 4-9 non-overlapping seen
objects (about 5 on average: placements that do not fit are dropped; sides anywhere from the small to the
large range, boxes at least 0.02·S apart) on the same background with an empty caption;
``--data shapes-dense`` trains the dVAE on them. A 1-2 object scene is about 90% background, so the dVAE sees
colours and edges rarely and learns them slowly; dense scenes are 26% foreground instead of 11% (2.4 times as
much, measured over 300 scenes each) and hold several objects per crop. Held-out pairs never appear in them
either.

**Checker.** :func:`parse` finds the objects of an image in five steps (thresholds are the constants below):

1. each pixel takes its nearest reference colour (the six colours and white) by RGB distance; the non-white
   pixels, cleaned by a 3x3 majority vote (which removes single-pixel noise), form the foreground;
2. 8-connected foreground regions smaller than 0.004·S² pixels are specks and ignored (a small triangle
   covers at least 0.0128·S²);
3. colour: a majority vote of the region's pixels within RGB distance 50 of a colour (blends with the white
   background stay out of the vote); with votes from fewer than 10% of its pixels the colour is unknown;
4. shape, from the region's bounding box (width w, height h, aspect within 2:3..3:2): the share of its area in
   the top half of the box (triangle 1/4, others 1/2), the fill ratio area / (w·h) (square 1, circle pi/4,
   triangle 1/2) and the extent along the two diagonals relative to the box side (square sqrt(2), circle 1,
   triangle 1.06). Triangle: top share < 0.435 and fill 0.42-0.80; square: diagonal ratio >= 1.10 and fill
   >= 0.80; circle: the rest with fill 0.65-0.90; anything else has no shape. Blurred, noisy and resampled
   renders keep these features well inside the rules;
5. size: small when (w + h) / 2 < 0.28·S; centre: the box centre.

:func:`matches` then requires exactly the objects the caption names (same number, colour and shape, and the
size and the position or relation where the caption states them); :func:`check` also says why not.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dalle.errors import ConfigError, ImageError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom")
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
PREFIXES: tuple[str, ...] = ("", "a drawing of ", "a picture of ", "an image of ")

HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

# Geometry, as fractions of the image side (see the module docstring).
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.16, 0.22), "large": (0.34, 0.42)}
SIZE_THRESHOLD = 0.28
EDGE_MARGIN = 0.03
OBJECT_GAP = 0.06
POSITION_LIMIT = 0.40
POSITION_RENDER_LIMIT = 0.35
RELATION_MARGIN = 0.10
RELATION_SPREAD = 0.5  # renderer: off-axis offset <= this times the on-axis offset

# Checker thresholds.
MIN_OBJECT_AREA = 0.004  # of S*S pixels; the smallest real object (a small triangle) covers 0.0128
VOTE_DISTANCE = 50.0  # RGB distance within which a pixel votes for a colour; blends with white stay out
MIN_VOTES = 0.1  # a region needs votes from this share of its pixels (and at least 3) to get a colour
MAX_ASPECT = 1.5  # regions whose box is more elongated than this are no shape
# Shape rules (thresholds measured on clean, blurred and noisy renders; see the module notes).
TRIANGLE_MAX_TOP = 0.435  # share of the area in the top half: triangle 0.25 (blurred <= 0.42), others 0.5
TRIANGLE_FILL = (0.42, 0.80)  # area / box area: triangle 0.5 (blurred up to 0.75)
SQUARE_MIN_DIAGONAL = 1.10  # diagonal extent / side: square sqrt(2) (blurred >= 1.13), circle 1 (<= 1.06)
SQUARE_MIN_FILL = 0.80  # square 1 (blurred >= 0.82)
CIRCLE_FILL = (0.65, 0.90)  # circle pi / 4 (blurred 0.72-0.84)

TRAIN_TWO_OBJECT_PROB = 0.5
TRAIN_STATE_SIZE_PROB = 0.5
TRAIN_STATE_POSITION_PROB = 0.5
TRAIN_PLAIN_TEMPLATE_PROB = 0.7


class CaptionError(ConfigError):
    """A caption is not in the shapes-world grammar (see :mod:`dalle.data.shapes`)."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object as a caption describes it; ``size`` and ``position`` are None when the caption is silent."""

    colour: str
    shape: str
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption says: one object (maybe with size/position), or two objects and a relation."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


@dataclass(frozen=True)
class ShapeObject:
    """A drawn or detected object. ``cx``, ``cy`` and ``side`` are fractions of the image side.

    ``colour`` and ``shape`` are None for a detected region that fits no palette colour or no shape.
    """

    colour: str | None
    shape: str | None
    size: str
    cx: float
    cy: float
    side: float

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre, as fractions of the image width and height."""
        return (self.cx, self.cy)


@dataclass(frozen=True)
class Scene:
    """A caption and the objects drawn for it; render it at any size with :func:`render`."""

    caption: str
    objects: tuple[ShapeObject, ...]


# ----------------------------------------------------------------------------------------------- captions

_PREFIX_RE = "(?:" + "|".join(re.escape(p) for p in PREFIXES if p) + ")?"
_OBJECT_RE = r"an? (?:(" + "|".join(SIZES) + r") )?(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")"
_ONE_RE = re.compile(_PREFIX_RE + _OBJECT_RE + "(?: (" + "|".join(POSITIONS) + "))?")
_TWO_RE = re.compile(_PREFIX_RE + _OBJECT_RE + " (" + "|".join(RELATIONS) + ") " + _OBJECT_RE)


def normalize_caption(caption: str) -> str:
    """Lowercase, collapse whitespace and drop a final period: the form the grammar is written in."""
    if not isinstance(caption, str):
        raise CaptionError(f"a caption must be a string, got {type(caption).__name__}")
    return " ".join(caption.lower().split()).rstrip(".").rstrip()


def parse_caption(caption: str) -> CaptionSpec:
    """Read a caption of the shapes-world grammar into a :class:`CaptionSpec`; raise CaptionError
    otherwise."""
    text = normalize_caption(caption)
    m = _ONE_RE.fullmatch(text)
    if m:
        size, colour, shape, position = m.groups()
        return CaptionSpec((ObjectSpec(colour, shape, size, position),))
    m = _TWO_RE.fullmatch(text)
    if m:
        size_a, colour_a, shape_a, relation, size_b, colour_b, shape_b = m.groups()
        return CaptionSpec(
            (ObjectSpec(colour_a, shape_a, size_a), ObjectSpec(colour_b, shape_b, size_b)), relation
        )
    raise CaptionError(
        f"caption {caption!r} is not in the shapes grammar; write e.g. 'a large red circle on the left' or "
        "'a blue square above a green circle' (colours: "
        + ", ".join(COLOURS)
        + "; shapes: "
        + ", ".join(SHAPES)
        + ")"
    )


def _object_phrase(obj: ObjectSpec) -> str:
    words = [w for w in (obj.size, obj.colour, obj.shape) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def make_caption(spec: CaptionSpec, prefix: str = "") -> str:
    """Write ``spec`` as a caption, optionally after one of :data:`PREFIXES` (``"a drawing of "``, ...)."""
    _validate_spec(spec)
    if prefix not in PREFIXES:
        raise CaptionError(f"unknown caption prefix {prefix!r}; use one of {PREFIXES}")
    if spec.relation is None:
        (obj,) = spec.objects
        text = _object_phrase(obj) + (f" {obj.position}" if obj.position else "")
    else:
        text = f"{_object_phrase(spec.objects[0])} {spec.relation} {_object_phrase(spec.objects[1])}"
    return prefix + text


def _validate_spec(spec: CaptionSpec) -> None:
    n = len(spec.objects)
    if n not in (1, 2) or (n == 2) != (spec.relation is not None):
        raise CaptionError("a scene has one object without a relation, or two objects with one")
    if spec.relation is not None and spec.relation not in RELATIONS:
        raise CaptionError(f"unknown relation {spec.relation!r}; use one of {RELATIONS}")
    for obj in spec.objects:
        if obj.colour not in COLOURS or obj.shape not in SHAPES:
            raise CaptionError(f"unknown colour or shape in {obj}; colours {tuple(COLOURS)}, shapes {SHAPES}")
        if obj.size is not None and obj.size not in SIZES:
            raise CaptionError(f"unknown size {obj.size!r}; use one of {SIZES}")
        if obj.position is not None and (obj.position not in POSITIONS or n == 2):
            raise CaptionError(
                f"position {obj.position!r} is allowed only for one object, one of {POSITIONS}"
            )


def is_held_out(colour: str | None, shape: str | None) -> bool:
    """True for the colour-shape pairs kept out of all training data (:data:`HELD_OUT`)."""
    return (colour, shape) in HELD_OUT


# ------------------------------------------------------------------------------------------------ sampling


def _rng(*keys: Any) -> random.Random:
    # Seeded from a hash of the keys and drawn from with random() only: Python guarantees that sequence
    # across versions, so the data stream (and the bundled model's recipe) does not depend on the platform.
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _uniform(rng: random.Random, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _choice(rng: random.Random, seq: Sequence[Any]) -> Any:
    return seq[min(int(rng.random() * len(seq)), len(seq) - 1)]


def _place(spec: CaptionSpec, rng: random.Random, caption: str) -> Scene:
    """Choose sizes and centres that satisfy ``spec`` with the documented margins."""
    sizes = [o.size or _choice(rng, SIZES) for o in spec.objects]
    sides = [_uniform(rng, *SIZE_RANGES[s]) for s in sizes]
    if spec.relation is None:
        obj, side = spec.objects[0], sides[0]
        lo, hi = EDGE_MARGIN + side / 2, 1 - EDGE_MARGIN - side / 2
        cx_lo, cx_hi, cy_lo, cy_hi = lo, hi, lo, hi
        if obj.position == "on the left":
            cx_hi = POSITION_RENDER_LIMIT
        elif obj.position == "on the right":
            cx_lo = 1 - POSITION_RENDER_LIMIT
        elif obj.position == "at the top":
            cy_hi = POSITION_RENDER_LIMIT
        elif obj.position == "at the bottom":
            cy_lo = 1 - POSITION_RENDER_LIMIT
        centres = [(_uniform(rng, cx_lo, cx_hi), _uniform(rng, cy_lo, cy_hi))]
    else:
        # "lead" is the object with the smaller coordinate on the relation's axis (the upper or left one).
        lead = 1 if spec.relation in ("below", "to the right of") else 0
        trail = 1 - lead
        s_lead, s_trail = sides[lead], sides[trail]
        lo_lead = EDGE_MARGIN + s_lead / 2
        hi_trail = 1 - EDGE_MARGIN - s_trail / 2
        d_min = (s_lead + s_trail) / 2 + OBJECT_GAP
        d = _uniform(rng, d_min, hi_trail - lo_lead)
        p_lead = _uniform(rng, lo_lead, hi_trail - d)
        # Off-axis: offset e within the spread limit and such that both objects stay inside the image.
        lo_l, hi_l = EDGE_MARGIN + s_lead / 2, 1 - EDGE_MARGIN - s_lead / 2
        lo_t, hi_t = EDGE_MARGIN + s_trail / 2, 1 - EDGE_MARGIN - s_trail / 2
        e = _uniform(rng, max(-RELATION_SPREAD * d, lo_t - hi_l), min(RELATION_SPREAD * d, hi_t - lo_l))
        q_lead = _uniform(rng, max(lo_l, lo_t - e), min(hi_l, hi_t - e))
        axis_pos = {lead: p_lead, trail: p_lead + d}
        off_pos = {lead: q_lead, trail: q_lead + e}
        vertical = spec.relation in ("above", "below")
        centres = [(off_pos[i], axis_pos[i]) if vertical else (axis_pos[i], off_pos[i]) for i in range(2)]
    objects = tuple(
        ShapeObject(o.colour, o.shape, size, cx, cy, side)
        for o, size, side, (cx, cy) in zip(spec.objects, sizes, sides, centres)
    )
    return Scene(caption, objects)


def make_scene(caption: str, seed: int = 0) -> Scene:
    """Lay out the objects of ``caption`` (any pair, held-out ones included) deterministically from
    ``seed``."""
    text = normalize_caption(caption)
    spec = parse_caption(text)
    return _place(spec, _rng("render", int(seed), text), text)


def sample_scene(index: int, seed: int = 0) -> Scene:
    """The training scene number ``index`` of the stream ``seed``: a pure function of both, no held-out pair.

    Half the scenes have two objects with a relation; a one-object caption states the size and the position
    each with probability 1/2. 70% of captions use the plain template, the rest one of the prefixes.
    """
    if index < 0:
        raise ConfigError(f"sample index must be >= 0, got {index}")
    rng = _rng("train", int(seed), int(index))
    if rng.random() < TRAIN_TWO_OBJECT_PROB:
        a = _choice(rng, SEEN_PAIRS)
        b = _choice(rng, [p for p in SEEN_PAIRS if p != a])
        spec = CaptionSpec((ObjectSpec(*a), ObjectSpec(*b)), _choice(rng, RELATIONS))
    else:
        colour, shape = _choice(rng, SEEN_PAIRS)
        size = _choice(rng, SIZES) if rng.random() < TRAIN_STATE_SIZE_PROB else None
        position = _choice(rng, POSITIONS) if rng.random() < TRAIN_STATE_POSITION_PROB else None
        spec = CaptionSpec((ObjectSpec(colour, shape, size, position),))
    prefix = "" if rng.random() < TRAIN_PLAIN_TEMPLATE_PROB else _choice(rng, PREFIXES[1:])
    return _place(spec, rng, make_caption(spec, prefix))


def sample(index: int, seed: int = 0, size: int = 128) -> tuple[Image.Image, str]:
    """Training example ``index`` of stream ``seed``: ``(image, caption)``, random-access and
    deterministic."""
    scene = sample_scene(index, seed)
    return render(scene, size=size), scene.caption


DENSE_OBJECTS = (4, 9)  # dense scenes hold this many objects (inclusive), fewer when they do not fit
DENSE_GAP = 0.02  # minimum gap between the bounding boxes of a dense scene, as a fraction of the side


def dense_scene(index: int, seed: int = 0) -> Scene:
    """Dense scene ``index`` of stream ``seed``, for training the dVAE only: up to 4-9 non-overlapping
    objects.

    Every object is a seen colour-shape pair (never a held-out one) with a side drawn from the small range,
    the large range or in between, placed by rejection sampling (20 tries per wanted object, so about 5 on
    average; boxes at least ``DENSE_GAP`` apart and ``EDGE_MARGIN`` from the border). Its images are 26%
    foreground against 11% for the captioned stream, so the dVAE sees colours and edges far more often per
    step. The caption is empty: these scenes have no caption in the grammar, and the transformer never trains
    on them.
    """
    if index < 0:
        raise ConfigError(f"sample index must be >= 0, got {index}")
    rng = _rng("dense", int(seed), int(index))
    want = DENSE_OBJECTS[0] + int(rng.random() * (DENSE_OBJECTS[1] - DENSE_OBJECTS[0] + 1))
    lo_side, hi_side = SIZE_RANGES["small"][0], SIZE_RANGES["large"][1]
    objects: list[ShapeObject] = []
    for _ in range(want * 20):
        if len(objects) >= want:
            break
        side = _uniform(rng, lo_side, hi_side)
        lo, hi = EDGE_MARGIN + side / 2, 1 - EDGE_MARGIN - side / 2
        cx, cy = _uniform(rng, lo, hi), _uniform(rng, lo, hi)
        if any(max(abs(cx - o.cx), abs(cy - o.cy)) < (side + o.side) / 2 + DENSE_GAP for o in objects):
            continue
        colour, shape = _choice(rng, SEEN_PAIRS)
        size = "small" if side < SIZE_THRESHOLD else "large"
        objects.append(ShapeObject(colour, shape, size, cx, cy, side))
    return Scene("", tuple(objects))


def dense_sample(index: int, seed: int = 0, size: int = 128) -> tuple[Image.Image, str]:
    """Dense training image ``index`` of stream ``seed`` (:func:`dense_scene`) and its empty caption."""
    return render(dense_scene(index, seed), size=size), ""


def stream(
    seed: int = 0, size: int = 128, start: int = 0, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[Image.Image, str]]:
    """Endless training examples for one shard: indices ``rank, rank + world_size, ...`` of stream ``seed``.

    ``start`` counts examples already taken *by this shard*, so a resumed run passes the number it consumed.
    The shards of ``world_size`` ranks together cover every index exactly once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start < 0:
        raise ConfigError(f"start must be >= 0, got {start}")
    for k in itertools.count(start):
        yield sample(k * world_size + rank, seed, size)


def captions(n: int, seed: int = 0, start: int = 0) -> list[str]:
    """The captions of training examples ``start .. start + n - 1`` (no rendering), e.g. to train a
    tokenizer."""
    return [sample_scene(i, seed).caption for i in range(start, start + n)]


# ----------------------------------------------------------------------------------------------- rendering


def render(caption_or_scene: str | Scene, size: int = 128, seed: int = 0) -> Image.Image:
    """Draw a caption (laid out from ``seed``, see :func:`make_scene`) or a :class:`Scene` as a size x size
    image."""
    if not isinstance(size, int) or size < 16:
        raise ConfigError(f"image size must be an integer >= 16, got {size!r}")
    scene = caption_or_scene if isinstance(caption_or_scene, Scene) else make_scene(caption_or_scene, seed)
    return Image.fromarray(_draw(scene, size), "RGB")


def _draw(scene: Scene, size: int) -> np.ndarray:
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    centres = np.arange(size, dtype=np.float64) + 0.5  # pixel centres; a pixel is in a shape if its centre is
    for obj in scene.objects:
        if obj.colour not in COLOURS or obj.shape not in SHAPES:
            raise ConfigError(
                f"cannot draw {obj}: colour must be one of {tuple(COLOURS)}, shape one of {SHAPES}"
            )
        length, cx, cy = obj.side * size, obj.cx * size, obj.cy * size
        x0, y0 = cx - length / 2, cy - length / 2
        j0, j1 = max(0, int(np.floor(x0))), min(size, int(np.ceil(x0 + length)) + 1)
        i0, i1 = max(0, int(np.floor(y0))), min(size, int(np.ceil(y0 + length)) + 1)
        xs, ys = centres[None, j0:j1], centres[i0:i1, None]
        inside = (xs >= x0) & (xs < x0 + length) & (ys >= y0) & (ys < y0 + length)
        if obj.shape == "circle":
            inside &= (xs - cx) ** 2 + (ys - cy) ** 2 <= (length / 2) ** 2
        elif obj.shape == "triangle":
            inside &= np.abs(xs - cx) <= (ys - y0) / 2  # apex at the top centre, base = height = length
        img[i0:i1, j0:j1][inside] = COLOURS[obj.colour]
    return img


# ------------------------------------------------------------------------------------------------- checker

_REFS = np.array([*COLOURS.values(), BACKGROUND], dtype=np.float32)  # palette then white
_REF_SQ = (_REFS**2).sum(1)
_ONES3 = np.ones(3, dtype=np.float32)
_WHITE = len(COLOURS)
_WHITE_RADIUS_SQ = float(((_REFS[:_WHITE] - _REFS[_WHITE]) ** 2).sum(1).min()) / 4
_COLOUR_NAMES = tuple(COLOURS)


def _as_rgb_array(image: Any) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image, a uint8/float array (HWC) or a [3,H,W] tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        arr = image.detach().float().cpu().numpy()
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise ImageError(f"expected a [3,H,W] tensor with values in [0, 1], got shape {tuple(arr.shape)}")
        return np.clip(arr.transpose(1, 2, 0), 0.0, 1.0) * 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageError(f"expected an HxWx3 image array, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0  # floats are taken as [0, 1]
    raise ImageError(f"unsupported image array dtype {arr.dtype}; use uint8 or floats in [0, 1]")


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Label the 8-connected regions of ``mask`` by runs: (row, start, end, region id per run, number of
    regions)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; row-major order pairs each end with its start
    n = len(rows)
    if n == 0:
        return rows, starts, ends, rows, 0
    stride = w + 2
    key_start, key_end = rows * stride + starts, rows * stride + ends
    # Runs of the next row touching run i (8-connectivity): start_j <= end_i and end_j >= start_i. Runs of a
    # row are sorted and disjoint, so they form one contiguous block of indices [lo, hi).
    lo = np.searchsorted(key_end, (rows + 1) * stride + starts, side="left")
    hi = np.searchsorted(key_start, (rows + 1) * stride + ends, side="right")
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in np.nonzero(hi > lo)[0].tolist():
        ri = find(i)
        for j in range(int(lo[i]), int(hi[i])):
            rj = find(j)
            if rj != ri:
                parent[rj] = ri
    roots = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    _, labels = np.unique(roots, return_inverse=True)
    return rows, starts, ends, labels, int(labels.max()) + 1


def parse(image: Any) -> list[ShapeObject]:
    """Detect the objects in a shapes-world image (PIL image, HxWx3 array or [3,H,W] tensor in [0, 1]).

    Returns one :class:`ShapeObject` per region larger than a speck, top to bottom then left to right;
    ``colour`` / ``shape`` are None where the region fits no palette colour / no shape (see the module notes).
    """
    rgb = _as_rgb_array(image)
    h, w = rgb.shape[:2]
    px = rgb.reshape(-1, 3)
    # A pixel closer to white than half the smallest white-to-palette distance is nearest to white (triangle
    # inequality), so only the remaining pixels need distances to all seven references.
    to_white = 255.0 - px
    cand = np.flatnonzero((to_white * to_white) @ _ONES3 >= _WHITE_RADIUS_SQ)  # @ beats .sum(1) 10x here
    sub = px[cand]
    d2 = ((sub * sub) @ _ONES3)[:, None] - 2.0 * (sub @ _REFS.T) + _REF_SQ  # squared distances, M x 7
    sub_nearest = d2.argmin(1)
    nearest = np.full(h * w, _WHITE, dtype=np.int64)
    nearest[cand] = sub_nearest
    near_d2 = np.full(h * w, np.inf, dtype=np.float32)
    near_d2[cand] = d2[np.arange(len(cand)), sub_nearest]
    fg = _majority3(nearest.reshape(h, w) != _WHITE)
    rows, starts, ends, labels, n = _runs(fg)
    if n == 0:
        return []
    lengths = ends - starts
    area = np.bincount(labels, weights=lengths, minlength=n)
    keep = area >= MIN_OBJECT_AREA * h * w
    if not keep.any():
        return []
    # Renumber kept regions 0..k-1 and keep only their runs.
    new_id = np.cumsum(keep) - 1
    run_keep = keep[labels]
    rows, starts, ends, lengths = rows[run_keep], starts[run_keep], ends[run_keep], lengths[run_keep]
    labels = new_id[labels[run_keep]]
    k = int(keep.sum())
    area = area[keep]
    y0 = np.full(k, h)
    y1 = np.full(k, -1)
    x0 = np.full(k, w)
    x1 = np.full(k, -1)
    np.minimum.at(y0, labels, rows)
    np.maximum.at(y1, labels, rows)
    np.minimum.at(x0, labels, starts)
    np.maximum.at(x1, labels, ends - 1)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    # Extents along the two diagonals (x + y and x - y), in the same units as the box sides: a square
    # reaches sqrt(2) times its side there, a circle its diameter, a triangle about 1.06 times its base.
    diag = []
    for a, b in ((starts + rows, ends - 1 + rows), (starts - rows, ends - 1 - rows)):
        lo_d, hi_d = np.full(k, 1 << 30), np.full(k, -(1 << 30))
        np.minimum.at(lo_d, labels, a)
        np.maximum.at(hi_d, labels, b)
        diag.append(hi_d - lo_d + 1)
    diag_ratio = (diag[0] + diag[1]) / np.sqrt(2) / (bw + bh)
    # Share of the area above the box's middle row line (a row on the line counts half).
    mid = (y0 + y1) / 2.0
    run_mid = mid[labels]
    top_weight = (rows < run_mid) + 0.5 * (rows == run_mid)
    top = np.bincount(labels, weights=lengths * top_weight, minlength=k) / area
    fill = area / (bw * bh)
    # Colour votes: expand runs to pixel indices, count nearest-palette labels of pixels close to a colour.
    total = int(lengths.sum())
    offsets = np.repeat(rows * w + starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    pix_label = np.repeat(labels, lengths)
    votes_ok = near_d2[offsets] < VOTE_DISTANCE**2
    votes = np.bincount(
        pix_label[votes_ok] * _WHITE + nearest[offsets][votes_ok], minlength=k * _WHITE
    ).reshape(k, _WHITE)
    short_side = min(h, w)
    objects = []
    for i in np.lexsort((x0, y0)).tolist():
        n_votes = int(votes[i].sum())
        colour = _COLOUR_NAMES[int(votes[i].argmax())] if n_votes >= max(3, MIN_VOTES * area[i]) else None
        shape = _classify_shape(
            float(fill[i]), float(top[i]), float(diag_ratio[i]), float(bw[i]) / float(bh[i])
        )
        side = (float(bw[i]) + float(bh[i])) / 2 / short_side
        objects.append(
            ShapeObject(
                colour=colour,
                shape=shape,
                size="small" if side < SIZE_THRESHOLD else "large",
                cx=(float(x0[i]) + float(x1[i]) + 1) / 2 / w,
                cy=(float(y0[i]) + float(y1[i]) + 1) / 2 / h,
                side=side,
            )
        )
    return objects


def _classify_shape(fill: float, top: float, diag: float, aspect: float) -> str | None:
    """The shape rules of the module notes; None when a region fits none of them."""
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return None
    if top < TRIANGLE_MAX_TOP:
        return "triangle" if TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1] else None
    if diag >= SQUARE_MIN_DIAGONAL:
        return "square" if fill >= SQUARE_MIN_FILL else None
    return "circle" if CIRCLE_FILL[0] <= fill <= CIRCLE_FILL[1] else None


def _majority3(mask: np.ndarray) -> np.ndarray:
    """3x3 majority vote on a boolean mask: removes single-pixel specks and ragged edges left by noise."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    rows = padded[:-2] + padded[1:-1] + padded[2:]  # vertical sums, then horizontal
    count = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    return count >= 5


def position_holds(position: str, obj: ShapeObject) -> bool:
    """Whether ``obj`` is "on the left" / "on the right" / "at the top" / "at the bottom"
    (limits 0.4 / 0.6)."""
    if position == "on the left":
        return obj.cx < POSITION_LIMIT
    if position == "on the right":
        return obj.cx > 1 - POSITION_LIMIT
    if position == "at the top":
        return obj.cy < POSITION_LIMIT
    if position == "at the bottom":
        return obj.cy > 1 - POSITION_LIMIT
    raise CaptionError(f"unknown position {position!r}; use one of {POSITIONS}")


def relation_holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether "A ``relation`` B" holds by centre offsets (main-axis offset > 0.1 and > the off-axis
    offset)."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "above":
        main, off = dy, dx
    elif relation == "below":
        main, off = -dy, dx
    elif relation == "to the left of":
        main, off = dx, dy
    elif relation == "to the right of":
        main, off = -dx, dy
    else:
        raise CaptionError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    return main > RELATION_MARGIN and main > abs(off)


def _object_mismatch(spec: ObjectSpec, obj: ShapeObject) -> str | None:
    if obj.colour != spec.colour:
        return f"colour: expected {spec.colour}, found {obj.colour or 'no palette colour'}"
    if obj.shape != spec.shape:
        return f"shape: expected {spec.shape}, found {obj.shape or 'no clear shape'}"
    if spec.size is not None and obj.size != spec.size:
        return f"size: expected {spec.size}, found {obj.size} (side {obj.side:.2f})"
    if spec.position is not None and not position_holds(spec.position, obj):
        return f"position: expected {spec.position}, centre at ({obj.cx:.2f}, {obj.cy:.2f})"
    return None


def judge(caption: str | CaptionSpec, objects: Sequence[ShapeObject]) -> tuple[bool, str]:
    """Compare detected ``objects`` with a caption: ``(True, "ok")`` or ``(False, "category: detail")``.

    Categories: count, colour, shape, size, position, relation.
    """
    spec = caption if isinstance(caption, CaptionSpec) else parse_caption(caption)
    if len(objects) != len(spec.objects):
        return False, f"count: expected {len(spec.objects)} object(s), found {len(objects)}"
    if spec.relation is None:
        reason = _object_mismatch(spec.objects[0], objects[0])
        return (reason is None), (reason or "ok")
    candidates = []  # (number of wrong objects, reason) for each way of pairing caption and image objects
    for ia, ib in ((0, 1), (1, 0)):
        found = (
            _object_mismatch(spec.objects[0], objects[ia]),
            _object_mismatch(spec.objects[1], objects[ib]),
        )
        reasons = [r for r in found if r]
        if reasons:
            candidates.append((len(reasons), reasons[0]))
        elif relation_holds(spec.relation, objects[ia], objects[ib]):
            return True, "ok"
        else:
            candidates.append((0, f"relation: the objects are right but not '{spec.relation}'"))
    return False, min(candidates, key=lambda c: c[0])[1]


def check(caption: str, image: Any) -> tuple[bool, str]:
    """Parse ``image`` and :func:`judge` it against ``caption``."""
    spec = parse_caption(caption)
    return judge(spec, parse(image))


def matches(caption: str, image: Any) -> bool:
    """True when ``image`` shows exactly what ``caption`` says (see the module notes for the exact rules)."""
    return check(caption, image)[0]


def describe(objects: Sequence[ShapeObject]) -> str:
    """A short human-readable listing of detected objects, for logs and failure reports."""
    if not objects:
        return "no objects"
    return "; ".join(
        f"{o.size} {o.colour or '?'} {o.shape or '?'} at ({o.cx:.2f}, {o.cy:.2f})" for o in objects
    )


# --------------------------------------------------------------------------------------- evaluation prompts

_ONE_OBJECT_VARIANTS: tuple[tuple[str | None, str | None], ...] = tuple(
    (size, position) for size in (None, *SIZES) for position in (None, *POSITIONS)
)


def _one_object_prompts(pairs: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    # A Latin square: round r gives pair p the variant (r + p) mod 15, so every pair meets every
    # size/position variant once, and each prefix of len(pairs) prompts covers every pair.
    out = []
    for r in range(len(_ONE_OBJECT_VARIANTS)):
        for p, (colour, shape) in enumerate(pairs):
            size, position = _ONE_OBJECT_VARIANTS[(r + p) % len(_ONE_OBJECT_VARIANTS)]
            out.append(make_caption(CaptionSpec((ObjectSpec(colour, shape, size, position),))))
    return tuple(out)


def _two_object_prompts(pairs: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    ordered = [(a, b) for a in pairs for b in pairs if a != b]
    rng = random.Random(7)  # Fisher-Yates on random() only, which Python keeps stable across versions
    for i in range(len(ordered) - 1, 0, -1):
        j = min(int(rng.random() * (i + 1)), i)
        ordered[i], ordered[j] = ordered[j], ordered[i]
    n = len(ordered)
    out = []
    for k in range(n * len(RELATIONS)):
        a, b = ordered[k % n]
        relation = RELATIONS[(k + k // n) % len(RELATIONS)]  # every ordered pair meets every relation once
        out.append(make_caption(CaptionSpec((ObjectSpec(*a), ObjectSpec(*b)), relation)))
    return tuple(out)


#: Fixed evaluation prompts, balanced in every prefix (take the first N for a smaller run):
#: ``one_object_seen`` (225 = 15 seen pairs x 15 size/position variants), ``two_objects_seen`` (840 = 210
#: ordered pairs of distinct seen pairs x 4 relations), ``one_object_held_out`` (45 = 3 pairs x 15 variants).
EVAL_SETS: dict[str, tuple[str, ...]] = {
    "one_object_seen": _one_object_prompts(SEEN_PAIRS),
    "two_objects_seen": _two_object_prompts(SEEN_PAIRS),
    "one_object_held_out": _one_object_prompts(sorted(HELD_OUT, key=ALL_PAIRS.index)),
}


def eval_prompts(name: str, n: int | None = None) -> list[str]:
    """The first ``n`` prompts (all when None) of the evaluation set ``name`` (a key of :data:`EVAL_SETS`)."""
    if name not in EVAL_SETS:
        raise ConfigError(f"unknown evaluation set {name!r}; choose from {sorted(EVAL_SETS)}")
    prompts = EVAL_SETS[name]
    return list(prompts if n is None else prompts[:n])


__all__ = [
    "ALL_PAIRS",
    "BACKGROUND",
    "COLOURS",
    "DENSE_GAP",
    "DENSE_OBJECTS",
    "EVAL_SETS",
    "HELD_OUT",
    "POSITIONS",
    "PREFIXES",
    "RELATIONS",
    "SEEN_PAIRS",
    "SHAPES",
    "SIZES",
    "SIZE_RANGES",
    "CaptionError",
    "CaptionSpec",
    "ObjectSpec",
    "Scene",
    "ShapeObject",
    "captions",
    "check",
    "dense_sample",
    "dense_scene",
    "describe",
    "eval_prompts",
    "is_held_out",
    "judge",
    "make_caption",
    "make_scene",
    "matches",
    "normalize_caption",
    "parse",
    "parse_caption",
    "position_holds",
    "relation_holds",
    "render",
    "sample",
    "sample_scene",
    "stream",
]

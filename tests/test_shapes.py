"""Tests of the shapes world: grammar, renderer, training stream, held-out exclusion, checker, prompt sets."""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle.data import shapes as S
from dalle.errors import ConfigError

PALETTE = {*S.COLOURS.values(), S.BACKGROUND}
HELD_OUT_PHRASES = ("green triangle", "purple circle", "orange square")


def degrade(
    img: Image.Image, rng: np.random.Generator, blur=1.5, noise=10.0, shift=10.0, down=2
) -> Image.Image:
    """Blur, resample, noise and a colour cast: a stand-in for a dVAE reconstruction."""
    if down > 1:
        small = img.resize((img.width // down, img.height // down), Image.BILINEAR)
        img = small.resize(img.size, Image.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, noise, arr.shape) + rng.uniform(-shift, shift, (1, 1, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ grammar


def all_specs():
    for (colour, shape), size, position in itertools.product(
        S.ALL_PAIRS, (None, *S.SIZES), (None, *S.POSITIONS)
    ):
        yield S.CaptionSpec((S.ObjectSpec(colour, shape, size, position),))
    for a, b in itertools.product(S.ALL_PAIRS, repeat=2):
        for relation in S.RELATIONS:
            yield S.CaptionSpec((S.ObjectSpec(*a), S.ObjectSpec(*b)), relation)
    yield S.CaptionSpec(
        (S.ObjectSpec("red", "circle", "small"), S.ObjectSpec("blue", "square", "large")), "below"
    )


def test_caption_round_trip_every_spec_and_prefix():
    n = 0
    for spec in all_specs():
        for prefix in S.PREFIXES:
            caption = S.make_caption(spec, prefix)
            assert caption == caption.lower() and "  " not in caption
            assert S.parse_caption(caption) == spec
            n += 1
    assert n > 5000


def test_caption_examples_and_articles():
    one = S.CaptionSpec((S.ObjectSpec("orange", "circle"),))
    assert S.make_caption(one) == "an orange circle"
    assert S.make_caption(one, "a drawing of ") == "a drawing of an orange circle"
    big = S.CaptionSpec((S.ObjectSpec("orange", "circle", "large", "on the left"),))
    assert S.make_caption(big) == "a large orange circle on the left"
    two = S.CaptionSpec((S.ObjectSpec("blue", "square"), S.ObjectSpec("yellow", "circle")), "to the left of")
    assert S.make_caption(two) == "a blue square to the left of a yellow circle"
    # lenient reading: either article, capitals, extra spaces, a final period
    assert S.parse_caption("A  Orange Circle.") == one
    assert S.parse_caption("an image of a large orange circle on the left") == big


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a pink circle",
        "a red hexagon",
        "two red circles",
        "a red circle above",
        "a red circle in the middle",
        "a huge red circle",
        "a red circle on the left above a blue square",
        "a photo of a red circle",
        "red circle",
    ],
)
def test_bad_captions_raise(caption):
    with pytest.raises(S.CaptionError, match="grammar"):
        S.parse_caption(caption)
    with pytest.raises(ConfigError):
        S.render(caption)
    with pytest.raises(ValueError):
        S.matches(caption, Image.new("RGB", (32, 32), "white"))


def test_bad_specs_raise():
    with pytest.raises(S.CaptionError):
        S.make_caption(S.CaptionSpec((S.ObjectSpec("red", "circle"),), "above"))
    with pytest.raises(S.CaptionError):
        S.make_caption(
            S.CaptionSpec(
                (S.ObjectSpec("red", "circle", None, "on the left"), S.ObjectSpec("red", "square")), "above"
            )
        )
    with pytest.raises(S.CaptionError):
        S.make_caption(S.CaptionSpec((S.ObjectSpec("red", "circle"),)), prefix="a photo of ")
    with pytest.raises(ConfigError):
        S.render("a red circle", size=8)


# ----------------------------------------------------------------------------------------------- renderer


def test_render_palette_background_and_determinism():
    for i in range(40):
        scene = S.sample_scene(i, seed=5)
        img = S.render(scene, size=96)
        assert img.mode == "RGB" and img.size == (96, 96)
        colours = {tuple(c) for c in np.unique(np.asarray(img).reshape(-1, 3), axis=0)}
        assert S.BACKGROUND in colours and colours <= PALETTE
        assert {S.COLOURS[o.colour] for o in scene.objects} <= colours
        arr = np.asarray(img)
        assert (arr[0] == 255).all() and (arr[-1] == 255).all()  # the border margin stays white
    a = S.render("a small red circle on the left", seed=3)
    assert a.size == (128, 128)
    assert a.tobytes() == S.render("a small red circle on the left", seed=3).tobytes()
    assert a.tobytes() != S.render("a small red circle on the left", seed=4).tobytes()
    # a scene renders at any size with the same layout
    scene = S.make_scene("a blue triangle above a red square", seed=1)
    for size in (32, 64, 200):
        assert S.matches(scene.caption, S.render(scene, size=size))


def test_render_time_about_a_millisecond():
    scenes = [S.sample_scene(i) for i in range(100)]
    start = time.perf_counter()
    for scene in scenes:
        S.render(scene)
    per_image = (time.perf_counter() - start) / len(scenes)
    assert per_image < 0.005, per_image  # ~0.5 ms measured; loose bound for a shared CPU


@pytest.mark.parametrize("size", [64, 128, 256])
def test_size_classes_are_apart_and_scale_with_the_image(size):
    sides = {"small": [], "large": []}
    for colour, shape in S.ALL_PAIRS:
        for label in S.SIZES:
            for seed in range(3):
                img = S.render(f"a {label} {colour} {shape}", size=size, seed=seed)
                (obj,) = S.parse(img)
                assert obj.size == label
                sides[label].append(obj.side * size)
    lo_small, hi_small = S.SIZE_RANGES["small"]
    lo_large, hi_large = S.SIZE_RANGES["large"]
    # measured sides are box sides in whole pixels (a triangle's apex row may be empty): allow 2 px
    assert lo_small * size - 2 <= min(sides["small"]) and max(sides["small"]) <= hi_small * size + 2
    assert lo_large * size - 2 <= min(sides["large"]) and max(sides["large"]) <= hi_large * size + 2
    assert min(sides["large"]) > 1.4 * max(sides["small"])


def test_layouts_satisfy_captions_with_margins():
    relations_seen = Counter()
    for i in range(4000):
        scene = S.sample_scene(i, seed=11)
        spec = S.parse_caption(scene.caption)
        assert S.judge(spec, scene.objects) == (True, "ok")
        for obj in scene.objects:
            half = obj.side / 2
            assert S.EDGE_MARGIN - 1e-9 <= obj.cx - half and obj.cx + half <= 1 - S.EDGE_MARGIN + 1e-9
            assert S.EDGE_MARGIN - 1e-9 <= obj.cy - half and obj.cy + half <= 1 - S.EDGE_MARGIN + 1e-9
            assert S.SIZE_RANGES[obj.size][0] <= obj.side <= S.SIZE_RANGES[obj.size][1]
        if spec.relation is None:
            position = spec.objects[0].position
            obj = scene.objects[0]
            limit = S.POSITION_RENDER_LIMIT
            assert {
                None: True,
                "on the left": obj.cx <= limit,
                "on the right": obj.cx >= 1 - limit,
                "at the top": obj.cy <= limit,
                "at the bottom": obj.cy >= 1 - limit,
            }[position]
        else:
            a, b = scene.objects
            holding = [r for r in S.RELATIONS if S.relation_holds(r, a, b)]
            assert holding == [spec.relation]  # exactly one relation: captions are unambiguous
            relations_seen[spec.relation] += 1
            # bounding boxes apart by OBJECT_GAP on the relation's axis, off-axis offset within the spread
            vertical = spec.relation in ("above", "below")
            main = abs(b.cy - a.cy) if vertical else abs(b.cx - a.cx)
            off = abs(b.cx - a.cx) if vertical else abs(b.cy - a.cy)
            assert main >= (a.side + b.side) / 2 + S.OBJECT_GAP - 1e-9
            assert off <= S.RELATION_SPREAD * main + 1e-9
    assert set(relations_seen) == set(S.RELATIONS)


# -------------------------------------------------------------------------------------- training stream


def test_sample_is_deterministic_and_random_access():
    for i in (0, 7, 123456):
        img_a, cap_a = S.sample(i, seed=2, size=64)
        img_b, cap_b = S.sample(i, seed=2, size=64)
        assert cap_a == cap_b and img_a.tobytes() == img_b.tobytes()
        assert S.matches(cap_a, img_a)
    assert [S.sample_scene(i, 0) for i in range(20)] != [S.sample_scene(i, 1) for i in range(20)]
    assert S.captions(5, seed=2, start=3) == [S.sample_scene(i, 2).caption for i in range(3, 8)]
    with pytest.raises(ConfigError):
        S.sample_scene(-1)


def test_stream_shards_and_resumes():
    def take(it, n):
        return [(img.tobytes(), cap) for img, cap in itertools.islice(it, n)]

    expected = [(img.tobytes(), cap) for img, cap in (S.sample(i, 4, 32) for i in range(12))]
    assert take(S.stream(seed=4, size=32), 12) == expected
    shards = [take(S.stream(seed=4, size=32, rank=r, world_size=3), 4) for r in range(3)]
    assert [x for group in zip(*shards) for x in group] == expected  # ranks interleave to the full stream
    # resuming rank 1 of 3 after it took 2 examples continues at global index 2 * 3 + 1
    assert take(S.stream(seed=4, size=32, start=2, rank=1, world_size=3), 2) == [expected[7], expected[10]]
    for bad in (dict(rank=2, world_size=2), dict(rank=-1), dict(world_size=0), dict(start=-1)):
        with pytest.raises(ConfigError):
            next(S.stream(**bad))


def test_training_distribution_covers_the_grammar():
    specs = [S.parse_caption(c) for c in S.captions(4000, seed=0)]
    pairs = Counter((o.colour, o.shape) for spec in specs for o in spec.objects)
    assert set(pairs) == set(S.SEEN_PAIRS) and len(S.SEEN_PAIRS) == 15
    two = sum(spec.relation is not None for spec in specs)
    assert 0.45 < two / len(specs) < 0.55
    assert {spec.relation for spec in specs} == {None, *S.RELATIONS}
    singles = [spec.objects[0] for spec in specs if spec.relation is None]
    assert {o.size for o in singles} == {None, *S.SIZES}
    assert {o.position for o in singles} == {None, *S.POSITIONS}
    captions = S.captions(400, seed=0)
    assert {next(p for p in S.PREFIXES[::-1] if c.startswith(p)) for c in captions} == set(S.PREFIXES)


def test_held_out_pairs_never_appear_in_training_data():
    assert S.HELD_OUT == {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
    assert all(S.is_held_out(*p) for p in S.HELD_OUT) and not S.is_held_out("red", "circle")
    for i in range(20000):
        scene = S.sample_scene(i, seed=i % 3)
        assert not any(phrase in scene.caption for phrase in HELD_OUT_PHRASES), scene.caption
        assert not any(S.is_held_out(o.colour, o.shape) for o in scene.objects)
        assert not any(S.is_held_out(o.colour, o.shape) for o in S.parse_caption(scene.caption).objects)
    for i in range(300):  # and the pixels agree
        img, _ = S.sample(i, seed=9, size=64)
        assert not any(S.is_held_out(o.colour, o.shape) for o in S.parse(img))


def test_dense_scenes_hold_many_separate_seen_objects_and_no_held_out_pair():
    counts = []
    for i in range(3000):
        scene = S.dense_scene(i, seed=i % 2)
        assert scene.caption == ""
        assert not any(S.is_held_out(o.colour, o.shape) for o in scene.objects)
        objs = scene.objects
        counts.append(len(objs))
        for a in range(len(objs)):
            o = objs[a]
            assert S.SIZE_RANGES["small"][0] <= o.side <= S.SIZE_RANGES["large"][1]
            assert S.EDGE_MARGIN <= o.cx - o.side / 2 and o.cx + o.side / 2 <= 1 - S.EDGE_MARGIN
            for b in range(a):
                gap = max(abs(o.cx - objs[b].cx), abs(o.cy - objs[b].cy)) - (o.side + objs[b].side) / 2
                assert gap >= S.DENSE_GAP - 1e-12
    assert min(counts) >= 3 and max(counts) <= S.DENSE_OBJECTS[1] and sum(counts) / len(counts) > 4.5
    assert S.dense_scene(7, seed=1) == S.dense_scene(7, seed=1) != S.dense_scene(7, seed=2)
    for i in range(100):  # the pixels agree: the checker finds exactly the drawn objects, none held out
        scene = S.dense_scene(i, seed=5)
        img, caption = S.dense_sample(i, seed=5, size=128)
        assert caption == "" and np.array_equal(np.asarray(img), np.asarray(S.render(scene, size=128)))
        found = S.parse(img)
        assert sorted((o.colour, o.shape) for o in found) == sorted(
            (o.colour, o.shape) for o in scene.objects
        )
        assert not any(S.is_held_out(o.colour, o.shape) for o in found)
    with pytest.raises(ConfigError):
        S.dense_scene(-1)


# ------------------------------------------------------------------------------------------------ checker


def _same_objects(scene: S.Scene, found: list[S.ShapeObject], size: int) -> bool:
    tol = 1.5 / size
    remaining = list(found)
    for obj in scene.objects:
        hit = next(
            (
                f
                for f in remaining
                if (f.colour, f.shape, f.size) == (obj.colour, obj.shape, obj.size)
                and abs(f.cx - obj.cx) <= tol
                and abs(f.cy - obj.cy) <= tol
            ),
            None,
        )
        if hit is None:
            return False
        remaining.remove(hit)
    return not remaining


def test_checker_is_exact_on_thousands_of_clean_renders():
    cases = [(S.sample_scene(i, seed=21), 128) for i in range(1500)]
    cases += [(S.sample_scene(i, seed=22), 64) for i in range(300)]
    cases += [(S.sample_scene(i, seed=23), 256) for i in range(100)]
    prompts = (
        S.EVAL_SETS["one_object_seen"]
        + S.EVAL_SETS["one_object_held_out"]
        + S.EVAL_SETS["two_objects_seen"][:200]
    )
    cases += [(S.make_scene(p, seed=k), 128) for k, p in enumerate(prompts)]
    failures = []
    for scene, size in cases:
        img = S.render(scene, size=size)
        found = S.parse(img)
        ok, reason = S.judge(scene.caption, found)
        if not (ok and _same_objects(scene, found, size)):
            failures.append((scene.caption, size, reason, S.describe(found)))
    assert not failures, failures[:5]
    assert len(cases) > 2000


def _wrong_captions(spec: S.CaptionSpec):
    """Captions that each change one thing the image shows, so that none of them can match it."""
    objs = list(spec.objects)
    opposite = {
        "on the left": "on the right",
        "on the right": "on the left",
        "at the top": "at the bottom",
        "at the bottom": "at the top",
    }
    for k, obj in enumerate(objs):
        other_colour = next(c for c in S.COLOURS if c != obj.colour)
        other_shape = next(s for s in S.SHAPES if s != obj.shape)
        for changed in (
            S.ObjectSpec(other_colour, obj.shape, obj.size, obj.position),
            S.ObjectSpec(obj.colour, other_shape, obj.size, obj.position),
        ):
            if len(objs) == 2 and changed.colour == objs[1 - k].colour and changed.shape == objs[1 - k].shape:
                continue  # both objects alike: swapping them could still describe the image
            yield S.CaptionSpec(tuple(changed if j == k else o for j, o in enumerate(objs)), spec.relation)
    if spec.relation is None:
        obj = objs[0]
        if obj.size:
            flipped = "small" if obj.size == "large" else "large"
            yield S.CaptionSpec((S.ObjectSpec(obj.colour, obj.shape, flipped, obj.position),))
        if obj.position:
            yield S.CaptionSpec((S.ObjectSpec(obj.colour, obj.shape, obj.size, opposite[obj.position]),))
        yield S.CaptionSpec((obj, S.ObjectSpec("red" if obj.colour != "red" else "blue", "circle")), "above")
    else:
        for relation in S.RELATIONS:
            if relation != spec.relation:
                yield S.CaptionSpec(spec.objects, relation)
        yield S.CaptionSpec(spec.objects[::-1], spec.relation)  # A above B -> B above A
        yield S.CaptionSpec(spec.objects[:1])


def test_checker_rejects_captions_that_differ_in_one_attribute():
    reasons = Counter()
    for i in range(250):
        scene = S.sample_scene(i, seed=31)
        img = S.render(scene)
        found = S.parse(img)
        for wrong in _wrong_captions(S.parse_caption(scene.caption)):
            ok, reason = S.judge(wrong, found)
            assert not ok, (scene.caption, S.make_caption(wrong))
            reasons[reason.split(":")[0]] += 1
    assert set(reasons) == {"count", "colour", "shape", "size", "position", "relation"}


def test_checker_tolerates_blur_noise_and_colour_cast():
    rng = np.random.default_rng(0)
    results = []
    for i in range(150):
        scene = S.sample_scene(i, seed=41)
        results.append(S.check(scene.caption, degrade(S.render(scene), rng))[0])
    for k, prompt in enumerate(S.EVAL_SETS["one_object_held_out"]):
        results.append(S.matches(prompt, degrade(S.render(prompt, seed=k), rng, blur=2.0, noise=15.0)))
    assert np.mean(results) >= 0.97  # 100% when measured


def test_checker_ignores_specks():
    rng = np.random.default_rng(1)
    for i in range(30):
        scene = S.sample_scene(i, seed=51)
        arr = np.asarray(S.render(scene)).copy()
        white = (arr == 255).all(-1)
        placed = 0
        while placed < 25:
            y, x = rng.integers(2, 122, size=2)
            if white[y - 2 : y + 6, x - 2 : x + 6].all():  # keep specks off the objects
                arr[y : y + 4, x : x + 4] = list(S.COLOURS.values())[int(rng.integers(6))]
                placed += 1
        assert S.matches(scene.caption, Image.fromarray(arr)), scene.caption


def test_parse_accepts_arrays_and_tensors():
    torch = pytest.importorskip("torch")
    img = S.render("a large yellow triangle to the left of a small blue circle", seed=2)
    expected = S.parse(img)
    arr = np.asarray(img)
    assert S.parse(arr) == expected
    assert S.parse(arr.astype(np.float32) / 255) == expected
    assert S.parse(np.concatenate([arr, np.full(arr.shape[:2] + (1,), 255, np.uint8)], -1)) == expected
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    assert S.parse(tensor) == expected and S.parse(tensor[None]) == expected
    assert S.parse(img.convert("RGBA")) == expected
    with pytest.raises(ValueError):
        S.parse(np.zeros((8, 8)))


def test_blank_or_cluttered_images_do_not_match():
    blank = Image.new("RGB", (128, 128), "white")
    assert S.parse(blank) == []
    assert S.check("a red circle", blank) == (False, "count: expected 1 object(s), found 0")
    grey = Image.new("RGB", (128, 128), (128, 128, 128))
    assert not S.matches("a green square", grey)
    two = S.render("a red circle above a blue square", seed=0)
    assert not S.matches("a red circle", two)


def test_parse_is_fast():
    images = [S.render(S.sample_scene(i, seed=61)) for i in range(60)]
    times = []
    for img in images:
        start = time.perf_counter()
        S.parse(img)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.005, statistics.median(times)  # ~1-2 ms measured on the 2-core CPU


# --------------------------------------------------------------------------------------- evaluation sets


def test_eval_sets_are_fixed_and_balanced():
    sets = S.EVAL_SETS
    assert {k: len(v) for k, v in sets.items()} == {
        "one_object_seen": 225,
        "two_objects_seen": 840,
        "one_object_held_out": 45,
    }
    assert sets["one_object_seen"][:3] == (
        "a red circle",
        "a red square on the left",
        "a red triangle on the right",
    )
    for name, prompts in sets.items():
        assert len(set(prompts)) == len(prompts)
        specs = [S.parse_caption(p) for p in prompts]
        pairs = [(o.colour, o.shape) for spec in specs for o in spec.objects]
        if name == "one_object_held_out":
            assert set(pairs) == set(S.HELD_OUT)
        else:
            assert set(pairs) == set(S.SEEN_PAIRS)
        assert all(p == S.make_caption(spec) for p, spec in zip(prompts, specs))  # plain template only
    one = [S.parse_caption(p).objects[0] for p in sets["one_object_seen"]]
    assert {(o.colour, o.shape) for o in one[:15]} == set(S.SEEN_PAIRS)  # every prefix of 15 covers all pairs
    assert Counter((o.size, o.position) for o in one) == Counter({v: 15 for v in S._ONE_OBJECT_VARIANTS})
    two = [S.parse_caption(p) for p in sets["two_objects_seen"]]
    assert Counter(s.relation for s in two[:100]) == Counter({r: 25 for r in S.RELATIONS})
    assert len({(s.objects, s.relation) for s in two}) == 840
    assert S.eval_prompts("one_object_held_out", 4) == list(sets["one_object_held_out"][:4])
    with pytest.raises(ConfigError):
        S.eval_prompts("nope")

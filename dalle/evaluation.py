"""Text-image alignment of a model on the shapes world, judged by the shapes checker.

:func:`evaluate` generates images for the fixed prompt sets of :data:`dalle.data.shapes.EVAL_SETS` (the first
``prompts_per_set`` of each, ``images_per_prompt`` images per prompt, temperature 1) and reports the share of
images the checker (:func:`dalle.data.shapes.check`) accepts, per set, with the reasons for failures. It also
measures the dVAE alone: the PSNR of reconstructions of rendered scenes, and how often the checker still
accepts the reconstruction.

Seeds: every generate call uses the same base ``seed``; the pipeline seeds image ``k`` of each prompt with
``seed + k`` independently of the other prompts in the call, so the results do not depend on how prompts are
grouped into calls or on ``batch_size``.

The model only needs ``generate(prompts, num_images=, seed=, temperature=, guidance_scale=, rerank=,
progress=)`` returning PIL images prompt by prompt, and, for the PSNR, ``encoder.encode``, ``decoder.decode``
and ``image_size`` (as :class:`dalle.pipeline.DALLE` has).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dalle.data import shapes
from dalle.errors import ConfigError

#: Accuracy targets of the bundled model (issue 7), shown beside the measured figures.
TARGETS: dict[str, float] = {"one_object_seen": 0.95, "two_objects_seen": 0.80, "one_object_held_out": 0.70}
DEFAULT_PROMPTS_PER_SET = 30
DEFAULT_IMAGES_PER_PROMPT = 4
_IMAGES_PER_CALL = 64  # prompts are sent in groups of about this many images, for progress messages


def evaluate(
    model: Any,
    prompts_per_set: int | None = DEFAULT_PROMPTS_PER_SET,
    images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT,
    seed: int = 0,
    guidance_scale: float | None = None,
    rerank: int | None = None,
    batch_size: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    sets: Sequence[str] | None = None,
    psnr_images: int = 32,
    examples_per_set: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate images for the evaluation prompt sets, judge them, and measure the dVAE's reconstructions.

    Args:
        model: a :class:`dalle.pipeline.DALLE` or anything with the same ``generate`` (see the module notes).
        prompts_per_set: the first N prompts of each set (None: all of them: 225 / 840 / 45).
        images_per_prompt: images generated (and judged) per prompt.
        seed: base seed of generation and of the rendered scenes for the PSNR.
        guidance_scale, rerank: passed to ``generate`` (None: off, as in the headline figures).
        batch_size: passed to ``generate`` (images sampled at once) and used for the dVAE; None: defaults.
        out_dir: when given, write ``results.json`` and ``examples.png`` (example images with verdicts) there.
        sets: names of the prompt sets (default: all of :data:`dalle.data.shapes.EVAL_SETS`).
        psnr_images: rendered scenes for the reconstruction PSNR (0 skips it).
        examples_per_set: images per set in the example grid (one per prompt).
        log: called with a line of progress now and then (e.g. ``print``).

    Returns:
        ``{"settings", "sets": {name: {"accuracy", "correct", "total", "target", "failures", "per_prompt"}},
        "reconstruction": {"psnr_mean", ...} or None, "seconds", "files"}`` (what ``results.json`` holds).
    """
    names = list(shapes.EVAL_SETS) if sets is None else list(sets)
    for name in names:
        if name not in shapes.EVAL_SETS:
            raise ConfigError(f"unknown evaluation set {name!r}; choose from {sorted(shapes.EVAL_SETS)}")
    if prompts_per_set is not None and (not isinstance(prompts_per_set, int) or prompts_per_set < 1):
        raise ConfigError(f"prompts_per_set must be a positive integer or None, got {prompts_per_set!r}")
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ConfigError(f"images_per_prompt must be a positive integer, got {images_per_prompt!r}")
    if psnr_images < 0 or examples_per_set < 0:
        raise ConfigError("psnr_images and examples_per_set must be >= 0")
    say = log or (lambda line: None)
    settings = {
        "model": getattr(model, "name", None),
        "prompts_per_set": prompts_per_set,
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "temperature": 1.0,
        "guidance_scale": guidance_scale,
        "rerank": rerank,
        "batch_size": batch_size,
        "image_size": getattr(model, "image_size", None),
    }
    results: dict[str, Any] = {"settings": settings, "sets": {}, "reconstruction": None, "seconds": {}}
    examples: list[tuple[Image.Image, str]] = []
    gen_seconds = judge_seconds = 0.0
    for name in names:
        prompts = shapes.eval_prompts(name, prompts_per_set)
        per_prompt: list[dict[str, Any]] = []
        failures: Counter[str] = Counter()
        group = max(1, _IMAGES_PER_CALL // images_per_prompt)
        for start in range(0, len(prompts), group):
            chunk = prompts[start : start + group]
            t0 = time.perf_counter()
            images = _generate(model, chunk, images_per_prompt, seed, guidance_scale, rerank, batch_size)
            t1 = time.perf_counter()
            for j, prompt in enumerate(chunk):
                verdicts = [
                    shapes.check(prompt, img)
                    for img in images[j * images_per_prompt : (j + 1) * images_per_prompt]
                ]
                for ok, reason in verdicts:
                    if not ok:
                        failures[reason.split(":")[0]] += 1
                per_prompt.append(
                    {"prompt": prompt, "correct": sum(ok for ok, _ in verdicts), "total": len(verdicts)}
                )
                if start + j < examples_per_set:
                    ok, reason = verdicts[0]
                    examples.append((images[j * images_per_prompt], ("OK  " if ok else "NO  ") + prompt))
            judge_seconds += time.perf_counter() - t1
            gen_seconds += t1 - t0
            say(f"{name}: {min(start + group, len(prompts))}/{len(prompts)} prompts")
        correct = sum(p["correct"] for p in per_prompt)
        total = sum(p["total"] for p in per_prompt)
        results["sets"][name] = {
            "accuracy": correct / total,
            "correct": correct,
            "total": total,
            "prompts": len(prompts),
            "target": TARGETS.get(name),
            "failures": dict(failures.most_common()),
            "per_prompt": per_prompt,
        }
        say(f"{name}: accuracy {correct / total:.1%} ({correct}/{total})")
    results["seconds"]["generate"] = round(gen_seconds, 3)
    results["seconds"]["judge"] = round(judge_seconds, 3)
    if psnr_images:
        t0 = time.perf_counter()
        recon, recon_examples = _reconstruction(model, psnr_images, seed, batch_size)
        results["reconstruction"] = recon
        results["seconds"]["reconstruction"] = round(time.perf_counter() - t0, 3)
        examples += recon_examples[:examples_per_set]
        say(f"dVAE reconstruction: PSNR {recon['psnr_mean']:.2f} dB on {recon['images']} rendered scenes")
    results["files"] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if examples and examples_per_set:
            grid_path = out / "examples.png"
            ncols = examples_per_set
            _grid([img for img, _ in examples], ncols, [cap for _, cap in examples]).save(grid_path)
            results["files"]["examples"] = str(grid_path)
        json_path = out / "results.json"
        results["files"]["results"] = str(json_path)
        json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _generate(
    model: Any,
    prompts: list[str],
    k: int,
    seed: int,
    guidance_scale: float | None,
    rerank: int | None,
    batch_size: int | None,
) -> list[Image.Image]:
    kwargs: dict[str, Any] = dict(
        num_images=k, seed=seed, temperature=1.0, guidance_scale=guidance_scale, rerank=rerank, progress=False
    )
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    images = list(model.generate(prompts, **kwargs))
    if len(images) != len(prompts) * k:
        raise RuntimeError(f"generate returned {len(images)} images for {len(prompts)} prompts x {k}")
    return images


def _module_device(model: Any) -> Any:
    import torch

    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    for module in (getattr(model, "encoder", None), getattr(model, "decoder", None)):
        params = getattr(module, "parameters", None)
        if params is not None:
            for p in params():
                return p.device
    return torch.device("cpu")


def _preprocess(image: Image.Image, size: int) -> Any:
    """Mapped pixels [1, 3, size, size] for the encoder."""
    try:
        from dalle.images import preprocess
    except ImportError:  # the images module is optional for this path: the scenes are already size x size
        import torch

        from dalle.dvae import map_pixels

        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        return map_pixels(x[None].contiguous())
    return preprocess(image, size)


def reconstruction_psnr(
    model: Any, num_images: int = 32, seed: int = 0, batch_size: int | None = None
) -> dict[str, Any]:
    """PSNR (dB, peak 1.0) of ``decoder.decode(encoder.encode(x))`` on rendered evaluation scenes.

    Scenes cycle through the evaluation sets (held-out pairs and two-object scenes included), drawn at
    ``model.image_size`` with seeds ``seed, seed + 1, ...``. Also reports the checker's accuracy on the
    reconstructions, a check that the dVAE keeps what the checker reads, overall and per evaluation set
    (``checker_by_set``): a guide to what a transformer on top of this dVAE can reach on that set. It is not
    a strict bound: a transformer may emit token grids that decode more cleanly than the encoder's argmax
    codes of a rendered scene.
    """
    return _reconstruction(model, num_images, seed, batch_size)[0]


def _reconstruction(
    model: Any, num_images: int, seed: int, batch_size: int | None
) -> tuple[dict[str, Any], list[tuple[Image.Image, str]]]:
    import torch

    size = int(model.image_size)
    names = list(shapes.EVAL_SETS)
    pools = [shapes.EVAL_SETS[name] for name in names]
    set_of = [names[i % len(pools)] for i in range(num_images)]
    prompts = [
        pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(num_images)
    ]
    scenes = [shapes.render(p, size=size, seed=seed + i) for i, p in enumerate(prompts)]
    device = _module_device(model)
    bs = batch_size or 16
    psnrs: list[float] = []
    accepted = 0
    by_set: dict[str, dict[str, Any]] = {}
    examples = []
    for start in range(0, num_images, bs):
        batch = scenes[start : start + bs]
        x = torch.cat([_preprocess(img, size) for img in batch]).to(device)
        with torch.no_grad():
            out = model.decoder.decode(model.encoder.encode(x)).float().clamp(0, 1).cpu()
        ref = torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in batch]))
        ref = ref.permute(0, 3, 1, 2)
        mse = ((out - ref) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        arrays = (out.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
        for j, m in enumerate(mse.tolist()):
            psnr = 10.0 * math.log10(1.0 / m)
            psnrs.append(psnr)
            recon = Image.fromarray(arrays[j], "RGB")
            ok = shapes.matches(prompts[start + j], recon)
            accepted += ok
            counts = by_set.setdefault(set_of[start + j], {"accepted": 0, "images": 0})
            counts["accepted"] += int(ok)
            counts["images"] += 1
            examples.append((recon, f"{'OK' if ok else 'NO'}  dVAE {psnr:.1f} dB: {prompts[start + j]}"))
    result = {
        "images": num_images,
        "psnr_mean": float(np.mean(psnrs)),
        "psnr_min": float(np.min(psnrs)),
        "psnr_max": float(np.max(psnrs)),
        "checker_accuracy": accepted / num_images,
        "checker_by_set": {
            name: {**c, "accuracy": c["accepted"] / c["images"]} for name, c in by_set.items()
        },
    }
    return result, examples


def _grid(images: list[Image.Image], ncols: int, captions: list[str]) -> Image.Image:
    try:
        from dalle.images import make_grid
    except ImportError:
        return _simple_grid(images, ncols, captions)
    return make_grid(images, ncols=ncols, captions=captions)


def _simple_grid(images: list[Image.Image], ncols: int, captions: list[str]) -> Image.Image:
    """A plain grid with each caption wrapped under its image (used when dalle.images is not available)."""
    w = max(img.width for img in images)
    h = max(img.height for img in images)
    lines = [textwrap.wrap(c, max(8, w // 6)) or [""] for c in captions]
    text_h = 11 * max(len(ls) for ls in lines) + 4
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    pad = 2
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + text_h + pad) + pad), (160, 160, 160))
    draw = ImageDraw.Draw(canvas)
    for i, (img, ls) in enumerate(zip(images, lines)):
        x = pad + (i % ncols) * (w + pad)
        y = pad + (i // ncols) * (h + text_h + pad)
        draw.rectangle([x, y + h, x + w - 1, y + h + text_h - 1], fill=(255, 255, 255))
        canvas.paste(img.convert("RGB"), (x, y))
        for k, line in enumerate(ls):
            draw.text((x + 2, y + h + 2 + 11 * k), line, fill=(0, 0, 0))
    return canvas


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate`'s results, as ``dalle evaluate`` prints it."""
    s = results["settings"]
    lines = [
        f"model {s.get('model')}: {s['images_per_prompt']} images per prompt, seed {s['seed']}, "
        "temperature 1, "
        f"guidance {s['guidance_scale'] or 'off'}, rerank {s['rerank'] or 'off'}",
        f"{'prompt set':<22} {'accuracy':>9} {'correct':>13} {'target':>7}",
    ]
    for name, r in results["sets"].items():
        target = f"{r['target']:.0%}" if r.get("target") is not None else "-"
        lines.append(f"{name:<22} {r['accuracy']:>9.1%} {r['correct']:>6}/{r['total']:<6} {target:>7}")
        if r["failures"]:
            lines.append(" " * 23 + "failures: " + ", ".join(f"{k} {v}" for k, v in r["failures"].items()))
    rec = results.get("reconstruction")
    if rec:
        lines.append(
            f"dVAE reconstruction PSNR {rec['psnr_mean']:.2f} dB (min {rec['psnr_min']:.2f}) "
            f"on {rec['images']} "
            f"rendered scenes; checker accepts {rec['checker_accuracy']:.0%} of reconstructions"
        )
        by_set = rec.get("checker_by_set") or {}
        if len(by_set) > 1:
            lines.append(
                " " * 23
                + "by set: "
                + ", ".join(
                    f"{name} {c['accuracy']:.0%} ({c['accepted']}/{c['images']})"
                    for name, c in by_set.items()
                )
            )
    for kind, path in results.get("files", {}).items():
        lines.append(f"wrote {kind}: {path}")
    return "\n".join(lines)


__all__ = ["TARGETS", "evaluate", "format_results", "reconstruction_psnr"]

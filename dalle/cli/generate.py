"""``dalle generate``, ``dalle complete`` and ``dalle demo``: text to image with a model directory or name."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dalle.cli import add_threads_flag

if TYPE_CHECKING:  # pragma: no cover
    from dalle.pipeline import GenerationOutput

ORDER = 10

#: the demo's prompts and what each shows of the bundled shapes models: what they draw well (one object, two
#: objects and their relation, positions) and one colour-shape pair they never saw (held out of all training)
DEMO = (
    ("a large red circle", "one object: what the model draws best"),
    ("a small blue square on the left", "one object, its size and position"),
    ("a yellow triangle above a green square", "two objects and how they are placed"),
    ("a purple square at the bottom", "one object and its position"),
    ("a large green triangle", "never seen in training: green triangles are held out of all training data"),
)
DEMO_PROMPTS = tuple(prompt for prompt, _ in DEMO)


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def parse_seed(text: str) -> int:
    """An argparse type: a seed from 0 to 2**32 - 1 (CPU generators would repeat larger seeds' images)."""
    value = _non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**32 = {2**32}, got {value}")
    return value


def _float(text: str, zero_ok: bool = False) -> float:
    """A number > 0 (or >= 0 with ``zero_ok``) for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 if zero_ok else value > 0):
        raise argparse.ArgumentTypeError(f"expected a number {'>=' if zero_ok else '>'} 0, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    return _float(text, zero_ok=True)


def _positive_float(text: str) -> float:
    return _float(text)


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="model directory or registered name: shapes, shapes-128, or rudalle-malevich, "
        "rudalle-malevich-v2, rudalle-emojich, rudalle-surrealist-xl, rudalle-kandinsky (downloaded "
        "and converted on first use) (default: the bundled shapes model)",
    )
    p.add_argument("-n", "--num-images", type=_positive_int, default=4, help="images per prompt (default 4)")
    p.add_argument(
        "--seed", type=parse_seed, default=None, help="base seed; image k uses seed+k (default: random)"
    )
    p.add_argument(
        "--temperature",
        type=_nonnegative_float,
        default=1.0,
        help="sampling temperature (default 1, the paper's); 0 is greedy decoding (the most likely token "
        "at every cell, the same image for every seed)",
    )
    p.add_argument(
        "--top-k",
        type=_non_negative_int,
        default=None,
        help="sample among the k likeliest tokens; 0 turns it off (default: the model's, e.g. 1024 for "
        "ruDALL-E models, none for dalle models)",
    )
    p.add_argument(
        "--top-p",
        type=_probability,
        default=None,
        help="nucleus sampling probability mass; 1 turns it off (default: the model's, e.g. 0.99 for "
        "ruDALL-E models, none for dalle models)",
    )
    p.add_argument(
        "--sampler",
        choices=("race", "multinomial"),
        default=None,
        help="how a token is drawn: race (exponential race) or multinomial (torch.multinomial, as "
        "rudalle) (default: the model's; race for dalle models, multinomial for ruDALL-E models)",
    )
    p.add_argument(
        "--filter",
        choices=("dalle", "rudalle"),
        default=None,
        help="top-k/top-p rule: dalle's or rudalle's (transformers' top_k_top_p_filtering) (default: "
        "the model's; dalle for dalle models, rudalle for ruDALL-E models)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the one-token decode step with torch.compile (CUDA graphs on CUDA); the first "
        "image pays the compilation (default: off)",
    )
    p.add_argument("--guidance", type=_positive_float, default=None, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images sampled at once")
    add_threads_flag(p)
    p.add_argument(
        "--output", default=None, help="grid PNG to write (default: generated.png if no --output-dir)"
    )
    p.add_argument("--output-dir", default=None, help="also write one PNG per image into this directory")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar, print only the written paths")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle generate``, ``dalle complete`` and ``dalle demo`` to the subcommand parsers."""
    p = sub.add_parser("generate", help="generate images from a text prompt")
    p.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    _add_sampling_args(p)
    p.add_argument(
        "--rerank",
        type=_positive_int,
        default=None,
        help="draw N candidates, keep the best -n by the model's own score (for ruDALL-E models "
        "rudalle's perplexity, lowest kept) (default: no reranking)",
    )
    p.set_defaults(func=run_generate)

    c = sub.add_parser("complete", help="complete the bottom of an image from a prompt (image priming)")
    c.add_argument("image", help="image file whose top rows are kept")
    c.add_argument("prompt", help="caption for the completed image")
    c.add_argument(
        "--rows", type=_non_negative_int, default=None, help="token rows kept (default: 15/32 of grid)"
    )
    c.add_argument("--allow-upscale", action="store_true", help="accept images smaller than the model's size")
    _add_sampling_args(c)
    c.set_defaults(func=run_complete)

    d = sub.add_parser("demo", help="generate a grid for a few prompts with the bundled model")
    d.add_argument("--output-dir", default="outputs", help="where to write demo.png (default: outputs)")
    d.add_argument(
        "--model", default=None, help="model directory or registered name (default: the bundled shapes model)"
    )
    d.add_argument("--seed", type=parse_seed, default=0, help="base seed (default 0)")
    d.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add_threads_flag(d)
    d.set_defaults(func=run_demo)


def _slug(text: str, limit: int = 40) -> str:
    # letters of any script stay (a Russian prompt gives a Russian file name), everything else becomes "-"
    return re.sub(r"[\W_]+", "-", text.lower()).strip("-")[:limit] or "image"


def _settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    keys = ("temperature", "top_k", "top_p", "guidance", "rerank", "rows", "sampler", "filter")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    out.update(extra)
    return out


def _write(
    args: argparse.Namespace, pipe: Any, result: Any, prompts: list[str], extra: dict[str, Any]
) -> None:
    import dalle
    from dalle.images import make_grid, save_png

    settings = json.dumps(_settings(args, **extra), sort_keys=True)
    base_meta = {"model": pipe.name, "settings": settings, "software": f"dalle {dalle.__version__}"}
    output = args.output
    if output is None and args.output_dir is None:
        output = "generated.png"
    if args.output_dir is not None:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (img, prompt, seed) in enumerate(zip(result.images, result.prompts, result.seeds)):
            path = out_dir / f"{i:03d}-{_slug(prompt)}-seed{seed}.png"
            save_png(img, path, {**base_meta, "prompt": prompt, "seed": str(seed)})
            print(path)
    if output is not None:
        path = Path(output)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        ncols = args.num_images if len(prompts) > 1 else min(args.num_images, 8)
        grid = make_grid(result.images, ncols=ncols)
        meta = {**base_meta, "prompt": " | ".join(prompts), "seed": ",".join(str(s) for s in result.seeds)}
        save_png(grid, path, meta)
        print(path)


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse output paths that cannot be written before any image is sampled (creating their folders)."""
    from dalle.cli import UsageError

    targets = []
    if args.output is not None or args.output_dir is None:
        path = Path(args.output or "generated.png")
        if path.is_dir():
            raise UsageError(
                f"--output {str(path)!r} is a directory; give a file name such as {str(path / 'grid.png')!r}"
            )
        if path.suffix.lower() != ".png":
            raise UsageError(
                f"--output {str(path)!r} must end in .png (the images carry their prompt, seed and "
                "settings as PNG metadata)"
            )
        targets.append(("--output", path.parent))
    if args.output_dir is not None:
        targets.append(("--output-dir", Path(args.output_dir)))
    for flag, folder in targets:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the folder {str(folder)!r} for {flag}: {exc.strerror or exc}"
            ) from None
        if not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write into {str(folder)!r} ({flag}): permission denied")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments `generate` and `complete` share, from the common sampling flags."""
    return {
        "num_images": args.num_images,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "guidance_scale": args.guidance,
        "batch_size": args.batch_size,
        "progress": not args.quiet,
        "return_tokens": True,
        "sampler": args.sampler,
        "filter": args.filter,
    }


def run_generate(args: argparse.Namespace) -> int:
    """Run ``dalle generate``: sample images for the prompts and write them; returns the exit code."""
    from dalle.cli import UsageError
    from dalle.pipeline import DALLE

    if args.rerank is not None and args.rerank < args.num_images:
        raise UsageError(f"--rerank {args.rerank} must be at least -n {args.num_images}")
    _check_outputs(args)
    pipe = DALLE.from_pretrained(args.model, device=args.device, compile=args.compile)
    result = pipe.generate(
        args.prompt,
        **_sampling_kwargs(args),
        rerank=args.rerank,
    )
    _write(args, pipe, result, list(args.prompt), {})
    return 0


def run_complete(args: argparse.Namespace) -> int:
    """Run ``dalle complete``: keep the top token rows of an image and sample the rest; returns the exit
    code."""
    from dalle.cli import UsageError
    from dalle.pipeline import DALLE

    _check_outputs(args)
    pipe = DALLE.from_pretrained(args.model, device=args.device, compile=args.compile)
    if args.rows is not None and args.rows > pipe.grid:
        raise UsageError(f"--rows {args.rows} exceeds the model's {pipe.grid} token rows")
    rows = pipe.completion_rows if args.rows is None else args.rows
    result = pipe.complete(
        args.image,
        args.prompt,
        rows=rows,
        **_sampling_kwargs(args),
        allow_upscale=args.allow_upscale,
    )
    _write(args, pipe, result, [args.prompt], {"source_image": str(args.image), "rows": rows})
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run ``dalle demo``: one image for each demo prompt with the bundled model, as a grid; returns 0."""
    import dalle
    from dalle.images import make_grid, save_png
    from dalle.pipeline import DALLE

    start = time.perf_counter()
    pipe = DALLE.from_pretrained(args.model, device=args.device)
    loaded = time.perf_counter()
    result = cast(
        "GenerationOutput",
        pipe.generate(  # return_tokens=True: a GenerationOutput
            list(DEMO_PROMPTS), num_images=1, seed=args.seed, progress=True, return_tokens=True
        ),
    )
    done = time.perf_counter()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = make_grid(result.images, ncols=len(DEMO_PROMPTS), captions=list(DEMO_PROMPTS))
    path = out_dir / "demo.png"
    settings = {"command": "demo", "num_images": 1, "temperature": 1.0, "device": str(pipe.device)}
    save_png(
        grid,
        path,
        {
            "model": pipe.name,
            "prompt": " | ".join(DEMO_PROMPTS),
            "seed": ",".join(str(s) for s in result.seeds),
            "settings": json.dumps(settings, sort_keys=True),
            "software": f"dalle {dalle.__version__}",
        },
    )
    print(
        f"model {pipe.name!r} on {pipe.device}: loaded in {loaded - start:.1f} s, "
        f"{len(result.images)} images in {done - loaded:.1f} s"
    )
    bundled = pipe.name in ("shapes", "shapes-128")
    print("prompts, left to right:")
    for i, (prompt, note) in enumerate(DEMO, 1):
        print(f"  {i}. {prompt}" + (f"  ({note})" if bundled else ""))
    print(f"wrote {path.resolve()}")
    return 0

"""``dalle evaluate``: text-image alignment on the shapes world, judged by the shapes checker."""

from __future__ import annotations

import argparse

from dalle.cli import add_threads_flag
from dalle.cli.generate import parse_seed

ORDER = 40
# Same as dalle.evaluation's defaults (a test checks); written out so that `dalle --help` stays fast.
DEFAULT_PROMPTS_PER_SET = 30
DEFAULT_IMAGES_PER_PROMPT = 4


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle evaluate`` to the subcommand parsers."""
    p = sub.add_parser(
        "evaluate",
        help="measure how often generated images match their shapes-world prompts",
        description=(
            "Generate images for the fixed shapes-world prompt sets (one object, two objects with a "
            "relation, held-out colour-shape pairs), judge each with the shapes checker, measure the dVAE's "
            "reconstruction PSNR, print a table and write results.json and examples.png."
        ),
    )
    p.add_argument(
        "--model", default=None, help="model directory or registered name (default: the bundled shapes model)"
    )
    p.add_argument("--out", default="outputs/evaluate", help="output directory (default: outputs/evaluate)")
    p.add_argument("--guidance", type=float, default=None, metavar="G", help="classifier-free guidance scale")
    p.add_argument("--rerank", type=int, default=None, metavar="N", help="draw N candidates, keep the best")
    p.add_argument(
        "--images-per-prompt",
        type=int,
        default=DEFAULT_IMAGES_PER_PROMPT,
        metavar="K",
        help=f"images per prompt (default {DEFAULT_IMAGES_PER_PROMPT})",
    )
    p.add_argument(
        "--prompts-per-set",
        type=int,
        default=DEFAULT_PROMPTS_PER_SET,
        metavar="N",
        help=f"first N prompts of each set (default {DEFAULT_PROMPTS_PER_SET}; 0 for all)",
    )
    p.add_argument("--sets", default=None, help="comma-separated prompt sets (default: all)")
    p.add_argument("--seed", type=parse_seed, default=0, metavar="S", help="base seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="images sampled at once")
    p.add_argument(
        "--psnr-images", type=int, default=32, metavar="N", help="rendered scenes for the dVAE PSNR"
    )
    add_threads_flag(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``dalle evaluate``: score a model on the shapes prompt sets; returns the exit code."""
    import sys

    from dalle.cli import UsageError
    from dalle.data.shapes import EVAL_SETS
    from dalle.evaluation import evaluate, format_results

    if args.images_per_prompt < 1:
        raise UsageError("--images-per-prompt must be at least 1")
    if args.prompts_per_set < 0 or args.psnr_images < 0:
        raise UsageError("--prompts-per-set and --psnr-images must be >= 0")
    if args.rerank is not None and args.rerank < args.images_per_prompt:
        raise UsageError("--rerank N needs N >= --images-per-prompt")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    sets = None
    if args.sets:
        sets = [s.strip() for s in args.sets.split(",") if s.strip()]
        unknown = [s for s in sets if s not in EVAL_SETS]
        if unknown:
            raise UsageError(
                f"unknown prompt set(s) {', '.join(unknown)}; choose from {', '.join(EVAL_SETS)}"
            )

    from dalle.pipeline import DALLE

    model = DALLE.from_pretrained(args.model, device=args.device)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = evaluate(
        model,
        prompts_per_set=args.prompts_per_set or None,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        guidance_scale=args.guidance,
        rerank=args.rerank,
        batch_size=args.batch_size,
        out_dir=args.out,
        sets=sets,
        psnr_images=args.psnr_images,
        log=log,
    )
    print(format_results(results))
    return 0

"""``dalle convert``: turn ruDALL-E's released files into a dalle model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ORDER = 40


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle convert`` to the subcommand parsers."""
    from dalle.rudalle import PRESET_NAMES, RUDALLE_HUB

    p = sub.add_parser(
        "convert",
        help="convert ruDALL-E weights (a registered name or local files) into a dalle model directory",
        description=(
            "Write a dalle model directory (safetensors weights in their own dtype, float16 kept; "
            "the tokenizer; config.json) from ruDALL-E's files: either SOURCE, a registered name "
            f"({', '.join(RUDALLE_HUB)}), whose files are downloaded from the Hugging Face Hub "
            "into the cache, or local files given with --transformer, --vqgan and --bpe. "
            'Then: dalle generate --model OUT "..."'
        ),
    )
    p.add_argument(
        "source",
        nargs="?",
        default=None,
        metavar="SOURCE",
        help="registered ruDALL-E name to download (omit it when giving --transformer/--vqgan/--bpe)",
    )
    p.add_argument("out", metavar="OUT", help="model directory to write (created; files in it are replaced)")
    p.add_argument(
        "--transformer",
        default=None,
        metavar="FILE",
        help="rudalle transformer checkpoint, e.g. pytorch_model_v3.bin (default: none; local mode)",
    )
    p.add_argument(
        "--preset",
        default=None,
        choices=PRESET_NAMES,
        help="configuration of --transformer (default: malevich; with SOURCE, the model's own)",
    )
    p.add_argument(
        "--vqgan",
        default=None,
        metavar="FILE",
        help="VQGAN checkpoint, e.g. vqgan.gumbelf8-sber.model.ckpt (default: none; local mode)",
    )
    p.add_argument(
        "--bpe", default=None, metavar="FILE", help="youtokentome bpe.model (default: none; local mode)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="replace a field of the preset's RuDalleConfig, e.g. --set depth=2 (repeatable; values are "
        "JSON, else strings; default: none) -- for custom or test checkpoints",
    )
    p.add_argument(
        "--name", default=None, help="model name stored in config.json (default: OUT's folder name)"
    )
    p.add_argument(
        "--quiet", action="store_true", help="no download progress bar (default: shown on a terminal)"
    )
    p.set_defaults(func=run)


def _overrides(items: list[str]) -> dict[str, Any]:
    from dalle.cli import UsageError

    out: dict[str, Any] = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[field] = json.loads(text)
        except json.JSONDecodeError:
            out[field] = text
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``dalle convert``; returns the exit code."""
    from dalle.cli import UsageError
    from dalle.hub import convert_rudalle, download_rudalle
    from dalle.rudalle import RUDALLE_HUB

    local = {"--transformer": args.transformer, "--vqgan": args.vqgan, "--bpe": args.bpe}
    overrides = _overrides(args.overrides)
    if args.source is not None:
        if args.source not in RUDALLE_HUB:
            raise UsageError(
                f"unknown SOURCE {args.source!r}: choose one of {', '.join(RUDALLE_HUB)}, or give local "
                "files with --transformer, --vqgan and --bpe instead"
            )
        if any(local.values()):
            raise UsageError("give either SOURCE or --transformer/--vqgan/--bpe, not both")
        entry = RUDALLE_HUB[args.source]
        if args.preset is not None and args.preset != entry["preset"]:
            raise UsageError(f"{args.source} is a {entry['preset']!r} model; leave --preset out")
        files = download_rudalle(args.source, progress=False if args.quiet else None)
        preset = entry["preset"]
        source = {"preset": preset, "repos": list(entry["repos"]), "filename": entry["filename"]}
        name = args.name or args.source
    else:
        missing = [flag for flag, value in local.items() if value is None]
        if missing:
            raise UsageError(f"without SOURCE, give the local files: {', '.join(missing)} missing")
        for flag, value in local.items():
            if not Path(value).is_file():
                raise UsageError(f"{flag} {value!r} is not a file")
        files = {"transformer": args.transformer, "vqgan": args.vqgan, "bpe": args.bpe}
        preset = args.preset or "malevich"
        source = {"preset": preset, "transformer": Path(args.transformer).name}
        name = args.name
    path = convert_rudalle(
        args.out,
        files["transformer"],
        files["vqgan"],
        files["bpe"],
        preset,
        name=name,
        overrides=overrides or None,
        source=source,
    )
    print(f"wrote {path}")
    return 0

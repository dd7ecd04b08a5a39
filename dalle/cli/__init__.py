"""The ``dalle`` command.

Each module in this package (other than the ``_``-prefixed ones) defines one group of subcommands through a
``register(subparsers)`` function that adds its parsers and sets ``func`` to a callable taking the parsed
arguments and returning an exit code. Exit codes: 0 success, 2 bad arguments, 1 any other error, 130 when
interrupted. Errors print one line; ``--debug`` prints the traceback too.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback
import warnings
from collections.abc import Sequence


class UsageError(Exception):
    """A command-line argument is invalid in a way argparse cannot check; exits with code 2."""


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command (applied by :func:`main` before it runs)."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: torch's, one per core). On a machine that other programs keep "
        "busy, one thread per core runs several times slower than fewer threads: then pass the "
        "number of idle cores (e.g. --threads 1 on 2 cores with one other busy program)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``dalle`` argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dalle",
        description="DALL-E in PyTorch: generate images from text, reconstruct images, train models.",
    )
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        modules.append(importlib.import_module(f"{__name__}.{info.name}"))
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 50), m.__name__)):
        module.register(sub)
    for subparser in sub.choices.values():  # a UsageError prints the usage of the subcommand it concerns
        subparser.set_defaults(_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on bad arguments
    if not args.debug:
        # warnings meant for users (caption truncated, ...) print as one line, not as a source excerpt
        warnings.formatwarning = lambda message, category, *rest, **kw: f"warning: {message}\n"
    try:
        threads = getattr(args, "threads", None)
        if threads is not None:
            if threads < 1:
                raise UsageError(f"--threads must be at least 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        return int(args.func(args) or 0)
    except UsageError as exc:
        getattr(args, "_parser", parser).error(str(exc))  # prints the subcommand's usage and exits with 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI turns every error into one line
        from dalle.errors import DalleError

        if args.debug:
            traceback.print_exc()
        if isinstance(exc, DalleError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            hint = "" if args.debug else " (run with --debug for the traceback)"
            print(f"error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return 1
    return 0  # unreachable; keeps type checkers happy

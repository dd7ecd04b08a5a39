"""``dalle info``: versions, compute device and cache location."""

from __future__ import annotations

import argparse
import platform

ORDER = 90


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle info`` to the subcommand parsers."""
    p = sub.add_parser("info", help="print versions, the compute device and where the cache is")
    p.add_argument("--model", default=None, help="also describe this model directory or registered name")
    p.set_defaults(func=run)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    """Run ``dalle info``: print versions, devices, the cache and a model summary; returns 0."""
    import torch

    import dalle
    from dalle.loading import cache_dir

    print(f"dalle        {dalle.__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    print(f"torch        {torch.__version__}")
    for dist in ("torchvision", "youtokentome", "safetensors", "numpy", "pillow"):
        found = _version(dist)
        if dist == "youtokentome" and found == "not installed":
            found += " (optional: captions use dalle's pure-Python BPE encoder, same ids)"
        print(f"{dist:<12} {found}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device       cuda ({names})")
    else:
        print(f"device       cpu ({torch.get_num_threads()} threads; no CUDA device found)")
    print(f"cache        {cache_dir()}")
    if args.model is not None:
        from dalle.pipeline import describe_model

        print(describe_model(args.model))
    return 0

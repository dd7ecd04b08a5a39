"""Benchmark: captions -> padded LongTensor with BPETokenizer.encode, next to youtokentome alone.

    .venv/bin/python benchmarks/bench_tokenizer.py [--n 10000] [--repeats 21] [--text-len 256]

Trains a tokenizer on synthetic shapes-world captions, then times (median of --repeats runs, same process,
same youtokentome object) youtokentome's batch encode of the raw captions (list of id lists) against the
full ``encode`` (normalise + youtokentome + padded tensor), and the pieces of the latter. Captions are
already lowercase, so youtokentome alone does the same BPE work. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch

from dalle.tokenizer import BPETokenizer, normalize

TARGET_MS = 100.0

_COLORS = "red green blue yellow purple orange black white gray pink cyan brown teal olive navy".split()
_SHAPES = "circle square triangle star hexagon pentagon cross heart diamond ellipse ring arrow".split()
_SIZES = "small large tiny big medium huge".split()
_RELS = ["to the left of", "to the right of", "above", "below", "next to", "on top of", "inside", "behind"]
_STYLES = ["", "", "on a white background", "drawn in outline", "with a thick border", "in the corner"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` varied lowercase captions (8 to 25 words)."""
    rng = random.Random(seed)
    caps = []
    for _ in range(n):
        parts = [f"a {rng.choice(_SIZES)} {rng.choice(_COLORS)} {rng.choice(_SHAPES)}"]
        for _ in range(rng.randint(1, 3)):
            parts.append(f"{rng.choice(_RELS)} a {rng.choice(_COLORS)} {rng.choice(_SHAPES)}")
        style = rng.choice(_STYLES)
        caps.append(", ".join(parts) + (f" {style}" if style else "") + rng.choice(["", ".", "!"]))
    return caps


def median_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU of all threads) of ``fn()`` in milliseconds, after a warm-up call.

    CPU time is less disturbed than wall time when other processes share the cores.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the markdown table; returns 0 when the target is met, else 1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="captions per encode call (default 10000)")
    parser.add_argument("--repeats", type=int, default=21, help="timed runs per row (default 21)")
    parser.add_argument("--text-len", type=int, default=256, help="text positions (default 256)")
    parser.add_argument("--vocab-size", type=int, default=200, help="tokenizer vocabulary (default 200)")
    parser.add_argument("--threads", type=int, default=-1, help="youtokentome encode threads (-1: all cores)")
    args = parser.parse_args(argv)

    try:
        import youtokentome  # noqa: F401
    except ImportError:
        sys.exit(
            "bench_tokenizer.py measures dalle's tokenizer against youtokentome, which is not installed: "
            "`make setup` installs it (or pip install cython setuptools wheel && "
            "pip install --no-build-isolation youtokentome)"
        )
    captions = make_captions(args.n)
    t0 = time.perf_counter()
    tok = BPETokenizer.train(make_captions(2000, seed=1), vocab_size=args.vocab_size, strict=True)
    train_ms = (time.perf_counter() - t0) * 1e3
    tok = BPETokenizer.from_bytes(tok.to_bytes(), n_threads=args.threads)
    bpe = tok._bpe  # the very youtokentome object encode() uses

    assert [normalize(c) for c in captions] == captions  # so youtokentome alone does the same work
    rows = bpe.encode(captions)
    n_tokens = sum(map(len, rows))
    assert tok.encode(captions, text_len=args.text_len).tolist()[0][: len(rows[0])] == rows[0]

    results = [
        (
            "youtokentome alone: `bpe.encode(captions)` -> id lists",
            median_ms(lambda: bpe.encode(captions), args.repeats),
        ),
        (
            "**`tok.encode(captions, text_len)` -> LongTensor**",
            median_ms(lambda: tok.encode(captions, text_len=args.text_len), args.repeats),
        ),
        ("  of which: normalise", median_ms(lambda: [normalize(c) for c in captions], args.repeats)),
        (
            "  of which: pad into the tensor",
            median_ms(lambda: tok._pad([list(r) for r in rows], args.text_len, True, False), args.repeats),
        ),
        (
            "`tok.encode(..., dropout=0.1)` (training, 1 thread)",
            median_ms(lambda: tok.encode(captions, text_len=args.text_len, dropout=0.1), args.repeats),
        ),
    ]
    base = results[0][1][0]
    cmd = "python " + " ".join(
        [os.path.relpath(__file__, os.getcwd()), *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"Command: `{cmd}`  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs visible, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; python {platform.python_version()}, "
        f"torch {torch.__version__}, youtokentome {version('youtokentome')}  "
    )
    print(
        f"Data: {args.n} captions, {n_tokens / args.n:.1f} tokens each on average, vocab {tok.vocab_size}, "
        f"text_len {args.text_len}; median of {args.repeats} runs (training the tokenizer on 2000 captions: "
        f"{train_ms:.0f} ms)\n"
    )
    print("| step | median ms | min ms | x youtokentome alone | CPU ms, all threads |")
    print("|---|---:|---:|---:|---:|")
    for name, (med, low, cpu) in results:
        print(f"| {name} | {med:.1f} | {low:.1f} | {med / base:.2f} | {cpu:.1f} |")
    full = results[1][1][0]
    verdict = "meets" if full < TARGET_MS else "MISSES"
    print(f"\nencode of {args.n} captions: {full:.1f} ms, {verdict} the {TARGET_MS:.0f} ms target")
    return 0 if full < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())

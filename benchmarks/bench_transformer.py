"""Time to sample one 32x32 image with the static KV cache against full recomputation, in the same run.

    .venv/bin/python benchmarks/bench_transformer.py                 # CPU section (+ CUDA section if present)
    .venv/bin/python benchmarks/bench_transformer.py --points 8      # more measured no-cache steps

Without the cache every one of the grid**2 steps is a teacher-forced pass over the whole prefix (text,
start-of-image and the j tokens sampled so far). That takes about an hour for the `small` preset on a 2-core
CPU, so the no-cache figure is **extrapolated**: `--points` prefix lengths spread over the image are timed,
and the per-step time is linearly interpolated over all steps and summed (the output says so). The cached
figure is a real end-to-end `sample()` call. Weights are random (timing only; zero-initialised heads give
uniform logits, which does not change the work done). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch

from dalle.sampling import sample
from dalle.transformer import DALLETransformer, TransformerConfig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_sampling(model: DALLETransformer, batch: int, points: int, compile_step: bool = False) -> dict:
    """Cached sample() wall time, and the extrapolated no-cache time from ``points`` measured steps."""
    c, device = model.config, model.device
    text = torch.randint(1, c.text_vocab_size, (batch, c.text_len), device=device)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    n = c.image_len
    # warm-up: masks, tables, allocator, (compilation)
    sample(model, text, generator=gens, prime=torch.zeros(batch, n - 4, dtype=torch.long, device=device))
    step_fn = model.decode_step
    if compile_step:
        model.decode_step = torch.compile(model.decode_step, mode="reduce-overhead")  # type: ignore[method-assign]
        sample(model, text, generator=gens, prime=torch.zeros(batch, n - 16, dtype=torch.long, device=device))
    cached = _timed(lambda: sample(model, text, generator=gens), device)
    model.decode_step = step_fn  # type: ignore[method-assign]

    # no cache: step j is a forward over text + cells 0..j (what sample(use_cache=False) runs)
    image = torch.randint(0, c.image_vocab_size, (batch, n), device=device)
    js = sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})
    measured = []
    with torch.no_grad():
        model(text, image[:, :2])  # warm-up
        for j in js:
            measured.append(_timed(lambda j=j: model(text, image[:, : j + 1]), device))
    xs = torch.tensor(js, dtype=torch.float64)
    ys = torch.tensor(measured, dtype=torch.float64)
    all_steps = torch.arange(n, dtype=torch.float64)
    idx = torch.searchsorted(xs, all_steps, right=True).clamp(1, len(js) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    interp = y0 + (y1 - y0) * (all_steps - x0) / (x1 - x0)
    no_cache = float(interp.sum())
    return {"cached": cached, "no_cache": no_cache, "js": js, "measured": measured}


def bench_attention_cuda(batch: int = 8, heads: int = 12, text_len: int = 256, grid: int = 32) -> list[str]:
    """FlexAttention vs SDPA (dense additive mask), forward + backward, bf16, row mask at L = 1280."""
    from dalle.attention import AttentionMasks, attend

    masks = AttentionMasks(text_len, grid)
    length = text_len + grid * grid
    q, k, v = (
        torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    rows = []
    for backend in ("sdpa", "flex"):

        def run(backend=backend):
            attend(q, k, v, masks, "row", backend).sum().backward()

        try:
            for _ in range(3):
                run()
            t = min(_timed(run, q.device) for _ in range(20))
            rows.append(
                f"| attention fwd+bwd, row mask, L={length}, B{batch} H{heads} D64 bf16 | {backend} | "
                f"{t * 1e3:.2f} ms |"
            )
        except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
            rows.append(f"| attention, {backend} | failed: {type(exc).__name__} | |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--points", type=int, default=6, help="measured no-cache steps (>= 2)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TransformerConfig.preset(args.preset)
    command = "python " + " ".join(
        shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    )
    torch.manual_seed(0)

    print(f"command: `{command}`")
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    )
    print(
        f"preset {args.preset}: depth {cfg.depth}, d_model {cfg.d_model}, heads {cfg.heads}, "
        f"text_len {cfg.text_len}, "
        f"grid {cfg.image_grid}x{cfg.image_grid}, batch {args.batch}\n"
    )
    print("| device | setting | KV cache | no cache | speed-up |")
    print("|---|---|---|---|---|")
    notes = []
    if not args.skip_cpu:
        model = DALLETransformer(cfg).eval()
        r = bench_sampling(model, args.batch, args.points)
        print(
            f"| CPU ({torch.get_num_threads()} threads) | fp32, SDPA | {r['cached']:.1f} s | "
            f"{r['no_cache']:.0f} s (extrapolated) | {r['no_cache'] / r['cached']:.0f}x |"
        )
        notes.append(
            "CPU no-cache steps measured at prefix j = "
            + ", ".join(f"{j}: {t:.2f} s" for j, t in zip(r["js"], r["measured"]))
            + "; per-step time interpolated linearly "
            f"over all {cfg.image_len} steps and summed"
        )
        del model
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        model = DALLETransformer(cfg).to("cuda").eval()
        r = bench_sampling(model, args.batch, args.points)
        print(
            f"| {name} | bf16 autocast, eager | {r['cached']:.2f} s | {r['no_cache']:.1f} s (extrapolated) | "
            f"{r['no_cache'] / r['cached']:.0f}x |"
        )
        try:
            rc = bench_sampling(model, args.batch, 2, compile_step=True)
            print(f"| {name} | bf16, decode_step compiled (reduce-overhead) | {rc['cached']:.2f} s | | |")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"compiled decode_step failed: {type(exc).__name__}: {exc}")
        print()
        print("| attention kernel | backend | time |")
        print("|---|---|---|")
        for row in bench_attention_cuda():
            print(row)
    else:
        notes.append("no CUDA device: GPU section skipped")
    print()
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

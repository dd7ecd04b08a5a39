"""Encode / decode time per image: OpenAI's ``dall_e`` vs ``dalle.dvae``, same weights, same run.

Full-size models (256x256 images, 8192 tokens), random weights shared by both implementations. Each
repeat runs OpenAI's code and ours back to back, so load from other processes hits both alike; the table
reports medians. OpenAI's side is timed as its notebook does it (``argmax(enc(x))``; ``one_hot`` then
``dec(z)``, sigmoid, ``unmap_pixels``), ours through ``Encoder.encode`` / ``Decoder.decode``; both under
``torch.no_grad()``.

    .venv/bin/python benchmarks/bench_dvae.py [--batch-sizes 1,4] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process summed over its threads)."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated batch sizes (default 1,4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per setting (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype", default=None, help="CUDA compute dtype for ours: float32, float16, bfloat16"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time ours through torch.compile (default mode; compilation happens in the warm-up)",
    )
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="ours with cuDNN's heuristic algorithm choice instead of timed selection (CUDA)",
    )
    parser.add_argument(
        "--nchw", action="store_true", help="ours on NCHW activations instead of channels-last"
    )
    args = parser.parse_args(argv)

    try:
        import dall_e
    except ImportError:
        print("OpenAI's package is needed: pip install DALL-E attrs", file=sys.stderr)
        return 1
    from dalle.dvae import Decoder, Encoder, unmap_pixels

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    torch.manual_seed(0)
    ref_enc = dall_e.Encoder(device=device).requires_grad_(False).eval()
    ref_dec = dall_e.Decoder(device=device).requires_grad_(False).eval()
    enc = Encoder(device="meta", dtype=args.dtype)
    dec = Decoder(device="meta", dtype=args.dtype)
    enc.load_state_dict(ref_enc.state_dict(), assign=True)
    dec.load_state_dict(ref_dec.state_dict(), assign=True)
    enc = enc.to(device).requires_grad_(False).eval()
    dec = dec.to(device).requires_grad_(False).eval()
    for module in (enc, dec):
        module.cudnn_benchmark = not args.no_cudnn_benchmark
        module.channels_last = not args.nchw
    our_encode, our_decode = enc.encode, dec.decode
    if args.compile:
        our_encode, our_decode = torch.compile(our_encode), torch.compile(our_decode)

    def ref_encode(x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(ref_enc(x), dim=1)

    def ref_decode(z: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(z, num_classes=ref_enc.vocab_size).permute(0, 3, 1, 2).float()
        return unmap_pixels(torch.sigmoid(ref_dec(one_hot).float()[:, :3]))

    rows = []
    with torch.no_grad():
        for b in batch_sizes:
            x = torch.rand(b, 3, 256, 256, device=device) * 0.8 + 0.1
            z = ref_encode(x)
            tasks = {
                "encode": (lambda x=x: ref_encode(x), lambda x=x: our_encode(x)),
                "decode": (lambda z=z: ref_decode(z), lambda z=z: our_decode(z)),
            }
            for task, (ref_fn, our_fn) in tasks.items():
                for _ in range(args.warmup):
                    ref_fn()
                    our_fn()
                ref_t, our_t = [], []
                for _ in range(args.repeats):  # interleaved: background load hits both alike
                    ref_t.append(_time(ref_fn, device))
                    our_t.append(_time(our_fn, device))
                r, o = (statistics.median(t[0] for t in ts) / b for ts in (ref_t, our_t))
                rc, oc = (statistics.median(t[1] for t in ts) / b for ts in (ref_t, our_t))
                rows.append((task, b, r, o, rc, oc))
                print(
                    f"  {task} batch {b}: dall_e {r * 1e3:.2f} ms/img, dalle {o * 1e3:.2f} ms/img",
                    file=sys.stderr,
                )

    where = (
        f"{device.type}, {torch.get_num_threads()} threads"
        if device.type == "cpu"
        else (f"{torch.cuda.get_device_name(device)}, dalle dtype {args.dtype or 'default (bfloat16)'}")
    )
    where += "".join(
        note
        for flag, note in (
            (args.compile, ", ours compiled"),
            (args.nchw, ", ours NCHW"),
            (args.no_cudnn_benchmark, ", ours without cuDNN benchmark"),
        )
        if flag
    )
    print(
        f"\ndVAE full size (256x256, vocab 8192), {where}; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}; median of {args.repeats}, seconds per image "
        "(wall clock, and CPU time summed over threads, which other processes' load disturbs less)\n"
    )
    print(
        "| task | batch | dall_e wall | dalle wall | speed-up (wall) "
        "| dall_e CPU | dalle CPU | speed-up (CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task, b, r, o, rc, oc in rows:
        print(f"| {task} | {b} | {r:.4g} | {o:.4g} | {r / o:.2f}x | {rc:.4g} | {oc:.4g} | {rc / oc:.2f}x |")
    print(f"\ncommand: {' '.join([sys.executable.split('/')[-1], *sys.argv])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

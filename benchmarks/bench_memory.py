"""Peak memory: the full-size dVAE (OpenAI's ``dall_e`` vs ``dalle.dvae``, same weights) and generation with
the bundled model, each case in a fresh Python process so that one case's peak cannot hide another's.

On CPU the figure is the process's peak resident set during the work (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after loading, so loading's own transients do not count), reported with the resident
set after loading the weights, so that the work's own share shows; on CUDA it is
``torch.cuda.max_memory_allocated`` after a reset, with the allocation after loading.

    .venv/bin/python benchmarks/bench_memory.py [--device cpu|cuda] [--batch 1] [--case NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, sys
import torch
import torch.nn.functional as F

case, device, batch = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(2)

def status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise SystemExit("needs Linux /proc/self/status")

def loaded():
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    return status_mib("VmRSS")

def peak():
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mib("VmHWM")

torch.manual_seed(0)
with torch.no_grad():
    if case in ("dall_e", "dalle"):
        from dalle.dvae import Decoder, Encoder, unmap_pixels
        if case == "dalle":  # random weights: memory does not depend on their values
            enc, dec = Encoder(device=device).eval(), Decoder(device=device).eval()
        else:
            import dall_e
            ref_enc = dall_e.Encoder(device=device).requires_grad_(False).eval()
            ref_dec = dall_e.Decoder(device=device).requires_grad_(False).eval()
        x = torch.rand(batch, 3, 256, 256, device=device) * 0.8 + 0.1
        before = loaded()
        if case == "dalle":
            out = dec.decode(enc.encode(x))
        else:  # OpenAI's notebook
            z = torch.argmax(ref_enc(x), dim=1)
            z = F.one_hot(z, num_classes=ref_enc.vocab_size).permute(0, 3, 1, 2).float()
            out = unmap_pixels(torch.sigmoid(ref_dec(z).float()[:, :3]))
    else:  # generation with a bundled model: "generate:NAME"
        from dalle.pipeline import DALLE
        pipe = DALLE.from_pretrained(case.split(":", 1)[1], device=device)
        before = loaded()
        pipe.generate(["a red circle"] * batch, seed=0, progress=False)
print(json.dumps({"loaded": before, "peak": peak()}))
"""

CASES = (
    ("dall_e", "OpenAI `dall_e`: `argmax(enc(x))`, `one_hot`, `dec(z)` (full size, 256x256)"),
    ("dalle", "`dalle.dvae`: `dec.decode(enc.encode(x))` (same sizes)"),
    ("generate:shapes", "`DALLE.from_pretrained('shapes').generate` (bundled model, 256x256)"),
    ("generate:shapes-128", "`DALLE.from_pretrained('shapes-128').generate` (bundled model, 128x128)"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument(
        "--case",
        action="append",
        choices=[c for c, _ in CASES],
        help="run only this case (repeatable; default all)",
    )
    args = parser.parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    what = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"device {args.device}; "
        f"batch {args.batch}; python {platform.python_version()}\n"
    )
    print(f"| case | after loading (MiB) | {what} (MiB) | the work's share (MiB) |")
    print("|---|---:|---:|---:|")
    for case, label in CASES:
        if args.case and case not in args.case:
            continue
        run = subprocess.run(
            [sys.executable, "-c", CHILD, case, args.device, str(args.batch)],
            capture_output=True,
            text=True,
            env=env,
        )
        if run.returncode != 0:
            print(
                f"| {label} | failed: "
                f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode} | | |"
            )
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {label} | {r['loaded']:.0f} | {r['peak']:.0f} | {r['peak'] - r['loaded']:.0f} |")
    print(
        "\ncommand: python "
        f"{' '.join([os.path.relpath(__file__), *(argv if argv is not None else sys.argv[1:])])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

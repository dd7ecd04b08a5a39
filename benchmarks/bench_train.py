"""Training throughput of a transformer step (forward, backward, AdamW) in float32 and under bfloat16
autocast, on the CPU (``dalle train --cpu-bf16``) or CUDA (``--bf16``), through the trainer's own code path
(:class:`dalle.train.transformer.TransformerTrainer` on token shards).

The model is the bundled shapes transformer's architecture (8 layers of full attention, 8 heads of 32) at a
chosen image side, on shapes scenes encoded by the bundled dVAE.

    .venv/bin/python benchmarks/bench_train.py [--image-size 256] [--batch 8 16] [--steps 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_shards(path: Path, n: int, image_size: int, device: str) -> None:
    """``n`` shapes scenes encoded by the bundled dVAE at ``image_size``
    (:func:`dalle.train.encode.encode_dataset`, what ``dalle encode-dataset`` runs)."""
    from dalle.train.encode import EncodeConfig, encode_dataset

    encode_dataset(
        EncodeConfig(
            data="shapes:1",
            dvae=str(REPO / "dalle" / "pretrained" / "shapes"),
            out_dir=str(path),
            limit=n,
            image_size=image_size,
            device=device,
            progress=False,
        )
    )


def run(image_size: int, batch: int, steps: int, bf16: bool, device: str, shards: Path) -> float:
    """Samples per second over ``steps`` timed steps after one warm-up step."""
    from dalle.train.config import TransformerTrainConfig
    from dalle.train.transformer import TransformerTrainer

    pretrained = REPO / "dalle" / "pretrained" / "shapes"
    with tempfile.TemporaryDirectory() as out:
        cfg = TransformerTrainConfig(
            data=str(shards),
            dvae=str(pretrained),
            tokenizer=str(pretrained / "tokenizer.model"),
            out_dir=out,
            image_size=image_size,
            text_len=16,
            depth=8,
            heads=8,
            head_dim=32,
            attn_types=["full"] * 8,
            batch_size=batch,
            steps=steps + 1,
            warmup_steps=1,
            bpe_dropout=0.0,
            ema_decay=0.0,
            eval_every=0,
            sample_every=0,
            plot_every=0,
            ckpt_every=10**6,
            log_every=1,
            progress=False,
            device=device,
            bf16=bf16,
            cpu_bf16=bf16,
        )
        TransformerTrainer(cfg).fit()
        from dalle.train.outputs import read_metrics

        rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"]
    times = [r["time"] for r in rows]
    return batch * (len(times) - 1) / (times[-1] - times[0])


def cpu_description() -> str:
    """The CPU's model name and whether it has native bfloat16 (Linux /proc/cpuinfo; else platform's
    guess)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?"
    )
    native = [flag for flag in ("avx512_bf16", "amx_bf16") if f" {flag}" in info]
    return f"{name}, bfloat16: {', '.join(native) or 'not native'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    p.add_argument("--steps", type=int, default=4, help="timed steps per case (after one warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "tokens"
        make_shards(shards, max(args.batch) * (args.steps + 1), args.image_size, args.device)
        for batch in args.batch:
            for bf16 in (False, True):
                rate = run(args.image_size, batch, args.steps, bf16, args.device, shards)
                results.append(
                    {
                        "batch": batch,
                        "precision": "bfloat16 autocast" if bf16 else "float32",
                        "samples_per_s": round(rate, 2),
                    }
                )
                print(json.dumps(results[-1]), flush=True)
    print(
        json.dumps(
            {
                "cpu": cpu_description(),
                "torch": torch.__version__,
                "threads": args.threads,
                "image_size": args.image_size,
                "device": args.device,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Sampling image tokens: `dalle` against Hugging Face `transformers` and DALLE-pytorch, in the same run.

    .venv/bin/python benchmarks/bench_peers.py                       # defaults below, CPU
    .venv/bin/python benchmarks/bench_peers.py --depth 12 --grid 32 --batch 4 --device cuda

All three models get the same shape: ``depth`` layers of full causal self-attention, ``heads`` x ``head_dim``
wide, MLP ratio 4, a caption of ``text_len`` tokens followed by ``grid x grid`` image tokens sampled one at a
time at temperature 1 with no top-k / top-p filtering; random weights (timing only), fp32. What each library
does per step is its own best path:

* ``dalle``: ``DALLETransformer.sample`` (static KV cache, fixed-shape decode step);
* ``transformers``: ``GPT2LMHeadModel.generate(use_cache=True)`` over one joint text + image vocabulary (a
  generic decoder with the same widths; its logits cover both vocabularies);
* DALLE-pytorch: ``DALLE.generate_images(use_cache=True)`` with ``attn_types=('full',)``; its time includes
  decoding the tokens with a tiny ``DiscreteVAE`` (a few ms, measured separately and subtracted).

Needs ``pip install transformers dalle-pytorch "pytorch-lightning<2" "setuptools<81"`` for the peers; a peer
that is not installed is reported as such. Prints a markdown table (median of ``--repeats`` timed runs after
one warm-up run each).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import warnings
from collections.abc import Callable

import torch
from bench_transformer import _timed  # same folder: run as `python benchmarks/bench_peers.py`

from dalle.sampling import sample
from dalle.transformer import DALLETransformer, TransformerConfig


def _median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def bench_ours(a: argparse.Namespace, device: torch.device, text: torch.Tensor) -> tuple[float, int]:
    cfg = TransformerConfig(
        text_vocab_size=a.text_vocab,
        text_len=a.text_len,
        image_vocab_size=a.image_vocab,
        image_grid=a.grid,
        depth=a.depth,
        heads=a.heads,
        head_dim=a.head_dim,
        attn_types=["full"] * a.depth,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = DALLETransformer(cfg).to(device).eval()
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(text.shape[0])]

    def run() -> None:
        out = sample(model, text, generator=gens)
        assert out.shape == (text.shape[0], a.grid, a.grid)

    return _median_time(run, device, a.repeats), sum(p.numel() for p in model.parameters())


def bench_hf(a: argparse.Namespace, device: torch.device, text: torch.Tensor) -> tuple[float, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = a.heads * a.head_dim
    n = a.grid * a.grid
    cfg = GPT2Config(
        vocab_size=a.text_vocab + a.image_vocab,
        n_positions=a.text_len + n,
        n_embd=d,
        n_layer=a.depth,
        n_head=a.heads,
        n_inner=4 * d,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    mask = torch.ones_like(text)

    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=text,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                use_cache=True,
            )
        assert out.shape == (text.shape[0], a.text_len + n)

    return _median_time(run, device, a.repeats), sum(p.numel() for p in model.parameters())


def bench_dalle_pytorch(
    a: argparse.Namespace, device: torch.device, text: torch.Tensor
) -> tuple[float, int, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dalle_pytorch import DALLE, DiscreteVAE

    torch.manual_seed(0)
    vae = DiscreteVAE(
        image_size=a.grid * 8,
        num_layers=3,
        num_tokens=a.image_vocab,
        codebook_dim=32,
        hidden_dim=16,
        num_resnet_blocks=0,
    )
    model = (
        DALLE(
            dim=a.heads * a.head_dim,
            vae=vae,
            num_text_tokens=a.text_vocab,
            text_seq_len=a.text_len,
            depth=a.depth,
            heads=a.heads,
            dim_head=a.head_dim,
            attn_types=("full",),
            ff_dropout=0.0,
            attn_dropout=0.0,
        )
        .to(device)
        .eval()
    )
    own = sum(p.numel() for n_, p in model.named_parameters() if not n_.startswith("vae."))
    text = text.clamp(1, a.text_vocab - 1)  # 0 is its padding id

    def run() -> None:
        with torch.no_grad():
            images = model.generate_images(text, filter_thres=0.0, temperature=1.0, use_cache=True)
        assert images.shape[0] == text.shape[0]

    tokens = torch.randint(0, a.image_vocab, (text.shape[0], a.grid * a.grid), device=device)

    def decode() -> None:
        with torch.no_grad():
            vae.decode(tokens)

    vae_time = _median_time(decode, device, a.repeats)
    return _median_time(run, device, a.repeats), own, vae_time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--grid", type=int, default=16, help="image tokens per side (default 16: 256 tokens)")
    parser.add_argument("--text-vocab", type=int, default=1024)
    parser.add_argument("--image-vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--skip", default="", help="comma-separated: hf, dalle-pytorch")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    torch.manual_seed(1)
    text = torch.randint(1, a.text_vocab, (a.batch, a.text_len), device=device)
    n = a.grid * a.grid
    print(f"command: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"shape: depth {a.depth}, {a.heads} heads x {a.head_dim}, "
        f"text {a.text_len} + image {a.grid}x{a.grid}, "
        f"batch {a.batch}, median of {a.repeats}\n"
    )
    rows: list[tuple[str, str, str]] = []
    ours, params = bench_ours(a, device, text)
    rows.append(
        ("dalle (this library)", f"{ours:.2f} s ({ours / n * 1e3:.1f} ms/step)", f"{params / 1e6:.1f}M")
    )
    if "hf" not in skip:
        try:
            t, p = bench_hf(a, device, text)
            rows.append(
                (
                    "transformers GPT-2 generate",
                    f"{t:.2f} s ({t / n * 1e3:.1f} ms/step), {t / ours:.2f}x ours",
                    f"{p / 1e6:.1f}M",
                )
            )
        except ImportError as exc:
            rows.append(("transformers", f"not installed ({exc.name})", ""))
    if "dalle-pytorch" not in skip:
        try:
            t, p, vae_t = bench_dalle_pytorch(a, device, text)
            t -= vae_t
            rows.append(
                (
                    "DALLE-pytorch generate_images",
                    f"{t:.2f} s ({t / n * 1e3:.1f} ms/step), "
                    f"{t / ours:.2f}x ours (VAE decode {vae_t * 1e3:.0f} ms subtracted)",
                    f"{p / 1e6:.1f}M",
                )
            )
        except ImportError as exc:
            rows.append(("DALLE-pytorch", f"not installed ({exc.name})", ""))
    print(f"| library | time to sample {a.batch} image(s) of {n} tokens (ms per step) | parameters |")
    print("|---|---|---:|")
    for name, value, p in rows:
        print(f"| {name} | {value} | {p} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

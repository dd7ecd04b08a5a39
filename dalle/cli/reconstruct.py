"""``dalle reconstruct``: an image through the dVAE (encode to tokens, decode back), side by side."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, cast

from dalle.cli import add_threads_flag

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder

ORDER = 30


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle reconstruct`` to the subcommand parsers."""
    p = sub.add_parser(
        "reconstruct",
        help="encode an image to dVAE tokens and decode it back; writes original | reconstruction",
        description=(
            "Encode an image to dVAE tokens and decode it back, writing the preprocessed original and its "
            "reconstruction side by side. Weights: --encoder and --decoder (files or URLs, e.g. OpenAI's "
            "https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl), or --model (a model directory or "
            "`dalle train-dvae` output); by default the bundled model's dVAE."
        ),
    )
    p.add_argument("image", nargs="?", default=None, help="image file (default: the bundled sample photo)")
    p.add_argument("--output", "-o", default="reconstruction.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--encoder", default=None, help="encoder weights: .pkl, .pt, .safetensors or http(s) URL")
    p.add_argument("--decoder", default=None, help="decoder weights: .pkl, .pt, .safetensors or http(s) URL")
    p.add_argument("--model", default=None, help="model directory or name holding a dVAE (default: shapes)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="image side in pixels, a multiple of 8 (default: 256 "
        "for --encoder/--decoder, else the model's image size)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    add_threads_flag(p)
    p.add_argument("--no-upscale", action="store_true", help="refuse images smaller than --size")
    p.set_defaults(func=run)


def load_dvae_dir(path: Path) -> tuple[Encoder, Decoder, int]:
    """(encoder, decoder, image_size) from a directory with config.json + encoder/decoder.safetensors."""
    from dalle.errors import ModelLoadError
    from dalle.loading import model_from_state_dict, read_weights

    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        enc_cfg, dec_cfg, size = cfg["encoder"], cfg["decoder"], int(cfg.get("image_size", 256))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{cfg_file}: not a dVAE or model directory config ({exc})") from None
    models = []
    for kind, conf in (("encoder", enc_cfg), ("decoder", dec_cfg)):
        tensors, _ = read_weights(path / f"{kind}.safetensors")
        models.append(model_from_state_dict(tensors, kind, conf, source=str(path / f"{kind}.safetensors")))
    return cast("Encoder", models[0]), cast("Decoder", models[1]), size  # kinds asked for above


def run(args: argparse.Namespace) -> int:
    """Run ``dalle reconstruct``: a dVAE round trip of one image, written side by side; returns the exit
    code."""
    from dalle.cli import UsageError
    from dalle.dvae import Decoder, Encoder
    from dalle.errors import ImageError, ModelLoadError
    from dalle.images import load_image, make_grid, reconstruct, sample_image_path, save_png
    from dalle.loading import load_model, resolve_device
    from dalle.pipeline import DEFAULT_MODEL, resolve_model

    if (args.encoder is None) != (args.decoder is None):
        raise UsageError("pass both --encoder and --decoder (they must come from the same dVAE)")
    if args.encoder is not None and args.model is not None:
        raise UsageError("pass either --encoder/--decoder or --model, not both")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise UsageError(f"--size must be a positive multiple of 8, got {args.size}")
    device = resolve_device(args.device)
    image = args.image if args.image is not None else sample_image_path()

    start = time.perf_counter()
    if args.encoder is not None:
        encoder = load_model(args.encoder, device)
        decoder = load_model(args.decoder, device)
        size, weights = args.size or 256, f"encoder {args.encoder}, decoder {args.decoder}"
    else:
        name = args.model
        try:
            path = resolve_model(name)  # a directory, or a registered name such as the bundled "shapes"
        except ModelLoadError as exc:
            raise ModelLoadError(
                f"no dVAE weights: {exc}; pass --encoder and --decoder (files or URLs, e.g. "
                "https://cdn.openai.com/dall-e/encoder.pkl and https://cdn.openai.com/dall-e/decoder.pkl) "
                "or --model DIR"
            ) from exc
        enc, dec, model_size = load_dvae_dir(path)
        encoder, decoder = enc.to(device).eval(), dec.to(device).eval()
        size, weights = args.size or model_size, f"model {name or DEFAULT_MODEL} ({path})"
    if not isinstance(encoder, Encoder) or not isinstance(decoder, Decoder):
        raise ModelLoadError(
            f"--encoder must hold an encoder and --decoder a decoder (got {type(encoder).__name__} and "
            f"{type(decoder).__name__})"
        )
    loaded = time.perf_counter()
    source = load_image(image)
    if min(source.size) < size:
        if args.no_upscale:
            raise ImageError(
                f"the image is {source.width}x{source.height}, smaller than {size} px; leave out "
                "--no-upscale to enlarge it"
            )
        warnings.warn(
            f"the image is {source.width}x{source.height}, smaller than {size} px: it is enlarged before "
            "encoding (pass --no-upscale to refuse such images)",
            UserWarning,
            stacklevel=1,
        )
    original, rec = reconstruct(source, encoder, decoder, size=size, allow_upscale=not args.no_upscale)
    done = time.perf_counter()
    grid = make_grid([original, rec], ncols=2, captions=["original", "reconstruction"])
    out = save_png(
        grid,
        args.output,
        {"source_image": str(image), "weights": weights, "size": str(size), "software": "dalle reconstruct"},
    )
    print(f"weights: {weights}")
    print(
        f"{size}x{size} on {device}: loaded in {loaded - start:.1f} s, reconstructed "
        f"({(size // 8) ** 2} tokens) in {done - loaded:.1f} s"
    )
    print(f"wrote {Path(out).resolve()}")
    return 0

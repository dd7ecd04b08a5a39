"""The directories a run exports: a dVAE directory (``dalle train-dvae``) and a model directory
(``dalle train``), and loading a dVAE back from either. Both are written by
:func:`dalle.model_dir.write_model_files`, the format's one writer (as
:meth:`dalle.pipeline.DALLE.save_pretrained` is)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dalle.errors import ConfigError, ModelLoadError
from dalle.model_dir import FORMAT_VERSION, dvae_config, load_weights, model_config, write_model_files

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer

#: the model-directory format version (:data:`dalle.model_dir.FORMAT_VERSION`), under its older name
MODEL_FORMAT_VERSION = FORMAT_VERSION


def _write_json(obj: Any, file: Path) -> None:
    """``obj`` as indented JSON, replacing ``file`` atomically (a run's ``run_config.json``)."""
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, file)


def write_model_dir(
    out_dir: str | os.PathLike[str],
    tokenizer: BPETokenizer,
    encoder: Encoder,
    decoder: Decoder,
    transformer: DALLETransformer,
    image_size: int,
    name: str,
    trained_with_caption_dropout: bool,
    weights_dtype: str = "float32",
) -> Path:
    """Write the model directory :meth:`dalle.pipeline.DALLE.from_pretrained` loads.

    ``weights_dtype`` ("float32", "float16" or "bfloat16") is the precision of ``transformer.safetensors``;
    loading casts it back to the model's float32 parameters (half precision halves the file).

    Files: ``config.json`` (``{"format_version": 1, "transformer", "encoder", "decoder", "image_size",
    "text_len", "name", "trained_with_caption_dropout"}``), ``transformer.safetensors``,
    ``encoder.safetensors``, ``decoder.safetensors`` and ``tokenizer.model``. Each file is replaced
    atomically and ``config.json`` is written last, so a directory with a config is complete.
    """
    tcfg = transformer.config
    if int(image_size) != 8 * int(tcfg.image_grid):
        raise ConfigError(
            f"image_size {image_size} does not match the {tcfg.image_grid}x{tcfg.image_grid} token grid"
        )
    config = model_config(
        name=str(name),
        image_size=int(image_size),
        text_len=int(tcfg.text_len),
        trained_with_caption_dropout=bool(trained_with_caption_dropout),
        transformer=tcfg.to_dict(),
        encoder=encoder.config(),
        decoder=decoder.config(),
    )
    dtype = (
        None if weights_dtype == "float32" else getattr(torch, weights_dtype)
    )  # float32: the module as it is
    return write_model_files(
        out_dir,
        config,
        encoder=encoder,
        decoder=decoder,
        transformer=transformer,
        tokenizer=tokenizer,
        weights_dtype=dtype,
    )


def save_dvae_dir(
    out_dir: str | os.PathLike[str],
    encoder: Encoder,
    decoder: Decoder,
    image_size: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trained dVAE: ``config.json``
    (``{"format_version": 1, "kind": "dvae", "encoder", "decoder", "image_size", ...extra}``),
    ``encoder.safetensors``, ``decoder.safetensors`` (same names as a model dir)."""
    config = dvae_config(encoder.config(), decoder.config(), image_size, extra)
    return write_model_files(out_dir, config, encoder=encoder, decoder=decoder)


#: the exported results a run leaves in its --out (beside its checkpoints): a model or a dVAE directory
_RESULT_DIRS = ("model", "dvae")


def model_path(spec: str | os.PathLike[str]) -> Path:
    """The directory a model flag names: an existing path as it is, else a registered model's directory
    (``shapes``, ``shapes-128``: the bundled ones), else the path as given (so that the caller's error names
    it). A directory wins over a registered name of the same spelling."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from dalle.pipeline import REGISTRY, resolve_model

    return resolve_model(str(spec)) if str(spec) in REGISTRY else path


def load_dvae(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[Encoder, Decoder, int]:
    """Load (encoder, decoder, image_size) from a dVAE directory (:func:`save_dvae_dir`), a model directory
    (:func:`write_model_dir`), a registered model's name (e.g. ``shapes``: its dVAE) or a training run's
    output holding one of them (``dvae/`` or ``model/``). For OpenAI's ``encoder.pkl``/``decoder.pkl`` use
    :func:`dalle.load_model`."""
    from dalle.dvae import Decoder, Encoder

    root = model_path(path)
    if not (root / "config.json").is_file():
        inner = [root / name for name in _RESULT_DIRS if (root / name / "config.json").is_file()]
        if len(inner) == 1:  # `dalle train-dvae --out RUN` writes RUN/dvae; `dalle train` writes RUN/model
            root = inner[0]
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{root} is not a dVAE directory (no config.json); pass the output directory of "
            "`dalle train-dvae` or a model directory"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
        encoder = Encoder(**cfg["encoder"])
        decoder = Decoder(**cfg["decoder"])
        image_size = int(cfg["image_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file} does not describe a dVAE: {exc}") from exc
    load_weights(encoder, root / "encoder.safetensors")
    load_weights(decoder, root / "decoder.safetensors")
    return encoder.to(device), decoder.to(device), image_size

"""The directories a run exports: a dVAE directory (``dalle train-dvae``) and a model directory (``dalle train``),
and loading a dVAE back from either."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dalle._files import publish
from dalle.errors import ConfigError, ModelLoadError
from dalle.train.checkpoints import _saveable

if TYPE_CHECKING:  # pragma: no cover

    from dalle.dvae import Decoder, Encoder
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer

MODEL_FORMAT_VERSION = 1


def _write_safetensors(module_or_state: nn.Module | Mapping[str, torch.Tensor], file: Path) -> None:
    """safetensors weights written atomically; shared (tied) tensors are stored once (``save_model``)."""
    from safetensors.torch import save_file, save_model

    tmp = file.with_name(file.name + ".tmp")
    if isinstance(module_or_state, nn.Module):
        module_or_state.to(memory_format=torch.contiguous_format)  # channels-last weights are not contiguous
        save_model(module_or_state, str(tmp))
    else:
        save_file(_saveable(module_or_state), str(tmp))
    publish(tmp, file)  # safetensors writes 0600 files


def _write_json(obj: Any, file: Path) -> None:
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
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    tcfg = transformer.config
    if int(image_size) != 8 * int(tcfg.image_grid):
        raise ConfigError(f"image_size {image_size} does not match the {tcfg.image_grid}x{tcfg.image_grid} token grid")
    if weights_dtype == "float32":
        _write_safetensors(transformer, path / "transformer.safetensors")
    else:
        dtype = getattr(torch, weights_dtype)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in transformer.state_dict().items()}
        _write_safetensors(state, path / "transformer.safetensors")
    _write_safetensors(encoder, path / "encoder.safetensors")
    _write_safetensors(decoder, path / "decoder.safetensors")
    tmp = path / "tokenizer.model.tmp"
    tokenizer.save(tmp)
    os.replace(tmp, path / "tokenizer.model")
    config = {
        "format_version": MODEL_FORMAT_VERSION,
        "name": str(name),
        "image_size": int(image_size),
        "text_len": int(tcfg.text_len),
        "trained_with_caption_dropout": bool(trained_with_caption_dropout),
        "transformer": tcfg.to_dict(),
        "encoder": encoder.config(),
        "decoder": decoder.config(),
    }
    _write_json(config, path / "config.json")
    return path


def save_dvae_dir(
    out_dir: str | os.PathLike[str],
    encoder: Encoder,
    decoder: Decoder,
    image_size: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a trained dVAE: ``config.json`` (``{"format_version": 1, "kind": "dvae", "encoder", "decoder",
    "image_size", ...extra}``), ``encoder.safetensors``, ``decoder.safetensors`` (same names as a model dir)."""
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    _write_safetensors(encoder, path / "encoder.safetensors")
    _write_safetensors(decoder, path / "decoder.safetensors")
    config = {
        "format_version": MODEL_FORMAT_VERSION,
        "kind": "dvae",
        "image_size": int(image_size),
        "encoder": encoder.config(),
        "decoder": decoder.config(),
        **dict(extra or {}),
    }
    _write_json(config, path / "config.json")
    return path


def _load_module_weights(module: nn.Module, file: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, str(file), strict=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load weights from {file}: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(f"weights in {file} do not fit its config: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")


#: the exported results a run leaves in its --out (beside its checkpoints): a model or a dVAE directory
_RESULT_DIRS = ("model", "dvae")


def model_path(spec: str | os.PathLike[str]) -> Path:
    """The directory a model flag names: an existing path as it is, else a registered model's directory
    (``shapes``, ``shapes-128``: the bundled ones), else the path as given (so that the caller's error names it).
    A directory wins over a registered name of the same spelling."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    from dalle.pipeline import REGISTRY, resolve_model

    return resolve_model(str(spec)) if str(spec) in REGISTRY else path


def load_dvae(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[Encoder, Decoder, int]:
    """Load (encoder, decoder, image_size) from a dVAE directory (:func:`save_dvae_dir`), a model directory
    (:func:`write_model_dir`), a registered model's name (e.g. ``shapes``: its dVAE) or a training run's output
    holding one of them (``dvae/`` or ``model/``). For OpenAI's ``encoder.pkl``/``decoder.pkl`` use
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
    _load_module_weights(encoder, root / "encoder.safetensors")
    _load_module_weights(decoder, root / "decoder.safetensors")
    return encoder.to(device), decoder.to(device), image_size

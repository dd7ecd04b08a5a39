"""Model directories on disk: the one format version, its ``config.json``, the one writer and the readers.

A model directory holds::

    config.json            {"format_version": 1, "name", "image_size", "text_len", "transformer": {...},
                            "encoder": {...}, "decoder": {...}, "trained_with_caption_dropout": bool,
                            "architecture": "dalle" | "rudalle", "image_tokenizer": "dvae" | "vqgan",
                            "sampling": {"top_k", "top_p", "sampler", "filter"}, "source": {...}}
    transformer.safetensors
    encoder.safetensors
    decoder.safetensors
    tokenizer.model        (youtokentome BPE model)

``architecture``, ``image_tokenizer``, ``sampling`` and ``source`` are written only where they differ from
what their absence means (``"dalle"``, ``"dvae"``, no defaults, no source), so a dalle model with a dVAE reads
in every dalle version. A dVAE directory (``dalle train-dvae``) is the image-tokenizer half of one:
``config.json`` (``{"format_version": 1, "kind": "dvae", "image_size", "encoder", "decoder", ...}``),
``encoder.safetensors`` and ``decoder.safetensors``.

:func:`write_model_files` writes both kinds: :meth:`dalle.pipeline.DALLE.save_pretrained`, the trainers'
exports (:func:`dalle.train.exports.write_model_dir`, :func:`~dalle.train.exports.save_dvae_dir`) and the
ruDALL-E conversion (:func:`dalle.hub.convert_rudalle`) all go through it. Every file is replaced atomically
and ``config.json`` is written last: a directory with a config is complete.
"""

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

if TYPE_CHECKING:  # pragma: no cover
    from dalle.transformer import DALLETransformer

#: the version of the model-directory (and dVAE-directory) format this dalle writes and reads
FORMAT_VERSION = 1
ARCHITECTURES: tuple[str, ...] = ("dalle", "rudalle")
IMAGE_TOKENIZERS: tuple[str, ...] = ("dvae", "vqgan")
#: the files of a complete model directory
FILES = (
    "config.json",
    "transformer.safetensors",
    "encoder.safetensors",
    "decoder.safetensors",
    "tokenizer.model",
)
#: the keys of a model's default sampling settings (``config.json``'s ``sampling``)
SAMPLING_KEYS = ("top_k", "top_p", "sampler", "filter")


# ------------------------------------------------------------------------------------------------- config
def model_config(
    *,
    name: str,
    image_size: int,
    text_len: int,
    trained_with_caption_dropout: bool,
    transformer: dict[str, Any],
    encoder: dict[str, Any],
    decoder: dict[str, Any],
    architecture: str = "dalle",
    image_tokenizer: str = "dvae",
    sampling: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``config.json`` of a model directory; the keys added for ruDALL-E / VQGAN models are written only where
    they differ from what older files mean by their absence."""
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "image_size": image_size,
        "text_len": text_len,
        "trained_with_caption_dropout": trained_with_caption_dropout,
    }
    if architecture != "dalle":
        config["architecture"] = architecture
    if image_tokenizer != "dvae":
        config["image_tokenizer"] = image_tokenizer
    if sampling:
        config["sampling"] = dict(sampling)
    if source:
        config["source"] = dict(source)
    config.update(transformer=transformer, encoder=encoder, decoder=decoder)
    return config


def dvae_config(
    encoder: dict[str, Any], decoder: dict[str, Any], image_size: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``config.json`` of a dVAE directory: ``{"format_version", "kind": "dvae", "image_size", "encoder",
    "decoder", ...extra}``."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "dvae",
        "image_size": int(image_size),
        "encoder": encoder,
        "decoder": decoder,
        **dict(extra or {}),
    }


def check_sampling_defaults(sampling: dict[str, Any]) -> dict[str, Any]:
    """Validate a model's default sampling settings (keys of :data:`SAMPLING_KEYS`; None = unset) and return
    the ones that are set."""
    from dalle.sampling import FILTERS, SAMPLERS

    if not isinstance(sampling, dict):
        raise ConfigError(f"sampling must be a dict of default settings, got {type(sampling).__name__}")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"unknown sampling defaults {unknown}; known: {', '.join(SAMPLING_KEYS)}")
    out = {k: v for k, v in sampling.items() if v is not None}
    top_k, top_p = out.get("top_k", 0), out.get("top_p", 1.0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"sampling top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"sampling top_p must be in (0, 1] (1: off), got {top_p!r}")
    if out.get("sampler", SAMPLERS[0]) not in SAMPLERS:
        raise ConfigError(f"sampling sampler must be one of {', '.join(SAMPLERS)}, got {out['sampler']!r}")
    if out.get("filter", FILTERS[0]) not in FILTERS:
        raise ConfigError(f"sampling filter must be one of {', '.join(FILTERS)}, got {out['filter']!r}")
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The checked ``config.json`` of the model directory ``path`` (every file of :data:`FILES` present, the
    format version this dalle reads, the keys it needs, known architecture / image tokenizer)."""
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"model directory {str(path)!r} lacks {', '.join(missing)}; it must hold {', '.join(FILES)}"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path / 'config.json'} has format_version {version!r}; "
            f"this dalle reads version {FORMAT_VERSION}. "
            "Upgrade dalle or re-save the model."
        )
    for key in ("transformer", "encoder", "decoder", "image_size"):
        if key not in config:
            raise ModelLoadError(f"{path / 'config.json'} lacks the key {key!r}")
    for key, allowed in (("architecture", ARCHITECTURES), ("image_tokenizer", IMAGE_TOKENIZERS)):
        if config.get(key, allowed[0]) not in allowed:
            raise ModelLoadError(
                f"{path / 'config.json'}: {key} {config[key]!r} is not one of {', '.join(allowed)}; "
                "upgrade dalle or re-save the model"
            )
    if not isinstance(config.get("sampling", {}), dict):
        raise ModelLoadError(f"{path / 'config.json'}: sampling must be an object of default settings")
    return config


# ------------------------------------------------------------------------------------------------ weights
def load_weights(module: nn.Module, file: Path) -> None:
    """Copy the safetensors weights of ``file`` into ``module`` (into its dtype: half-precision files widen
    into float32 parameters); every weight must fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(
            f"weights in {file} do not fit the model described in config.json: {exc}"
        ) from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {file} do not fit config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def save_weights(module: nn.Module, file: Path) -> None:
    """A module's weights as a safetensors file, written atomically with ordinary permissions; shared (tied)
    tensors are stored once (``save_model``); channels-last weights are made contiguous first."""
    from safetensors.torch import save_model

    module.to(memory_format=torch.contiguous_format)  # channels-last weights are not contiguous
    tmp = file.with_name(file.name + ".tmp")
    save_model(module, str(tmp))
    publish(tmp, file)  # safetensors writes 0600 files


def without_masks(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without ruDALL-E's attention masks (rebuilt on load, never stored)."""
    from dalle.rudalle import MASK_NAMES

    return {k: v for k, v in state.items() if k.removeprefix("transformer.") not in MASK_NAMES}


def load_transformer(
    directory: str | os.PathLike[str], config: Mapping[str, Any] | None = None
) -> DALLETransformer:
    """The :class:`~dalle.transformer.DALLETransformer` of a dalle model directory, with float32 parameters
    (half-precision files widen) on the CPU, in eval mode: the transformer
    :meth:`dalle.pipeline.DALLE.from_pretrained` loads from such a directory. ``config``: the directory's
    checked ``config.json`` (:func:`read_config`; read when None). ruDALL-E models load with
    ``from_pretrained``."""
    from dalle.transformer import DALLETransformer, TransformerConfig

    path = Path(directory)
    cfg = read_config(path) if config is None else config
    if cfg.get("architecture", "dalle") != "dalle":
        raise ModelLoadError(
            f"{str(path)!r} holds a {cfg['architecture']} transformer; load it with DALLE.from_pretrained"
        )
    try:
        transformer = DALLETransformer(TransformerConfig.from_dict(cfg["transformer"]))
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ModelLoadError(f"{path / 'config.json'} describes an invalid model: {exc}") from exc
    load_weights(transformer, path / "transformer.safetensors")
    return transformer.eval()


# ------------------------------------------------------------------------------------------------- writer
def _write_config(path: Path, config: Mapping[str, Any]) -> None:
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path / "config.json")


def write_model_files(
    directory: str | os.PathLike[str],
    config: Mapping[str, Any],
    *,
    encoder: nn.Module,
    decoder: nn.Module,
    transformer: nn.Module | Mapping[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
    weights_dtype: torch.dtype | None = None,
    weights_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a model directory (or, without ``transformer`` and ``tokenizer``, a dVAE directory) and return
    its path; the one writer of the format (see the module notes).

    ``config`` is the ``config.json`` content (:func:`model_config` or :func:`dvae_config`). ``transformer``
    is a module or a state dict (e.g. a memory-mapped checkpoint). A dalle module (``config`` has no other
    ``architecture``) with ``weights_dtype`` None is written as it is (``save_model``); otherwise its tensors
    are written one by one (memory stays at one tensor), without ruDALL-E's attention masks, floating-point
    ones converted to ``weights_dtype`` (None keeps each tensor's dtype), with ``weights_metadata`` in the
    file's header. ``tokenizer`` is anything with ``save(path)``. Files are written in the order transformer,
    encoder, decoder, tokenizer, ``config.json``.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    if transformer is not None:
        file = path / "transformer.safetensors"
        as_is = (
            weights_dtype is None
            and weights_metadata is None
            and config.get("architecture", "dalle") == "dalle"
        )
        if isinstance(transformer, nn.Module) and as_is:
            save_weights(transformer, file)
        else:
            from dalle.loading import write_safetensors

            state = transformer.state_dict() if isinstance(transformer, nn.Module) else transformer
            write_safetensors(without_masks(state), file, metadata=weights_metadata, dtype=weights_dtype)
    save_weights(encoder, path / "encoder.safetensors")
    save_weights(decoder, path / "decoder.safetensors")
    if tokenizer is not None:
        tmp = path / "tokenizer.model.tmp"
        tokenizer.save(tmp)
        os.replace(tmp, path / "tokenizer.model")
    _write_config(path, config)
    return path


__all__ = [
    "ARCHITECTURES",
    "FILES",
    "FORMAT_VERSION",
    "IMAGE_TOKENIZERS",
    "SAMPLING_KEYS",
    "check_sampling_defaults",
    "dvae_config",
    "load_transformer",
    "load_weights",
    "model_config",
    "read_config",
    "save_weights",
    "without_masks",
    "write_model_files",
]

"""Released ruDALL-E models: download from the Hugging Face Hub and conversion into dalle model directories.

The registered names ``rudalle-malevich``, ``rudalle-malevich-v2``, ``rudalle-emojich``,
``rudalle-surrealist-xl`` and ``rudalle-kandinsky`` (:data:`dalle.rudalle.RUDALLE_HUB`) download the released
files (:func:`download_rudalle`; ``$DALLE_HF_ENDPOINT`` replaces the Hub, downloads resume from their
``.part`` files, see :func:`dalle.loading.download_hf_file`) and convert them once (:func:`convert_rudalle`)
into a model directory in the cache (:func:`ensure_rudalle_model`), which
:meth:`dalle.pipeline.DALLE.from_pretrained` loads. ``dalle convert`` runs the same steps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dalle.errors import ConfigError, ModelLoadError
from dalle.model_dir import check_sampling_defaults, model_config, without_masks, write_model_files


def convert_rudalle(
    out_dir: str | os.PathLike[str],
    transformer: str | os.PathLike[str],
    vqgan: str | os.PathLike[str],
    bpe: str | os.PathLike[str],
    preset: str = "malevich",
    *,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    sampling: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Convert ruDALL-E's released files into a dalle model directory and return its path.

    ``transformer``: a rudalle ``pytorch_model*.bin`` (read with ``torch.load(weights_only=True)``,
    memory-mapped); ``vqgan``: the Lightning ``.ckpt`` of the Sber VQGAN (read safely, see
    :func:`dalle.loading.read_lightning_checkpoint`; its architecture is read from the tensor shapes);
    ``bpe``: the youtokentome ``bpe.model``. ``preset`` names the transformer's configuration
    (:data:`dalle.rudalle.PRESET_NAMES`) and ``overrides`` replace fields of it (custom or test checkpoints).
    ``sampling``: the model's default sampling settings (default: rudalle's recommended ones).

    The transformer's tensors are checked against the configuration (names and shapes) and written one by one
    in their own dtype (float16 stays float16), so converting Kandinsky (21.5 GiB) needs no more memory than
    its largest tensor. Files are replaced atomically, ``config.json`` last: a directory without it is an
    unfinished conversion.
    """
    from dalle.loading import read_lightning_checkpoint
    from dalle.rudalle import (
        RUDALLE_SAMPLING,
        RuDalleConfig,
        RuDalleTokenizer,
        RuDalleTransformer,
        read_rudalle_checkpoint,
    )
    from dalle.vqgan import vqgan_from_state_dict

    try:
        config = RuDalleConfig.preset(preset, **(overrides or {}))
    except TypeError as exc:  # dataclasses.replace names the unknown field
        raise ConfigError(f"bad configuration overrides {overrides}: {exc}") from None
    tokenizer = RuDalleTokenizer.load(bpe)
    if tokenizer.vocab_size > config.bpe_vocab_size:
        raise ModelLoadError(
            f"{bpe} has {tokenizer.vocab_size} tokens, more than the {config.bpe_vocab_size} text ids "
            f"of the {preset!r} configuration; is it the right bpe.model?"
        )
    state = read_rudalle_checkpoint(transformer)
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in without_masks(RuDalleTransformer(config).state_dict()).items()
        }
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        detail = "; ".join(
            f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shapes of", wrong))
            if keys
        )
        raise ModelLoadError(
            f"{transformer} does not hold a {preset!r} ruDALL-E transformer: {detail}. Pass the "
            "preset the checkpoint was released as (--preset)"
        )
    encoder, decoder = vqgan_from_state_dict(read_lightning_checkpoint(vqgan), None, source=os.fspath(vqgan))
    if decoder.vocab_size != config.image_vocab_size:
        raise ModelLoadError(
            f"the VQGAN {vqgan} has {decoder.vocab_size} codes, the transformer "
            f"{config.image_vocab_size}; they do not belong together"
        )
    path = Path(out_dir)
    model = model_config(
        name=name or path.name,
        image_size=config.image_grid * encoder.factor,
        text_len=config.text_len,
        trained_with_caption_dropout=False,
        transformer=config.to_dict(),
        encoder=encoder.config(),
        decoder=decoder.config(),
        architecture="rudalle",
        image_tokenizer="vqgan",
        sampling=check_sampling_defaults(dict(RUDALLE_SAMPLING) if sampling is None else sampling),
        source=source or {"preset": preset},
    )
    # the tensors are written in their own dtype, one by one
    return write_model_files(
        path,
        model,
        encoder=encoder,
        decoder=decoder,
        transformer=state,
        tokenizer=tokenizer,
        weights_metadata={"format": "dalle.rudalle"},
    )


def download_rudalle(name: str, *, progress: bool | None = None) -> dict[str, Path]:
    """Download the files of a released ruDALL-E model (``rudalle-malevich``, ...; see
    :data:`dalle.rudalle.RUDALLE_HUB`) from the Hugging Face Hub (``$DALLE_HF_ENDPOINT`` replaces it) into the
    cache; returns the local paths by role (``transformer``, ``vqgan``, ``bpe``). Downloads resume."""
    from dalle.loading import download_hf_file
    from dalle.rudalle import RUDALLE_BPE_FILE, RUDALLE_HUB, RUDALLE_UTILS_REPOS, RUDALLE_VQGAN_FILE

    if name not in RUDALLE_HUB:
        raise ConfigError(f"unknown ruDALL-E model {name!r}; choose one of {', '.join(RUDALLE_HUB)}")
    entry = RUDALLE_HUB[name]
    return {
        "transformer": download_hf_file(entry["repos"], entry["filename"], progress=progress),
        "vqgan": download_hf_file(RUDALLE_UTILS_REPOS, RUDALLE_VQGAN_FILE, progress=progress),
        "bpe": download_hf_file(RUDALLE_UTILS_REPOS, RUDALLE_BPE_FILE, progress=progress),
    }


def ensure_rudalle_model(name: str, *, progress: bool | None = None) -> Path:
    """The model directory of a released ruDALL-E model in the cache (``cache_dir()/models/{name}``):
    downloaded (:func:`download_rudalle`) and converted (:func:`convert_rudalle`) on first use. The
    downloaded originals stay in ``cache_dir()/huggingface`` (delete them to free the space)."""
    from dalle.loading import cache_dir
    from dalle.rudalle import RUDALLE_HUB

    if name not in RUDALLE_HUB:
        raise ConfigError(f"unknown ruDALL-E model {name!r}; choose one of {', '.join(RUDALLE_HUB)}")
    path = cache_dir() / "models" / name
    if (path / "config.json").is_file():
        return path
    files = download_rudalle(name, progress=progress)
    entry = RUDALLE_HUB[name]
    return convert_rudalle(
        path,
        files["transformer"],
        files["vqgan"],
        files["bpe"],
        entry["preset"],
        name=name,
        overrides=entry.get("overrides"),
        source={"preset": entry["preset"], "repos": list(entry["repos"]), "filename": entry["filename"]},
    )


__all__ = ["convert_rudalle", "download_rudalle", "ensure_rudalle_model"]

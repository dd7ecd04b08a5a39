"""Put a new dVAE under a trained transformer, as a starting point for fine-tuning the transformer on its
codes.

Usage: dalle remap MODEL_DIR NEW_DVAE_DIR OUT_DIR [--data SPEC] [--scenes N] [--seed S]
(the command line lives in ``dalle.cli.train``; this module is the library part).

Both dVAEs encode the same N images at the model's image side: by default rendered shapes-world scenes
(``shapes.sample(i, seed)``); with ``--data`` the first N readable images of a folder, of ``.tar`` shards or
of another shapes stream (centre-cropped and resized as ``dalle encode-dataset`` does). Each code ``j`` of the
new dVAE is matched with the old code ``c`` it most often replaces at the same cell, and the transformer's
image embedding and output row of ``j`` start as those of ``c``; codes the new dVAE never uses keep their
rows. The transformer then predicts roughly the right cells in the new vocabulary, and
``dalle train --init OUT_DIR --dvae OUT_DIR`` fine-tunes it on tokens of the new dVAE. OUT_DIR is a complete
model directory (the new dVAE, the tokenizer and the remapped transformer); ``code_map.json`` there records
the match and how often it held.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dalle.data.datasets import (
    TokenShards,
    center_crop,
    is_endless,
    iter_source_once,
    open_source,
    to_uint8_tensor,
)
from dalle.errors import ConfigError
from dalle.pipeline import DALLE
from dalle.train.exports import load_dvae
from dalle.train.transformer import encode_images
from dalle.transformer import DALLETransformer

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Encoder
    from dalle.vqgan import VQGANEncoder


def code_cooccurrence(
    old_encoder: Encoder | VQGANEncoder,
    new_encoder: Encoder | VQGANEncoder,
    batches: Iterable[torch.Tensor],
    vocab: int,
) -> torch.Tensor:
    """counts[j, c]: cells where the new encoder gives ``j`` and the old one ``c``, over uint8 image
    batches."""
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    for pixels in batches:
        old = encode_images(old_encoder, pixels).flatten()
        new = encode_images(new_encoder, pixels).flatten()
        counts += torch.bincount(new * vocab + old, minlength=vocab * vocab).view(vocab, vocab)
    return counts


def _image_batches(data: str, limit: int, size: int, batch: int = 16) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, size, size] batches of the first ``limit`` readable images of ``data``."""
    try:
        source = open_source(data, require_captions=False, size=size)
    except ConfigError:
        if not Path(data).exists():  # open_source's message speaks of training data; say what remap needs
            raise ConfigError(
                f"--data {data!r} does not exist; give a folder of images, .tar shards or 'shapes[:SEED]'"
            ) from None
        raise
    if isinstance(source, TokenShards):
        raise ConfigError(
            f"{data!r} holds encoded tokens, not images; give the images themselves (a folder, "
            ".tar shards or 'shapes[:SEED]')"
        )
    pending: list[torch.Tensor] = []
    found = 0
    for image, _, _ in iter_source_once(source, limit=limit if is_endless(source) else None):
        if image is None:  # unreadable: skipped, the next one counts instead
            continue
        pending.append(to_uint8_tensor(center_crop(image, size)))  # sources decode to RGB
        found += 1
        if len(pending) == batch or found == limit:
            yield torch.stack(pending)
            pending = []
        if found == limit:
            return
    if pending:
        yield torch.stack(pending)


def remap_image_codes(
    model_dir: str | os.PathLike[str],
    new_dvae: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    scenes: int = 500,
    seed: int = 7,
    data: str | None = None,
) -> dict[str, Any]:
    """Write ``out_dir`` (see the module notes) and return what ``code_map.json`` there holds: ``data`` and
    ``scenes`` (the images matched on and how many were read), ``new_codes_used``,
    ``old_codes_used``, ``agreement`` (share of cells where the matched old code is the old encoder's) and
    ``map`` (new code -> old code, for the codes the new dVAE used)."""
    if scenes < 1:
        raise ConfigError(f"--scenes must be at least 1, got {scenes}")
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
        raise ConfigError(
            f"{out_dir} already exists and is not empty; remap writes a new model directory, so "
            "give a new OUT"
        )
    pipe = DALLE.from_pretrained(model_dir, device="cpu")
    if not isinstance(pipe.transformer, DALLETransformer):  # its embedding and head are what remap rewrites
        raise ConfigError(
            f"{model_dir} holds a {type(pipe.transformer).__name__}; remap works on dalle's own "
            "model directories"
        )
    encoder, decoder, size = load_dvae(new_dvae)
    if size != pipe.image_size:
        raise ConfigError(
            f"the new dVAE was trained at {size} px and the model works at {pipe.image_size} px; "
            f"train the dVAE with --image-size {pipe.image_size}"
        )
    vocab = pipe.transformer.config.image_vocab_size
    if encoder.vocab_size != vocab:
        raise ConfigError(
            f"the new dVAE has {encoder.vocab_size} codes and the transformer {vocab}; "
            f"train the dVAE with --vocab-size {vocab}"
        )
    data = data or f"shapes:{seed}"
    counts = code_cooccurrence(pipe.encoder, encoder, _image_batches(data, scenes, size), vocab)
    images = int(counts.sum()) // pipe.grid**2
    if images == 0:
        raise ConfigError(f"{data!r} holds no readable image to match the codes on")
    used = counts.sum(1) > 0
    match = counts.argmax(1)
    t = pipe.transformer
    with torch.no_grad():  # image_emb has one more row (the image start token), which stays
        emb, head = t.image_emb.weight, t.image_head.weight
        old_emb, old_head = emb[:vocab].clone(), head.clone()
        emb[:vocab][used] = old_emb[match[used]]
        head[used] = old_head[match[used]]
    pipe.encoder, pipe.decoder = encoder.eval(), decoder.eval()
    out = pipe.save_pretrained(out_dir)
    summary = {
        "data": data,
        "scenes": images,
        "new_codes_used": int(used.sum()),
        "old_codes_used": int((counts.sum(0) > 0).sum()),
        "agreement": float(counts.max(1).values.sum() / counts.sum()),
        "map": {int(j): int(match[j]) for j in torch.nonzero(used).flatten()},
    }
    (Path(out) / "code_map.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

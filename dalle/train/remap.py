"""Put a new dVAE under a trained transformer, as a starting point for fine-tuning the transformer on its codes.

Usage: python -m dalle.train.remap MODEL_DIR NEW_DVAE_DIR OUT_DIR [--scenes N] [--seed S]

Both dVAEs encode the same N rendered shapes-world scenes (``shapes.sample(i, seed)`` at the model's image side).
Each code ``j`` of the new dVAE is matched with the old code ``c`` it most often replaces at the same cell, and
the transformer's image embedding and output row of ``j`` start as those of ``c``; codes the new dVAE never uses
keep their rows. The transformer then predicts roughly the right cells in the new vocabulary, and
``dalle train --init OUT_DIR --dvae OUT_DIR`` fine-tunes it on tokens of the new dVAE. OUT_DIR is a complete
model directory (the new dVAE, the tokenizer and the remapped transformer); ``code_map.json`` there records the
match and how often it held.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from dalle.data import shapes
from dalle.data.datasets import to_uint8_tensor
from dalle.errors import ConfigError, DalleError
from dalle.pipeline import DALLE
from dalle.train.common import load_dvae
from dalle.train.transformer import encode_images


def code_cooccurrence(old_encoder: torch.nn.Module, new_encoder: torch.nn.Module, scenes: int, seed: int,
                      size: int, vocab: int, batch: int = 16) -> torch.Tensor:
    """counts[j, c]: cells where the new encoder gives ``j`` and the old one ``c``, over ``scenes`` scenes."""
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    for start in range(0, scenes, batch):
        pixels = torch.stack([to_uint8_tensor(shapes.sample(i, seed=seed, size=size)[0])
                              for i in range(start, min(start + batch, scenes))])
        old = encode_images(old_encoder, pixels).flatten()
        new = encode_images(new_encoder, pixels).flatten()
        counts += torch.bincount(new * vocab + old, minlength=vocab * vocab).view(vocab, vocab)
    return counts


def remap_image_codes(model_dir: str | os.PathLike[str], new_dvae: str | os.PathLike[str],
                      out_dir: str | os.PathLike[str], scenes: int = 500, seed: int = 7) -> dict[str, Any]:
    """Write ``out_dir`` (see the module notes) and return what ``code_map.json`` there holds: ``new_codes_used``,
    ``old_codes_used``, ``agreement`` (share of cells where the matched old code is the old encoder's) and
    ``map`` (new code -> old code, for the codes the new dVAE used)."""
    if scenes < 1:
        raise ConfigError(f"--scenes must be at least 1, got {scenes}")
    pipe = DALLE.from_pretrained(model_dir, device="cpu")
    encoder, decoder, size = load_dvae(new_dvae)
    if size != pipe.image_size:
        raise ConfigError(f"the new dVAE was trained at {size} px and the model works at {pipe.image_size} px; "
                          f"train the dVAE with --image-size {pipe.image_size}")
    vocab = pipe.transformer.config.image_vocab_size
    if encoder.vocab_size != vocab:
        raise ConfigError(f"the new dVAE has {encoder.vocab_size} codes and the transformer {vocab}; "
                          f"train the dVAE with --vocab-size {vocab}")
    counts = code_cooccurrence(pipe.encoder, encoder, scenes, seed, size, vocab)
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
        "scenes": scenes, "seed": seed, "new_codes_used": int(used.sum()),
        "old_codes_used": int((counts.sum(0) > 0).sum()),
        "agreement": float(counts.max(1).values.sum() / counts.sum()),
        "map": {int(j): int(match[j]) for j in torch.nonzero(used).flatten()},
    }
    (Path(out) / "code_map.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m dalle.train.remap``."""
    p = argparse.ArgumentParser(prog="python -m dalle.train.remap", description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("new_dvae")
    p.add_argument("out_dir")
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    try:
        s = remap_image_codes(a.model_dir, a.new_dvae, a.out_dir, a.scenes, a.seed)
    except DalleError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{s['new_codes_used']} new codes matched to {s['old_codes_used']} old ones; "
          f"the match holds on {100 * s['agreement']:.1f}% of cells; wrote {a.out_dir}")


if __name__ == "__main__":
    main()

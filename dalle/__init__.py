"""dalle: DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation") in PyTorch.

The public API, re-exported from the modules that define it. Names are resolved lazily (PEP 562) so that
``import dalle`` stays cheap and never imports optional pieces (youtokentome, the CLI) until they are used.

OpenAI's notebook flow works with only the import line changed::

    from dalle import map_pixels, unmap_pixels, load_model
    enc = load_model("encoder.pkl", "cpu")
    dec = load_model("decoder.pkl", "cpu")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Encoder": "dalle.dvae",
    "Decoder": "dalle.dvae",
    "map_pixels": "dalle.dvae",
    "unmap_pixels": "dalle.dvae",
    "load_model": "dalle.loading",
    "preprocess": "dalle.images",
    "make_grid": "dalle.images",
    "BPETokenizer": "dalle.tokenizer",
    "TransformerConfig": "dalle.transformer",
    "DALLETransformer": "dalle.transformer",
    "DALLE": "dalle.pipeline",
    "generate": "dalle.pipeline",
    "border_mask": "dalle.pipeline",
    "convert_rudalle": "dalle.pipeline",
    "RuDalleConfig": "dalle.rudalle",
    "RuDalleTokenizer": "dalle.rudalle",
    "RuDalleTransformer": "dalle.rudalle",
    "VQGANEncoder": "dalle.vqgan",
    "VQGANDecoder": "dalle.vqgan",
    "DalleError": "dalle.errors",
    "ModelLoadError": "dalle.errors",
    "UnsafePickleError": "dalle.errors",
    "DownloadError": "dalle.errors",
    "ImageError": "dalle.errors",
    "TokenizerError": "dalle.errors",
    "ConfigError": "dalle.errors",
    "CheckpointError": "dalle.errors",
    "OutOfMemoryError": "dalle.errors",
}

__all__ = [
    "BPETokenizer",
    "CheckpointError",
    "ConfigError",
    "DALLE",
    "DALLETransformer",
    "DalleError",
    "Decoder",
    "DownloadError",
    "Encoder",
    "ImageError",
    "ModelLoadError",
    "OutOfMemoryError",
    "RuDalleConfig",
    "RuDalleTokenizer",
    "RuDalleTransformer",
    "TokenizerError",
    "TransformerConfig",
    "UnsafePickleError",
    "VQGANDecoder",
    "VQGANEncoder",
    "border_mask",
    "convert_rudalle",
    "generate",
    "load_model",
    "make_grid",
    "map_pixels",
    "preprocess",
    "unmap_pixels",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dalle.dvae import Decoder, Encoder, map_pixels, unmap_pixels
    from dalle.errors import (
        CheckpointError,
        ConfigError,
        DalleError,
        DownloadError,
        ImageError,
        ModelLoadError,
        OutOfMemoryError,
        TokenizerError,
        UnsafePickleError,
    )
    from dalle.images import make_grid, preprocess
    from dalle.loading import load_model
    from dalle.pipeline import DALLE, border_mask, convert_rudalle, generate
    from dalle.rudalle import RuDalleConfig, RuDalleTokenizer, RuDalleTransformer
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig
    from dalle.vqgan import VQGANDecoder, VQGANEncoder


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dalle' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

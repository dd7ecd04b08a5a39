"""The DALLE bundle: tokenizer + dVAE + transformer, model directories, and text-to-image generation.

A model directory holds::

    config.json            {"format_version": 1, "name", "image_size", "text_len", "transformer": {...},
                            "encoder": {...}, "decoder": {...}, "trained_with_caption_dropout": bool}
    transformer.safetensors
    encoder.safetensors
    decoder.safetensors
    tokenizer.model        (youtokentome BPE model)

Seeds: image ``k`` (0-based) of a prompt generated with seed ``s`` is sampled from its own
``torch.Generator`` seeded with ``s + k``. It does not depend on the batch size, on the other prompts of the
call or on ``num_images``: ``generate(p, num_images=1, seed=s + k)`` gives the same image again (on the same
device). Numerical differences between batch shapes are far below what flips a sampled token in practice.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from dalle._files import publish
from dalle.errors import ConfigError, ModelLoadError, OutOfMemoryError
from dalle.loading import PRETRAINED_DIR, resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder
    from dalle.images import ImageLike
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig

FORMAT_VERSION = 1
DEFAULT_MODEL = "shapes"
#: registered model names -> model directories shipped inside the package
REGISTRY: dict[str, Path] = {"shapes": PRETRAINED_DIR / "shapes", "shapes-128": PRETRAINED_DIR / "shapes-128"}

_FILES = ("config.json", "transformer.safetensors", "encoder.safetensors", "decoder.safetensors", "tokenizer.model")

Scorer = Callable[[str, list[Image.Image]], torch.Tensor]

# how allocators word running out of memory: CUDA's caching allocator, and the CPU allocator on Linux / Windows
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


#: seeds are taken modulo 2**32 by CPU generators, so larger ones would repeat smaller ones' images
SEED_LIMIT = 2**32


def _base_seed(seed: int | None, count: int = 1) -> int:
    """The given seed, or a random one; rejects what is not an integer in [0, 2**32 - count] (the seeds of
    the ``count`` images are seed, seed + 1, ..., all below 2**32)."""
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_LIMIT - count:
        raise ConfigError(f"seed must be an integer from 0 to {SEED_LIMIT - count} (image k of a prompt uses seed + k, "
                          f"below 2**32) or None, got {seed!r}")
    return int(seed)


def kv_cache_bytes(config: TransformerConfig, dtype: torch.dtype) -> int:
    """Bytes of the static KV cache for one sampled row: keys and values of every layer over the stream."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.depth * config.heads * config.seq_len * config.head_dim * itemsize


def batch_size_for_memory(free_bytes: int, cache_bytes_per_row: int, cap: int = 32) -> int:
    """Rows to sample at once so that two caches per row fit in half of ``free_bytes`` (1..``cap``)."""
    return int(max(1, min(cap, free_bytes // 2 // max(1, 2 * cache_bytes_per_row))))


@contextlib.contextmanager
def _out_of_memory_as_error(what: str, n: int, device: torch.device) -> Iterator[None]:
    """Turn an allocator failure inside the block into :class:`OutOfMemoryError` naming ``batch_size``."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise OutOfMemoryError(
            f"out of memory while {what} a batch of {n} images on {device}; "
            f"pass a smaller batch_size (e.g. {max(1, n // 2)}) or fewer images"
        ) from exc


def resolve_model(name_or_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the model directory for a directory path or a registered name (e.g. ``"shapes"``).

    None is the bundled default model (``"shapes"``), whatever the current directory holds. A model directory
    (one holding ``config.json``) at the given path wins over a registered name, as a local folder does in
    Hugging Face's ``from_pretrained``, with a warning; pass ``"./shapes"`` style paths to be explicit.
    """
    key = DEFAULT_MODEL if name_or_dir is None else str(name_or_dir)
    local = name_or_dir is not None and (Path(key).expanduser() / "config.json").is_file()
    if key in REGISTRY and not local:
        path = REGISTRY[key]
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the registered model {key!r} is not installed at {path}; reinstall dalle or pass a directory"
            )
        return path
    if key in REGISTRY and not any(ch in key for ch in "/\\"):
        warnings.warn(f"the model directory {key!r} in the current directory is used, not the bundled model of that "
                      f"name (leave the model unset for the bundled default, or pass './{key}' to say you mean the "
                      "directory)", UserWarning, stacklevel=3)
    path = Path(name_or_dir).expanduser()
    if not path.exists():
        names = ", ".join(sorted(REGISTRY))
        raise ModelLoadError(f"no model directory {str(path)!r} and no registered model of that name (known: {names})")
    if not path.is_dir():
        raise ModelLoadError(f"{str(path)!r} is a file; a model is a directory written by DALLE.save_pretrained")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise ModelLoadError(
            f"model directory {str(path)!r} lacks {', '.join(missing)}; it must hold {', '.join(_FILES)}"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path / 'config.json'} has format_version {version!r}; this dalle reads version {FORMAT_VERSION}. "
            "Upgrade dalle or re-save the model."
        )
    for key in ("transformer", "encoder", "decoder", "image_size"):
        if key not in config:
            raise ModelLoadError(f"{path / 'config.json'} lacks the key {key!r}")
    return config


def _load_weights(module: torch.nn.Module, file: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(module, str(file), strict=False)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc
    except RuntimeError as exc:  # shape mismatches
        raise ModelLoadError(f"weights in {file} do not fit the model described in config.json: {exc}") from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {file} do not fit config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def _save_weights(module: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import save_model

    tmp = file.with_name(file.name + ".tmp")
    save_model(module, str(tmp))
    publish(tmp, file)


def describe_model(name_or_dir: str | os.PathLike[str]) -> str:
    """A few lines describing a model directory (for ``dalle info --model``), without loading the weights."""
    path = resolve_model(name_or_dir)
    cfg = _read_config(path)
    t = cfg["transformer"]
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    lines = [
        f"model        {cfg.get('name', path.name)} ({path})",
        f"image        {cfg['image_size']}x{cfg['image_size']} pixels, "
        f"{t.get('image_grid')}x{t.get('image_grid')} tokens from {t.get('image_vocab_size')} codes",
        f"text         up to {t.get('text_len')} tokens, vocabulary {t.get('text_vocab_size')}",
        f"transformer  {t.get('depth')} layers, {t.get('heads')} heads of {t.get('head_dim')}",
        f"guidance     {'yes' if cfg.get('trained_with_caption_dropout') else 'no'} (caption dropout in training)",
        f"files        {size / 2**20:.1f} MiB",
    ]
    return "\n".join(lines)


@dataclass
class GenerationOutput:
    """Images with the token grids and per-image seeds they came from (``return_tokens=True``)."""

    images: list[Image.Image]
    tokens: torch.Tensor
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    scores: torch.Tensor | None = None


class DALLE:
    """Text-to-image generation with a tokenizer, a dVAE (encoder + decoder) and a transformer.

    Build one with :meth:`from_pretrained` (a directory or a registered name such as ``"shapes"``), or from
    parts. All modules live on ``self.device`` in eval mode.
    """

    def __init__(
        self,
        tokenizer: BPETokenizer,
        encoder: Encoder,
        decoder: Decoder,
        transformer: DALLETransformer,
        image_size: int,
        *,
        name: str = "custom",
        trained_with_caption_dropout: bool = False,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> None:
        cfg = transformer.config
        grid = cfg.image_grid
        if image_size % 8 or image_size // 8 != grid:
            raise ConfigError(
                f"image_size {image_size} does not match the transformer's {grid}x{grid} token grid "
                f"(the dVAE downsamples by 8, so image_size must be {grid * 8})"
            )
        if encoder.vocab_size != cfg.image_vocab_size or decoder.vocab_size != cfg.image_vocab_size:
            raise ConfigError(
                f"dVAE vocabulary ({encoder.vocab_size}/{decoder.vocab_size}) differs from the transformer's "
                f"image vocabulary ({cfg.image_vocab_size})"
            )
        if tokenizer.vocab_size > cfg.text_vocab_size:
            raise ConfigError(
                f"tokenizer vocabulary {tokenizer.vocab_size} exceeds the transformer's text vocabulary "
                f"{cfg.text_vocab_size}"
            )
        self.tokenizer = tokenizer
        from dalle.tokenizer import PAD_ID, UNK_ID, WORD_MARK

        vocab = tokenizer.vocab()  # pads, unknowns and a bare word marker say nothing about the image
        self._no_info_ids = torch.tensor([PAD_ID, UNK_ID] + ([vocab.index(WORD_MARK)] if WORD_MARK in vocab else []))
        self.image_size = int(image_size)
        self.name = name
        self.trained_with_caption_dropout = bool(trained_with_caption_dropout)
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        # inference only: no parameter needs a gradient (nor autocast a cached half-precision copy of it)
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)
        self.decoder = decoder.to(self.device).eval().requires_grad_(False)
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        # the modules' own CUDA precision follows the pipeline's (they would otherwise pick bfloat16 themselves)
        self.encoder.set_dtype(dtype)
        self.decoder.set_dtype(dtype)
        self.transformer.cuda_dtype = dtype
        if self.device.type == "cuda" and dtype != torch.float32:
            self.transformer.cast_matmul_weights(dtype)
        self.compiled = bool(compile)
        if self.compiled:
            self.transformer.compile_decoding()

    # ------------------------------------------------------------------ properties
    @property
    def grid(self) -> int:
        """Side of the image token grid."""
        return int(self.transformer.config.image_grid)

    @property
    def text_len(self) -> int:
        """Number of text positions of the transformer."""
        return int(self.transformer.config.text_len)

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device | None = "auto",
        dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> DALLE:
        """Load a model directory written by :meth:`save_pretrained`, or a registered name (``"shapes"``); None
        (the default) is the bundled default model.

        ``device="auto"`` picks CUDA when present. ``dtype`` is the compute precision: None gives float32 on
        CPU and bfloat16 on CUDA (the blocks' matmul weights stored in bfloat16, the rest float32 under
        autocast). ``compile=True`` compiles the one-token decode step (CUDA graphs on CUDA; see
        :meth:`DALLETransformer.compile_decoding`): the first generation pays the compilation.
        """
        from dalle.dvae import Decoder, Encoder
        from dalle.tokenizer import BPETokenizer
        from dalle.transformer import DALLETransformer, TransformerConfig

        path = resolve_model(name_or_dir)
        cfg = _read_config(path)
        try:
            tcfg = TransformerConfig.from_dict(cfg["transformer"])
            encoder = Encoder(**cfg["encoder"])
            decoder = Decoder(**cfg["decoder"])
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path / 'config.json'} describes an invalid model: {exc}") from exc
        transformer = DALLETransformer(tcfg)
        _load_weights(transformer, path / "transformer.safetensors")
        _load_weights(encoder, path / "encoder.safetensors")
        _load_weights(decoder, path / "decoder.safetensors")
        tokenizer = BPETokenizer.load(path / "tokenizer.model")
        return cls(
            tokenizer,
            encoder,
            decoder,
            transformer,
            int(cfg["image_size"]),
            name=str(cfg.get("name", path.name)),
            trained_with_caption_dropout=bool(cfg.get("trained_with_caption_dropout", False)),
            device=device,
            dtype=dtype,
            compile=compile,
        )

    def config(self) -> dict[str, Any]:
        """The ``config.json`` content of this model."""
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "image_size": self.image_size,
            "text_len": self.text_len,
            "trained_with_caption_dropout": self.trained_with_caption_dropout,
            "transformer": self.transformer.config.to_dict(),
            "encoder": self.encoder.config(),
            "decoder": self.decoder.config(),
        }

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model directory (config, safetensors weights, tokenizer); each file is replaced atomically."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _save_weights(self.transformer, path / "transformer.safetensors")
        _save_weights(self.encoder, path / "encoder.safetensors")
        _save_weights(self.decoder, path / "decoder.safetensors")
        tmp = path / "tokenizer.model.tmp"
        self.tokenizer.save(tmp)
        os.replace(tmp, path / "tokenizer.model")
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(self.config(), indent=2) + "\n")
        os.replace(tmp, path / "config.json")
        return path

    # ------------------------------------------------------------------ helpers
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [len(prompts), text_len] on the model's device (lowercased BPE, padded)."""
        return self.tokenizer.encode(list(prompts), text_len=self.text_len).to(self.device)

    @torch.inference_mode()
    def decode_tokens(self, tokens: torch.Tensor, batch_size: int | None = None) -> list[Image.Image]:
        """Decode image token grids ([B, grid, grid] or [B, grid * grid]) to PIL images, ``batch_size`` at a time."""
        from dalle.images import to_pil

        cells = self.grid * self.grid
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
            raise ConfigError(f"tokens must be an integer tensor of image token ids, got {type(tokens).__name__}"
                              + (f" of {tokens.dtype}" if isinstance(tokens, torch.Tensor) else ""))
        if tokens.numel() == 0 or tokens.numel() % cells:
            raise ConfigError(
                f"tokens of shape {tuple(tokens.shape)} are not image token grids of this model: expected "
                f"[B, {self.grid}, {self.grid}] or [B, {cells}]"
            )
        tokens = tokens.reshape(-1, self.grid, self.grid)
        vocab = self.decoder.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ConfigError(f"image token ids must lie in [0, {vocab}), got {int(tokens.min())}..{int(tokens.max())}")
        bs = batch_size or self._default_batch_size()
        images: list[Image.Image] = []
        for i in range(0, len(tokens), bs):
            chunk = tokens[i : i + bs].to(self.device)
            with _out_of_memory_as_error("decoding", len(chunk), self.device):
                pixels = self.decoder.decode(chunk)
            out = to_pil(pixels.float().clamp(0, 1).cpu())
            images.extend(out if isinstance(out, list) else [out])
        return images

    @torch.inference_mode()
    def encode_image(self, image: ImageLike, *, allow_upscale: bool = False) -> torch.Tensor:
        """Encode an image (path, PIL, array or tensor) to its token grid [1, grid, grid]."""
        from dalle.images import preprocess

        x = preprocess(image, size=self.image_size, allow_upscale=allow_upscale).to(self.device)
        return self.encoder.encode(x)  # the dVAE computes in the precision set_dtype gave it

    def reconstruct(self, image: ImageLike, *, allow_upscale: bool = False) -> Image.Image:
        """dVAE round trip of one image: encode to tokens, decode back."""
        return self.decode_tokens(self.encode_image(image, allow_upscale=allow_upscale))[0]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], tokens: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Mean log-likelihood per image token of each grid given its prompt (the built-in rerank score)."""
        cells = self.grid * self.grid
        if not isinstance(tokens, torch.Tensor) or tokens.numel() != len(prompts) * cells:
            raise ConfigError(
                f"score needs one {self.grid}x{self.grid} token grid per prompt: {len(prompts)} prompts, got "
                f"tokens of shape {tuple(getattr(tokens, 'shape', ()))}"
            )
        tokens = tokens.reshape(len(prompts), -1)
        bs = batch_size or self._default_batch_size()
        out = []
        for i in range(0, len(prompts), bs):
            text = self.encode_text(prompts[i : i + bs])
            ll = self.transformer.image_log_likelihood(text, tokens[i : i + bs].to(self.device))
            out.append(ll.float().cpu())
        return torch.cat(out) / tokens.shape[1]

    def _default_batch_size(self) -> int:
        """8 on CPU; on CUDA as many rows (at most 32) as half the free memory holds, counting two KV caches
        per row (guidance samples two streams per image)."""
        if self.device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_size_for_memory(free, kv_cache_bytes(self.transformer.config, self.dtype))

    def _check_sampling_args(
        self, temperature: float, top_k: int | None, top_p: float | None, guidance_scale: float | None,
        batch_size: int | None = None,
    ) -> None:
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
            raise ConfigError(f"top_k must be a positive integer or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if guidance_scale is not None and not (isinstance(guidance_scale, (int, float)) and guidance_scale > 0):
            raise ConfigError(f"guidance_scale must be a number > 0 or None, got {guidance_scale!r}")
        if guidance_scale is not None and not self.trained_with_caption_dropout:
            raise ConfigError(
                f"model {self.name!r} was not trained with caption dropout, so it has no unconditional mode "
                "for classifier-free guidance; leave guidance_scale (--guidance) unset or train with --caption-dropout"
            )

    def _warn_if_no_text(self, prompts: list[str], text: torch.Tensor) -> None:
        """Warn when a prompt has no known token: the model then draws from its caption-free mode, which only a
        model trained with caption dropout has learned."""
        empty = torch.isin(text.cpu(), self._no_info_ids).all(dim=1).tolist()
        for prompt in dict.fromkeys(p for p, e in zip(prompts, empty) if e):
            what = "is empty" if not prompt.strip() else "holds no character the tokenizer knows"
            mode = (
                "an unconditional sample" if self.trained_with_caption_dropout
                else "arbitrary images (this model was not trained with empty captions)"
            )
            warnings.warn(f"prompt {prompt!r} {what}, so the model produces {mode}", UserWarning, stacklevel=4)

    def _sample_rows(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        prime: torch.Tensor | None,
        batch_size: int | None,
        progress: bool,
        callback: Callable[[int, torch.Tensor], None] | None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Sample one token grid per (prompt, seed) row, in micro-batches; returns [N, grid, grid] on CPU."""
        bs = batch_size or self._default_batch_size()  # batch_size was checked by _check_sampling_args
        grids = []
        try:
            for i in range(0, len(prompts), bs):
                text = self.encode_text(prompts[i : i + bs])
                self._warn_if_no_text(prompts[i : i + bs], text)
                gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds[i : i + bs]]
                p = None if prime is None else prime[i : i + bs].to(self.device)
                with _out_of_memory_as_error("sampling", len(gens), self.device):
                    out = self.transformer.sample(
                        text, generator=gens, prime=p, callback=callback, progress=progress, **sampling
                    )
                grids.append(out.reshape(-1, self.grid, self.grid).cpu())
        finally:
            if not self.compiled:  # a compiled step keeps its cache: new storage would mean recording anew
                self.transformer.reset_cache()  # the KV cache can be large (also after a failure)
        return torch.cat(grids)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: str | Sequence[str],
        num_images: int = 1,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        rerank: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        return_tokens: bool = False,
        *,
        scorer: Scorer | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[Image.Image] | GenerationOutput:
        """Generate ``num_images`` images for each prompt.

        Args:
            prompts: one caption or a list of (different) captions.
            num_images: images per prompt; the result lists them prompt by prompt.
            seed: base seed; image k of a prompt uses seed ``seed + k`` (random when None; see
                ``GenerationOutput.seeds``).
            temperature, top_k, top_p: sampling settings (the paper samples at temperature 1, no top-k/p).
            guidance_scale: classifier-free guidance strength (models trained with caption dropout only).
            rerank: draw this many candidates per prompt and keep the ``num_images`` best by ``scorer``
                (default: the model's own mean image-token log-likelihood).
            batch_size: images sampled at once (default 8 on CPU; on CUDA up to 32, as many as half the free
                memory holds with two KV caches per image).
            progress: show a tqdm bar over image tokens.
            return_tokens: return a :class:`GenerationOutput` with token grids, seeds and scores.
            scorer: ``score(prompt, images) -> tensor`` of one score per image, higher is better (e.g. CLIP).
            callback: ``callback(step, tokens)`` during sampling, for showing partial images.
        """
        if not isinstance(prompts, (str, Iterable)):
            raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ConfigError("no prompts given")
        for i, p in enumerate(prompt_list):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, not a string")
        if not (isinstance(num_images, int) and num_images >= 1):
            raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
        candidates = num_images
        if rerank is not None:
            if not (isinstance(rerank, int) and rerank >= num_images):
                raise ConfigError(f"rerank ({rerank!r}) must be an integer >= num_images ({num_images})")
            candidates = rerank
        self._check_sampling_args(temperature, top_k, top_p, guidance_scale, batch_size)
        base = _base_seed(seed, candidates)

        rows = [p for p in prompt_list for _ in range(candidates)]
        seeds = [base + k for _ in prompt_list for k in range(candidates)]
        tokens = self._sample_rows(
            rows,
            seeds,
            prime=None,
            batch_size=batch_size,
            progress=progress,
            callback=callback,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            guidance_scale=guidance_scale,
        )
        scores = None
        if rerank is not None:
            tokens, seeds, scores = self._rerank(prompt_list, tokens, seeds, candidates, num_images, scorer, batch_size)
        images = self.decode_tokens(tokens, batch_size)
        if return_tokens:
            kept_prompts = [p for p in prompt_list for _ in range(num_images)]
            return GenerationOutput(images, tokens, seeds, kept_prompts, scores)
        return images

    def _rerank(
        self,
        prompts: list[str],
        tokens: torch.Tensor,
        seeds: list[int],
        candidates: int,
        keep: int,
        scorer: Scorer | None,
        batch_size: int | None,
    ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        kept_tokens, kept_seeds, kept_scores = [], [], []
        for j, prompt in enumerate(prompts):
            cand = tokens[j * candidates : (j + 1) * candidates]
            if scorer is None:
                s = self.score([prompt] * candidates, cand, batch_size)
            else:
                s = torch.as_tensor(scorer(prompt, self.decode_tokens(cand, batch_size)), dtype=torch.float32).flatten().cpu()
                if s.numel() != candidates:
                    raise ConfigError(f"scorer returned {s.numel()} scores for {candidates} images")
            order = torch.argsort(s, descending=True, stable=True)[:keep]
            kept_tokens.append(cand[order])
            kept_seeds.extend(seeds[j * candidates + int(i)] for i in order)
            kept_scores.append(s[order])
        return torch.cat(kept_tokens), kept_seeds, torch.cat(kept_scores)

    @property
    def completion_rows(self) -> int:
        """Token rows :meth:`complete` keeps by default: the paper's 15 of 32, rounded for other grids."""
        return round(self.grid * 15 / 32)

    def complete(
        self,
        image: ImageLike,
        prompt: str,
        rows: int | None = None,
        num_images: int = 1,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        batch_size: int | None = None,
        progress: bool = True,
        return_tokens: bool = False,
        *,
        allow_upscale: bool = False,
        callback: Callable[[int, torch.Tensor], None] | None = None,
    ) -> list[Image.Image] | GenerationOutput:
        """Image completion: keep the top ``rows`` token rows of ``image`` and sample the rest from ``prompt``.

        ``rows`` defaults to the paper's proportion, 15 of 32 rows (rounded for other grid sizes). The kept
        token rows are returned unchanged (``return_tokens=True`` shows them).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt is {type(prompt).__name__}, not a string")
        if rows is None:
            rows = self.completion_rows
        if not (isinstance(rows, int) and 0 <= rows <= self.grid):
            raise ConfigError(f"rows must be an integer between 0 and {self.grid}, got {rows!r}")
        if not (isinstance(num_images, int) and num_images >= 1):
            raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
        self._check_sampling_args(temperature, top_k, top_p, guidance_scale, batch_size)
        base = _base_seed(seed, num_images)
        source = self.encode_image(image, allow_upscale=allow_upscale).cpu()
        prime = source[:, :rows].reshape(1, -1).repeat(num_images, 1)
        seeds = [base + k for k in range(num_images)]
        tokens = self._sample_rows(
            [prompt] * num_images,
            seeds,
            prime=prime if rows > 0 else None,
            batch_size=batch_size,
            progress=progress,
            callback=callback,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            guidance_scale=guidance_scale,
        )
        images = self.decode_tokens(tokens, batch_size)
        if return_tokens:
            return GenerationOutput(images, tokens, seeds, [prompt] * num_images)
        return images


_DEFAULT_MODELS: dict[tuple[str, str], DALLE] = {}


def load_default(device: str | torch.device | None = "auto") -> DALLE:
    """The bundled default model (``"shapes"``), loaded once per device and cached."""
    dev = resolve_device(device)
    key = (DEFAULT_MODEL, str(dev))
    if key not in _DEFAULT_MODELS:
        _DEFAULT_MODELS[key] = DALLE.from_pretrained(None, device=dev)
    return _DEFAULT_MODELS[key]


def generate(
    prompt: str | Sequence[str],
    *,
    model: str | os.PathLike[str] | DALLE | None = None,
    device: str | torch.device = "auto",
    **kwargs: Any,
) -> list[Image.Image] | GenerationOutput:
    """Generate images with the default model (or ``model``: a DALLE, a directory or a registered name).

    Keyword arguments are those of :meth:`DALLE.generate`.
    """
    if model is None:
        pipe = load_default(device)
    elif isinstance(model, DALLE):
        pipe = model
    else:
        pipe = DALLE.from_pretrained(model, device=device)
    return pipe.generate(prompt, **kwargs)


__all__ = ["DALLE", "GenerationOutput", "generate", "load_default", "describe_model", "resolve_model", "REGISTRY"]

"""The DALLE bundle: tokenizer + dVAE + transformer, loading and saving model directories, and text-to-image
generation.

A model directory (:mod:`dalle.model_dir`: the format, its writer and readers) holds ``config.json``,
``transformer.safetensors``, ``encoder.safetensors``, ``decoder.safetensors`` and ``tokenizer.model``.
``architecture`` (absent: ``"dalle"``) names the transformer class:
:class:`~dalle.transformer.DALLETransformer` with :class:`~dalle.tokenizer.BPETokenizer`, or
:class:`~dalle.rudalle.RuDalleTransformer` with :class:`~dalle.rudalle.RuDalleTokenizer` (``transformer`` then
holds a ``RuDalleConfig``).
``image_tokenizer`` (absent: ``"dvae"``) names the image tokenizer: OpenAI's dVAE (:mod:`dalle.dvae`) or a
taming VQGAN (:mod:`dalle.vqgan`; ``encoder`` / ``decoder`` hold their constructor arguments). ``sampling``
(optional) holds the model's default sampling settings, used where ``generate`` is not given them.
Weights keep the dtype they were written in (ruDALL-E's float16 stays float16 on disk).

ruDALL-E models load without ever holding a float32 copy on CUDA: the modules are built on the ``meta``
device and take the tensors read one by one from the memory-mapped safetensors file (``assign=True``), in
float16 (their own dtype; ``dtype=torch.bfloat16`` converts) on CUDA and in float32 on the CPU, which computes
in float32 (a model that would not fit in the available memory is refused before loading, with the figures).
The registered names ``rudalle-malevich``, ``rudalle-malevich-v2``, ``rudalle-emojich``,
``rudalle-surrealist-xl`` and ``rudalle-kandinsky`` download the released files from the Hugging Face Hub and
convert them once into a model directory in the cache (:func:`dalle.hub.ensure_rudalle_model`).

Seeds: image ``k`` (0-based) of a prompt generated with seed ``s`` is sampled from its own
``torch.Generator`` seeded with ``s + k``. It does not depend on the batch size, on the other prompts of the
call or on ``num_images``: ``generate(p, num_images=1, seed=s + k)`` gives the same image again (on the same
device). Numerical differences between batch shapes are far below what flips a sampled token in practice.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from dalle.errors import ConfigError, ModelLoadError, OutOfMemoryError, TokenizerError
from dalle.hub import convert_rudalle, download_rudalle, ensure_rudalle_model
from dalle.loading import PRETRAINED_DIR, resolve_device
from dalle.model_dir import (
    ARCHITECTURES,
    FORMAT_VERSION,
    IMAGE_TOKENIZERS,
    check_sampling_defaults,
    load_transformer,
    load_weights,
    model_config,
    read_config,
    write_model_files,
)

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder
    from dalle.images import ImageLike
    from dalle.rudalle import RuDalleConfig, RuDalleTokenizer, RuDalleTransformer
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig
    from dalle.vqgan import VQGANDecoder, VQGANEncoder

DEFAULT_MODEL = "shapes"
#: registered model names -> model directories shipped inside the package
REGISTRY: dict[str, Path] = {"shapes": PRETRAINED_DIR / "shapes", "shapes-128": PRETRAINED_DIR / "shapes-128"}

Scorer = Callable[[str, list[Image.Image]], torch.Tensor]

# how allocators word running out of memory: CUDA's caching allocator, and the CPU allocator
# on Linux / Windows
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
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, np.integer))
        or not 0 <= seed <= SEED_LIMIT - count
    ):
        raise ConfigError(
            f"seed must be an integer from 0 to {SEED_LIMIT - count} (image k of a prompt uses seed + k, "
            f"below 2**32) or None, got {seed!r}"
        )
    return int(seed)


def kv_cache_bytes(config: TransformerConfig | RuDalleConfig, dtype: torch.dtype) -> int:
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
    from dalle.rudalle import RUDALLE_HUB

    key = DEFAULT_MODEL if name_or_dir is None else str(name_or_dir)
    local = name_or_dir is not None and (Path(key).expanduser() / "config.json").is_file()
    if key in RUDALLE_HUB and not local:
        return ensure_rudalle_model(key)
    if key in REGISTRY and not local:
        path = REGISTRY[key]
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the registered model {key!r} is not installed at {path}; "
                "reinstall dalle or pass a directory"
            )
        return path
    if key in REGISTRY and not any(ch in key for ch in "/\\"):
        warnings.warn(
            f"the model directory {key!r} in the current directory is used, not the bundled model of that "
            f"name (leave the model unset for the bundled default, or pass './{key}' to say you mean the "
            "directory)",
            UserWarning,
            stacklevel=3,
        )
    path = Path(key).expanduser()  # key is the given path (None was the default model)
    if not path.exists():
        names = ", ".join(sorted(REGISTRY) + sorted(RUDALLE_HUB))
        raise ModelLoadError(
            f"no model directory {str(path)!r} and no registered model of that name (known: {names})"
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"{str(path)!r} is a file; a model is a directory written by DALLE.save_pretrained"
        )
    return path


def default_dtype(device: torch.device, architecture: str = "dalle") -> torch.dtype:
    """The compute precision a pipeline uses unless told: float32 on the CPU; on CUDA bfloat16 for dalle
    models and float16 for ruDALL-E models (their weights' own dtype; rudalle runs them in float16)."""
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if architecture == "rudalle" else torch.bfloat16


def _float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_fits(what: str, num_params: int, dtype: torch.dtype, device: torch.device) -> None:
    """OutOfMemoryError, before anything is allocated, when ``num_params`` in ``dtype`` cannot fit on
    ``device``."""
    need = num_params * torch.empty((), dtype=dtype).element_size()
    free = _available_memory(device)
    if free is None or need <= free:
        return
    gib = 2**30
    if device.type == "cpu":
        half = num_params * 2 / gib
        raise OutOfMemoryError(
            f"{what} has {num_params / 1e9:.2f}B parameters: {need / gib:.1f} GiB as float32, "
            f"which the CPU needs (it computes in float32), but only {free / gib:.1f} GiB of memory "
            f"is available. Run it on a CUDA GPU (float16 weights, {half:.1f} GiB of GPU memory "
            "plus the KV cache) or on a machine with more memory"
        )
    raise OutOfMemoryError(
        f"{what} needs {need / gib:.1f} GiB for its {dtype} weights on {device}, "
        f"but only {free / gib:.1f} GiB is free; use a GPU with more memory, "
        "free memory held by other processes, or run on the CPU"
    )


def _read_safetensors(
    file: Path, device: torch.device, dtype: torch.dtype | None
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """(tensors, stored float dtype) of a safetensors file, read tensor by tensor from the memory-mapped file
    straight to ``device`` and converted to ``dtype`` (floating-point tensors only; None keeps them)."""
    from safetensors import SafetensorError, safe_open

    state, stored = {}, None
    try:
        with safe_open(
            str(file), framework="pt", device="cpu" if device.type != "cuda" else str(device)
        ) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point():
                    stored = stored or t.dtype
                    t = t.to(dtype) if dtype is not None else t
                state[key] = t.to(device)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read weights from {file}: {exc}") from exc
    return state, stored or torch.float32


def _load_rudalle_transformer(
    file: Path, config: RuDalleConfig, device: torch.device, dtype: torch.dtype, what: str
) -> tuple[RuDalleTransformer, torch.dtype]:
    """(model, dtype stored on disk): built on meta, taking the tensors of ``file`` in ``dtype`` on
    ``device``."""
    from dalle.rudalle import RuDalleTransformer

    with torch.device("meta"):
        num_params = RuDalleTransformer(config).num_parameters()
    _check_fits(f"the transformer of {what!r}", num_params, dtype, device)
    state, stored = _read_safetensors(file, device, dtype)
    try:
        model = RuDalleTransformer.from_rudalle_checkpoint(state, config, device=device, dtype=None)
    except ModelLoadError as exc:
        raise ModelLoadError(f"weights in {file} do not fit config.json: {exc}") from exc
    return model, stored


def _load_image_tokenizer(path: Path, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """(encoder, decoder) of a model directory: OpenAI's dVAE or a taming VQGAN (float32 weights)."""
    if cfg.get("image_tokenizer", "dvae") == "dvae":
        from dalle.dvae import Decoder, Encoder

        encoder, decoder = Encoder(**cfg["encoder"]), Decoder(**cfg["decoder"])
        load_weights(encoder, path / "encoder.safetensors")
        load_weights(decoder, path / "decoder.safetensors")
        return encoder, decoder
    from dalle.vqgan import VQGANDecoder, VQGANEncoder

    halves = []
    for cls, key in ((VQGANEncoder, "encoder"), (VQGANDecoder, "decoder")):
        module = cls(**{**cfg[key], "device": "meta"})
        state, _ = _read_safetensors(path / f"{key}.safetensors", torch.device("cpu"), torch.float32)
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"weights in {path / f'{key}.safetensors'} do not fit config.json: {exc}"
            ) from exc
        halves.append(module)
    return halves[0], halves[1]


def describe_model(name_or_dir: str | os.PathLike[str]) -> str:
    """A few lines describing a model directory (for ``dalle info --model``), without loading the weights."""
    path = resolve_model(name_or_dir)
    cfg = read_config(path)
    t = cfg["transformer"]
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    lines = [
        f"model        {cfg.get('name', path.name)} ({path})",
        f"architecture {cfg.get('architecture', 'dalle')} transformer, "
        f"{cfg.get('image_tokenizer', 'dvae')} images",
        f"image        {cfg['image_size']}x{cfg['image_size']} pixels, "
        f"{t.get('image_grid')}x{t.get('image_grid')} tokens from {t.get('image_vocab_size')} codes",
        f"text         up to {t.get('text_len')} tokens, vocabulary {t.get('text_vocab_size')}",
        f"transformer  {t.get('depth')} layers, {t.get('heads')} heads of {t.get('head_dim')}",
        f"guidance     {'yes' if cfg.get('trained_with_caption_dropout') else 'no'} "
        "(caption dropout in training)",
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
    """Text-to-image generation with a text tokenizer, an image tokenizer (encoder + decoder) and a
    transformer.

    Parts: a :class:`~dalle.transformer.DALLETransformer` with a :class:`~dalle.tokenizer.BPETokenizer`, or a
    :class:`~dalle.rudalle.RuDalleTransformer` with a :class:`~dalle.rudalle.RuDalleTokenizer`; either with
    OpenAI's dVAE (:class:`~dalle.dvae.Encoder` / :class:`~dalle.dvae.Decoder`) or a taming VQGAN
    (:class:`~dalle.vqgan.VQGANEncoder` / :class:`~dalle.vqgan.VQGANDecoder`). Build one with
    :meth:`from_pretrained` (a directory or a registered name such as ``"shapes"`` or ``"rudalle-malevich"``),
    or from parts. All modules live on ``self.device`` in eval mode. ``sampling`` holds default sampling
    settings (``top_k``, ``top_p``, ``sampler``, ``filter``) that :meth:`generate` uses where it is not given
    them.
    """

    def __init__(
        self,
        tokenizer: BPETokenizer | RuDalleTokenizer,
        encoder: Encoder | VQGANEncoder,
        decoder: Decoder | VQGANDecoder,
        transformer: DALLETransformer | RuDalleTransformer,
        image_size: int,
        *,
        name: str = "custom",
        trained_with_caption_dropout: bool = False,
        device: str | torch.device | None = "cpu",
        dtype: torch.dtype | None = None,
        compile: bool = False,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        from dalle.rudalle import RuDalleTokenizer, RuDalleTransformer

        cfg = transformer.config
        grid = cfg.image_grid
        self.architecture = "rudalle" if isinstance(transformer, RuDalleTransformer) else "dalle"
        self.image_tokenizer = "dvae" if getattr(encoder, "kind", None) != "vqgan-encoder" else "vqgan"
        if self.architecture == "rudalle" and not isinstance(tokenizer, RuDalleTokenizer):
            raise ConfigError(
                f"a RuDalleTransformer reads captions encoded by RuDalleTokenizer ([2] + ids + [3], "
                f"0-padded), got a {type(tokenizer).__name__}; wrap the BPE model with RuDalleTokenizer"
            )
        factor = int(getattr(encoder, "factor", 8))  # pixels per token side of the encoder's input
        if image_size % factor or image_size // factor != grid:
            raise ConfigError(
                f"image_size {image_size} does not match the transformer's {grid}x{grid} token grid "
                f"(the image tokenizer downsamples by {factor}, so image_size must be {grid * factor})"
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
        no_info = [PAD_ID, UNK_ID] + ([vocab.index(WORD_MARK)] if WORD_MARK in vocab else [])
        if isinstance(tokenizer, RuDalleTokenizer):  # nor do the BOS / EOS every ruDALL-E caption carries
            no_info += [tokenizer.bos_id, tokenizer.eos_id]
        self._no_info_ids = torch.tensor(sorted(set(no_info)))
        self.sampling = check_sampling_defaults(sampling or {})
        self.image_size = int(image_size)
        self.name = name
        self.trained_with_caption_dropout = bool(trained_with_caption_dropout)
        self.device = resolve_device(device)
        if dtype is None:
            dtype = default_dtype(self.device, self.architecture)
        self.dtype = dtype
        #: dtype of the transformer's floating-point weights in the files save_pretrained writes by default
        self.weights_dtype = _float_dtype(transformer)
        # inference only: no parameter needs a gradient (nor autocast a cached half-precision copy of it)
        self.encoder = encoder.to(self.device).eval().requires_grad_(False)
        self.decoder = decoder.to(self.device).eval().requires_grad_(False)
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        # the modules' own CUDA precision follows the pipeline's (they would otherwise pick bfloat16
        # themselves)
        self.encoder.set_dtype(dtype)
        self.decoder.set_dtype(dtype)
        self.transformer.cuda_dtype = dtype
        if self.architecture == "rudalle":
            # CUDA: every weight in the compute dtype, as rudalle's fp16 mode (its clamps and PB-relax are
            # made for float16); CPU: float32, the only precision the CPU computes in
            weight_dtype = dtype if self.device.type == "cuda" else torch.float32
            if _float_dtype(self.transformer) != weight_dtype:
                self.transformer.to(weight_dtype)
        elif self.device.type == "cuda" and dtype != torch.float32:
            cast("DALLETransformer", self.transformer).cast_matmul_weights(dtype)
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
        """Load a model directory written by :meth:`save_pretrained` (or ``dalle convert``), or a registered
        name: ``"shapes"`` (bundled), ``"rudalle-malevich"``, ``"rudalle-emojich"``,
        ``"rudalle-surrealist-xl"``, ``"rudalle-kandinsky"`` (downloaded and converted once, see
        :func:`ensure_rudalle_model`); None (the default) is the bundled default model.

        ``device="auto"`` picks CUDA when present. ``dtype`` is the compute precision: None gives float32 on
        CPU; on CUDA bfloat16 for dalle models (the blocks' matmul weights stored in bfloat16, the rest
        float32 under autocast) and float16 for ruDALL-E models (all weights float16, as stored).
        ``compile=True`` compiles the one-token decode step (CUDA graphs on CUDA; see
        :meth:`DALLETransformer.compile_decoding`): the first generation pays the compilation.
        """
        path = resolve_model(name_or_dir)
        cfg = read_config(path)
        architecture = cfg.get("architecture", "dalle")
        dev = resolve_device(device)
        if dtype is None:
            dtype = default_dtype(dev, architecture)
        transformer: DALLETransformer | RuDalleTransformer
        try:
            encoder, decoder = _load_image_tokenizer(path, cfg)
            if architecture == "rudalle":
                from dalle.rudalle import RuDalleConfig, RuDalleTokenizer

                rcfg = RuDalleConfig.from_dict(cfg["transformer"])
                transformer, stored = _load_rudalle_transformer(
                    path / "transformer.safetensors",
                    rcfg,
                    dev,
                    dtype if dev.type == "cuda" else torch.float32,
                    str(cfg.get("name", path.name)),
                )
                tokenizer: Any = RuDalleTokenizer.load(path / "tokenizer.model")
            else:
                from dalle.tokenizer import BPETokenizer

                transformer = load_transformer(path, cfg)
                stored = None
                tokenizer = BPETokenizer.load(path / "tokenizer.model")
        except (ModelLoadError, TokenizerError):
            raise
        except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise ModelLoadError(f"{path / 'config.json'} describes an invalid model: {exc}") from exc
        pipe = cls(
            tokenizer,
            encoder,
            decoder,
            transformer,
            int(cfg["image_size"]),
            name=str(cfg.get("name", path.name)),
            trained_with_caption_dropout=bool(cfg.get("trained_with_caption_dropout", False)),
            device=dev,
            dtype=dtype,
            compile=compile,
            sampling=cfg.get("sampling"),
        )
        if stored is not None:
            pipe.weights_dtype = stored
        return pipe

    def config(self) -> dict[str, Any]:
        """The ``config.json`` content of this model (a dalle model with a dVAE writes no
        ``architecture`` / ``image_tokenizer`` keys, so older dalle versions read it too)."""
        return model_config(
            name=self.name,
            image_size=self.image_size,
            text_len=self.text_len,
            trained_with_caption_dropout=self.trained_with_caption_dropout,
            transformer=self.transformer.config.to_dict(),
            encoder=self.encoder.config(),
            decoder=self.decoder.config(),
            architecture=self.architecture,
            image_tokenizer=self.image_tokenizer,
            sampling=self.sampling,
        )

    def __repr__(self) -> str:
        t = self.transformer.config
        params = sum(p.numel() for p in self.transformer.parameters())
        return (
            f"DALLE(name={self.name!r}, architecture={self.architecture!r}, image={self.image_size}px "
            f"({self.grid}x{self.grid} tokens of {t.image_vocab_size} codes), text={self.text_len} tokens, "
            f"transformer={t.depth} layers x {t.heads} heads x {t.head_dim} "
            f"({params / 1e6:.1f}M parameters), "
            f"guidance={'yes' if self.trained_with_caption_dropout else 'no'}, device={str(self.device)!r}, "
            f"dtype={str(self.dtype).replace('torch.', '')}{', compiled' if self.compiled else ''})"
        )

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        weights_dtype: torch.dtype | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write the model directory (config, safetensors weights, tokenizer); each file is replaced
        atomically, ``config.json`` last.

        ``weights_dtype`` (e.g. ``torch.float16``) converts the transformer's floating-point weights in the
        file; None keeps the dtype the model was loaded from (float16 for converted ruDALL-E models, even
        after loading them as float32 on the CPU) or, for a model built from parts, its parameters' dtype.
        The parts are written by :func:`dalle.model_dir.write_model_files`, the format's one writer.
        """
        path = Path(directory)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{str(path)!r} is a file; save_pretrained writes a directory")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            what = "a model directory" if (path / "config.json").is_file() else "files"
            raise ConfigError(
                f"{str(path)!r} already holds {what}; choose an empty or new directory, "
                "or pass overwrite=True to replace the model files in it"
            )
        if weights_dtype is None and self.architecture == "rudalle":
            weights_dtype = self.weights_dtype  # the stored dtype, not the one computed in
        return write_model_files(
            path,
            self.config(),
            encoder=self.encoder,
            decoder=self.decoder,
            transformer=self.transformer,
            tokenizer=self.tokenizer,
            weights_dtype=weights_dtype,
        )

    # ------------------------------------------------------------------ helpers
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [len(prompts), text_len] on the model's device (lowercased BPE, padded). A prompt longer
        than the model reads keeps its first ``text_len`` tokens, with a warning."""
        from dalle.tokenizer import TruncationWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncationWarning)
            ids = self.tokenizer.encode(list(prompts), text_len=self.text_len)
        for w in caught:
            if not issubclass(w.category, TruncationWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if any(issubclass(w.category, TruncationWarning) for w in caught):
            lengths = (
                [len(row) for row in cast("BPETokenizer", self.tokenizer).encode_ids(list(prompts))]
                if hasattr(self.tokenizer, "encode_ids")
                else []
            )
            long = [p for p, n in zip(prompts, lengths) if n > self.text_len] or list(prompts)
            warnings.warn(
                f"prompt {long[0]!r}{f' (and {len(long) - 1} more)' if len(long) > 1 else ''} "
                f"is longer than the {self.text_len} tokens model {self.name!r} reads: "
                f"only its first {self.text_len} tokens are used; "
                "shorten the prompt to control what is dropped",
                TruncationWarning,
                stacklevel=3,
            )
        return ids.to(self.device)

    @torch.inference_mode()
    def decode_tokens(self, tokens: torch.Tensor, batch_size: int | None = None) -> list[Image.Image]:
        """Decode image token grids ([B, grid, grid] or [B, grid * grid]) to PIL images, ``batch_size`` at a
        time."""
        from dalle.images import to_pil

        cells = self.grid * self.grid
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex():
            raise ConfigError(
                f"tokens must be an integer tensor of image token ids, got {type(tokens).__name__}"
                + (f" of {tokens.dtype}" if isinstance(tokens, torch.Tensor) else "")
            )
        if tokens.numel() == 0 or tokens.numel() % cells:
            raise ConfigError(
                f"tokens of shape {tuple(tokens.shape)} are not image token grids of this model: expected "
                f"[B, {self.grid}, {self.grid}] or [B, {cells}]"
            )
        tokens = tokens.reshape(-1, self.grid, self.grid)
        vocab = self.decoder.vocab_size
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ConfigError(
                f"image token ids must lie in [0, {vocab}), got {int(tokens.min())}..{int(tokens.max())}"
            )
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

    @property
    def higher_score_is_better(self) -> bool:
        """False for ruDALL-E models, whose :meth:`score` is rudalle's perplexity (lower is better)."""
        return self.architecture != "rudalle"

    @torch.inference_mode()
    def score(
        self, prompts: Sequence[str], tokens: torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """The built-in rerank score of each grid given its prompt: the mean log-likelihood per image token
        (higher is better) for dalle models; for ruDALL-E models rudalle's own score, the perplexity of
        ``generate_images`` (:func:`dalle.rudalle.rerank_scores`; lower is better, see
        :attr:`higher_score_is_better`)."""
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
            grids = tokens[i : i + bs].to(self.device)
            if self.architecture == "rudalle":
                from dalle.rudalle import rerank_scores

                _, logits = self.transformer(text, grids)
                version = cast("RuDalleConfig", self.transformer.config).version
                out.append(rerank_scores(logits, grids, version).float().cpu())
            else:
                ll = self.transformer.image_log_likelihood(text, grids)
                out.append(ll.float().cpu() / tokens.shape[1])
        return torch.cat(out)

    def _default_batch_size(self) -> int:
        """8 on CPU; on CUDA as many rows (at most 32) as half the free memory holds, counting two KV caches
        per row (guidance samples two streams per image)."""
        if self.device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return batch_size_for_memory(free, kv_cache_bytes(self.transformer.config, self.dtype))

    def _sampling(
        self,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        guidance_scale: float | None,
        batch_size: int | None = None,
        sampler: str | None = None,
        filter: str | None = None,
    ) -> dict[str, Any]:
        """Validate the sampling arguments and return the keyword arguments of :func:`dalle.sampling.sample`:
        None takes the model's default (:attr:`sampling`); ``top_k=0`` and ``top_p=1`` switch a filter off."""
        from dalle.sampling import FILTERS, SAMPLERS

        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ConfigError(f"temperature must be a number >= 0 (0: greedy decoding), got {temperature!r}")
        if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
            raise ConfigError(
                f"top_k must be an integer >= 0 (0: off) or None (the model's default), got {top_k!r}"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1: off), got {top_p}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)} or None, got {sampler!r}")
        if filter is not None and filter not in FILTERS:
            raise ConfigError(f"filter must be one of {', '.join(FILTERS)} or None, got {filter!r}")
        if guidance_scale is not None and not (
            isinstance(guidance_scale, (int, float)) and guidance_scale > 0
        ):
            raise ConfigError(f"guidance_scale must be a number > 0 or None, got {guidance_scale!r}")
        if guidance_scale is not None and not self.trained_with_caption_dropout:
            raise ConfigError(
                f"model {self.name!r} was not trained with caption dropout, so it has no unconditional mode "
                "for classifier-free guidance; leave guidance_scale (--guidance) unset "
                "or train with --caption-dropout"
            )
        d = self.sampling
        top_k = d.get("top_k") if top_k is None else top_k
        top_p = d.get("top_p") if top_p is None else top_p
        return {
            "temperature": temperature,
            "top_k": top_k or None,
            "top_p": None if top_p is None or top_p >= 1 else top_p,
            "guidance_scale": guidance_scale,
            "sampler": sampler or d.get("sampler"),
            "filter": filter or d.get("filter"),
        }

    def unfamiliar_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` that the tokenizer spells out piece by piece (most pieces single characters, or
        characters it does not know): words its training captions most likely never held, which the model
        cannot have learned to draw. Empty for tokenizers without ``tokenize`` (e.g. ruDALL-E's)."""
        tokenize = getattr(self.tokenizer, "tokenize", None)
        if tokenize is None or self.architecture != "dalle":
            return []
        from dalle.tokenizer import WORD_MARK, normalize

        unknown = self.tokenizer.id_to_token(1) if hasattr(self.tokenizer, "id_to_token") else "<UNK>"
        found = []
        for word in dict.fromkeys(re.findall(r"\w+", normalize(prompt))):
            pieces = [piece.lstrip(WORD_MARK) for piece in tokenize(word)]
            pieces = [piece for piece in pieces if piece]
            single = sum(len(piece) == 1 for piece in pieces)
            if unknown in pieces or (len(pieces) > 2 and 2 * single > len(pieces)):
                found.append(word)
        return found

    def _warn_if_no_text(self, prompts: list[str], text: torch.Tensor) -> None:
        """Warn when a prompt has no known token: the model then draws from its caption-free mode, which only
        a model trained with caption dropout has learned."""
        empty = torch.isin(text.cpu(), self._no_info_ids).all(dim=1).tolist()
        for prompt in dict.fromkeys(p for p, e in zip(prompts, empty) if e):
            what = "is empty" if not prompt.strip() else "holds no character the tokenizer knows"
            mode = (
                "an unconditional sample"
                if self.trained_with_caption_dropout
                else "arbitrary images (this model was not trained with empty captions)"
            )
            warnings.warn(
                f"prompt {prompt!r} {what}, so the model produces {mode}", UserWarning, stacklevel=4
            )
        for prompt in dict.fromkeys(prompts):
            words = self.unfamiliar_words(prompt)
            if words:
                warnings.warn(
                    f"prompt {prompt!r}: the tokenizer spells out "
                    f"{', '.join(repr(w) for w in words)} piece by piece, so the model most likely "
                    f"never saw {'this word' if len(words) == 1 else 'these words'} in "
                    "training and will not draw what it means",
                    UserWarning,
                    stacklevel=4,
                )

    def _sample_rows(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        batch_size: int | None,
        progress: bool,
        callback: Callable[[int, torch.Tensor], None] | None,
        prompt_tokens: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **sampling: Any,
    ) -> torch.Tensor:
        """Sample one token grid per (prompt, seed) row, in micro-batches; returns [N, grid, grid] on CPU.
        ``prompt_tokens`` [N, cells] / ``prompt_mask`` [cells] (optional) are the kept cells."""
        from dalle.sampling import sample

        bs = batch_size or self._default_batch_size()  # batch_size was checked by _sampling
        grids = []
        try:
            for i in range(0, len(prompts), bs):
                text = self.encode_text(prompts[i : i + bs])
                self._warn_if_no_text(prompts[i : i + bs], text)
                gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds[i : i + bs]]
                given = None if prompt_tokens is None else prompt_tokens[i : i + bs].to(self.device)
                with _out_of_memory_as_error("sampling", len(gens), self.device):
                    out = sample(
                        self.transformer,
                        text,
                        generator=gens,
                        callback=callback,
                        progress=progress,
                        prompt_tokens=given,
                        prompt_mask=prompt_mask if given is not None else None,
                        **sampling,
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
        sampler: str | None = None,
        filter: str | None = None,
    ) -> list[Image.Image] | GenerationOutput:
        """Generate ``num_images`` images for each prompt.

        Args:
            prompts: one caption or a list of (different) captions.
            num_images: images per prompt; the result lists them prompt by prompt.
            seed: base seed; image k of a prompt uses seed ``seed + k`` (random when None; see
                ``GenerationOutput.seeds``).
            temperature, top_k, top_p: sampling settings (the paper samples at temperature 1, no top-k/p);
                ``temperature=0`` is greedy decoding (always the most likely token; no randomness).
                None takes the model's default (:attr:`sampling`: none for dalle models, rudalle's
                recommended top_k 1024 / top_p 0.99 for ruDALL-E models); ``top_k=0`` / ``top_p=1`` is off.
            guidance_scale: classifier-free guidance strength (models trained with caption dropout only).
            rerank: draw this many candidates per prompt and keep the ``num_images`` best by ``scorer``
                (default: :meth:`score`, the model's own mean image-token log-likelihood, or for ruDALL-E
                models rudalle's perplexity, of which the lowest are kept).
            batch_size: images sampled at once (default 8 on CPU; on CUDA up to 32, as many as half the free
                memory holds with two KV caches per image).
            progress: show a tqdm bar over image tokens.
            return_tokens: return a :class:`GenerationOutput` with token grids, seeds and scores.
            scorer: ``score(prompt, images) -> tensor`` of one score per image, higher is better (e.g. CLIP).
            callback: ``callback(step, tokens)`` during sampling, for showing partial images.
            sampler: ``"race"`` or ``"multinomial"`` (rudalle's draw); filter: ``"dalle"`` or ``"rudalle"``
                (transformers' top-k/top-p rule); None takes the model's default (see :mod:`dalle.sampling`).
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
        settings = self._sampling(temperature, top_k, top_p, guidance_scale, batch_size, sampler, filter)
        base = _base_seed(seed, candidates)

        rows = [p for p in prompt_list for _ in range(candidates)]
        seeds = [base + k for _ in prompt_list for k in range(candidates)]
        tokens = self._sample_rows(
            rows, seeds, batch_size=batch_size, progress=progress, callback=callback, **settings
        )
        scores = None
        if rerank is not None:
            tokens, seeds, scores = self._rerank(
                prompt_list, tokens, seeds, candidates, num_images, scorer, batch_size
            )
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
        kept_tokens: list[torch.Tensor] = []
        kept_seeds: list[int] = []
        kept_scores: list[torch.Tensor] = []
        for j, prompt in enumerate(prompts):
            cand = tokens[j * candidates : (j + 1) * candidates]
            if scorer is None:
                s = self.score([prompt] * candidates, cand, batch_size)
            else:
                s = (
                    torch.as_tensor(scorer(prompt, self.decode_tokens(cand, batch_size)), dtype=torch.float32)
                    .flatten()
                    .cpu()
                )
                if s.numel() != candidates:
                    raise ConfigError(f"scorer returned {s.numel()} scores for {candidates} images")
            order = torch.argsort(
                s, descending=scorer is not None or self.higher_score_is_better, stable=True
            )[:keep]
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
        keep: torch.Tensor | None = None,
        sampler: str | None = None,
        filter: str | None = None,
    ) -> list[Image.Image] | GenerationOutput:
        """Image completion: keep the top ``rows`` token rows of ``image`` and sample the rest from
        ``prompt``.

        ``rows`` defaults to the paper's proportion, 15 of 32 rows (rounded for other grid sizes). ``keep``, a
        bool [grid, grid] mask, keeps any set of token cells instead (e.g. borders, as rudalle's image
        prompts; see :func:`border_mask`) and replaces ``rows``. The kept cells are returned unchanged
        (``return_tokens=True`` shows them). Sampling settings as for :meth:`generate`.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt is {type(prompt).__name__}, not a string")
        if keep is not None and rows is not None:
            raise ConfigError("give rows (top token rows kept) or keep (a mask of kept cells), not both")
        if keep is None:
            if rows is None:
                rows = self.completion_rows
            if not (isinstance(rows, int) and 0 <= rows <= self.grid):
                raise ConfigError(f"rows must be an integer between 0 and {self.grid}, got {rows!r}")
            keep = torch.zeros(self.grid, self.grid, dtype=torch.bool)
            keep[:rows] = True
        if not (
            isinstance(keep, torch.Tensor)
            and keep.dtype == torch.bool
            and keep.shape == (self.grid, self.grid)
        ):
            raise ConfigError(
                f"keep must be a bool tensor [{self.grid}, {self.grid}] of kept token cells, got "
                f"{getattr(keep, 'dtype', type(keep).__name__)} of shape {tuple(getattr(keep, 'shape', ()))}"
            )
        if not (isinstance(num_images, int) and num_images >= 1):
            raise ConfigError(f"num_images must be a positive integer, got {num_images!r}")
        settings = self._sampling(temperature, top_k, top_p, guidance_scale, batch_size, sampler, filter)
        base = _base_seed(seed, num_images)
        source = self.encode_image(image, allow_upscale=allow_upscale).cpu()
        given = source.reshape(1, -1).repeat(num_images, 1)
        seeds = [base + k for k in range(num_images)]
        tokens = self._sample_rows(
            [prompt] * num_images,
            seeds,
            batch_size=batch_size,
            progress=progress,
            callback=callback,
            prompt_tokens=given if bool(keep.any()) else None,
            prompt_mask=keep.reshape(-1),
            **settings,
        )
        images = self.decode_tokens(tokens, batch_size)
        if return_tokens:
            return GenerationOutput(images, tokens, seeds, [prompt] * num_images)
        return images


def border_mask(grid: int, top: int = 0, bottom: int = 0, left: int = 0, right: int = 0) -> torch.Tensor:
    """A bool [grid, grid] mask of the token cells within the given number of rows / columns of each edge
    (rudalle's ``ImagePrompts`` borders), for :meth:`DALLE.complete`'s ``keep``."""
    for side, width in (("top", top), ("bottom", bottom), ("left", left), ("right", right)):
        if isinstance(width, bool) or not isinstance(width, int) or not 0 <= width <= grid:
            raise ConfigError(f"{side} must be an integer from 0 to {grid}, got {width!r}")
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    mask[:top] = True
    mask[:, :left] = True
    if bottom:
        mask[grid - bottom :] = True
    if right:
        mask[:, grid - right :] = True
    return mask


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


__all__ = [
    "DALLE",
    "GenerationOutput",
    "generate",
    "load_default",
    "describe_model",
    "resolve_model",
    "REGISTRY",
    "border_mask",
    "convert_rudalle",
    "download_rudalle",
    "ensure_rudalle_model",
    "default_dtype",
    # the model-directory format (dalle.model_dir), importable from here as before
    "ARCHITECTURES",
    "FORMAT_VERSION",
    "IMAGE_TOKENIZERS",
]

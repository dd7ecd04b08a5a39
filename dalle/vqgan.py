"""Taming-transformers VQGAN image tokenizers: ruDALL-E's "Sber" Gumbel f8 and taming's nearest-codebook
VQGANs.

The modules mirror taming-transformers' ``Encoder`` / ``Decoder`` (``taming.modules.diffusionmodules.model``)
and quantizers, with the same module nesting, so a taming or ruDALL-E state dict loads without renaming::

    encoder.conv_in.*, encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}.*,
    encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}.*, encoder.down.{i}.downsample.conv.*,
    encoder.mid.{block_1,attn_1,block_2}.*, encoder.norm_out.*, encoder.conv_out.*
    quant_conv.*                                  (z_channels -> embed_dim, 1x1)
    quantize.proj.*, quantize.embed.weight        (Gumbel)   or   quantize.embedding.weight   (nearest code)
    post_quant_conv.*                             (embed_dim -> z_channels, 1x1)
    decoder.conv_in.*, decoder.mid.*, decoder.up.{i}.block.{j}.*, decoder.up.{i}.attn.{j}.*,
    decoder.up.{i}.upsample.conv.*, decoder.norm_out.*, decoder.conv_out.*

The model is split in two modules, like :mod:`dalle.dvae`: :class:`VQGANEncoder` (pixels -> token ids) holds
``encoder``, ``quant_conv`` and the encoding half of ``quantize``; :class:`VQGANDecoder` (token ids -> pixels)
holds the codebook, ``post_quant_conv`` and ``decoder``. :func:`split_state_dict` cuts a full taming state
dict (e.g. the ``state_dict`` of a Lightning ``.ckpt``, see :func:`dalle.loading.read_lightning_checkpoint`)
into the two halves.

Tokens. Gumbel models (ruDALL-E) encode to ``argmax`` over codes of ``quantize.proj(quant_conv(encoder(x)))``:
the noise-free limit of the Gumbel-softmax sample that ruDALL-E's ``disable_gumbel_softmax=True`` also takes.
Nearest-codebook models (taming's ``VectorQuantizer``) encode to the code at the smallest squared distance
from ``quant_conv(encoder(x))``. Both decode a code's embedding through ``post_quant_conv`` and ``decoder``,
then map ``[-1, 1]`` to ``[0, 1]``.

Inputs follow :class:`dalle.dvae.Encoder`: :meth:`VQGANEncoder.encode` takes ``map_pixels`` output (what
``dalle.images.preprocess`` returns) and undoes the mapping itself, so the pipeline can swap tokenizers.

Precision: parameters stay float32; on CUDA the convolutions run under autocast in the chosen dtype
(``use_mixed_precision`` -> bfloat16 by default, or ``dtype`` / :meth:`set_dtype`); the code logits, code
distances and the output are float32. On CPU everything is float32.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle.dvae import check_token_grid, resolve_dtype, unmap_pixels
from dalle.errors import ConfigError, ImageError, ModelLoadError

__all__ = [
    "PRESETS",
    "QUANTIZERS",
    "VQGANEncoder",
    "VQGANDecoder",
    "split_state_dict",
    "infer_vqgan_config",
    "vqgan_from_state_dict",
    "load_vqgan",
]

#: quantizer kinds: "gumbel" (ruDALL-E / taming GumbelVQ) and "vq" (taming VectorQuantizer, nearest code)
QUANTIZERS = ("gumbel", "vq")

_DDCONFIG_KEYS = (
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "z_channels",
    "double_z",
    "in_channels",
    "out_ch",
    "resolution",
    "dropout",
    "resamp_with_conv",
)

_TAMING_F16 = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "z_channels": 256,
    "double_z": False,
    "in_channels": 3,
    "out_ch": 3,
    "resolution": 256,
    "dropout": 0.0,
    "embed_dim": 256,
    "quantizer": "vq",
}

#: named architectures: constructor kwargs shared by :class:`VQGANEncoder` and :class:`VQGANDecoder`
PRESETS: dict[str, dict[str, Any]] = {
    # ruDALL-E's image tokenizer (rudalle/vae/vqgan.gumbelf8-sber.config.yml): 256 px -> 32x32 of 8192 codes
    "sber-gumbel-f8": {
        "ch": 128,
        "ch_mult": [1, 1, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [32],
        "z_channels": 256,
        "double_z": False,
        "in_channels": 3,
        "out_ch": 3,
        "resolution": 256,
        "dropout": 0.0,
        "n_embed": 8192,
        "embed_dim": 256,
        "quantizer": "gumbel",
    },
    # taming-transformers' ImageNet VQGANs (configs/imagenet_vqgan*.yaml): 256 px -> 16x16 tokens
    "taming-f16-1024": {**_TAMING_F16, "n_embed": 1024},
    "taming-f16-16384": {**_TAMING_F16, "n_embed": 16384},
}


# ------------------------------------------------------------------------------------------------ validation
def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int_list(name: str, value: Any, minimum: int = 1, allow_empty: bool = False) -> list[int]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be a list of ints, got {type(value).__name__} {value!r}")
    out = [_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value)]
    if not out and not allow_empty:
        raise ConfigError(f"{name} must not be empty")
    return out


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _iter_widths(ch: int, ch_mult: Sequence[int]) -> Iterator[int]:
    # every width a GroupNorm sees: conv_in's and each level's
    yield ch
    for m in ch_mult:
        yield ch * m


def _groupnorm(channels: int, device: Any) -> nn.GroupNorm:
    # taming normalises with 32 groups, eps 1e-6, affine (its `Normalize`)
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True, device=device)


def _conv(
    n_in: int, n_out: int, k: int, device: Any, stride: int = 1, padding: int | None = None
) -> nn.Conv2d:
    return nn.Conv2d(
        n_in, n_out, k, stride=stride, padding=(k - 1) // 2 if padding is None else padding, device=device
    )


# ------------------------------------------------------------------------------------------------- layers
class ResnetBlock(nn.Module):
    """taming's ResnetBlock without time embedding: ``x + conv2(drop(swish(norm2(conv1(swish(norm1(x)))))))``.

    A 1x1 ``nin_shortcut`` maps ``x`` to ``out_channels`` when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, device: Any = None) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _groupnorm(in_channels, device)
        self.conv1 = _conv(in_channels, out_channels, 3, device)
        self.norm2 = _groupnorm(out_channels, device)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(out_channels, out_channels, 3, device)
        if in_channels != out_channels:
            self.nin_shortcut = _conv(in_channels, out_channels, 1, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # silu == taming's swish x * sigmoid(x)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return shortcut + h


class AttnBlock(nn.Module):
    """taming's single-head spatial self-attention with 1x1 ``q``, ``k``, ``v``, ``proj_out`` and a
    residual."""

    def __init__(self, channels: int, device: Any = None) -> None:
        super().__init__()
        self.norm = _groupnorm(channels, device)
        self.q = _conv(channels, channels, 1, device)
        self.k = _conv(channels, channels, 1, device)
        self.v = _conv(channels, channels, 1, device)
        self.proj_out = _conv(channels, channels, 1, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # [B, 1, H*W, C]: one head over all positions
            return conv(h).flatten(2).transpose(1, 2).unsqueeze(1)

        # softmax(q k^T / sqrt(C)) v, the same product taming writes with bmm; the fused kernel saves the
        # [HW, HW] matrix on GPUs
        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right/bottom by one, then a stride-2 3x3 ``conv`` (or 2x2 average pooling)."""

    def __init__(self, channels: int, with_conv: bool = True, device: Any = None) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = _conv(channels, channels, 3, device, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # torch convolutions pad symmetrically; taming pads only right and bottom
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 ``conv`` (when ``with_conv``)."""

    def __init__(self, channels: int, with_conv: bool = True, device: Any = None) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = _conv(channels, channels, 3, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class _Level(nn.Module):
    """One resolution of the encoder (``down.{i}``) or decoder (``up.{i}``): resblocks, attention,
    resampling."""

    def __init__(
        self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: nn.Module | None, resample_name: str
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # taming attends after every resblock of a level that has attention (there is one AttnBlock per block)
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        resample = getattr(self, self.resample_name, None)
        return resample(h) if resample is not None else h


class _Mid(nn.Module):
    """The bottleneck: resblock, attention, resblock (``mid.block_1``, ``mid.attn_1``, ``mid.block_2``)."""

    def __init__(self, channels: int, dropout: float, device: Any) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, device)
        self.attn_1 = AttnBlock(channels, device)
        self.block_2 = ResnetBlock(channels, channels, dropout, device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class TamingEncoder(nn.Module):
    """taming's ``Encoder``: [B, in_channels, H, W] in [-1, 1] -> [B, z_channels, H/f, W/f], f = 2^(levels-1).

    Attention follows each resblock of a level whose nominal size (``resolution / 2^i``) is in
    ``attn_resolutions``; the nominal size fixes the architecture only, any multiple of f can be encoded.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        in_channels: int,
        resolution: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        double_z: bool = False,
        device: Any = None,
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = _conv(in_channels, ch, 3, device)
        self.down = nn.ModuleList()
        width_in, res = ch, resolution
        for i, width in enumerate(widths):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width_in, width, dropout, device))
                width_in = width
                if res in attn_resolutions:
                    attn.append(AttnBlock(width, device))
            last = i == levels - 1
            self.down.append(
                _Level(
                    blocks, attn, None if last else Downsample(width, resamp_with_conv, device), "downsample"
                )
            )
            if not last:
                res //= 2
        self.mid = _Mid(width_in, dropout, device)
        self.norm_out = _groupnorm(width_in, device)
        self.conv_out = _conv(width_in, 2 * z_channels if double_z else z_channels, 3, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class TamingDecoder(nn.Module):
    """taming's ``Decoder``: [B, z_channels, h, w] -> [B, out_ch, h*f, w*f] (roughly [-1, 1])."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        out_ch: int,
        resolution: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        device: Any = None,
    ) -> None:
        super().__init__()
        levels = len(ch_mult)
        width_in = ch * ch_mult[-1]
        # taming starts from the bottom size and doubles it, which differs from resolution / 2^i when the
        # resolution is not a multiple of 2^(levels-1); keep its arithmetic so attention lands where it does
        res = resolution // 2 ** (levels - 1)
        self.conv_in = _conv(z_channels, width_in, 3, device)
        self.mid = _Mid(width_in, dropout, device)
        ups: list[_Level] = []
        for i in reversed(range(levels)):
            width = ch * ch_mult[i]
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width_in, width, dropout, device))
                width_in = width
                if res in attn_resolutions:
                    attn.append(AttnBlock(width, device))
            ups.append(
                _Level(blocks, attn, Upsample(width, resamp_with_conv, device) if i else None, "upsample")
            )
            if i:
                res *= 2
        # up.0 is the full-resolution level, as in taming (which builds bottom-up and prepends)
        self.up = nn.ModuleList(reversed(ups))
        self.norm_out = _groupnorm(width_in, device)
        self.conv_out = _conv(width_in, out_ch, 3, device)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class InverseHaar(nn.Module):
    """One level of the inverse 2-D Haar (db1) wavelet transform: 4 sub-bands [B, C, h, w] -> [B, C, 2h, 2w].

    Holds ruDALL-E's ``DWTInverse`` filter buffers (``g0_col``, ``g1_col``, ``g0_row``, ``g1_row``: the db1
    reconstruction filters 1/sqrt(2) * [1, 1] and [1, -1]) so its state dict loads; the transform itself is
    the closed form of those filters.
    """

    g0_col: torch.Tensor
    g1_col: torch.Tensor
    g0_row: torch.Tensor
    g1_row: torch.Tensor

    def __init__(self, device: Any = None) -> None:
        super().__init__()
        r = 1 / math.sqrt(2)
        lo, hi = torch.tensor([r, r], device=device), torch.tensor([r, -r], device=device)
        self.register_buffer("g0_col", lo.reshape(1, 1, 2, 1).clone())
        self.register_buffer("g1_col", hi.reshape(1, 1, 2, 1).clone())
        self.register_buffer("g0_row", lo.reshape(1, 1, 1, 2).clone())
        self.register_buffer("g1_row", hi.reshape(1, 1, 1, 2).clone())

    def forward(self, ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        # Synthesis along H then W: out[2i + a] = (lo[i] + (-1)^a hi[i]) / sqrt(2) (filters g0 = r[1, 1],
        # g1 = r[1, -1]); lh/hl/hh are pytorch_wavelets' band order.
        def synth(lo: torch.Tensor, hi: torch.Tensor, dim: int) -> torch.Tensor:
            g0, g1 = (self.g0_col, self.g1_col) if dim == 2 else (self.g0_row, self.g1_row)
            even = lo * g0.flatten()[0] + hi * g1.flatten()[0]
            odd = lo * g0.flatten()[1] + hi * g1.flatten()[1]
            return torch.stack((even, odd), dim=dim + 1).flatten(dim, dim + 1)

        lo = synth(ll, lh, 2)
        hi = synth(hl, hh, 2)
        return synth(lo, hi, 3)


class DWTDecoder(nn.Module):
    """ruDALL-E's ``DecoderDWT``: ``post_quant_conv``, a 12-channel taming decoder, an inverse Haar transform.

    Output channels 0-2 are the low band, 3-11 three high bands per colour; the image is twice the decoder's
    size (512 px for 32x32 tokens).
    """

    def __init__(self, *, embed_dim: int, z_channels: int, device: Any = None, **ddconfig: Any) -> None:
        super().__init__()
        self.post_quant_conv = _conv(embed_dim, z_channels, 1, device)
        self.decoder = TamingDecoder(z_channels=z_channels, out_ch=12, device=device, **ddconfig)
        self.idwt = InverseHaar(device)

    def forward(self, quant: torch.Tensor) -> torch.Tensor:
        bands = self.decoder(self.post_quant_conv(quant))
        b, _, h, w = bands.shape
        high = bands[:, 3:].reshape(b, 3, 3, h, w)
        return self.idwt(bands[:, :3], high[:, :, 0], high[:, :, 1], high[:, :, 2])


# ------------------------------------------------------------------------------------------------ quantizers
class _EncodeQuantizer(nn.Module):
    """The encoding half of a quantizer: ``proj`` (Gumbel logits) or ``embedding`` (nearest code)."""

    def __init__(self, kind: str, z_channels: int, embed_dim: int, n_embed: int, device: Any) -> None:
        super().__init__()
        self.kind = kind
        if kind == "gumbel":
            # ruDALL-E / taming: GumbelQuantize(num_hiddens=z_channels, ...) fed with quant_conv's output
            self.proj = _conv(z_channels, n_embed, 1, device)
        else:
            self.embedding = nn.Embedding(n_embed, embed_dim, device=device)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids [B, h, w] for float32 latents ``z`` [B, C, h, w]."""
        if self.kind == "gumbel":
            return self.proj(z).argmax(dim=1)
        return _nearest_code(z, self.embedding.weight)


def _nearest_code(z: torch.Tensor, codebook: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, in taming's order of operations so near-ties resolve as in taming;
    # rows are processed in chunks so the [positions, codes] distance matrix stays under max_elements.
    b, c, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)
    codebook = codebook.float()
    e2 = codebook.pow(2).sum(dim=1)
    step = max(1, max_elements // codebook.shape[0])
    out = []
    for rows in flat.split(step):
        d = rows.pow(2).sum(dim=1, keepdim=True) + e2 - 2 * rows @ codebook.t()
        out.append(d.argmin(dim=1))
    return torch.cat(out).view(b, h, w)


class _DecodeQuantizer(nn.Module):
    """The decoding half of a quantizer: the codebook, ``embed`` (Gumbel) or ``embedding`` (nearest code)."""

    def __init__(self, kind: str, embed_dim: int, n_embed: int, device: Any) -> None:
        super().__init__()
        self.kind = kind
        table = nn.Embedding(n_embed, embed_dim, device=device)
        self.add_module("embed" if kind == "gumbel" else "embedding", table)

    @property
    def codebook(self) -> torch.Tensor:
        table = cast(nn.Embedding, self.embed if self.kind == "gumbel" else self.embedding)
        return table.weight

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code vectors [B, embed_dim, h, w] for ids [B, h, w]."""
        return F.embedding(tokens, self.codebook).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ the modules
_M = TypeVar("_M", bound="_VQGANModule")


class _VQGANModule(nn.Module):
    """What VQGANEncoder and VQGANDecoder share: the architecture kwargs, dtype policy, config."""

    kind: str = "?"

    def _init_common(self, cfg: dict[str, Any], use_mixed_precision: bool, dtype: Any) -> dict[str, Any]:
        ch = _int("ch", cfg["ch"])
        ch_mult = _int_list("ch_mult", cfg["ch_mult"])
        arch: dict[str, Any] = {
            "ch": ch,
            "ch_mult": ch_mult,
            "num_res_blocks": _int("num_res_blocks", cfg["num_res_blocks"]),
            "attn_resolutions": _int_list("attn_resolutions", cfg["attn_resolutions"], allow_empty=True),
            "z_channels": _int("z_channels", cfg["z_channels"]),
            "double_z": _bool("double_z", cfg["double_z"]),
            "in_channels": _int("in_channels", cfg["in_channels"]),
            "out_ch": _int("out_ch", cfg["out_ch"]),
            "resolution": _int("resolution", cfg["resolution"]),
            "dropout": float(cfg["dropout"]) if isinstance(cfg["dropout"], int | float) else cfg["dropout"],
            "resamp_with_conv": _bool("resamp_with_conv", cfg["resamp_with_conv"]),
            "n_embed": _int("n_embed", cfg["n_embed"], minimum=2),
            "embed_dim": _int("embed_dim", cfg["embed_dim"]),
            "quantizer": cfg["quantizer"],
        }
        if (
            isinstance(arch["dropout"], bool)
            or not isinstance(arch["dropout"], float)
            or not (0.0 <= arch["dropout"] < 1.0)
        ):
            raise ConfigError(f"dropout must be a float in [0, 1), got {cfg['dropout']!r}")
        if arch["quantizer"] not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {arch['quantizer']!r}")
        for width in _iter_widths(ch, ch_mult):
            if width % 32:
                raise ConfigError(
                    "every width ch * ch_mult[i] must be a multiple of 32 "
                    "(taming's GroupNorm has 32 groups), "
                    f"got ch={ch}, ch_mult={ch_mult}"
                )
        if arch["double_z"]:
            raise ConfigError("double_z=True is a KL autoencoder's encoder; VQGANs have double_z false")
        if arch["quantizer"] == "gumbel" and arch["embed_dim"] != arch["z_channels"]:
            # GumbelQuantize's proj takes z_channels inputs but is fed quant_conv's embed_dim outputs
            raise ConfigError(
                "a Gumbel VQGAN needs embed_dim == z_channels, "
                f"got {arch['embed_dim']} and {arch['z_channels']}"
            )
        self.arch = arch
        self.vocab_size: int = arch["n_embed"]
        self.quantizer_kind: str = arch["quantizer"]
        #: pixels per token side
        self.factor: int = 2 ** (len(ch_mult) - 1)
        self.use_mixed_precision = _bool("use_mixed_precision", use_mixed_precision)
        self._dtype = resolve_dtype(dtype)
        return arch

    def _taming_kwargs(self) -> dict[str, Any]:
        a = self.arch
        return {
            k: a[k]
            for k in (
                "ch",
                "ch_mult",
                "num_res_blocks",
                "attn_resolutions",
                "resolution",
                "dropout",
                "resamp_with_conv",
            )
        }

    @property
    def dtype(self) -> torch.dtype | None:
        """The requested CUDA compute dtype (``None`` = default policy); see :meth:`set_dtype`."""
        return self._dtype

    def set_dtype(self: _M, dtype: torch.dtype | str | None) -> _M:
        """Choose the CUDA compute dtype (float32, float16, bfloat16 or None for the default); returns
        self."""
        self._dtype = resolve_dtype(dtype)
        return self

    def compute_dtype(self) -> torch.dtype:
        """The dtype the convolutions compute in on the current device (always float32 on CPU)."""
        if self.device.type != "cuda":
            return torch.float32
        if self._dtype is not None:
            return self._dtype
        return torch.bfloat16 if self.use_mixed_precision else torch.float32

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the compute dtype on CUDA; else float32, even inside a caller's autocast region."""
        dtype = self.compute_dtype()
        if dtype != torch.float32:
            return torch.autocast(device_type="cuda", dtype=dtype)
        return self._float32()

    def _float32(self) -> contextlib.AbstractContextManager[Any]:
        # A caller's autocast (e.g. the transformer's) would otherwise override the precision chosen here.
        kind = self.device.type
        if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
            return torch.autocast(kind, enabled=False)
        return contextlib.nullcontext()

    @property
    def device(self) -> torch.device:
        """The device the parameters live on."""
        return next(self.parameters()).device

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict; ``type(m)(**m.config())`` rebuilds the architecture."""
        cfg = {k: (list(v) if isinstance(v, list) else v) for k, v in self.arch.items()}
        cfg["use_mixed_precision"] = self.use_mixed_precision
        cfg["dtype"] = None if self._dtype is None else str(self._dtype).removeprefix("torch.")
        return cfg

    @classmethod
    def from_preset(cls: type[_M], name: str, **overrides: Any) -> _M:
        """Build (random weights) from a :data:`PRESETS` name; ``overrides`` replace constructor kwargs."""
        if name not in PRESETS:
            raise ConfigError(f"unknown VQGAN preset {name!r}; use one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_ddconfig(
        cls: type[_M],
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        quantizer: str = "gumbel",
        **kwargs: Any,
    ) -> _M:
        """Build from a taming ``ddconfig`` (a dict or OmegaConf node) plus ``n_embed``, ``embed_dim``."""
        return cls(
            **_ddconfig_kwargs(ddconfig), n_embed=n_embed, embed_dim=embed_dim, quantizer=quantizer, **kwargs
        )


def _ddconfig_kwargs(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(ddconfig) - set(_DDCONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown ddconfig keys {unknown}; expected some of {', '.join(_DDCONFIG_KEYS)}")
    out = {}
    for k, v in ddconfig.items():
        out[k] = list(v) if k in ("ch_mult", "attn_resolutions") else v
    return out


_ARCH_DEFAULTS: dict[str, Any] = {**PRESETS["sber-gumbel-f8"], "resamp_with_conv": True}


class VQGANEncoder(_VQGANModule):
    """Pixels -> VQGAN token ids. Holds ``encoder``, ``quant_conv`` and ``quantize.proj`` /
    ``quantize.embedding``.

    Defaults are ruDALL-E's Sber Gumbel f8 (:data:`PRESETS` ``"sber-gumbel-f8"``). The architecture kwargs are
    taming's ``ddconfig`` keys (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``z_channels``,
    ``double_z``, ``in_channels``, ``out_ch``, ``resolution``, ``dropout``, ``resamp_with_conv``) plus
    ``n_embed`` (codebook size), ``embed_dim`` (code width) and ``quantizer`` ("gumbel" or "vq").
    ``device``: where to create the parameters ("meta" for a weightless skeleton); ``use_mixed_precision`` /
    ``dtype``: CUDA compute precision as for :class:`dalle.dvae.Encoder`.
    """

    kind = "vqgan-encoder"

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (32,),
        z_channels: int = 256,
        double_z: bool = False,
        in_channels: int = 3,
        out_ch: int = 3,
        resolution: int = 256,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        n_embed: int = 8192,
        embed_dim: int = 256,
        quantizer: str = "gumbel",
        device: torch.device | str | None = None,
        use_mixed_precision: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        a = self._init_common(dict(locals()), use_mixed_precision, dtype)
        self.encoder = TamingEncoder(
            **self._taming_kwargs(), z_channels=a["z_channels"], in_channels=a["in_channels"], device=device
        )
        self.quant_conv = _conv(a["z_channels"], a["embed_dim"], 1, device)
        self.quantize = _EncodeQuantizer(
            a["quantizer"], a["z_channels"], a["embed_dim"], a["n_embed"], device
        )

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ImageError(
                f"VQGANEncoder expects a 4-d tensor [B, C, H, W], got {getattr(x, 'shape', type(x).__name__)}"
            )
        if x.shape[1] != self.arch["in_channels"]:
            raise ImageError(
                f"input has {x.shape[1]} channels but the encoder was built for {self.arch['in_channels']}"
            )
        if x.dtype != torch.float32:
            raise ImageError(f"VQGANEncoder expects float32 input (map_pixels output), got {x.dtype}")
        h, w = x.shape[2:]
        if h == 0 or w == 0 or h % self.factor or w % self.factor:
            raise ImageError(
                f"VQGANEncoder: height and width must be positive multiples of {self.factor} (the VQGAN "
                f"downsamples by {self.factor}), got {h}x{w}; resize or crop the image first"
            )
        if x.numel() and (float(x.min()) < 0.1 - 1e-3 or float(x.max()) > 0.9 + 1e-3):
            # a [0, 1] image passed without map_pixels would otherwise be encoded slightly wrong, silently
            raise ImageError(
                "VQGANEncoder expects map_pixels output (values in [0.1, 0.9]), got values in "
                f"[{float(x.min()):.3g}, {float(x.max()):.3g}]; apply dalle.dvae.map_pixels (or "
                "dalle.images.preprocess) first"
            )

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(...))`` for images ``x`` in [-1, 1]: float32 [B, embed_dim, H/f, W/f]."""
        with self._autocast():
            z = self.quant_conv(self.encoder(x.to(self.device)))
        return z.float()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids LongTensor [B, H/f, W/f] for mapped pixels ``x`` [B, C, H, W] (``map_pixels`` output)."""
        self._check_input(x)
        images = unmap_pixels(x) * 2 - 1
        latents = self.latents(images)
        # code logits / distances in float32 whatever the compute dtype: near-ties must not flip tokens
        with self._float32():
            return self.quantize.indices(latents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(x)


class VQGANDecoder(_VQGANModule):
    """VQGAN token ids -> pixels. Holds the codebook (``quantize.embed`` / ``quantize.embedding``),
    ``post_quant_conv`` and ``decoder``.

    Same constructor kwargs as :class:`VQGANEncoder`, plus ``dwt``: ruDALL-E's wavelet decoder (the
    ``decoder`` is then ``post_quant_conv`` + a 12-channel taming decoder + an inverse Haar transform, and
    images are twice as large: 512 px for 32x32 tokens).
    """

    kind = "vqgan-decoder"

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (32,),
        z_channels: int = 256,
        double_z: bool = False,
        in_channels: int = 3,
        out_ch: int = 3,
        resolution: int = 256,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        n_embed: int = 8192,
        embed_dim: int = 256,
        quantizer: str = "gumbel",
        dwt: bool = False,
        device: torch.device | str | None = None,
        use_mixed_precision: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        a = self._init_common(dict(locals()), use_mixed_precision, dtype)
        self.dwt = _bool("dwt", dwt)
        if dwt and a["out_ch"] != 3:
            raise ConfigError(f"the DWT decoder makes RGB images (out_ch 3), got out_ch={a['out_ch']}")
        self.quantize = _DecodeQuantizer(a["quantizer"], a["embed_dim"], a["n_embed"], device)
        self.decoder: nn.Module
        if dwt:
            # ruDALL-E keeps this decoder's own post_quant_conv inside it (decoder.post_quant_conv)
            self.decoder = DWTDecoder(
                embed_dim=a["embed_dim"], z_channels=a["z_channels"], device=device, **self._taming_kwargs()
            )
        else:
            self.post_quant_conv = _conv(a["embed_dim"], a["z_channels"], 1, device)
            self.decoder = TamingDecoder(
                **self._taming_kwargs(), z_channels=a["z_channels"], out_ch=a["out_ch"], device=device
            )
        #: output pixels per token side
        self.output_factor: int = self.factor * (2 if dwt else 1)

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict; ``VQGANDecoder(**dec.config())`` rebuilds it."""
        return {**super().config(), "dwt": self.dwt}

    def _check_tokens(self, tokens: Any) -> torch.Tensor:
        return check_token_grid(tokens, self.vocab_size, self.device)

    def decode_raw(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder's float32 output for token ids [B, h, w], before clamping (roughly [-1, 1])."""
        quant = self.quantize.lookup(self._check_tokens(tokens))
        with self._autocast():
            if self.dwt:
                out = self.decoder(quant)
            else:
                out = self.decoder(self.post_quant_conv(quant))
        return out.float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images float32 [B, out_ch, h*f, w*f] in [0, 1] from token ids [B, h, w] (or [B, h*w], square)."""
        return (self.decode_raw(tokens).clamp(-1, 1) + 1) / 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`decode`."""
        return self.decode(tokens)


# ------------------------------------------------------------------------------------------ state dicts
def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # ruDALL-E's DWT checkpoint holds the wrapper VQGanGumbelVAE's keys ("model.encoder...")
    keys = [k for k in state_dict if not k.startswith("loss.")]
    if keys and all(k.startswith("model.") for k in keys):
        return {k.removeprefix("model."): v for k, v in state_dict.items() if not k.startswith("loss.")}
    return dict(state_dict)


def split_state_dict(
    state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a full taming / ruDALL-E VQGAN state dict into (encoder keys, decoder keys), names unchanged.

    Encoder: ``encoder.*``, ``quant_conv.*``, ``quantize.proj.*`` and (nearest-code models)
    ``quantize.embedding.*``. Decoder: ``quantize.embed.*`` / ``quantize.embedding.*``, ``post_quant_conv.*``,
    ``decoder.*``. Dropped: ``loss.*`` (discriminator, LPIPS) and a ``model.`` prefix of every key; in a DWT
    model, the unused top-level ``post_quant_conv``. With ``strict``, any other key raises
    :class:`~dalle.errors.ModelLoadError`.
    """
    sd = _strip_prefix(state_dict)
    dwt = any(k.startswith("decoder.decoder.") for k in sd)
    enc: dict[str, torch.Tensor] = {}
    dec: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        if key.startswith(("encoder.", "quant_conv.", "quantize.proj.")):
            enc[key] = value
        elif key.startswith("quantize.embedding."):
            enc[key] = dec[key] = value  # the nearest-code codebook both encodes and decodes
        elif key.startswith(("quantize.embed.", "decoder.")):
            dec[key] = value
        elif key.startswith("post_quant_conv."):
            if not dwt:  # the DWT model applies decoder.post_quant_conv; this one is never used
                dec[key] = value
        else:
            unknown.append(key)
    if unknown and strict:
        raise ModelLoadError(
            "not a taming VQGAN state dict: "
            f"unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    return enc, dec


def _level_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    found = set()
    for k in sd:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def infer_vqgan_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor kwargs for a full taming / ruDALL-E VQGAN state dict, read from its tensor shapes.

    The nominal ``resolution`` is not stored in the weights; it is taken as 256 and ``attn_resolutions``
    is set so that attention sits at the levels where the weights have it, which fixes the same
    architecture. The result includes ``dwt`` (a decoder kwarg; drop it for the encoder).
    """
    sd = _strip_prefix(state_dict)
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_channels = sd["encoder.conv_in.weight"].shape[1]
        levels = _level_indices(sd, "encoder.down.")
        ch_mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
        num_res_blocks = len(_level_indices(sd, "encoder.down.0.block."))
        z_channels = sd["encoder.conv_out.weight"].shape[0]
        embed_dim = sd["quant_conv.weight"].shape[0]
        if "quantize.proj.weight" in sd:
            quantizer, n_embed = "gumbel", sd["quantize.proj.weight"].shape[0]
        else:
            quantizer, n_embed = "vq", sd["quantize.embedding.weight"].shape[0]
        dwt = "decoder.decoder.conv_in.weight" in sd
        dec = "decoder.decoder." if dwt else "decoder."
        out_ch = 3 if dwt else sd[f"{dec}conv_out.weight"].shape[0]
    except KeyError as exc:
        raise ModelLoadError(f"not a taming VQGAN state dict: missing {exc.args[0]!r}") from None
    if not levels or levels != list(range(len(levels))):
        raise ModelLoadError(
            "not a taming VQGAN state dict: encoder.down levels are missing or not numbered 0..n"
        )
    resolution = 256
    attn = {resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd}
    attn |= {resolution // 2**i for i in levels if f"{dec}up.{i}.attn.0.q.weight" in sd}
    resamp = "encoder.down.0.downsample.conv.weight" in sd or len(levels) == 1
    return {
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": sorted(attn, reverse=True),
        "z_channels": z_channels,
        "double_z": False,
        "in_channels": in_channels,
        "out_ch": out_ch,
        "resolution": resolution,
        "dropout": 0.0,
        "resamp_with_conv": resamp,
        "n_embed": n_embed,
        "embed_dim": embed_dim,
        "quantizer": quantizer,
        "dwt": dwt,
    }


def _assign(module: _VQGANModule, sd: Mapping[str, torch.Tensor], what: str) -> None:
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{what}: weights do not fit a VQGAN with config {module.config()}: {exc}"
        ) from None


def vqgan_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: str | Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    source: str = "state dict",
) -> tuple[VQGANEncoder, VQGANDecoder]:
    """(encoder, decoder) in eval mode holding a full taming / ruDALL-E VQGAN ``state_dict``; strict keys.

    ``config``: a :data:`PRESETS` name, constructor kwargs, or None to infer them from the tensor shapes.
    ``loss.*`` keys are ignored. The modules are built on the meta device and take the tensors directly.
    """
    if config is None:
        cfg = infer_vqgan_config(state_dict)
    elif isinstance(config, str):
        if config not in PRESETS:
            raise ConfigError(f"unknown VQGAN preset {config!r}; use one of {', '.join(PRESETS)}")
        cfg = {
            **PRESETS[config],
            "dwt": any(k.startswith(("decoder.decoder.", "model.decoder.decoder.")) for k in state_dict),
        }
    else:
        cfg = dict(config)
    enc_sd, dec_sd = split_state_dict(state_dict)
    enc_cfg = {k: v for k, v in cfg.items() if k != "dwt"}
    encoder = VQGANEncoder(**enc_cfg, device="meta")
    decoder = VQGANDecoder(**cfg, device="meta")
    _assign(encoder, enc_sd, source)
    _assign(decoder, dec_sd, source)
    if device is not None:
        encoder, decoder = encoder.to(device), decoder.to(device)
    return encoder.eval().requires_grad_(False), decoder.eval().requires_grad_(False)


def load_vqgan(
    path: str | os.PathLike[str],
    config: str | Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> tuple[VQGANEncoder, VQGANDecoder]:
    """Read a taming / ruDALL-E VQGAN checkpoint safely (Lightning ``.ckpt`` or plain state dict) and build
    it.

    Uses :func:`dalle.loading.read_lightning_checkpoint` (no code from the file runs); ``config`` as for
    :func:`vqgan_from_state_dict`.
    """
    from dalle.loading import read_lightning_checkpoint  # lazy: keeps `import dalle.vqgan` light

    return vqgan_from_state_dict(read_lightning_checkpoint(path), config, device, source=os.fspath(path))

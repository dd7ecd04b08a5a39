"""The discrete VAE: OpenAI's dVAE encoder and decoder, pixel mapping, token encode / decode.

The architecture, module nesting, parameter names (``w`` / ``b``) and state-dict keys are those of OpenAI's
``dall_e`` package, so its released weights load with ``strict=True`` and give the same outputs::

    blocks.input.{w,b}
    blocks.group_{g}.block_{i}.id_path.{w,b}          (only where the width changes)
    blocks.group_{g}.block_{i}.res_path.conv_{k}.{w,b}
    blocks.output.conv.{w,b}

Differences from OpenAI's code, all of them additions:

* small configurations are allowed (``n_hid=8``, ``vocab_size=16``) for tests and small models;
* ``Encoder.encode(x) -> tokens`` and ``Decoder.decode(tokens) -> images``; ``decode`` looks the tokens up in
  the decoder's first 1x1 convolution as an embedding table instead of building a one-hot tensor, which is
  numerically the same and needs ``vocab_size`` times less memory;
* precision is chosen with one ``dtype`` argument (below) instead of being fixed;
* ``forward`` rejects spatial sizes that are not multiples of 8 instead of silently flooring them.

Precision. On CPU every convolution runs in float32. On CUDA the convolutions run in ``dtype``:
``torch.float32``, ``torch.float16`` (the regime of OpenAI's code on CUDA) or ``torch.bfloat16``. The default,
``dtype=None``, means bfloat16 on CUDA when ``use_mixed_precision`` is true and float32 otherwise. As in
OpenAI's code the two convolutions that touch the 8192-way vocabulary (the encoder's output, the decoder's
input) always run in float32, and parameters are always stored in float32 (so training keeps fp32 master
weights). Unlike OpenAI's decoder, ``forward`` always returns float32. Set it with the ``dtype`` constructor
argument, :meth:`Encoder.set_dtype`, or ``load_model(..., dtype=...)``.

Speed (same arithmetic, reordered; see benchmarks/bench_dvae.py): activations are channels-last; ReLUs
and residual adds reuse buffers in inference; the encoder's vocabulary-sized output is one matrix product
that lands in NCHW directly; each decoder group's nearest-neighbour upsampling is moved after the next
block's 1x1 convolutions, which then run on a quarter of the pixels.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle.errors import ConfigError, ImageError

__all__ = [
    "logit_laplace_eps",
    "map_pixels",
    "unmap_pixels",
    "Conv2d",
    "EncoderBlock",
    "DecoderBlock",
    "Encoder",
    "Decoder",
    "resolve_dtype",
]

logit_laplace_eps: float = 0.1

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------- pixel mapping
def _check_pixels(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ImageError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ImageError(f"{what} expects a 4-d tensor [B, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.float32:
        raise ImageError(f"{what} expects dtype torch.float32, got {x.dtype}; convert with .float() first")


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Map pixels in [0, 1] to [eps, 1 - eps] (eps = 0.1), the dVAE's input range.

    Like OpenAI's version it requires a 4-d float32 tensor (raising :class:`~dalle.errors.ImageError`, a
    ``ValueError``, otherwise).
    """
    _check_pixels(x, "map_pixels")
    return (1 - 2 * logit_laplace_eps) * x + logit_laplace_eps


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Invert :func:`map_pixels` and clamp to [0, 1]; same input checks."""
    _check_pixels(x, "unmap_pixels")
    return torch.clamp((x - logit_laplace_eps) / (1 - 2 * logit_laplace_eps), 0, 1)


# ------------------------------------------------------------------------------------------------ validation
def _check_int(name: str, value: Any, minimum: int = 1, multiple_of: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if value % multiple_of:
        raise ConfigError(f"{name} must be divisible by {multiple_of}, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Turn a dtype name ("float32", "float16", "bfloat16", "fp16", ...) or torch dtype into a torch dtype.

    ``None`` stays ``None`` (the default policy). Anything else raises :class:`~dalle.errors.ConfigError`.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
        return _DTYPES[key]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ConfigError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------- layers
class Conv2d(nn.Module):
    """OpenAI's convolution: parameters ``w`` [n_out, n_in, kw, kw] and ``b`` [n_out], "same" padding.

    ``use_float16=False`` pins the layer to float32 on every device; otherwise on CUDA it computes in
    ``cuda_dtype``, which the owning :class:`Encoder` / :class:`Decoder` sets.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        kw: int,
        use_float16: bool = True,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        self.n_in = _check_int("n_in", n_in)
        self.n_out = _check_int("n_out", n_out)
        self.kw = _check_int("kw", kw)
        if kw % 2 != 1:
            raise ConfigError(f"kw must be odd, got {kw}")
        self.use_float16 = _check_bool("use_float16", use_float16)
        self.requires_grad = _check_bool("requires_grad", requires_grad)
        self.padding = (kw - 1) // 2
        self.cuda_dtype: torch.dtype = torch.float32
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device)
        if w.device.type != "meta":  # meta tensors (load_model builds on meta) need no init; it is slow there
            w.normal_(std=1 / math.sqrt(n_in * kw**2))
        b = torch.zeros((n_out,), dtype=torch.float32, device=device)
        # Ordinary trainable parameters, as in OpenAI's code (where requires_grad has no effect either).
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def compute_dtype(self) -> torch.dtype:
        """The dtype this layer computes in: float32 on CPU or when pinned, else ``cuda_dtype``."""
        if self.use_float16 and self.w.is_cuda:
            return self.cuda_dtype
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ("same" padding), in the compute dtype the module chose for this device."""
        dtype = self.compute_dtype()
        w: torch.Tensor = self.w
        b: torch.Tensor = self.b
        if w.dtype != dtype:
            w, b = w.to(dtype), b.to(dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        return F.conv2d(x, w, b, padding=self.padding)

    def extra_repr(self) -> str:
        return f"n_in={self.n_in}, n_out={self.n_out}, kw={self.kw}, use_float16={self.use_float16}"


class _Block(nn.Module):
    """Pre-activation bottleneck resblock: ``id_path(x) + post_gain * res_path(x)``."""

    kernels: tuple[int, int, int, int] = (3, 3, 3, 1)
    res_path: _ResPath

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_layers: int,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
    ) -> None:
        super().__init__()
        self.n_in = _check_int("n_in", n_in)
        self.n_out = _check_int("n_out", n_out, multiple_of=4)
        self.n_layers = _check_int("n_layers", n_layers)
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        k1, k2, k3, k4 = self.kernels
        self.id_path: nn.Module = (
            Conv2d(n_in, n_out, 1, device=device, requires_grad=requires_grad)
            if n_in != n_out
            else nn.Identity()
        )
        res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, self.n_hid, k1, device=device, requires_grad=requires_grad)),
                    ("relu_2", nn.ReLU()),
                    (
                        "conv_2",
                        Conv2d(self.n_hid, self.n_hid, k2, device=device, requires_grad=requires_grad),
                    ),
                    ("relu_3", nn.ReLU()),
                    (
                        "conv_3",
                        Conv2d(self.n_hid, self.n_hid, k3, device=device, requires_grad=requires_grad),
                    ),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(self.n_hid, n_out, k4, device=device, requires_grad=requires_grad)),
                ]
            )
        )
        self.res_path = cast("_ResPath", res_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rest(self.res_path.conv_1(torch.relu(x)), self.id_path(x))

    def _rest(self, h: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        # res_path after conv_1, written out so that the ReLUs can work in place: they overwrite fresh
        # convolution outputs, which autograd does not need (ReLU saves its result, conv its input).
        rp = self.res_path
        h = rp.conv_2(torch.relu_(h))
        h = rp.conv_3(torch.relu_(h))
        h = rp.conv_4(torch.relu_(h))
        if identity.dtype != h.dtype:
            identity = identity.to(h.dtype)
        # post_gain = 1/n_layers^2 is a power of two for the usual configs, so adding with alpha equals
        # OpenAI's `identity + post_gain * h` bit for bit. In inference the sum goes into h's memory.
        if torch.is_grad_enabled() and (h.requires_grad or identity.requires_grad):
            return torch.add(identity, h, alpha=self.post_gain)
        return torch.add(identity, h, alpha=self.post_gain, out=h)


class EncoderBlock(_Block):
    """Encoder resblock; residual kernels 3, 3, 3, 1."""

    kernels = (3, 3, 3, 1)


class DecoderBlock(_Block):
    """Decoder resblock; residual kernels 1, 3, 3, 3."""

    kernels = (1, 3, 3, 3)

    def forward_upsampled(self, x: torch.Tensor, upsample: nn.Module) -> torch.Tensor:
        """``self(upsample(x))`` for nearest-neighbour ``upsample``, with a quarter of the work up front.

        The ReLU, the 1x1 ``conv_1`` and the 1x1 ``id_path`` act on each pixel alone, so they commute with
        nearest-neighbour upsampling and can run at the low resolution; the result is the same. This
        saves about 15% of the decoder's arithmetic.
        """
        if not (isinstance(upsample, nn.Upsample) and upsample.mode == "nearest"):
            return self(upsample(x))
        identity = upsample(self.id_path(x))
        h = upsample(self.res_path.conv_1(torch.relu(x)))
        return self._rest(h, identity)


if TYPE_CHECKING:
    # Static views of the nn.Sequential containers built below, so that attribute access such as
    # ``self.blocks.input`` or ``self.res_path.conv_1`` is typed (nn.Module.__getattr__ returns
    # ``Tensor | Module``). Only the type checker sees them; at runtime the containers are nn.Sequential.
    class _ResPath(nn.Sequential):
        conv_1: Conv2d
        conv_2: Conv2d
        conv_3: Conv2d
        conv_4: Conv2d

    class _Group(nn.Sequential):
        block_1: _Block

    class _DVAEBlocks(nn.Sequential):
        input: Conv2d
        group_1: _Group

    class _EncoderOutput(nn.Sequential):
        relu: nn.ReLU
        conv: Conv2d


def _to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _conv1x1_to_nchw(conv: Conv2d, h: torch.Tensor) -> torch.Tensor:
    """A 1x1 ``conv`` of channels-last ``h`` as one matrix product whose result is already NCHW.

    Used for the encoder's vocabulary-sized output, where a channels-last convolution followed by a copy
    to NCHW costs about twice as much on CPU.
    """
    dtype = conv.compute_dtype()
    b, c, height, width = h.shape
    rows = h.to(dtype).permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view for channels-last h
    w = conv.w.to(dtype).view(conv.n_out, conv.n_in)
    out = torch.matmul(w, rows.transpose(1, 2))  # [B, n_out, H*W]
    out = out + conv.b.to(dtype).view(1, -1, 1)
    return out.view(b, conv.n_out, height, width)


class _DVAEModule(nn.Module):
    """What Encoder and Decoder share: dtype policy, config, convenience properties."""

    group_count: int = 4
    # Run the convolutions on channels-last (NHWC) activations: 1.2-1.7x faster for the high-resolution
    # layers on CPU (oneDNN) and what tensor cores want on CUDA. Results differ from NCHW only by float
    # rounding (~1e-6 relative). Set to False on an instance to run OpenAI's NCHW kernels (the encoder then
    # reproduces OpenAI's outputs bit for bit on CPU).
    channels_last: bool = True
    # On CUDA, let cuDNN time its convolution algorithms on the first call with each input shape and keep the
    # fastest (``torch.backends.cudnn.benchmark`` inside the dVAE's own calls only; never when deterministic
    # algorithms are asked for). Set to False on an instance to use cuDNN's heuristic choice.
    cudnn_benchmark: bool = True
    blocks: _DVAEBlocks
    use_mixed_precision: bool

    def _init_precision(self, dtype: torch.dtype | str | None) -> None:
        self._dtype = resolve_dtype(dtype)
        self._apply_cuda_dtype()

    @property
    def dtype(self) -> torch.dtype | None:
        """The requested CUDA compute dtype (``None`` = default policy); see :meth:`set_dtype`."""
        return self._dtype

    def set_dtype(self, dtype: torch.dtype | str | None) -> _DVAEModule:
        """Choose the CUDA compute dtype (float32, float16, bfloat16 or None for the default); returns
        self."""
        self._dtype = resolve_dtype(dtype)
        self._apply_cuda_dtype()
        return self

    def _apply_cuda_dtype(self) -> None:
        if self._dtype is not None:
            cuda_dtype = self._dtype
        else:
            cuda_dtype = torch.bfloat16 if self.use_mixed_precision else torch.float32
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.cuda_dtype = cuda_dtype

    @property
    def device(self) -> torch.device:
        """The device the parameters live on."""
        return self.blocks.input.w.device

    def _own_precision(self) -> contextlib.AbstractContextManager[Any]:
        """Switch off an enclosing autocast: every layer casts to the dtype it chose itself (the output layer
        stays float32), which autocast would otherwise override. On CUDA, also let cuDNN pick its fastest
        convolution algorithms for each new shape (see :attr:`cudnn_benchmark`)."""
        kind = self.device.type
        stack = contextlib.ExitStack()
        if torch.is_autocast_enabled(kind):
            stack.enter_context(torch.autocast(kind, enabled=False))
        cudnn = torch.backends.cudnn
        if (
            kind == "cuda"
            and self.cudnn_benchmark
            and not cudnn.benchmark
            and not cudnn.deterministic
            and not torch.are_deterministic_algorithms_enabled()
        ):
            cudnn.benchmark = True  # only this flag: cudnn.flags() would reset the others (TF32 among them)
            stack.callback(setattr, cudnn, "benchmark", False)
        return stack

    def compute_dtype(self) -> torch.dtype:
        """The dtype the resblocks compute in on the current device."""
        return self.blocks.group_1.block_1.res_path.conv_1.compute_dtype()

    def _check_spatial(self, h: int, w: int, what: str) -> None:
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ImageError(
                f"{what}: height and width must be positive multiples of 8 (the dVAE downsamples by 8), "
                f"got {h}x{w}; resize or crop the image first"
            )


# ------------------------------------------------------------------------------------------------- encoder
class Encoder(_DVAEModule):
    """OpenAI's dVAE encoder: mapped pixels [B, C, H, W] -> logits [B, vocab_size, H/8, W/8].

    Args:
        n_hid: width of the first group (groups are 1, 2, 4, 8 times as wide); divisible by 4.
        n_blk_per_group: resblocks per group (4 groups; post_gain = 1 / (4 * n_blk_per_group)^2).
        input_channels: image channels (3 for RGB).
        vocab_size: number of image tokens.
        device: where to create the parameters.
        requires_grad: accepted for compatibility with OpenAI's signature; as there, the parameters are
            ordinary trainable ``nn.Parameter`` s whatever its value (freeze with ``.requires_grad_(False)``).
        use_mixed_precision: with ``dtype=None``, compute in bfloat16 on CUDA (True) or float32 (False).
        dtype: CUDA compute dtype (float32, float16 = OpenAI's behaviour, bfloat16); CPU is always float32.
    """

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        input_channels: int = 3,
        vocab_size: int = 8192,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
        use_mixed_precision: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        self.n_hid = _check_int("n_hid", n_hid, minimum=4, multiple_of=4)
        self.n_blk_per_group = _check_int("n_blk_per_group", n_blk_per_group)
        self.input_channels = _check_int("input_channels", input_channels)
        self.vocab_size = _check_int("vocab_size", vocab_size, minimum=2)
        self.requires_grad = _check_bool("requires_grad", requires_grad)
        self.use_mixed_precision = _check_bool("use_mixed_precision", use_mixed_precision)
        n_layers = self.group_count * n_blk_per_group

        def blk(n_in: int, n_out: int) -> EncoderBlock:
            return EncoderBlock(n_in, n_out, n_layers, device=device, requires_grad=requires_grad)

        def group(width_in: int, width: int, pool: bool) -> nn.Sequential:
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", blk(width_in if i == 0 else width, width)) for i in range(n_blk_per_group)
            ]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        blocks = nn.Sequential(
            OrderedDict(
                [
                    ("input", Conv2d(input_channels, n_hid, 7, device=device, requires_grad=requires_grad)),
                    ("group_1", group(n_hid, n_hid, True)),
                    ("group_2", group(n_hid, 2 * n_hid, True)),
                    ("group_3", group(2 * n_hid, 4 * n_hid, True)),
                    ("group_4", group(4 * n_hid, 8 * n_hid, False)),
                    (
                        "output",
                        nn.Sequential(
                            OrderedDict(
                                [
                                    ("relu", nn.ReLU()),
                                    (
                                        "conv",
                                        Conv2d(
                                            8 * n_hid,
                                            vocab_size,
                                            1,
                                            use_float16=False,
                                            device=device,
                                            requires_grad=requires_grad,
                                        ),
                                    ),
                                ]
                            )
                        ),
                    ),
                ]
            )
        )
        self.blocks = cast("_DVAEBlocks", blocks)
        self._init_precision(dtype)

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict; ``Encoder(**enc.config())`` rebuilds the
        architecture."""
        return {
            "n_hid": self.n_hid,
            "n_blk_per_group": self.n_blk_per_group,
            "input_channels": self.input_channels,
            "vocab_size": self.vocab_size,
            "requires_grad": self.requires_grad,
            "use_mixed_precision": self.use_mixed_precision,
            "dtype": _dtype_name(self._dtype),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab_size, H/8, W/8] (float32) for mapped pixels ``x`` [B, C, H, W] (float32)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ImageError(f"Encoder expects a 4-d tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != self.input_channels:
            raise ImageError(
                f"input has {x.shape[1]} channels but the encoder was built for {self.input_channels}"
            )
        if x.dtype != torch.float32:
            raise ImageError(f"Encoder expects float32 input (map_pixels output), got {x.dtype}")
        self._check_spatial(x.shape[2], x.shape[3], "Encoder")
        h = _to_memory_format(x, self.channels_last)
        with self._own_precision():
            for name, module in self.blocks.named_children():
                if name == "output" and h.is_contiguous(memory_format=torch.channels_last):
                    output = cast("_EncoderOutput", module)
                    h = _conv1x1_to_nchw(output.conv, output.relu(h))
                else:
                    h = module(h)
        return h.float().contiguous()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids LongTensor [B, H/8, W/8]: the argmax of :meth:`forward` over the vocabulary.

        ``x`` is the same input as ``forward`` takes: mapped pixels (see :func:`map_pixels`).
        """
        return torch.argmax(self(x), dim=1)


def check_token_grid(tokens: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Validate image token ids for decoding: [B, h, w], or [B, h*w] for square grids, integers in
    ``[0, vocab_size)``; returns them as [B, h, w] long on ``device`` (used by every image decoder)."""
    if not isinstance(tokens, torch.Tensor):
        raise ConfigError(f"decode expects a LongTensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise ConfigError(
            f"decode expects integer token ids, got {tokens.dtype} "
            "(the dVAE decoder's forward() takes one-hot)"
        )
    if tokens.dim() == 2:
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ConfigError(
                f"decode got {tokens.shape[1]} tokens per image, which is not a square grid; "
                "pass [B, h, w] instead"
            )
        tokens = tokens.reshape(tokens.shape[0], side, side)
    if tokens.dim() != 3:
        raise ConfigError(
            f"decode expects tokens of shape [B, h, w] (or [B, h*w]), got {tuple(tokens.shape)}"
        )
    if tokens.numel() == 0:
        raise ConfigError(f"decode got an empty token tensor of shape {tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ConfigError(f"token ids must lie in [0, {vocab_size - 1}], got values in [{lo}, {hi}]")
    return tokens.to(device=device, dtype=torch.long)


# ------------------------------------------------------------------------------------------------- decoder
class Decoder(_DVAEModule):
    """OpenAI's dVAE decoder: one-hot (or soft) tokens [B, vocab_size, h, w] -> [B, 2 * C, 8h, 8w].

    Output channels 0..C-1 are the logit-space means mu, C..2C-1 the logit-Laplace log-scales ln b; the
    image is ``unmap_pixels(sigmoid(out[:, :C]))`` (what :meth:`decode` returns).

    Args:
        n_init: width of the embedding (the first 1x1 convolution, which acts as the codebook).
        n_hid: width of the last group (groups are 8, 4, 2, 1 times as wide); divisible by 4.
        n_blk_per_group: resblocks per group.
        output_channels: image channels (3 for RGB); the network emits twice as many.
        vocab_size: number of image tokens.
        device, requires_grad, use_mixed_precision, dtype: as for :class:`Encoder`.
    """

    def __init__(
        self,
        n_init: int = 128,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
        use_mixed_precision: bool = True,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        self.n_init = _check_int("n_init", n_init)
        self.n_hid = _check_int("n_hid", n_hid, minimum=4, multiple_of=4)
        self.n_blk_per_group = _check_int("n_blk_per_group", n_blk_per_group)
        self.output_channels = _check_int("output_channels", output_channels)
        self.vocab_size = _check_int("vocab_size", vocab_size, minimum=2)
        self.requires_grad = _check_bool("requires_grad", requires_grad)
        self.use_mixed_precision = _check_bool("use_mixed_precision", use_mixed_precision)
        n_layers = self.group_count * n_blk_per_group

        def blk(n_in: int, n_out: int) -> DecoderBlock:
            return DecoderBlock(n_in, n_out, n_layers, device=device, requires_grad=requires_grad)

        def group(width_in: int, width: int, upsample: bool) -> nn.Sequential:
            layers: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", blk(width_in if i == 0 else width, width)) for i in range(n_blk_per_group)
            ]
            if upsample:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            return nn.Sequential(OrderedDict(layers))

        blocks = nn.Sequential(
            OrderedDict(
                [
                    (
                        "input",
                        Conv2d(
                            vocab_size,
                            n_init,
                            1,
                            use_float16=False,
                            device=device,
                            requires_grad=requires_grad,
                        ),
                    ),
                    ("group_1", group(n_init, 8 * n_hid, True)),
                    ("group_2", group(8 * n_hid, 4 * n_hid, True)),
                    ("group_3", group(4 * n_hid, 2 * n_hid, True)),
                    ("group_4", group(2 * n_hid, n_hid, False)),
                    (
                        "output",
                        nn.Sequential(
                            OrderedDict(
                                [
                                    ("relu", nn.ReLU()),
                                    (
                                        "conv",
                                        Conv2d(
                                            n_hid,
                                            2 * output_channels,
                                            1,
                                            device=device,
                                            requires_grad=requires_grad,
                                        ),
                                    ),
                                ]
                            )
                        ),
                    ),
                ]
            )
        )
        self.blocks = cast("_DVAEBlocks", blocks)
        self._init_precision(dtype)

    def config(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-able dict; ``Decoder(**dec.config())`` rebuilds the
        architecture."""
        return {
            "n_init": self.n_init,
            "n_hid": self.n_hid,
            "n_blk_per_group": self.n_blk_per_group,
            "output_channels": self.output_channels,
            "vocab_size": self.vocab_size,
            "requires_grad": self.requires_grad,
            "use_mixed_precision": self.use_mixed_precision,
            "dtype": _dtype_name(self._dtype),
        }

    def _body(self, h: torch.Tensor) -> torch.Tensor:
        with self._own_precision():
            return self._layers(h)

    def _layers(self, h: torch.Tensor) -> torch.Tensor:
        # Everything after the input (embedding) convolution. Each group's upsampling is deferred into the
        # next group's first block (DecoderBlock.forward_upsampled), which does its 1x1 work before it.
        h = _to_memory_format(h, self.channels_last)
        pending: nn.Module | None = None
        for name, group in self.blocks.named_children():
            if name == "input":
                continue
            for module in group.children() if name.startswith("group_") else [group]:
                if isinstance(module, nn.Upsample):
                    if pending is not None:
                        h = pending(h)
                    pending = module
                elif pending is not None and isinstance(module, DecoderBlock):
                    h, pending = module.forward_upsampled(h, pending), None
                else:
                    if pending is not None:
                        h, pending = pending(h), None
                    h = module(h)
        if pending is not None:
            h = pending(h)
        return h.float().contiguous()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder statistics [B, 2C, 8h, 8w] (float32) for one-hot or soft tokens ``z`` [B, vocab, h, w]."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ConfigError(
                f"Decoder expects a 4-d one-hot tensor [B, vocab, h, w], got {getattr(z, 'shape', type(z))}; "
                "use decode(tokens) for token ids"
            )
        if z.shape[1] != self.vocab_size:
            raise ConfigError(
                f"input has {z.shape[1]} channels but the decoder was built for {self.vocab_size}"
            )
        if z.dtype != torch.float32:
            raise ConfigError(f"Decoder expects float32 input, got {z.dtype}")
        with self._own_precision():
            return self._layers(self.blocks.input(z))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input convolution applied to one-hot ``tokens`` [B, h, w], as an embedding lookup.

        Returns float32 [B, n_init, h, w], equal to ``blocks.input(one_hot(tokens))``: a 1x1 convolution of
        a one-hot vector picks one column of ``w`` and adds ``b``.
        """
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].t()  # [vocab, n_init]
        h = F.embedding(tokens, table) + conv.b  # [B, h, w, n_init]
        return h.permute(0, 3, 1, 2)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return check_token_grid(tokens, self.vocab_size, self.device)

    def decode_stats(self, tokens: torch.Tensor) -> torch.Tensor:
        """Like :meth:`forward` on ``one_hot(tokens)`` but without building the one-hot tensor."""
        return self._body(self.embed(self._check_tokens(tokens)))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Images float32 [B, C, 8h, 8w] in [0, 1] from token ids [B, h, w] (or [B, h*w] for square grids).

        Equals ``unmap_pixels(sigmoid(forward(one_hot(tokens))[:, :C]))``, computed through an embedding
        lookup instead of a [B, vocab_size, h, w] one-hot tensor.
        """
        stats = self.decode_stats(tokens)
        return unmap_pixels(torch.sigmoid(stats[:, : self.output_channels]))

"""The DALL-E transformer: one decoder-only sparse transformer over the joint text + image token stream.

Stream and position conventions (the paper is silent on these; the choices are tested in
tests/test_transformer.py):

* The stream has ``L = text_len + grid**2`` slots (256 + 1024 = 1280 for the paper's sizes).
* Text slots ``0 .. text_len-1`` hold the caption tokens exactly as the tokenizer returns them (no BOS/EOS).
  Where the caption has ended (id ``text_pad_id``), the token embedding is replaced by a learned pad embedding
  **of that slot** (one per text position, paper §2.2). Each text slot adds its text position embedding.
* There is **no start-of-text token**: text slot ``k`` predicts text token ``k + 1``, so the text loss covers
  tokens ``1 .. text_len-1`` (pads included, as the model must learn where captions end) and the first text
  token is not modelled. This keeps the stream at exactly text_len + grid**2 slots.
* Image slot ``text_len + j`` is tied to image cell ``j`` (row ``j // grid``, col ``j % grid``, raster order):
  it adds the row and column embeddings **of cell j, the cell it predicts**, and its input token is the image
  token of cell ``j - 1``; slot ``text_len`` (cell 0) holds a learned **start-of-image** token instead
  (row ``image_vocab_size`` of the image embedding table). Hence the last text slot's output is not used, and
  the last image token is never an input. Attention masks index image slots by the same cell ``j``
  (see :mod:`dalle.attention`).
* Two output heads (a design choice: no wasted logits): text logits come from the text slots only, image
  logits from the image slots only, both computed in float32 even under autocast.

Blocks are pre-LayerNorm residual blocks (attention, then a 4x GELU MLP) with a final LayerNorm, following
the Sparse Transformer the paper builds on; output projections of each residual branch are initialised with
std 0.02 / sqrt(2 * depth) and both heads start at zero (the Sparse Transformer's recipe).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle.attention import (
    ATTN_TYPES,
    BACKENDS,
    AttentionMasks,
    KVCache,
    attend,
    attend_one,
    paper_schedule,
)
from dalle.errors import ConfigError, ModelLoadError

_PRESETS: dict[str, dict[str, Any]] = {
    # Ramesh et al. 2021: 64 layers, 62 heads of 64 (d_model 3968), about 12 billion parameters.
    "paper": dict(
        text_vocab_size=16384,
        text_len=256,
        image_vocab_size=8192,
        image_grid=32,
        depth=64,
        heads=62,
        head_dim=64,
    ),
    # GPT-2 small sized: 12 layers, d_model 768, 12 heads.
    "small": dict(
        text_vocab_size=16384,
        text_len=256,
        image_vocab_size=8192,
        image_grid=32,
        depth=12,
        heads=12,
        head_dim=64,
    ),
    # For tests: 4 layers (row, column, row, conv), d_model 64, a 6x6 grid.
    "tiny": dict(
        text_vocab_size=64, text_len=8, image_vocab_size=32, image_grid=6, depth=4, heads=4, head_dim=16
    ),
}
#: the names TransformerConfig.preset accepts
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`DALLETransformer`; JSON round trip with :meth:`to_dict`/:meth:`from_dict`.

    ``attn_types`` is a per-layer list of ``full``/``row``/``column``/``conv``; ``None`` means the paper's
    schedule (:func:`dalle.attention.paper_schedule`), see :attr:`layer_types`. ``text_vocab_size`` is the
    tokenizer's ``vocab_size`` (pad id included). ``attn_backend``: ``auto`` (SDPA on CPU; on CUDA,
    FlexAttention only where it measures faster), ``sdpa`` or ``flex``. ``cuda_autocast``: run CUDA forward
    passes under bfloat16 autocast (logits stay float32).
    """

    text_vocab_size: int = 16384
    text_len: int = 256
    image_vocab_size: int = 8192
    image_grid: int = 32
    depth: int = 64
    heads: int = 62
    head_dim: int = 64
    attn_types: list[str] | None = None
    conv_kernel: int = 11
    mlp_ratio: int = 4
    dropout: float = 0.0
    text_pad_id: int = 0
    text_loss_weight: float = 1.0 / 8.0
    image_loss_weight: float = 7.0 / 8.0
    text_loss_ignore_pad: bool = False
    attn_backend: str = "auto"
    checkpoint_activations: bool = False
    cuda_autocast: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried through save/load

    def __post_init__(self) -> None:
        for name in (
            "text_vocab_size",
            "text_len",
            "image_vocab_size",
            "image_grid",
            "depth",
            "heads",
            "head_dim",
            "mlp_ratio",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ConfigError(
                f"TransformerConfig.conv_kernel must be a positive odd integer, got {self.conv_kernel}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ConfigError(
                f"TransformerConfig.text_pad_id={self.text_pad_id} is outside the text vocabulary "
                f"(size {self.text_vocab_size})"
            )
        if self.attn_backend not in BACKENDS:
            raise ConfigError(
                f"TransformerConfig.attn_backend must be one of {BACKENDS}, got {self.attn_backend!r}"
            )
        if self.attn_types is not None:
            self.attn_types = list(self.attn_types)
            if len(self.attn_types) != self.depth:
                raise ConfigError(
                    f"TransformerConfig.attn_types has {len(self.attn_types)} entries "
                    f"but depth is {self.depth}; "
                    "give one type per layer, or None for the paper's schedule"
                )
            bad = [t for t in self.attn_types if t not in ATTN_TYPES]
            if bad:
                raise ConfigError(f"unknown attention types {bad}; choose from {', '.join(ATTN_TYPES)}")

    @property
    def d_model(self) -> int:
        """Model width, heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def image_len(self) -> int:
        """Number of image tokens, image_grid ** 2."""
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        """Length of the token stream, text_len + image_grid ** 2."""
        return self.text_len + self.image_len

    @property
    def layer_types(self) -> list[str]:
        """The attention type of every layer (``attn_types`` or the paper's schedule)."""
        return list(self.attn_types) if self.attn_types is not None else paper_schedule(self.depth)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named configuration (``paper``, ``small``, ``tiny``) with optional field overrides."""
        if name not in _PRESETS:
            raise ConfigError(f"unknown transformer preset {name!r}; choose one of {', '.join(_PRESETS)}")
        return cls.from_dict({**_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)


def _values_checkable(ids: torch.Tensor) -> bool:
    """Whether the id range of ``ids`` is checked here: on the CPU, where reading it is cheap. On an
    accelerator reading a value stalls the host until the device catches up (several times per training step),
    so there ids are checked where they enter: the tokenizer, the datasets and token shards,
    :meth:`DALLETransformer.prefill` and the ``DALLE`` pipeline."""
    return ids.numel() > 0 and ids.device.type == "cpu"


def _autocast_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for device types autocast does not know, e.g.
    meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_id_range(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Raise :class:`ConfigError` unless every id lies in ``[0, vocab_size)`` (reads the tensor: a device
    sync)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ConfigError(
            f"{name} ids must be in [0, {vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]"
        )


def check_text(text: torch.Tensor, config: Any, device: torch.device) -> torch.Tensor:
    """Validate caption ids [B, t <= config.text_len] for a transformer of ``config`` (any config with
    ``text_len``, ``text_vocab_size``, ``text_pad_id``) and right-pad them with the pad id to ``text_len``;
    returns long ids on ``device``. Values are checked where that costs no device sync
    (:func:`_values_checkable`)."""
    c = config
    if not isinstance(text, torch.Tensor) or text.dim() != 2 or text.dtype not in (torch.int64, torch.int32):
        raise ConfigError(
            "text must be an integer tensor [batch, text_len] of token ids "
            "(the model's tokenizer's encode output), "
            f"got {getattr(text, 'dtype', type(text).__name__)} of shape {tuple(getattr(text, 'shape', ()))}"
        )
    if text.shape[1] > c.text_len:
        raise ConfigError(
            f"text has {text.shape[1]} positions but the model takes at most text_len={c.text_len}; "
            f"encode captions with text_len={c.text_len}"
        )
    if _values_checkable(text):
        check_id_range(text, c.text_vocab_size, "text")
    text = text.long().to(device)
    if text.shape[1] < c.text_len:
        text = F.pad(text, (0, c.text_len - text.shape[1]), value=c.text_pad_id)
    return text


def check_image(
    image: torch.Tensor, config: Any, device: torch.device, name: str = "image", max_len: int | None = None
) -> torch.Tensor:
    """Validate image ids [B, n <= max_len] (raster order) or [B, rows, grid] for a transformer of ``config``
    (``image_grid``, ``image_len``, ``image_vocab_size``); returns [B, n] long ids on ``device``."""
    c = config
    max_len = c.image_len if max_len is None else max_len
    if not isinstance(image, torch.Tensor) or image.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"{name} must be an integer tensor of image token ids, got {type(image).__name__}")
    if image.dim() == 3:
        if image.shape[2] != c.image_grid:
            raise ConfigError(f"{name} rows have {image.shape[2]} tokens, the grid is {c.image_grid} wide")
        image = image.reshape(image.shape[0], -1)
    if image.dim() != 2 or image.shape[1] > max_len:
        raise ConfigError(
            f"{name} must be [batch, n<={max_len}] (raster order) or [batch, rows, {c.image_grid}], "
            f"got shape {tuple(image.shape)}"
        )
    if _values_checkable(image):
        check_id_range(image, c.image_vocab_size, name)
    return image.long().to(device)


# ------------------------------------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    """Multi-head masked self-attention with a fused qkv projection."""

    def __init__(self, config: TransformerConfig, attn_type: str) -> None:
        super().__init__()
        self.attn_type = attn_type
        self.heads, self.head_dim = config.heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.backend = config.attn_backend

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, p, _ = x.shape
        q, k, v = self.qkv(x).view(b, p, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, H, P, Dh]

    def forward(
        self,
        x: torch.Tensor,
        masks: AttentionMasks,
        cache: KVCache | None = None,
        layer: int = 0,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over the first ``x.shape[1]`` slots, storing keys/values in ``cache`` when given; or,
        with ``position`` (a 0-dim long tensor; needs ``cache``), of one new slot ``x`` [B, 1, d] over the
        cache."""
        q, k, v = self._split(x)
        if position is not None:
            assert cache is not None, "one-slot attention reads the KV cache"
            cache.write_one(layer, position, k, v)
            table = masks.decode_table(self.attn_type, x.device)
            y = attend_one(q, cache.k[layer], cache.v[layer], table, position).to(x.dtype)
        else:
            if cache is not None:
                cache.write_prefix(layer, k, v)
            p = self.dropout if self.training else 0.0
            y = attend(q, k, v, masks, self.attn_type, self.backend, p)
        return self.proj(y.transpose(1, 2).reshape(x.shape))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, config: TransformerConfig, attn_type: str) -> None:
        super().__init__()
        d = config.d_model
        self.ln_1 = nn.LayerNorm(d)
        self.attn = SelfAttention(config, attn_type)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Linear(config.mlp_ratio * d, d)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        masks: AttentionMasks,
        cache: KVCache | None = None,
        layer: int = 0,
        position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full (or prefix) pass, storing keys/values in ``cache`` when given; with ``position``, the one-slot
        pass of cached decoding (one method, so that module hooks such as FSDP2's see both)."""
        x = x + self.drop(self.attn(self.ln_1(x), masks, cache, layer, position))
        return x + self.drop(self.mlp(self.ln_2(x)))


# ------------------------------------------------------------------------------------------------- model


class DALLETransformer(nn.Module):
    """The DALL-E transformer (see the module docstring for the stream layout)."""

    # non-persistent buffers (register_buffer in __init__): the grid row and column of each image slot
    _cell_rows: torch.Tensor
    _cell_cols: torch.Tensor

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise ConfigError(f"DALLETransformer needs a TransformerConfig, got {type(config).__name__}")
        self.config = config
        d, t, g = config.d_model, config.text_len, config.image_grid
        self.text_emb = nn.Embedding(config.text_vocab_size, d)
        self.pad_emb = nn.Embedding(t, d)  # one learned pad token per text position
        self.text_pos = nn.Embedding(t, d)
        self.image_emb = nn.Embedding(config.image_vocab_size + 1, d)  # last row: start-of-image
        self.row_emb = nn.Embedding(g, d)
        self.col_emb = nn.Embedding(g, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, a) for a in config.layer_types)
        self.ln_f = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, config.text_vocab_size, bias=False)
        self.image_head = nn.Linear(d, config.image_vocab_size, bias=False)
        self.masks = AttentionMasks(t, g, config.conv_kernel)
        self.cache: KVCache | None = None
        self._compiled_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        #: CUDA compute precision; None follows ``config.cuda_autocast`` (bfloat16 or float32). DALLE sets it.
        self.cuda_dtype: torch.dtype | None = None
        self.register_buffer("_cell_rows", torch.arange(g * g) // g, persistent=False)
        self.register_buffer("_cell_cols", torch.arange(g * g) % g, persistent=False)
        self.reset_parameters()

    # -------------------------------------------------------------------------------------- helpers

    def reset_parameters(self) -> None:
        """Sparse-Transformer-style initialisation (normal 0.02, scaled residual outputs, zero heads)."""
        if self.text_emb.weight.device.type == "meta":
            return  # nothing to initialise (e.g. counting the paper preset's parameters)
        resid_std = 0.02 / math.sqrt(2 * self.config.depth)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = resid_std if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.text_head.weight)
        nn.init.zeros_(self.image_head.weight)

    @property
    def start_of_image_id(self) -> int:
        """Token id fed to the first image slot (a row of the image embedding, outside the image vocab)."""
        return self.config.image_vocab_size

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.text_emb.weight.device

    def num_parameters(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def cuda_compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype of CUDA forward passes, None for plain float32 (:attr:`cuda_dtype` or the
        config)."""
        dtype = self.cuda_dtype
        if dtype is None:
            dtype = torch.bfloat16 if self.config.cuda_autocast else None
        return None if dtype == torch.float32 else dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """CUDA autocast in the compute dtype; nothing to enter when the same autocast is already active (the
        decode loop enters it once, not once per token), and switched off for float32 inside another one."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        dtype = self.cuda_compute_dtype()
        if not _autocast_active("cuda"):
            return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        if dtype is not None and torch.get_autocast_dtype("cuda") == dtype:
            return contextlib.nullcontext()
        return (
            torch.autocast("cuda", dtype=dtype)
            if dtype is not None
            else torch.autocast("cuda", enabled=False)
        )

    def _check_text(self, text: torch.Tensor) -> torch.Tensor:
        """Validate text ids [B, t<=text_len]; right-pad with the pad id to text_len (documented rule)."""
        return check_text(text, self.config, self.device)

    def _check_image(
        self, image: torch.Tensor, name: str = "image", max_len: int | None = None
    ) -> torch.Tensor:
        """Validate image ids [B, n] or [B, rows, grid]; returns [B, n] long on the model's device."""
        return check_image(image, self.config, self.device, name, max_len)

    def _embed(self, text: torch.Tensor, image_in: torch.Tensor) -> torch.Tensor:
        """Embeddings of the stream: text [B, text_len], image_in [B, m] = slot inputs (start-of-image
        first)."""
        t = self.config.text_len
        is_pad = (text == self.config.text_pad_id).unsqueeze(-1)
        x_text = torch.where(is_pad, self.pad_emb.weight[:t], self.text_emb(text)) + self.text_pos.weight[:t]
        m = image_in.shape[1]
        pos = self.row_emb(self._cell_rows[:m]) + self.col_emb(self._cell_cols[:m])
        x_image = self.image_emb(image_in) + pos
        return self.drop(torch.cat([x_text, x_image], dim=1))

    def _image_inputs(self, image: torch.Tensor) -> torch.Tensor:
        """Slot inputs for image slots: start-of-image, then every image token but the last."""
        sos = torch.full((image.shape[0], 1), self.start_of_image_id, dtype=torch.long, device=image.device)
        return torch.cat([sos, image[:, :-1]], dim=1)

    def _trunk(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        use_ckpt = self.config.checkpoint_activations and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_ckpt and cache is None:
                x = checkpoint(block, x, self.masks, None, i, use_reentrant=False)
            else:
                x = block(x, self.masks, cache, i)
        return self.ln_f(x)

    def _heads(self, h: torch.Tensor, head: nn.Linear) -> torch.Tensor:
        """Logits in float32 (paper §2.4), also inside an autocast region."""
        if _autocast_active(h.device.type):
            with torch.autocast(h.device.type, enabled=False):
                return F.linear(h.float(), head.weight.float())
        return F.linear(h.float(), head.weight.float())

    # ------------------------------------------------------------------------------------ public API

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass.

        text: [B, t <= text_len] ids (right-padded with the pad id); image: [B, n <= grid**2]
        (or [B, rows, grid]) image ids in raster order. Returns float32 ``(text_logits [B, text_len-1,
        text_vocab], image_logits [B, n, image_vocab])``: ``text_logits[:, k]`` predicts ``text[:, k+1]`` and
        ``image_logits[:, j]`` predicts ``image[:, j]`` from the text and ``image[:, :j]``.
        """
        text = self._check_text(text)
        image = self._check_image(image)
        if image.shape[0] != text.shape[0]:
            raise ConfigError(f"text batch {text.shape[0]} and image batch {image.shape[0]} differ")
        t = self.config.text_len
        with self._autocast(self.device):
            h = self._trunk(self._embed(text, self._image_inputs(image)))
        return self._heads(h[:, : t - 1], self.text_head), self._heads(h[:, t:], self.image_head)

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss: per-kind mean cross-entropy, weighted text_loss_weight / image_loss_weight
        (1/8 and 7/8 by default). Returns ``(loss, {"text": ..., "image": ...})`` (detached parts)."""
        c = self.config
        text = self._check_text(text)
        image = self._check_image(image)
        if image.shape[1] != c.image_len:
            raise ConfigError(f"loss needs complete images of {c.image_len} tokens, got {image.shape[1]}")
        text_logits, image_logits = self(text, image)
        targets = text[:, 1:]
        if c.text_loss_ignore_pad:
            targets = targets.masked_fill(targets == c.text_pad_id, -100)
        # a sum over the counted targets divided by their number (at least 1): 0 when nothing is left to
        # predict (text_len == 1 or every target an ignored pad), decided without reading a value back from
        # the device
        counted = (targets != -100).sum().clamp_min(1)
        loss_text = (
            F.cross_entropy(
                text_logits.reshape(-1, text_logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            / counted
        )
        loss_image = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        loss = c.text_loss_weight * loss_text + c.image_loss_weight * loss_image
        return loss, {"text": loss_text.detach(), "image": loss_image.detach()}

    @torch.no_grad()
    def image_log_likelihood(
        self, text: torch.Tensor, image: torch.Tensor, reduction: str = "sum"
    ) -> torch.Tensor:
        """log p(image | text) per sample, [B] float32 (``reduction`` ``sum`` or ``mean`` over tokens), for
        reranking. A text batch of 1 is broadcast over the images. Runs without gradients."""
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        image = self._check_image(image)
        text = self._check_text(text)
        check_id_range(text, self.config.text_vocab_size, "text")
        check_id_range(image, self.config.image_vocab_size, "image")
        if text.shape[0] == 1 and image.shape[0] > 1:
            text = text.expand(image.shape[0], -1)
        _, logits = self(text, image)
        logp = logits.log_softmax(-1).gather(-1, image.unsqueeze(-1)).squeeze(-1)
        return logp.sum(1) if reduction == "sum" else logp.mean(1)

    # ------------------------------------------------------------------------------------- decoding

    def reset_cache(self) -> None:
        """Free the KV cache (it is reallocated by the next :meth:`prefill`)."""
        self.cache = None

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """Allocate (or reuse) the static KV cache for ``batch_size`` streams on the model's device."""
        c = self.config
        device = self.device
        if dtype is None:
            autocast = self.cuda_compute_dtype() if device.type == "cuda" else None
            dtype = autocast or self.text_emb.weight.dtype
        if self.cache is None or not self.cache.matches(batch_size, device, dtype):
            self.cache = KVCache(c.depth, batch_size, c.heads, c.seq_len, c.head_dim, device, dtype)
        for attn_type in set(c.layer_types):  # build decode tables eagerly, never inside a compiled step
            self.masks.decode_table(attn_type, device)
        return self.cache

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, prime: torch.Tensor | None = None) -> torch.Tensor:
        """Run the text, the start-of-image slot and an optional prefix of image tokens ``prime`` [B, n]
        (raster order, n < grid**2) through the model, filling the KV cache; returns float32 logits [B,
        image_vocab] for image cell n. Continue with :meth:`decode_step` at position text_len + n + 1."""
        c = self.config
        text = self._check_text(text)
        if prime is None:
            prime = torch.zeros(text.shape[0], 0, dtype=torch.long, device=self.device)
        prime = self._check_image(prime, "prime", max_len=c.image_len - 1)
        if prime.shape[0] != text.shape[0]:
            raise ConfigError(f"text batch {text.shape[0]} and prime batch {prime.shape[0]} differ")
        # once per generation, on any device (forward checks values only where that costs no device sync)
        check_id_range(text, c.text_vocab_size, "text")
        check_id_range(prime, c.image_vocab_size, "prime")
        sos = torch.full((text.shape[0], 1), self.start_of_image_id, dtype=torch.long, device=self.device)
        cache = self.setup_cache(text.shape[0])
        with self._autocast(self.device):
            h = self._trunk(self._embed(text, torch.cat([sos, prime], 1)), cache)
        return self._heads(h[:, -1], self.image_head)

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Feed one image token per stream at slot ``position`` (text_len + j, with ``token`` the image token
        of cell j - 1) and return float32 logits [B, image_vocab] for cell j. Shapes never change with
        ``position`` (pass a 0-dim long tensor on the model's device to avoid a copy per step), so the step
        can be compiled / captured in a CUDA graph (:meth:`compile_decoding`). Needs :meth:`prefill` first.

        Compiled for CUDA graphs, the returned tensor is overwritten by the next step: use it (or copy it)
        before calling again."""
        if self.cache is None:
            raise ConfigError("decode_step needs a filled KV cache: call prefill(text, prime) first")
        device = self.device
        position = torch.as_tensor(position, dtype=torch.long, device=device).reshape(())
        step = self._compiled_step if self._compiled_step is not None else self._step
        return step(token.to(device=device, dtype=torch.long), position)

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The body of :meth:`decode_step` (what :meth:`compile_decoding` compiles)."""
        cache, grid = self.cache, self.config.image_grid
        assert cache is not None
        cell = position - self.config.text_len
        with self._autocast(token.device):
            x = self.image_emb(token) + self.row_emb(cell // grid) + self.col_emb(cell % grid)
            x = x.unsqueeze(1)
            for i, block in enumerate(self.blocks):
                x = block(x, self.masks, cache, i, position)
            h = self.ln_f(x)
        return self._heads(h[:, 0], self.image_head)

    def cast_matmul_weights(self, dtype: torch.dtype) -> DALLETransformer:
        """Store the blocks' linear-layer weights in ``dtype`` (bfloat16 / float16, for CUDA inference);
        returns self. Autocast then has no half-precision copy of them to make and keep (24.6 GB at the
        paper's size), while embeddings, LayerNorms, the heads and the residual stream stay float32. Not for
        training."""
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ConfigError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype!r}")
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
        return self

    def compile_decoding(
        self, mode: str | None = None, *, backend: str = "inductor", fullgraph: bool = False
    ) -> DALLETransformer:
        """Compile the one-token decode step with ``torch.compile``; returns self.
        :func:`dalle.sampling.sample` with the race sampler then compiles the step together with the filter
        and the draw, so that on CUDA one graph replays per token.

        ``mode`` defaults to ``"reduce-overhead"`` on CUDA (CUDA graphs: the step replays as one graph, which
        makes decoding memory-bound instead of launch-bound) and ``"default"`` elsewhere. The first steps
        after a change of batch size compile or record anew. ``mode="off"`` goes back to eager decoding.
        ``backend`` and ``fullgraph`` go to ``torch.compile`` (``backend="eager"`` traces without generating
        code: a quick check that the step is one graph).
        """
        if mode == "off":
            self._compiled_step = None
            return self
        if backend != "inductor":
            mode = None  # modes are inductor's
        elif mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._compile_options: dict[str, Any] = {"mode": mode, "backend": backend, "fullgraph": fullgraph}
        self._compiled_step = torch.compile(self._step, dynamic=False, **self._compile_options)
        return self

    @property
    def decoding_compiled(self) -> bool:
        """True after :meth:`compile_decoding`."""
        return self._compiled_step is not None

    @classmethod
    def from_state_dict(cls, config: TransformerConfig, state: dict[str, torch.Tensor]) -> DALLETransformer:
        """A model that takes over the tensors of ``state`` (no copy, no random initialisation first: the
        model is built on the meta device), on the device those tensors are on."""
        with torch.device("meta"):
            model = cls(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the weights do not fit the configuration: {exc}") from exc
        # buffers are not saved: rebuild them beside the weights
        g, target = config.image_grid, model.text_emb.weight.device
        model._cell_rows = torch.arange(g * g, device=target) // g
        model._cell_cols = torch.arange(g * g, device=target) % g
        return model

"""ruDALL-E (Sber AI's DALL-E reproduction) in dalle: transformer, tokenizer mode, sampling filter and rerank
score.

The only public DALL-E-architecture weights are ruDALL-E's (Malevich 1.3B v3 and v2, Emojich, Surrealist XL,
Kandinsky 12B). :class:`RuDalleTransformer` computes the same logits as ``rudalle.dalle.model.DalleModel``
(rudalle 1.1.3), and its parameter names are that model's state-dict keys, so ``pytorch_model*.bin`` loads
unchanged (:meth:`RuDalleTransformer.from_rudalle_checkpoint`). It also offers the interface of
:class:`dalle.transformer.DALLETransformer` that :func:`dalle.sampling.sample` and the ``DALLE`` pipeline use.

Token stream (``T = text_len = 128`` caption tokens, ``g = image_grid = 32``, ``N = g*g = 1024`` cells,
``L = seq_len = T + N = 1152`` slots at most; ``V = text_vocab_size = 16384 + 128``):

* **Text ids.** The tokenizer gives ``[2] + bpe ids + [3]`` right-padded with 0 to ``T``
  (:class:`RuDalleTokenizer`). Before embedding, every 0 at text position ``i`` becomes the per-position pad
  token ``V - T + i`` (ids 16384..16511), so the text vocabulary is ``V`` and the text head predicts these
  pad ids too.
* **v3 layout** (Malevich v3, Surrealist XL, Kandinsky): slots ``0..T-1`` hold the ``T`` text ids with text
  position embeddings ``0..T-1`` (row ``T`` of ``text_pos_embeddings`` exists but is unused); slot ``T + i``
  holds the image token of cell ``i``. There is **no start-of-image slot**: the last text slot ``T-1``
  predicts cell 0, and slot ``T + i`` predicts cell ``i + 1``. ``S = text_slots = T``.
* **v2 layout** (Malevich v2, Emojich): an extra BOS (id 2) is put *before* the text, so slots ``0..T`` hold
  ``[2] + text`` (``T + 1 = 129`` text slots, position embeddings ``0..T``) and slot ``T + 1 + i`` holds cell
  ``i``. Slot ``T`` (the last caption token) predicts cell 0. The stream is capped at ``L`` slots, so only
  cells ``0..N-2`` are ever inputs (the reference drops the last slot of a longer stream). ``S = T + 1``.
* **Image inputs.** Cell ``i``'s token is embedded with ``image_embeddings`` plus the row/column embeddings
  of cell ``i`` itself (``i // g``, ``i % g``) -- the cell it *is*, not the one it predicts.
* **Masks** are indexed by slot with ``T`` text slots in *both* layouts (the reference builds them with
  ``text_tokens = T``). In v2 that shifts them by one: the mask treats slot ``T`` (last caption token) as
  image cell 0 and the slot of cell ``i`` as cell ``i + 1``. Per layer ``l`` (0-based): ``column`` if
  ``(l - 1) % 4 == 0``, else ``row`` unless ``l`` is the last layer, which is ``conv``. All are causal; text
  keys (slots < T) are always visible. For an image key slot ``k >= T`` and query slot ``q >= k``:
  ``row``: ``q - k <= g``; ``column``: ``(q - k) % g == 0`` (same column only); ``conv``: ``q == k`` or the
  query cell lies within +-5 rows and +-5 columns (kernel 11) of the key cell, clipped at the grid edges in
  v3 and wrapping around (modulo ``g``) in v2. The masks are persistent bool buffers
  ``transformer.{row,col,conv}_mask`` [L, L], as in the reference; loading a checkpoint never replaces them
  (the reference rebuilds them too).
* **Blocks** (CogView): ``x + LN_a(clamp(dense(attn(LN_in(x))), +-65504))`` then
  ``x + LN_b(mlp(LN_post(x)))`` with the sandwich LayerNorms ``before_first/second_addition_layernorm``, a
  4x MLP with tanh GELU ``0.5x(1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2)))``, then
  ``transformer.final_layernorm`` and the joint head ``to_logits`` = LayerNorm + biased Linear to
  ``V + image_vocab_size`` logits (text ids first, then the 8192 image codes).
* **Attention**: ``attn_impl="sdpa"`` (default) runs SDPA with the layer's mask (fp32-accumulated,
  row-max-stabilised softmax; mathematically the same as PB-relax). ``attn_impl="reference"`` reproduces
  the reference's arithmetic: ``(q / sqrt(d)) @ k^T``, masked scores ``-10000``, PB-relax (scores / 32, minus
  their per-(sample, head) maximum, times 32), softmax; use it for half-precision parity.
* **Training** details kept: embeddings go through ``0.1 * x + 0.9 * x.detach()`` (gradient scaled by 0.1);
  attention-probability, attention-output and MLP dropout as in the reference (``embedding_dropout_prob``
  is not applied by the reference, so it does not exist here). :meth:`RuDalleTransformer.loss` is the
  reference's ``return_loss=True`` value.

Interface slicing (``P`` = ``S - 1``, the slot that predicts cell 0): ``image_logits[:, j]`` =
``joint[:, P + j, V:]`` (predicts cell ``j`` from the text and cells ``< j``); ``text_logits[:, k]`` =
``joint[:, k + S - T, :V]`` for ``k < T - 1`` (predicts text token ``k + 1``, pad ids included).
``decode_step(token, position)`` with ``position = T + j`` feeds ``token`` (cell ``j - 1``) at stream slot
``S + j - 1`` (v3: ``position - 1``; v2: ``position``) and returns ``joint[:, that slot, V:]``, the logits of
cell ``j``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dalle.attention import DecodeTable, KVCache, attend_one
from dalle.errors import ConfigError, ModelLoadError, TokenizerError
from dalle.transformer import check_id_range, check_image, check_text

VERSIONS: tuple[str, ...] = ("v2", "v3")
ATTN_IMPLS: tuple[str, ...] = ("sdpa", "reference")
MASK_NAMES: tuple[str, ...] = ("row_mask", "col_mask", "conv_mask")
CLAMP = 65504.0  # largest float16
MASK_FILL = 10000.0  # the reference's additive mask value
PB_RELAX_ALPHA = 32.0
EMBED_GRAD_SCALE = 0.1
GELU_C = 0.7978845608028654  # sqrt(2 / pi), as the reference writes it
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 2, 3, 1, 0
#: ``masks(dtype) -> (bool [P, P], additive [P, P] in dtype)`` of one layer
MaskFn = Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor]]

_COMMON = dict(
    embedding_dropout_prob=0.1,
    output_dropout_prob=0.1,
    attention_dropout_prob=0.1,
    image_tokens_per_dim=32,
    text_seq_length=128,
    cogview_sandwich_layernorm=True,
    cogview_pb_relax=True,
    vocab_size=16384 + 128,
    image_vocab_size=8192,
)
#: rudalle 1.1.3's MODELS hyper-parameters (``model_params`` and ``hf_version``), by our preset name
RUDALLE_MODELS: dict[str, dict[str, Any]] = {
    "malevich": dict(hf_version="v3", num_layers=24, hidden_size=2048, num_attention_heads=16, **_COMMON),
    "malevich-v2": dict(hf_version="v2", num_layers=24, hidden_size=2048, num_attention_heads=16, **_COMMON),
    "emojich": dict(hf_version="v2", num_layers=24, hidden_size=2048, num_attention_heads=16, **_COMMON),
    "surrealist-xl": dict(
        hf_version="v3", num_layers=24, hidden_size=2048, num_attention_heads=16, **_COMMON
    ),
    "kandinsky": dict(hf_version="v3", num_layers=64, hidden_size=3840, num_attention_heads=60, **_COMMON),
}
PRESET_NAMES: tuple[str, ...] = tuple(RUDALLE_MODELS)

#: a middle setting of the (top_k, top_p) list rudalle's README samples Malevich with; the released models'
#: default sampling in dalle (``DALLE.generate`` uses it when top_k / top_p are not given)
RUDALLE_SAMPLING: dict[str, Any] = {
    "top_k": 1024,
    "top_p": 0.99,
    "sampler": "multinomial",
    "filter": "rudalle",
}
#: Hub repositories of the files every released model shares (rudalle 1.1.3's get_vae / get_tokenizer)
RUDALLE_UTILS_REPOS: tuple[str, ...] = ("shonenkov/rudalle-utils",)
RUDALLE_VQGAN_FILE = "vqgan.gumbelf8-sber.model.ckpt"
RUDALLE_BPE_FILE = "bpe.model"
#: dalle's registered names of the released models: preset, Hub repositories (rudalle 1.1.3's repo id first,
#: then the name the organisation was renamed to) and the transformer's file name
RUDALLE_HUB: dict[str, dict[str, Any]] = {
    "rudalle-malevich": {
        "preset": "malevich",
        "filename": "pytorch_model_v3.bin",
        "repos": ("sberbank-ai/rudalle-Malevich", "ai-forever/rudalle-Malevich"),
    },
    "rudalle-malevich-v2": {
        "preset": "malevich-v2",
        "filename": "pytorch_model_v2.bin",
        "repos": ("sberbank-ai/rudalle-Malevich", "ai-forever/rudalle-Malevich"),
    },
    "rudalle-emojich": {
        "preset": "emojich",
        "filename": "pytorch_model.bin",
        "repos": ("sberbank-ai/rudalle-Emojich", "ai-forever/rudalle-Emojich"),
    },
    "rudalle-surrealist-xl": {
        "preset": "surrealist-xl",
        "filename": "pytorch_model.bin",
        "repos": ("shonenkov-AI/rudalle-xl-surrealist",),
    },
    "rudalle-kandinsky": {
        "preset": "kandinsky",
        "filename": "pytorch_model.bin",
        "repos": ("shonenkov-AI/Kandinsky",),
    },
}


# --------------------------------------------------------------------------------------------------- config


@dataclass
class RuDalleConfig:
    """Hyper-parameters of :class:`RuDalleTransformer` (see the module docstring for the layout).

    ``text_vocab_size`` is rudalle's ``vocab_size`` (BPE ids + one pad id per text position, 16384 + 128);
    ``text_len`` its ``text_seq_length``; ``image_grid`` its ``image_tokens_per_dim``; ``version`` its
    ``hf_version``. ``cuda_autocast``: CUDA passes run under bfloat16 autocast unless the model's
    ``cuda_dtype`` says otherwise (logits stay float32).
    """

    version: str = "v3"
    text_vocab_size: int = 16384 + 128
    text_len: int = 128
    image_vocab_size: int = 8192
    image_grid: int = 32
    depth: int = 24
    heads: int = 16
    head_dim: int = 128
    sandwich_layernorm: bool = True
    pb_relax: bool = True
    attention_dropout: float = 0.1
    output_dropout: float = 0.1
    conv_kernel: int = 11
    layernorm_eps: float = 1e-5
    loss_img_weight: float = 7.0
    attn_impl: str = "sdpa"
    cuda_autocast: bool = True
    text_pad_id: int = 0

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ConfigError(f"RuDalleConfig.version must be one of {VERSIONS}, got {self.version!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"RuDalleConfig.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in (
            "text_vocab_size",
            "text_len",
            "image_vocab_size",
            "image_grid",
            "depth",
            "heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"RuDalleConfig.{name} must be a positive integer, got {value!r}")
        if self.text_vocab_size <= self.text_len:
            raise ConfigError(
                f"RuDalleConfig.text_vocab_size ({self.text_vocab_size}) must exceed "
                f"text_len ({self.text_len}): "
                "its last text_len ids are the per-position pad tokens"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ConfigError(
                f"RuDalleConfig.conv_kernel must be a positive odd integer, got {self.conv_kernel}"
            )
        for name in ("attention_dropout", "output_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"RuDalleConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.text_pad_id != 0:
            raise ConfigError("ruDALL-E's pad id is 0 (RuDalleConfig.text_pad_id must be 0)")

    # derived sizes -------------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        """Model width (rudalle's hidden_size), heads * head_dim."""
        return self.heads * self.head_dim

    @property
    def image_len(self) -> int:
        """Number of image cells, image_grid ** 2."""
        return self.image_grid * self.image_grid

    @property
    def seq_len(self) -> int:
        """Stream capacity (KV cache length), text_len + image_len (rudalle's total_seq_length)."""
        return self.text_len + self.image_len

    @property
    def text_slots(self) -> int:
        """Stream slots holding text: text_len (v3) or text_len + 1 (v2, with the extra BOS)."""
        return self.text_len + (1 if self.version == "v2" else 0)

    @property
    def bpe_vocab_size(self) -> int:
        """Text ids the tokenizer can produce (text_vocab_size minus the per-position pad ids)."""
        return self.text_vocab_size - self.text_len

    @property
    def joint_vocab_size(self) -> int:
        """Width of the joint head, text_vocab_size + image_vocab_size."""
        return self.text_vocab_size + self.image_vocab_size

    @property
    def layer_types(self) -> list[str]:
        """Mask of every layer: ``column`` if (l-1) % 4 == 0, else ``row``, the last layer ``conv``."""
        return [
            "column" if (i - 1) % 4 == 0 else ("row" if i != self.depth - 1 else "conv")
            for i in range(self.depth)
        ]

    # construction -------------------------------------------------------------------------------------
    @classmethod
    def from_rudalle_params(cls, hf_version: str = "v3", **model_params: Any) -> RuDalleConfig:
        """Translate rudalle's ``DalleModel`` keyword arguments (MODELS[...]['model_params']) into a config.

        ``embedding_dropout_prob`` (never applied by the reference), ``is_bool_mask``, ``device`` and
        ``init_layer_func`` are accepted and ignored; fields of this config (e.g. ``attn_impl``) may be passed
        too.
        """
        p = dict(model_params)
        hidden, heads = p.pop("hidden_size", 2048), p.pop("num_attention_heads", 16)
        if hidden % heads:
            raise ConfigError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        for unused in ("embedding_dropout_prob", "is_bool_mask", "device", "init_layer_func"):
            p.pop(unused, None)
        activation = p.pop("mlp_activation", "gelu_jit")
        if activation not in ("gelu", "gelu_jit"):
            raise ConfigError(
                f"mlp_activation={activation!r} is not supported (rudalle's are gelu / gelu_jit)"
            )
        renames = {
            "num_layers": "depth",
            "vocab_size": "text_vocab_size",
            "text_seq_length": "text_len",
            "image_tokens_per_dim": "image_grid",
            "cogview_sandwich_layernorm": "sandwich_layernorm",
            "cogview_pb_relax": "pb_relax",
            "attention_dropout_prob": "attention_dropout",
            "output_dropout_prob": "output_dropout",
            "loss_img_weight": "loss_img_weight",
        }
        kwargs = {renames.get(k, k): v for k, v in p.items()}
        return cls(version=hf_version, heads=heads, head_dim=hidden // heads, **kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> RuDalleConfig:
        """A released model's configuration: ``malevich`` (v3), ``malevich-v2``, ``emojich``,
        ``surrealist-xl``, ``kandinsky``; ``overrides`` replace fields of the result."""
        if name not in RUDALLE_MODELS:
            raise ConfigError(f"unknown ruDALL-E preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        config = cls.from_rudalle_params(**RUDALLE_MODELS[name])
        return dataclasses.replace(config, **overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuDalleConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown RuDalleConfig fields {unknown}; known fields: {sorted(names)}")
        return cls(**data)


# ---------------------------------------------------------------------------------------------------- masks


def build_masks(text_len: int, grid: int, version: str = "v3", kernel: int = 11) -> dict[str, torch.Tensor]:
    """The reference's three bool masks [L, L] (True: query row may attend to key column), by buffer name.

    Built vectorised on the current default device (so ``torch.device('meta')`` works); see the module
    docstring for the rules.
    """
    if version not in VERSIONS:
        raise ConfigError(f"version must be one of {VERSIONS}, got {version!r}")
    length = text_len + grid * grid
    s = torch.arange(length)
    q, k = s[:, None], s[None, :]
    causal = k <= q
    text_key = k < text_len
    d = q - k
    row = causal & (text_key | (d <= grid))
    col = causal & (text_key | (d % grid == 0))
    cq, ck = (q - text_len).clamp_min(0), (k - text_len).clamp_min(0)
    dr = cq // grid - ck // grid
    dc = cq % grid - ck % grid
    half = kernel // 2
    if version == "v2":  # the kernel wraps around the grid's edges
        dr, dc = dr % grid, dc % grid
        near = (torch.minimum(dr, grid - dr) <= half) & (torch.minimum(dc, grid - dc) <= half)
    else:  # v3: clipped at the edges, i.e. a plain Chebyshev neighbourhood
        near = (dr.abs() <= half) & (dc.abs() <= half)
    conv = causal & (text_key | (d == 0) | ((q >= text_len) & near))
    return {"row_mask": row, "col_mask": col, "conv_mask": conv}


_TYPE_TO_MASK = {"row": "row_mask", "column": "col_mask", "conv": "conv_mask"}


def _decode_table(mask: torch.Tensor) -> DecodeTable:
    """Fixed-width key lists of every query slot of a bool mask [L, L] (dense when a gather saves little)."""
    length = mask.shape[0]
    width = int(mask.sum(1).max())
    if width * 4 >= length * 3:
        return DecodeTable(
            index=torch.arange(length, device=mask.device)[None], valid=mask.clone(), dense=True
        )
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = mask.gather(1, order)
    index = torch.where(valid, order, torch.zeros_like(order))
    return DecodeTable(index=index.contiguous(), valid=valid.contiguous(), dense=False)


# ------------------------------------------------------------------------------------------------ functions


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The reference's tanh GELU, ``0.5 x (1 + tanh(0.7978845608028654 x (1 + 0.044715 x^2)))``."""
    return 0.5 * x * (1.0 + torch.tanh(GELU_C * x * (1.0 + 0.044715 * x * x)))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    pb_relax: bool = True,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The reference's attention arithmetic: q, k, v [B, H, P/K, Dh], ``allowed`` bool [.., P, K].

    Scores ``(q / sqrt(d)) @ k^T`` (PB-relax) or ``(q @ k^T) / sqrt(d)``; disallowed scores become
    ``-10000``; with PB-relax they are divided by 32, shifted by their maximum over the whole [P, K] matrix of
    each sample and head, and multiplied by 32 again; then softmax, dropout and the weighted sum of values.
    """
    scale = math.sqrt(q.shape[-1])
    scores = (q / scale) @ k.transpose(-1, -2) if pb_relax else (q @ k.transpose(-1, -2)) / scale
    m = allowed.to(scores.dtype)
    scores = scores * m - MASK_FILL * (1.0 - m)
    if pb_relax:
        scaled = scores / PB_RELAX_ALPHA
        peak = scaled.detach().flatten(2).amax(-1)[..., None, None]
        scores = (scaled - peak) * PB_RELAX_ALPHA
    probs = scores.softmax(-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def top_k_top_p_filtering(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """transformers' ``top_k_top_p_filtering`` (the filter rudalle samples with) on logits [B, V]; returns a
    filtered copy (the input is not modified).

    Top-k (``top_k > 0``): entries below the k-th largest value become ``filter_value`` (ties with it stay);
    ``k`` is raised to ``min_tokens_to_keep`` and capped at V. Top-p (``top_p < 1``): over the remaining
    logits sorted in decreasing order (a stable sort, so ties keep index order), a token is removed when the
    cumulative softmax probability of the tokens *before* it exceeds ``top_p`` (the token that crosses the
    threshold is kept, and so is the first sorted token); with ``min_tokens_to_keep > 1`` the first
    ``min_tokens_to_keep + 1`` sorted tokens stay (transformers protects them before shifting).
    """
    if logits.dim() != 2:
        raise ConfigError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k must be an int >= 0 (0: no top-k), got {top_k!r}")
    if not 0.0 <= float(top_p) <= 1.0:
        raise ConfigError(f"top_p must be in [0, 1] (1: no top-p), got {top_p}")
    if min_tokens_to_keep < 1:
        raise ConfigError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep}")
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p
        if min_tokens_to_keep > 1:  # (as in transformers: before the shift, and only above 1)
            remove[..., :min_tokens_to_keep] = False
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], dim=-1)
        logits = logits.masked_fill(remove.scatter(-1, order, remove), filter_value)
    return logits


def rudalle_filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """rudalle's ``generate_images`` rule: float32 image logits [B, image_vocab] divided by ``temperature``,
    then :func:`top_k_top_p_filtering`. Sample with ``multinomial(softmax(result))``."""
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return top_k_top_p_filtering(logits.float() / temperature, top_k=top_k, top_p=top_p)


def rudalle_sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row [B] long, drawn as rudalle draws it (:func:`rudalle_filter_logits`, softmax,
    ``torch.multinomial``)."""
    probs = rudalle_filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def ce_to_ppl(ce: torch.Tensor) -> torch.Tensor:
    """rudalle's per-image perplexity of per-token cross-entropies [B, n]: the mean of ``exp(ce)`` over the
    tokens whose cross-entropy is not exactly 0 (a row with none gives nan; the reference misaligns rows
    then)."""
    nonzero = ce != 0
    return torch.where(nonzero, ce.exp(), torch.zeros_like(ce)).sum(-1) / nonzero.sum(-1)


def rerank_scores(
    image_logits: torch.Tensor, image: torch.Tensor, version: str = "v3", reference_alignment: bool = True
) -> torch.Tensor:
    """rudalle's rerank score (lower is better: ``generate_images`` sorts images by it, ascending) from this
    module's aligned ``image_logits`` [B, N, image_vocab] (``image_logits[:, j]`` predicts cell j, as
    :meth:`RuDalleTransformer.forward` returns them) and the sampled ``image`` [B, N]. Returns [B] float32.

    rudalle scores the cross-entropies of cells 1..N-1 with :func:`ce_to_ppl`. For v3 its logits are aligned
    (the prediction of cell j scores cell j). For v2 it takes the joint logits of slots T..T+N-2, which
    predict cells 0..N-2, and scores them against cells 1..N-1 (off by one); ``reference_alignment=True``
    reproduces that, False scores the v2 predictions against the cells they predict.
    """
    if version not in VERSIONS:
        raise ConfigError(f"version must be one of {VERSIONS}, got {version!r}")
    if image_logits.dim() != 3 or image.shape != image_logits.shape[:2]:
        raise ConfigError(
            f"image_logits must be [B, N, vocab] and image [B, N], got {tuple(image_logits.shape)} and "
            f"{tuple(image.shape)}"
        )
    logits = image_logits[:, :-1] if (version == "v2" and reference_alignment) else image_logits[:, 1:]
    ce = F.cross_entropy(logits.float().transpose(1, 2), image[:, 1:].long(), reduction="none")
    return ce_to_ppl(ce)


# -------------------------------------------------------------------------------------------------- modules


class DalleSelfAttention(nn.Module):
    """Fused-qkv multi-head attention; output ``clamp(dense(.), +-65504)`` then dropout (reference order)."""

    def __init__(self, config: RuDalleConfig) -> None:
        super().__init__()
        d = config.d_model
        self.heads, self.head_dim = config.heads, config.head_dim
        self.impl, self.pb_relax = config.attn_impl, config.pb_relax
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)
        self.attention_dropout = config.attention_dropout
        self.output_dropout = nn.Dropout(config.output_dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, p, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, p, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # [B, H, P, Dh]

    def _out(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        y = self.dense(y.transpose(1, 2).reshape(shape))
        return self.output_dropout(y.clamp(-CLAMP, CLAMP))

    def forward(
        self, x: torch.Tensor, masks: MaskFn, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """Attention over the first ``x.shape[1]`` slots; ``masks(dtype)`` gives the (bool, additive)
        masks."""
        q, k, v = self._qkv(x)
        if cache is not None:
            cache.write_prefix(layer, k, v)
        p = self.attention_dropout if self.training else 0.0
        allowed, additive = masks(q.dtype)
        if self.impl == "reference":
            y = reference_attention(q, k, v, allowed, self.pb_relax, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=p)
        return self._out(y, x.shape)

    def step(
        self, x: torch.Tensor, table: DecodeTable, cache: KVCache, layer: int, slot: torch.Tensor
    ) -> torch.Tensor:
        """One new slot (x [B, 1, d]) attending over the static cache (gathered keys of ``table``)."""
        q, k, v = self._qkv(x)
        cache.write_one(layer, slot, k, v)
        if self.impl == "reference":
            valid = table.valid.index_select(0, slot.view(1))  # [1, K]
            kc, vc = cache.k[layer], cache.v[layer]
            if not table.dense:
                index = table.index.index_select(0, slot.view(1)).view(-1)
                kc, vc = kc.index_select(2, index), vc.index_select(2, index)
            y = reference_attention(q, kc.to(q.dtype), vc.to(q.dtype), valid.view(1, 1, 1, -1), self.pb_relax)
        else:
            y = attend_one(q, cache.k[layer], cache.v[layer], table, slot)
        return self._out(y.to(x.dtype), x.shape)


class DalleMLP(nn.Module):
    """4x MLP with the reference's tanh GELU, then dropout."""

    def __init__(self, config: RuDalleConfig) -> None:
        super().__init__()
        d = config.d_model
        self.dense_h_to_4h = nn.Linear(d, 4 * d)
        self.dense_4h_to_h = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(config.output_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, P, d] -> [B, P, d]."""
        return self.dropout(self.dense_4h_to_h(gelu(self.dense_h_to_4h(x))))


class DalleTransformerLayer(nn.Module):
    """CogView block: pre-LN attention and MLP, each output LayerNorm'ed again before its residual add."""

    def __init__(self, config: RuDalleConfig) -> None:
        super().__init__()
        d, eps = config.d_model, config.layernorm_eps
        self.sandwich = config.sandwich_layernorm
        self.input_layernorm = nn.LayerNorm(d, eps=eps)
        if self.sandwich:
            self.before_first_addition_layernorm = nn.LayerNorm(d, eps=eps)
            self.before_second_addition_layernorm = nn.LayerNorm(d, eps=eps)
        self.attention = DalleSelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps)
        self.mlp = DalleMLP(config)

    def _finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.sandwich:
            a = self.before_first_addition_layernorm(a)
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich:
            m = self.before_second_addition_layernorm(m)
        return x + m

    def forward(
        self, x: torch.Tensor, masks: MaskFn, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """Full (or prefix) pass; stores keys/values in ``cache`` when given."""
        return self._finish(x, self.attention(self.input_layernorm(x), masks, cache, layer))

    def step(
        self, x: torch.Tensor, table: DecodeTable, cache: KVCache, layer: int, slot: torch.Tensor
    ) -> torch.Tensor:
        """One-slot pass for cached decoding."""
        return self._finish(x, self.attention.step(self.input_layernorm(x), table, cache, layer, slot))


class DalleTransformer(nn.Module):
    """The layer stack, the three mask buffers and the final LayerNorm (state-dict prefix
    ``transformer.``)."""

    row_mask: torch.Tensor
    col_mask: torch.Tensor
    conv_mask: torch.Tensor

    def __init__(self, config: RuDalleConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DalleTransformerLayer(config) for _ in range(config.depth))
        masks = build_masks(config.text_len, config.image_grid, config.version, config.conv_kernel)
        for name in MASK_NAMES:
            self.register_buffer(name, masks[name])
        self.final_layernorm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The reference rebuilds its masks and never loads them: keep ours whether or not a checkpoint has
        # them.
        for name in MASK_NAMES:
            state_dict[prefix + name] = getattr(self, name)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class RuDalleTransformer(nn.Module):
    """ruDALL-E's transformer with rudalle's parameter names and dalle's transformer interface.

    Build with ``RuDalleTransformer(RuDalleConfig.preset("malevich"))`` and load a rudalle checkpoint with
    :meth:`from_rudalle_checkpoint` (or ``load_state_dict(rudalle_state_dict)``, masks optional).
    """

    #: :func:`dalle.sampling.sample` draws like rudalle's ``generate_images`` unless told otherwise
    default_sampler = "multinomial"
    default_filter = "rudalle"

    def __init__(self, config: RuDalleConfig) -> None:
        super().__init__()
        if not isinstance(config, RuDalleConfig):
            raise ConfigError(f"RuDalleTransformer needs a RuDalleConfig, got {type(config).__name__}")
        self.config = config
        c, d = config, config.d_model
        self.text_embeddings = nn.Embedding(c.text_vocab_size, d)
        self.image_embeddings = nn.Embedding(c.image_vocab_size, d)
        self.text_pos_embeddings = nn.Embedding(c.text_len + 1, d)
        self.image_row_embeddings = nn.Embedding(c.image_grid, d)
        self.image_col_embeddings = nn.Embedding(c.image_grid, d)
        self.to_logits = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c.joint_vocab_size))
        self.transformer = DalleTransformer(c)
        self.cache: KVCache | None = None
        self._compiled_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        #: CUDA autocast dtype (float16 / bfloat16; float32 or None with cuda_autocast=False: plain float32)
        self.cuda_dtype: torch.dtype | None = None
        self._mask_cache: dict[tuple, Any] = {}
        if self.text_embeddings.weight.device.type != "meta":
            for emb in (self.text_pos_embeddings, self.image_row_embeddings, self.image_col_embeddings):
                nn.init.normal_(
                    emb.weight, std=0.02
                )  # the reference's init; other modules keep torch defaults

    # --------------------------------------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.text_embeddings.weight.device

    def num_parameters(self) -> int:
        """Number of parameters (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def cuda_compute_dtype(self) -> torch.dtype | None:
        """Autocast dtype of CUDA passes, None for plain float32 (:attr:`cuda_dtype`, else the config)."""
        dtype = self.cuda_dtype
        if dtype is None:
            dtype = torch.bfloat16 if self.config.cuda_autocast else None
        return None if dtype == torch.float32 else dtype

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """CUDA autocast in the compute dtype; nothing is entered when the same autocast is already active
        (a decode loop may enter it once), and it is switched off for float32 inside another one."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        dtype = self.cuda_compute_dtype()
        if not torch.is_autocast_enabled("cuda"):
            return torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext()
        if dtype is not None and torch.get_autocast_dtype("cuda") == dtype:
            return contextlib.nullcontext()
        return (
            torch.autocast("cuda", dtype=dtype)
            if dtype is not None
            else torch.autocast("cuda", enabled=False)
        )

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> RuDalleTransformer:
        self._mask_cache = {}  # masks and decode tables follow the buffers to their new device
        return super()._apply(fn, *args, **kwargs)

    def _layer_mask(self, layer_type: str) -> torch.Tensor:
        return getattr(self.transformer, _TYPE_TO_MASK[layer_type])

    def _masks(self, layer_type: str, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(bool [P, P], additive [P, P] in ``dtype``) masks of the first ``length`` slots."""
        key = ("mask", layer_type, length, dtype)
        if key not in self._mask_cache:
            with torch.inference_mode(False):
                allowed = self._layer_mask(layer_type)[:length, :length].contiguous()
                additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
                additive.masked_fill_(~allowed, float("-inf"))
            self._mask_cache[key] = (allowed, additive)
        return self._mask_cache[key]

    def _table(self, layer_type: str) -> DecodeTable:
        key = ("table", layer_type)
        if key not in self._mask_cache:
            with torch.inference_mode(False):
                self._mask_cache[key] = _decode_table(self._layer_mask(layer_type))
        return self._mask_cache[key]

    def _check_text(self, text: torch.Tensor) -> torch.Tensor:
        """Validate text ids [B, t <= text_len] (ids in [0, text_vocab_size)); right-pad with 0 to
        text_len."""
        return check_text(text, self.config, self.device)

    def _check_image(
        self, image: torch.Tensor, name: str = "image", max_len: int | None = None
    ) -> torch.Tensor:
        """Validate image ids [B, n] or [B, rows, grid] (raster order); returns [B, n] long on the device."""
        return check_image(image, self.config, self.device, name, max_len)

    def _pair(
        self, text: torch.Tensor, image: torch.Tensor, max_len: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        text, image = self._check_text(text), self._check_image(image, max_len=max_len)
        if image.shape[0] != text.shape[0]:
            raise ConfigError(f"text batch {text.shape[0]} and image batch {image.shape[0]} differ")
        return text, image

    def text_stream_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Ids of the text slots [B, text_slots]: 0 -> per-position pad id, and (v2) the extra BOS in
        front."""
        c = self.config
        pads = torch.arange(c.text_len, device=text.device) + (c.text_vocab_size - c.text_len)
        ids = torch.where(text == c.text_pad_id, pads, text)
        if c.version == "v2":
            ids = F.pad(ids, (1, 0), value=BOS_ID)
        return ids

    def _image_pos(self, cells: torch.Tensor) -> torch.Tensor:
        g = self.config.image_grid
        return self.image_row_embeddings(cells // g) + self.image_col_embeddings(cells % g)

    def _embed(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Stream embeddings [B, min(S + m, L), d] of checked text [B, T] and image inputs [B, m]."""
        ids = self.text_stream_ids(text)
        x = self.text_embeddings(ids) + self.text_pos_embeddings.weight[: ids.shape[1]]
        if image.shape[1]:
            cells = torch.arange(image.shape[1], device=image.device)
            x = torch.cat([x, self.image_embeddings(image) + self._image_pos(cells)], dim=1)
        x = x[:, : self.config.seq_len]  # v2 with every cell: the reference drops the last slot
        if torch.is_grad_enabled() and x.requires_grad:
            x = x * EMBED_GRAD_SCALE + x.detach() * (1.0 - EMBED_GRAD_SCALE)
        return x

    def _trunk(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        length = x.shape[1]
        for i, (layer, layer_type) in enumerate(zip(self.transformer.layers, self.config.layer_types)):
            x = layer(x, functools.partial(self._masks, layer_type, length), cache, i)
        return self.transformer.final_layernorm(x)

    def _head(self, h: torch.Tensor, part: slice) -> torch.Tensor:
        """float32 logits of the joint head's columns ``part`` (LayerNorm + Linear outside autocast)."""
        ln, lin = cast(nn.LayerNorm, self.to_logits[0]), cast(nn.Linear, self.to_logits[1])
        with torch.autocast(h.device.type, enabled=False):
            h = F.layer_norm(h.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
            return F.linear(h, lin.weight[part].float(), lin.bias[part].float())

    def _hidden(
        self, text: torch.Tensor, image_in: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        with self._autocast(self.device):
            return self._trunk(self._embed(text, image_in), cache)

    # ------------------------------------------------------------------------------------------ public API
    def joint_logits(self, text: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of the joint head over the whole stream [B, slots, text_vocab + image_vocab],
        exactly ``DalleModel(cat(text, image), tril)[0]``: every given image token is an input (the stream is
        cut at seq_len slots, as the reference does in v2)."""
        if image is None:
            image = torch.zeros(text.shape[0], 0, dtype=torch.long)
        text, image = self._pair(text, image)
        return self._head(self._hidden(text, image), slice(None))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass: text [B, t <= text_len], image [B, n <= image_len] (or [B, rows, grid]).

        Returns float32 ``(text_logits [B, text_len-1, text_vocab], image_logits [B, n, image_vocab])``:
        ``text_logits[:, k]`` predicts text token ``k+1`` (pad ids as the per-position pad tokens) and
        ``image_logits[:, j]`` predicts ``image[:, j]`` from the text and ``image[:, :j]``
        (``joint[:, S-1+j, text_vocab:]``). The last image token is never an input.
        """
        c = self.config
        text, image = self._pair(text, image)
        n = image.shape[1]
        h = self._hidden(text, image[:, : max(n - 1, 0)])
        s, t, v = c.text_slots, c.text_len, c.text_vocab_size
        text_logits = self._head(h[:, s - t : s - 1], slice(0, v))
        image_logits = self._head(h[:, s - 1 : s - 1 + n], slice(v, None))
        return text_logits, image_logits

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rudalle's training loss (``DalleModel(..., return_loss=True)``) for complete images [B, image_len]:
        ``(ce_text + loss_img_weight * ce_image) / (loss_img_weight + 1)`` with the reference's targets
        (per-position pad ids; in v3 the last text slot is scored against cell 0's token over the text
        vocabulary and image cells 1..N-1 by the image slots, in v2 text tokens 0..T-1 and cells 0..N-1).
        Returns ``(loss, {"text": ..., "image": ...})`` with detached parts."""
        c = self.config
        text, image = self._pair(text, image)
        if image.shape[1] != c.image_len:
            raise ConfigError(f"loss needs complete images of {c.image_len} tokens, got {image.shape[1]}")
        ids = self.text_stream_ids(text)
        labels = torch.cat([ids[:, 1:], image], dim=1)
        h = self._hidden(text, image)
        t, v = c.text_len, c.text_vocab_size
        text_logits = self._head(h[:, :t], slice(0, v))
        image_logits = self._head(h[:, t : c.seq_len - (1 if c.version == "v3" else 0)], slice(v, None))
        loss_text = F.cross_entropy(text_logits.transpose(1, 2), labels[:, :t])
        loss_image = F.cross_entropy(image_logits.transpose(1, 2), labels[:, t:])
        w = c.loss_img_weight
        loss = (loss_text + w * loss_image) / (w + 1)
        return loss, {"text": loss_text.detach(), "image": loss_image.detach()}

    @torch.no_grad()
    def image_log_likelihood(
        self, text: torch.Tensor, image: torch.Tensor, reduction: str = "sum"
    ) -> torch.Tensor:
        """log p(image | text) per sample, [B] float32 (``reduction`` ``sum`` or ``mean`` over cells). A text
        batch of 1 is broadcast over the images. See :func:`rerank_scores` for rudalle's own score."""
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        image = self._check_image(image)
        text = self._check_text(text)
        if text.shape[0] == 1 and image.shape[0] > 1:
            text = text.expand(image.shape[0], -1)
        _, logits = self(text, image)
        logp = logits.log_softmax(-1).gather(-1, image.unsqueeze(-1)).squeeze(-1)
        return logp.sum(1) if reduction == "sum" else logp.mean(1)

    # ------------------------------------------------------------------------------------------ decoding
    def reset_cache(self) -> None:
        """Free the KV cache (the next :meth:`prefill` reallocates it)."""
        self.cache = None

    def setup_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        """Allocate (or reuse) the static KV cache [depth, B, heads, seq_len, head_dim] on the model's
        device."""
        c = self.config
        if dtype is None:
            autocast = self.cuda_compute_dtype() if self.device.type == "cuda" else None
            dtype = autocast or self.text_embeddings.weight.dtype
        if self.cache is None or not self.cache.matches(batch_size, self.device, dtype):
            self.cache = KVCache(c.depth, batch_size, c.heads, c.seq_len, c.head_dim, self.device, dtype)
        for layer_type in set(c.layer_types):  # build decode tables eagerly, never inside a compiled step
            self._table(layer_type)
        return self.cache

    @torch.no_grad()
    def prefill(self, text: torch.Tensor, prime: torch.Tensor | None = None) -> torch.Tensor:
        """Run the text and an optional prefix of image tokens ``prime`` [B, n] (n < image_len) through the
        model, filling the KV cache (slots ``0 .. S+n-1``); returns float32 logits [B, image_vocab] for cell
        n. Continue with :meth:`decode_step` at position ``text_len + n + 1``."""
        c = self.config
        text = self._check_text(text)
        if prime is None:
            prime = torch.zeros(text.shape[0], 0, dtype=torch.long, device=self.device)
        prime = self._check_image(prime, "prime", max_len=c.image_len - 1)
        if prime.shape[0] != text.shape[0]:
            raise ConfigError(f"text batch {text.shape[0]} and prime batch {prime.shape[0]} differ")
        check_id_range(text, c.text_vocab_size, "text")  # once per generation, on any device
        check_id_range(prime, c.image_vocab_size, "prime")
        cache = self.setup_cache(text.shape[0])
        h = self._hidden(text, prime, cache)
        return self._head(h[:, -1], slice(c.text_vocab_size, None))

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, position: int | torch.Tensor) -> torch.Tensor:
        """Feed the image token [B] of cell ``j - 1`` with ``position = text_len + j`` (1 <= j < image_len)
        and return float32 logits [B, image_vocab] for cell j. Internally the token goes to stream slot
        ``S + j - 1`` (v3: ``position - 1``, v2: ``position``). Shapes never depend on ``position`` (pass a
        0-dim long tensor to avoid recompiles). Needs :meth:`prefill` first."""
        if self.cache is None:
            raise ConfigError("decode_step needs a filled KV cache: call prefill(text, prime) first")
        device = self.device
        position = torch.as_tensor(position, dtype=torch.long, device=device).reshape(())
        step = self._compiled_step if self._compiled_step is not None else self._step
        return step(token.to(device=device, dtype=torch.long), position)

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The body of :meth:`decode_step` (what :meth:`compile_decoding` compiles)."""
        c = self.config
        cell = position - (c.text_len + 1)
        slot = cell + c.text_slots
        cache = cast(KVCache, self.cache)  # decode_step checked it is filled
        with self._autocast(token.device):
            x = (self.image_embeddings(token) + self._image_pos(cell)).unsqueeze(1)
            for i, (layer, layer_type) in enumerate(zip(self.transformer.layers, c.layer_types)):
                x = cast(DalleTransformerLayer, layer).step(x, self._table(layer_type), cache, i, slot)
            h = self.transformer.final_layernorm(x)
        return self._head(h[:, 0], slice(c.text_vocab_size, None))

    def compile_decoding(self, mode: str | None = None) -> RuDalleTransformer:
        """Compile the one-token decode step with ``torch.compile`` (``"reduce-overhead"``, i.e. CUDA graphs,
        on CUDA, ``"default"`` elsewhere; ``mode="off"`` goes back to eager decoding); returns self."""
        if mode == "off":
            self._compiled_step = None
            return self
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._compile_options: dict[str, Any] = {"mode": mode}
        self._compiled_step = torch.compile(self._step, dynamic=False, **self._compile_options)
        return self

    @property
    def decoding_compiled(self) -> bool:
        """True after :meth:`compile_decoding`."""
        return self._compiled_step is not None

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_rudalle_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | dict[str, torch.Tensor],
        config: RuDalleConfig | str,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = torch.float32,
    ) -> RuDalleTransformer:
        """Build a model from a rudalle checkpoint (``pytorch_model*.bin`` path, or its state dict) without
        allocating the weights twice. ``config``: a :class:`RuDalleConfig` or preset name. A ``module.``
        prefix (rudalle's FP16Module) is stripped; masks in the file are ignored (rebuilt, as the reference
        does). ``dtype``: parameter dtype (None keeps the file's). Returns the model in eval mode."""
        if isinstance(config, str):
            config = RuDalleConfig.preset(config)
        if isinstance(checkpoint, (str, os.PathLike)):
            checkpoint = _load_torch_state(Path(checkpoint))
        if not isinstance(checkpoint, dict):
            raise ModelLoadError(f"expected a state dict, got {type(checkpoint).__name__}")
        state = dict(checkpoint)
        if state and all(k.startswith("module.") for k in state):
            state = {k[len("module.") :]: v for k, v in state.items()}
        target = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        with torch.device(target):
            masks = build_masks(config.text_len, config.image_grid, config.version, config.conv_kernel)
        for name in MASK_NAMES:  # real masks first: _load_from_state_dict puts ours into the state dict
            setattr(model.transformer, name, masks[name])
            state.pop(f"transformer.{name}", None)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        state = {k: v.to(target) for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the checkpoint does not match the {config.version} config: {exc}") from exc
        return model.eval()


def read_rudalle_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The transformer weights of a rudalle ``pytorch_model*.bin`` (``torch.load(weights_only=True)``,
    memory-mapped where the file allows it, dtypes kept), without rudalle's ``module.`` prefix and masks."""
    state = _load_torch_state(Path(path))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path} does not hold a state dict (names -> tensors) of a rudalle transformer")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k.removeprefix("transformer.") not in MASK_NAMES}


def _load_torch_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{path} not found")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a load error
        raise ModelLoadError(f"{path} is not a readable PyTorch state dict ({exc})") from exc
    return obj


# ------------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def generate_codes(
    model: RuDalleTransformer,
    text: torch.Tensor,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    prompt: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """rudalle's ``generate_images`` token loop on the cached model: image codes [B, image_len].

    ``prompt`` [B or 1, image_len] with a bool ``prompt_mask`` [image_len] are rudalle's image prompts:
    masked cells take the prompt's token instead of a sample (e.g. kept borders). Other cells are drawn with
    :func:`rudalle_sample_logits`.
    """
    c = model.config
    text = model._check_text(text)
    batch, n = text.shape[0], c.image_len
    tokens = torch.zeros(batch, n, dtype=torch.long, device=model.device)
    mask = torch.zeros(n, dtype=torch.bool)
    if prompt is not None or prompt_mask is not None:
        if prompt is None or prompt_mask is None:
            raise ConfigError("give both prompt and prompt_mask, or neither")
        prompt = model._check_image(prompt, "prompt")
        mask = torch.as_tensor(prompt_mask, dtype=torch.bool).reshape(-1).cpu()
        if prompt.shape[1] != n or mask.numel() != n or prompt.shape[0] not in (1, batch):
            raise ConfigError(f"prompt must be [1 or {batch}, {n}] and prompt_mask [{n}]")
        tokens[:, mask.to(tokens.device)] = prompt.expand(batch, -1)[:, mask.to(tokens.device)]
    lead = int(mask.long().cumprod(0).sum())  # leading run of prompted cells: prefilled at once
    if lead == n:
        return tokens
    was_training = model.training
    model.eval()
    try:
        logits = model.prefill(text, tokens[:, :lead])
        for j in range(lead, n):
            if j > lead:
                logits = model.decode_step(
                    tokens[:, j - 1], torch.tensor(c.text_len + j, device=model.device)
                )
            if not mask[j]:
                tokens[:, j] = rudalle_sample_logits(logits, temperature, top_k, top_p, generator)
    finally:
        model.train(was_training)
    return tokens


# ----------------------------------------------------------------------------------------------- tokenizer

# youtokentome splits words on the C locale's whitespace and its own word marker "▁"
_YTTM_SPACES = dict.fromkeys(map(ord, "\t\n\v\f\r\u2581"), " ")


class RuDalleTokenizer:
    """rudalle's caption encoding (``YTTMTokenizerWrapper`` + ``generate_images``) over a youtokentome BPE
    model file (rudalle's ``bpe.model``), using :class:`dalle.tokenizer.BPETokenizer` to read it (youtokentome
    when installed, else dalle's pure-Python reader, same ids).

    Encoding: ``text.lower().strip()`` (nothing else), BPE ids, ``[2] + ids + [3]``, right-padded with 0 to
    ``text_len``; a longer sequence keeps its first ``text_len`` ids (the EOS is then cut off).
    """

    bos_id, eos_id, unk_id, pad_id = BOS_ID, EOS_ID, UNK_ID, PAD_ID

    def __init__(self, bpe: Any) -> None:
        """Wrap a :class:`dalle.tokenizer.BPETokenizer` (see :meth:`load`)."""
        self.bpe = bpe

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RuDalleTokenizer:
        """Load a youtokentome BPE model file (e.g. rudalle's ``bpe.model``)."""
        from dalle.tokenizer import BPETokenizer

        return cls(BPETokenizer.load(path))

    @property
    def vocab_size(self) -> int:
        """Number of BPE ids (16384 for rudalle's model; the transformer adds text_len pad ids)."""
        return int(self.bpe.vocab_size)

    def vocab(self) -> list[str]:
        """The token strings by id (specials as ``<PAD>``, ``<UNK>``, ``<BOS>``, ``<EOS>``)."""
        return list(self.bpe.vocab())

    def to_bytes(self) -> bytes:
        """The BPE model file's bytes."""
        return self.bpe.to_bytes()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the BPE model file (youtokentome's format) to ``path``."""
        return self.bpe.save(path)

    def _backend(self) -> Any:
        return self.bpe._bpe  # youtokentome.BPE or dalle._pybpe.PyBPE (BPETokenizer.encode would normalise)

    def encode_ids(self, text: str, dropout: float = 0.0) -> list[int]:
        """BPE ids of one caption after ``lower().strip()`` (no BOS/EOS, no padding)."""
        if not isinstance(text, str):
            raise TypeError(f"captions must be str, got {type(text).__name__}")
        text = text.lower().strip()
        backend = self._backend()
        if type(backend).__module__.startswith("dalle."):  # pure Python: split like youtokentome does
            text = text.translate(_YTTM_SPACES)
        if dropout > 0.0:
            return list(backend.encode([text], dropout_prob=float(dropout))[0])
        return list(backend.encode([text])[0])

    def encode(self, texts: str | Iterable[str], text_len: int = 128, dropout: float = 0.0) -> torch.Tensor:
        """LongTensor [B, text_len] (a single str gives B = 1): ``[2] + ids + [3]``, zero-padded or truncated
        to ``text_len``."""
        if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
            raise TokenizerError(f"text_len must be a positive int, got {text_len!r}")
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            ids = ([self.bos_id] + self.encode_ids(text, dropout) + [self.eos_id])[:text_len]
            rows.append(ids + [self.pad_id] * (text_len - len(ids)))
        if not rows:
            raise TokenizerError("encode() needs at least one caption")
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str | list[str]:
        """Text of ids [T] (a str) or [B, T] (a list), skipping pad, unk, bos and eos ids as rudalle does.
        Ids at or above :attr:`vocab_size` (the transformer's per-position pad ids) are skipped too."""
        rows = torch.as_tensor(ids, dtype=torch.long)
        single = rows.dim() == 1
        rows = rows.reshape(1, -1) if single else rows
        if rows.dim() != 2:
            raise TokenizerError(f"decode() takes ids [T] or [B, T], got shape {tuple(rows.shape)}")
        lists = [[int(i) for i in row if 0 <= int(i) < self.vocab_size] for row in rows.tolist()]
        texts = self._backend().decode(lists, ignore_ids=[self.eos_id, self.bos_id, self.unk_id, self.pad_id])
        return texts[0] if single else list(texts)


__all__ = [
    "PRESET_NAMES",
    "RUDALLE_HUB",
    "RUDALLE_MODELS",
    "RUDALLE_SAMPLING",
    "RuDalleConfig",
    "RuDalleTokenizer",
    "RuDalleTransformer",
    "build_masks",
    "ce_to_ppl",
    "generate_codes",
    "gelu",
    "read_rudalle_checkpoint",
    "reference_attention",
    "rerank_scores",
    "rudalle_filter_logits",
    "rudalle_sample_logits",
    "top_k_top_p_filtering",
]

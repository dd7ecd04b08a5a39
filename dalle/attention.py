"""Attention masks, attention kernels and the static KV cache of the DALL-E transformer.

Token stream (see :mod:`dalle.transformer` for the embeddings): ``text_len`` text slots followed by
``grid * grid`` image slots, ``L = text_len + grid**2`` in all. Image slot ``text_len + j`` is tied to image
cell ``j`` (row ``j // grid``, column ``j % grid``): it carries that cell's row/column embedding and its
output predicts that cell, while its *input* is the token of cell ``j - 1`` (the start-of-image token for
``j = 0``). Every mask below is written in terms of these cells, so "slot ``j``" and "cell ``j``" are the same
index.

Masks (``True`` = the query may attend to the key), all causal (key slot <= query slot):

* text queries see the text slots up to and including themselves, never image slots;
* image queries see **every** text slot in every layer, plus image keys chosen by the layer type:

  - ``full``: every earlier image slot (dense causal attention);
  - ``row``: the raster window of width ``grid + 1`` ending at the query, i.e. image cells ``j - grid .. j``
    (the earlier cells of the same row, and the previous row from the query's column onwards, the last
    one being the cell directly above), as in the paper's Figure 11;
  - ``column``: the same row-style window laid over the *transposed* grid (cells ordered column by column,
    ``t = col * grid + row``): cells with ``t_q - t_k`` in ``[0, grid]``, intersected with raster causality.
    That leaves every earlier cell of the same column plus the cell immediately to the left in the same row
    (the transposed window's part of the previous column that is not in the future);
  - ``conv``: an ``k x k`` (default 11) causal convolutional neighbourhood: row offsets ``dr`` in
    ``[-(k//2), 0]``, column offsets ``dc`` in ``[-(k//2), k//2]``, keeping only cells that precede or equal
    the query in raster order (so on the query's own row only ``dc <= 0``). No wraparound: cells that would
    fall outside the grid are absent. For k = 11 that is at most 5 * 11 + 6 = 61 image keys. This is a
    deliberate reading: the paper says its convolutional mask wraps around "like the row mask" but gives no
    offsets; a window that wrapped past the right edge would attend to cells at the far left of the next row,
    which are not neighbours, so this one keeps the 2-D neighbourhood a convolution has.

Masks are built once per (text_len, grid, type, kernel) on the CPU, then cached per device, length and dtype.
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from dalle.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from torch.nn.attention.flex_attention import BlockMask

ATTN_TYPES: tuple[str, ...] = ("full", "row", "column", "conv")
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flex")


def paper_schedule(depth: int) -> list[str]:
    """The paper's layer schedule: layer i (1-based) < depth is ``column`` if (i - 2) % 4 == 0 else ``row``;
    the last layer is ``conv``. A single-layer model gets ``conv``."""
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    types = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, depth)]
    return types + ["conv"]


def _image_allowed(grid: int, attn_type: str, conv_kernel: int) -> torch.Tensor:
    """Bool [N, N] image-to-image part of the mask (query cell, key cell), causal in raster order."""
    n = grid * grid
    j = torch.arange(n)
    jq, jk = j[:, None], j[None, :]
    causal = jk <= jq
    rq, cq = jq // grid, jq % grid
    rk, ck = jk // grid, jk % grid
    if attn_type == "full":
        return causal
    if attn_type == "row":
        return causal & (jq - jk <= grid)
    if attn_type == "column":
        tq, tk = cq * grid + rq, ck * grid + rk  # index in the transposed (column-major) order
        return causal & (tq - tk >= 0) & (tq - tk <= grid)
    if attn_type == "conv":
        half = conv_kernel // 2
        return causal & (rq - rk >= 0) & (rq - rk <= half) & ((cq - ck).abs() <= half)
    raise ConfigError(f"unknown attention type {attn_type!r}; choose one of {', '.join(ATTN_TYPES)}")


@functools.lru_cache(maxsize=64)
def build_mask(text_len: int, grid: int, attn_type: str, conv_kernel: int = 11) -> torch.Tensor:
    """Bool mask [L, L] (True = query row may attend to key column) over the whole stream, on the CPU.

    The result is cached and shared: treat it as read-only.
    """
    if text_len < 1 or grid < 1:
        raise ConfigError(f"text_len and grid must be >= 1, got text_len={text_len}, grid={grid}")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ConfigError(f"conv_kernel must be a positive odd number, got {conv_kernel}")
    t, n = text_len, grid * grid
    with torch.inference_mode(False):  # cached tensors must stay usable for training (see AttentionMasks)
        mask = torch.zeros(t + n, t + n, dtype=torch.bool)
        mask[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
        mask[t:, :t] = True  # image -> all text, in every layer
        mask[t:, t:] = _image_allowed(grid, attn_type, conv_kernel)
    return mask


@dataclass(frozen=True)
class DecodeTable:
    """Per-query key lists for one-token decoding: ``index[p]`` lists the key slots query slot ``p`` attends
    to (padded to a fixed width with slot 0), ``valid[p]`` marks the real entries. Rows come straight from
    the dense mask, so decoding attends to exactly the same keys as the full forward pass."""

    index: torch.Tensor  # long [L, K] ([1, L] arange when dense)
    valid: torch.Tensor  # bool [L, K]
    dense: bool  # True when K == L and ``valid`` is the dense mask itself


def _decode_table(mask: torch.Tensor) -> DecodeTable:
    length = mask.shape[0]
    width = int(mask.sum(1).max())
    if width * 4 >= length * 3:  # a gather would copy almost the whole cache: use the dense row instead
        index = torch.arange(length).unsqueeze(0)  # unused by attend_one; kept for inspection
        return DecodeTable(index=index, valid=mask.clone(), dense=True)
    # a stable sort puts each row's attended key slots first, in increasing order
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = mask.gather(1, order)
    index = torch.where(valid, order, torch.zeros_like(order))
    return DecodeTable(index=index.contiguous(), valid=valid.contiguous(), dense=False)


class AttentionMasks:
    """Caches every mask-derived tensor a model needs: dense bool and additive masks per (type, length,
    device, dtype), FlexAttention block masks and decode tables. One instance per model; not a module, so
    nothing here is saved in a state dict.

    Everything is built with inference mode switched off: a mask first built under ``torch.inference_mode``
    (e.g. while sampling previews) would otherwise be an inference tensor that a later training step cannot
    save for backward."""

    def __init__(self, text_len: int, grid: int, conv_kernel: int = 11) -> None:
        self.text_len = text_len
        self.grid = grid
        self.conv_kernel = conv_kernel
        self.length = text_len + grid * grid
        self._cache: dict[tuple, object] = {}

    def full(self, attn_type: str) -> torch.Tensor:
        """The whole bool mask [L, L] on the CPU."""
        return build_mask(self.text_len, self.grid, attn_type, self.conv_kernel)

    def bool_mask(self, attn_type: str, length: int, device: torch.device) -> torch.Tensor:
        """Bool mask for the first ``length`` slots, on ``device``."""
        key = ("bool", attn_type, length, str(device))
        if key not in self._cache:
            with torch.inference_mode(False):
                self._cache[key] = self.full(attn_type)[:length, :length].contiguous().to(device)
        return self._cache[key]  # type: ignore[return-value]

    def additive_mask(
        self, attn_type: str, length: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive mask (0 where allowed, -inf elsewhere) for SDPA; faster than a bool mask on the CPU."""
        key = ("add", attn_type, length, str(device), dtype)
        if key not in self._cache:
            allowed = self.bool_mask(attn_type, length, device)
            with torch.inference_mode(False):
                add = torch.zeros(allowed.shape, dtype=dtype, device=device)
                self._cache[key] = add.masked_fill_(~allowed, float("-inf"))
        return self._cache[key]  # type: ignore[return-value]

    def decode_table(self, attn_type: str, device: torch.device) -> DecodeTable:
        """Fixed-width key lists for :meth:`DALLETransformer.decode_step`, on ``device``."""
        key = ("table", attn_type, str(device))
        if key not in self._cache:
            with torch.inference_mode(False):
                table = _decode_table(self.full(attn_type))
                self._cache[key] = DecodeTable(table.index.to(device), table.valid.to(device), table.dense)
        return self._cache[key]  # type: ignore[return-value]

    def block_mask(self, attn_type: str, length: int, device: torch.device) -> BlockMask:
        """FlexAttention block mask equal to :meth:`bool_mask` (the mask_mod reads the dense mask)."""
        key = ("flex", attn_type, length, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            dense = self.bool_mask(attn_type, length, device)

            def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention's calling convention
                return dense[q_idx, kv_idx]

            with torch.inference_mode(False):
                self._cache[key] = create_block_mask(mask_mod, None, None, length, length, device=str(device))
        return cast("BlockMask", self._cache[key])


# ---------------------------------------------------------------------------------------------- kernels

_flex_compiled = None
_auto_choice: dict[tuple, str] = {}
_flex_failed = False


def _flex_attention():
    """FlexAttention compiled once per process (it is slow and memory-hungry uncompiled)."""
    global _flex_compiled
    if _flex_compiled is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # one compilation per mask type and grad mode (four types: eight), which is dynamo's default limit;
        # past it FlexAttention would silently run uncompiled (slow, memory-hungry)
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _sdpa(q, k, v, masks: AttentionMasks, attn_type: str, dropout_p: float) -> torch.Tensor:
    length = q.shape[-2]
    mask = masks.additive_mask(attn_type, length, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _flex(q, k, v, masks: AttentionMasks, attn_type: str) -> torch.Tensor:
    return _flex_attention()(q, k, v, block_mask=masks.block_mask(attn_type, q.shape[-2], q.device))


def _time(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _choose(q, k, v, masks: AttentionMasks, attn_type: str) -> str:
    """``auto`` backend: SDPA everywhere except CUDA, where FlexAttention is timed against SDPA once per
    shape (forward only, a few iterations) and kept only if it is faster. Any FlexAttention failure falls
    back to SDPA with a warning."""
    global _flex_failed
    if q.device.type != "cuda" or _flex_failed:
        return "sdpa"
    key = (str(q.device), tuple(q.shape), q.dtype, masks.text_len, masks.grid, attn_type)
    if key in _auto_choice:
        return _auto_choice[key]
    if torch.compiler.is_compiling():
        return "sdpa"  # never benchmark while being traced
    try:
        with torch.no_grad():
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            t_flex = _time(lambda: _flex(qd, kd, vd, masks, attn_type))
            t_sdpa = _time(lambda: _sdpa(qd, kd, vd, masks, attn_type, 0.0))
        _auto_choice[key] = "flex" if t_flex < t_sdpa else "sdpa"
    except Exception as exc:  # noqa: BLE001 - any compiler/driver problem must not break the model
        warnings.warn(f"FlexAttention unavailable ({type(exc).__name__}: {exc}); using SDPA", stacklevel=2)
        _flex_failed = True
        _auto_choice[key] = "sdpa"
    return _auto_choice[key]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    masks: AttentionMasks,
    attn_type: str,
    backend: str = "auto",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Masked self-attention over the first ``q.shape[-2]`` slots; q, k, v are [B, H, P, Dh].

    ``backend``: ``sdpa`` (precomputed additive mask, works everywhere), ``flex`` (FlexAttention block mask;
    no dropout) or ``auto`` (see :func:`_choose`; full-length passes without dropout only, SDPA otherwise).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        # FlexAttention only for full-length passes (training): prefills of varying length would each compile
        backend = (
            "sdpa" if dropout_p > 0 or q.shape[-2] != masks.length else _choose(q, k, v, masks, attn_type)
        )
    if backend == "flex" and dropout_p == 0.0:
        return _flex(q, k, v, masks, attn_type)
    return _sdpa(q, k, v, masks, attn_type, dropout_p)


def attend_one(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: DecodeTable, position: torch.Tensor
) -> torch.Tensor:
    """Attention of one new query slot ``position`` (0-dim long tensor) over a static cache.

    q is [B, H, 1, Dh]; caches are [B, H, L, Dh] and already hold the new key/value. Only the keys listed in
    ``table`` for this position are gathered (text slots plus the layer's image window), so the shapes are
    fixed and the work per step is independent of ``L`` for the sparse layer types.
    """
    valid = table.valid.index_select(0, position.view(1))  # [1, K]
    if table.dense:
        k, v = k_cache, v_cache
    else:
        index = table.index.index_select(0, position.view(1)).view(-1)
        k, v = k_cache.index_select(2, index), v_cache.index_select(2, index)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid.view(1, 1, 1, -1))


class KVCache(torch.nn.Module):
    """Static key/value cache for all layers: two preallocated buffers [depth, B, H, L, Dh], written in place
    so that compiled / CUDA-graph-captured decode steps always see the same storage. The buffers are
    non-persistent: they follow ``model.to(...)`` but never enter a state dict."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(
        self,
        depth: int,
        batch: int,
        heads: int,
        length: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        shape = (depth, batch, heads, length, head_dim)
        with torch.inference_mode(
            False
        ):  # normal tensors accept in-place writes inside and outside inference mode
            self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def batch(self) -> int:
        """Batch size the cache was allocated for."""
        return self.k.shape[1]

    def matches(self, batch: int, device: torch.device, dtype: torch.dtype) -> bool:
        """True if the cache can be reused for this batch size, device and dtype."""
        return self.k.shape[1] == batch and self.k.device == torch.device(device) and self.k.dtype == dtype

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values [B, H, P, Dh] of the first P slots of ``layer``."""
        length = k.shape[2]
        self.k[layer, :, :, :length] = k
        self.v[layer, :, :, :length] = v

    def write_one(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the key/value [B, H, 1, Dh] of slot ``position`` (0-dim long tensor) in place."""
        self.k[layer].index_copy_(2, position.view(1), k.to(self.k.dtype))
        self.v[layer].index_copy_(2, position.view(1), v.to(self.v.dtype))

"""Attention masks, checked by dependence (perturb one input slot, see which outputs move) against a
reference written independently from dalle.attention, plus the paper's layer schedule and decode tables."""

from __future__ import annotations

import pytest
import torch

from dalle.attention import ATTN_TYPES, AttentionMasks, build_mask, paper_schedule
from dalle.errors import ConfigError
from dalle.transformer import DALLETransformer, TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_allowed(q: int, k: int, text_len: int, grid: int, attn_type: str, kernel: int = 11) -> bool:
    """May stream slot q attend to slot k? Spelled out cell by cell (no tensor tricks)."""
    if k > q:
        return False  # causal everywhere
    if q < text_len:
        return True  # text: causal among itself (and k <= q < text_len means k is text)
    if k < text_len:
        return True  # image sees every text slot in every layer
    rq, cq = divmod(q - text_len, grid)
    rk, ck = divmod(k - text_len, grid)
    if attn_type == "full":
        return True
    if attn_type == "row":  # raster window of width grid + 1, ending at the query
        return (q - k) <= grid
    if attn_type == "column":  # earlier cells of the same column, plus the left neighbour
        return (ck == cq and rk <= rq) or (rk == rq and ck == cq - 1)
    if attn_type == "conv":  # causal kernel x kernel neighbourhood, no wraparound
        half = kernel // 2
        return rq - half <= rk <= rq and abs(ck - cq) <= half and (rk < rq or ck <= cq)
    raise AssertionError(attn_type)


def reference_mask(text_len: int, grid: int, attn_type: str, kernel: int = 11) -> torch.Tensor:
    n = text_len + grid * grid
    return torch.tensor(
        [[reference_allowed(q, k, text_len, grid, attn_type, kernel) for k in range(n)] for q in range(n)]
    )


def dependence(model: DALLETransformer) -> torch.Tensor:
    """D[q, s] = True iff perturbing the input vector of slot s changes the output at slot q."""
    c = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c.seq_len, c.d_model, generator=gen, dtype=torch.float64)
    # one batch: row 0 unperturbed, row 1 + s perturbed at slot s only
    xs = x.repeat(c.seq_len + 1, 1, 1)
    slots = torch.arange(c.seq_len)
    xs[slots + 1, slots] += torch.randn(c.seq_len, c.d_model, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = model._trunk(xs)
    changed = (out[1:] - out[:1]).abs().amax(-1) > 1e-9  # [s, q]
    return changed.T


def one_layer(attn_type: str, text_len: int, grid: int, kernel: int = 11) -> DALLETransformer:
    cfg = TransformerConfig.preset(
        "tiny", depth=1, attn_types=[attn_type], text_len=text_len, image_grid=grid, conv_kernel=kernel
    )
    torch.manual_seed(1)
    model = DALLETransformer(cfg).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("text_len,grid", [(1, 6), (3, 6), (5, 6), (2, 5)])
def test_mask_by_dependence(attn_type: str, text_len: int, grid: int) -> None:
    model = one_layer(attn_type, text_len, grid)
    expected = reference_mask(text_len, grid, attn_type)
    got = dependence(model)
    wrong = (got != expected).nonzero().tolist()
    assert not wrong, f"{attn_type}: (query, key) pairs that differ from the reference: {wrong[:10]}"


def test_small_conv_kernel_by_dependence() -> None:
    model = one_layer("conv", 2, 7, kernel=3)
    assert torch.equal(dependence(model), reference_mask(2, 7, "conv", kernel=3))


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("text_len,grid", [(4, 8), (7, 9), (32, 16)])
def test_mask_matches_reference(attn_type: str, text_len: int, grid: int) -> None:
    assert torch.equal(build_mask(text_len, grid, attn_type), reference_mask(text_len, grid, attn_type))


def test_window_sizes_at_full_size() -> None:
    """Image keys per interior query at 32x32: row 33, conv 61 (5 rows of 11 + 6), column = rows above + 1."""
    t, g = 256, 32
    q = t + 20 * g + 16  # row 20, col 16
    for attn_type, n_image in [("row", 33), ("conv", 61), ("column", 21 + 1), ("full", 20 * g + 17)]:
        row = build_mask(t, g, attn_type)[q]
        assert bool(row[:t].all()), "image queries must see every text slot"
        assert int(row[t:].sum()) == n_image, attn_type


def test_paper_schedule() -> None:
    types = paper_schedule(64)
    assert types[:4] == ["row", "column", "row", "row"]
    assert types[-1] == "conv"
    assert [i + 1 for i, t in enumerate(types) if t == "column"] == list(range(2, 64, 4))
    assert types.count("column") == 16 and types.count("row") == 47
    assert paper_schedule(1) == ["conv"]
    assert TransformerConfig.preset("paper").layer_types == types


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_decode_tables_list_exactly_the_mask(attn_type: str) -> None:
    masks = AttentionMasks(5, 13)
    table = masks.decode_table(attn_type, torch.device("cpu"))
    full = masks.full(attn_type)
    if table.dense:  # dense tables hold the mask rows themselves
        assert attn_type == "full" and torch.equal(table.valid, full)
        return
    rebuilt = torch.zeros_like(full)
    for p in range(full.shape[0]):
        rebuilt[p, table.index[p][table.valid[p]]] = True
    assert torch.equal(rebuilt, full)
    assert table.index.shape[1] < full.shape[0]


def test_bad_mask_arguments() -> None:
    with pytest.raises(ConfigError, match="unknown attention type"):
        build_mask(4, 4, "diagonal")
    with pytest.raises(ConfigError, match="odd"):
        build_mask(4, 4, "conv", 4)
    with pytest.raises(ConfigError, match="attention types"):
        TransformerConfig.preset("tiny", attn_types=["row", "row", "row", "strided"])


def test_additive_mask_is_cached() -> None:
    masks = AttentionMasks(3, 4)
    a = masks.additive_mask("row", 10, torch.device("cpu"), torch.float32)
    assert a is masks.additive_mask("row", 10, torch.device("cpu"), torch.float32)
    assert torch.equal(a == 0, build_mask(3, 4, "row")[:10, :10])


@pytest.mark.slow
def test_flex_equals_sdpa_cpu() -> None:
    """FlexAttention (compiled for the CPU; about a minute) gives the SDPA outputs."""
    from dalle.attention import attend

    masks = AttentionMasks(5, 6)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 41, 16) for _ in range(3))
    for attn_type in ATTN_TYPES:
        ref = attend(q, k, v, masks, attn_type, "sdpa")
        out = attend(q, k, v, masks, attn_type, "flex")
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_equals_sdpa_cuda(dtype: torch.dtype) -> None:
    from dalle.attention import attend

    masks = AttentionMasks(32, 16)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32 + 256, 64, device="cuda", dtype=dtype) for _ in range(3))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for attn_type in ATTN_TYPES:
        ref = attend(q, k, v, masks, attn_type, "sdpa")
        out = attend(q, k, v, masks, attn_type, "flex")
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)

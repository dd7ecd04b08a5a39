"""DALLETransformer: config, stream/position conventions, loss, cached decoding, save/load (tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dalle.attention import ATTN_TYPES
from dalle.errors import ConfigError
from dalle.transformer import DALLETransformer, TransformerConfig

T, G, VT, VI = 8, 6, 64, 32  # the tiny preset's text_len, grid, text vocab, image vocab


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(config: TransformerConfig, seed: int = 0, std: float = 0.3) -> DALLETransformer:
    """A model with every parameter random (zero-initialised heads would hide dependence)."""
    torch.manual_seed(seed)
    model = DALLETransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def tiny() -> DALLETransformer:
    return randomised(TransformerConfig.preset("tiny"))


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(1, VT, (b, T), generator=gen)
    text[0, 5:] = 0  # a short caption followed by pads
    text[-1, 2:] = 0
    image = torch.randint(0, VI, (b, G * G), generator=gen)
    return text, image


# ---------------------------------------------------------------------------------------------- config


def test_config_json_round_trip() -> None:
    cfg = TransformerConfig.preset("small", dropout=0.1, attn_types=["row"] * 11 + ["conv"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TransformerConfig.from_dict(data) == cfg
    assert TransformerConfig.from_dict(TransformerConfig.preset("tiny").to_dict()).layer_types == [
        "row",
        "column",
        "row",
        "conv",
    ]


def test_presets_and_validation() -> None:
    small = TransformerConfig.preset("small")
    assert (small.depth, small.d_model, small.heads) == (12, 768, 12)
    assert TransformerConfig.preset("tiny", image_grid=16, text_len=32).seq_len == 32 + 256
    with pytest.raises(ConfigError, match="unknown transformer preset"):
        TransformerConfig.preset("huge")
    with pytest.raises(ConfigError, match="unknown TransformerConfig fields"):
        TransformerConfig.preset("tiny", n_layers=3)
    with pytest.raises(ConfigError, match="attn_types has 2 entries"):
        TransformerConfig.preset("tiny", attn_types=["row", "conv"])
    with pytest.raises(ConfigError, match="text_pad_id"):
        TransformerConfig.preset("tiny", text_pad_id=64)
    with pytest.raises(ConfigError, match="DALLETransformer needs a TransformerConfig"):
        DALLETransformer({"depth": 2})  # type: ignore[arg-type]


def test_paper_preset_parameter_count() -> None:
    cfg = TransformerConfig.preset("paper")
    assert (cfg.depth, cfg.heads, cfg.head_dim, cfg.d_model, cfg.seq_len) == (64, 62, 64, 3968, 1280)
    with torch.device("meta"):
        model = DALLETransformer(cfg)
    n = model.num_parameters()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    print(f"\npaper preset: {n:,} parameters ({n / 1e9:.2f}e9; {blocks / 1e9:.2f}e9 in the 64 blocks)")
    assert 11.8e9 < n < 12.5e9
    assert abs(blocks - 64 * 12 * 3968**2) / blocks < 1e-3  # 12 d^2 per block plus biases and gains


# ---------------------------------------------------------------------------------------------- forward


def test_forward_shapes_and_dtypes(tiny: DALLETransformer) -> None:
    text, image = batch()
    text_logits, image_logits = tiny(text, image)
    assert text_logits.shape == (3, T - 1, VT) and image_logits.shape == (3, G * G, VI)
    assert text_logits.dtype == image_logits.dtype == torch.float32
    # a [B, grid, grid] image is the same as its raster order; a partial image gives the leading logits
    torch.testing.assert_close(tiny(text, image.view(3, G, G))[1], image_logits)
    torch.testing.assert_close(tiny(text, image[:, :10])[1], image_logits[:, :10], atol=1e-5, rtol=1e-5)


def test_bad_inputs(tiny: DALLETransformer) -> None:
    text, image = batch()
    with pytest.raises(ConfigError, match="at most text_len=8"):
        tiny(torch.ones(3, 9, dtype=torch.long), image)
    with pytest.raises(ConfigError, match=r"text ids must be in \[0, 64\)"):
        tiny(text + 64, image)
    with pytest.raises(ConfigError, match="integer tensor"):
        tiny(text.float(), image)
    with pytest.raises(ConfigError, match=r"image ids must be in \[0, 32\)"):
        tiny(text, image + 32)
    with pytest.raises(ConfigError, match="grid is 6 wide"):
        tiny(text, image.view(3, 9, 4))
    with pytest.raises(ConfigError, match="batch"):
        tiny(text[:2], image)


def test_whole_model_is_causal_in_raster_order(tiny: DALLETransformer) -> None:
    """Changing image token m moves image logits m+1.. only; text never sees the image; every image logit
    sees the first text token; the last image token is never an input."""
    text, image = batch(1)
    text_logits, image_logits = tiny(text, image)
    for m in (0, 7, 20, G * G - 2):
        img2 = image.clone()
        img2[0, m] = (img2[0, m] + 1) % VI
        t2, i2 = tiny(text, img2)
        changed = (i2 - image_logits).abs().amax(-1)[0] > 1e-6
        assert not changed[: m + 1].any() and changed[m + 1]
        torch.testing.assert_close(t2, text_logits)
    img2 = image.clone()
    img2[0, -1] = (img2[0, -1] + 1) % VI
    torch.testing.assert_close(tiny(text, img2)[1], image_logits)
    text2 = text.clone()
    text2[0, 0] = (text2[0, 0] + 1) % VT or 1
    assert ((tiny(text2, image)[1] - image_logits).abs().amax(-1) > 1e-6).all()


def test_start_of_image_and_position_indexing(tiny: DALLETransformer) -> None:
    """Image slot j carries the row/col embedding of cell j (the cell it predicts): perturbing row r's
    embedding first changes the logits of cell r*grid, column c's those of cell c. Cell 0 is predicted from
    the start-of-image token (the embedding row after the image vocabulary)."""
    text, image = batch(1)
    _, base = tiny(text, image)
    for table, index, first in [(tiny.row_emb, 2, 2 * G), (tiny.col_emb, 4, 4), (tiny.row_emb, 0, 0)]:
        saved = table.weight.data.clone()
        table.weight.data[index] += 1.0
        changed = (tiny(text, image)[1] - base).abs().amax(-1)[0] > 1e-6
        table.weight.data.copy_(saved)
        assert int(changed.nonzero()[0]) == first
    saved = tiny.image_emb.weight.data.clone()
    tiny.image_emb.weight.data[tiny.start_of_image_id] += 1.0
    changed = (tiny(text, image)[1] - base).abs().amax(-1)[0] > 1e-6
    tiny.image_emb.weight.data.copy_(saved)
    assert changed[0] and changed[1]  # cell 0 is predicted from the start-of-image slot; cell 1 attends to it
    assert tiny.image_emb.num_embeddings == VI + 1 and tiny.start_of_image_id == VI


def test_per_position_pad_embeddings(tiny: DALLETransformer) -> None:
    """Pads use the learned pad of their own slot; the pad id's token embedding is never used; a shorter
    text tensor is right-padded with the pad id."""
    text, image = batch()
    _, base = tiny(text, image)
    # row 0 has real tokens at 0..4 and pads at 5..7; row 2 has pads at 2..7; row 1 has no pads
    saved = tiny.pad_emb.weight.data.clone()
    tiny.pad_emb.weight.data[3] += 1.0
    changed = ((tiny(text, image)[1] - base).abs().amax((1, 2)) > 1e-6).tolist()
    tiny.pad_emb.weight.data.copy_(saved)
    assert changed == [False, False, True]
    tiny.pad_emb.weight.data[6] += 1.0
    changed = ((tiny(text, image)[1] - base).abs().amax((1, 2)) > 1e-6).tolist()
    tiny.pad_emb.weight.data.copy_(saved)
    assert changed == [True, False, True]
    saved = tiny.text_emb.weight.data.clone()
    tiny.text_emb.weight.data[0] += 1.0
    torch.testing.assert_close(tiny(text, image)[1], base)
    tiny.text_emb.weight.data.copy_(saved)
    torch.testing.assert_close(tiny(text[2:, :2], image[2:])[1], base[2:])


# ------------------------------------------------------------------------------------------------ loss


def test_loss_weighting(tiny: DALLETransformer) -> None:
    text, image = batch()
    text_logits, image_logits = tiny(text, image)
    lt = F.cross_entropy(text_logits.reshape(-1, VT), text[:, 1:].reshape(-1))
    li = F.cross_entropy(image_logits.reshape(-1, VI), image.reshape(-1))
    loss, parts = tiny.loss(text, image)
    torch.testing.assert_close(loss, lt / 8 + 7 * li / 8)
    torch.testing.assert_close(parts["text"], lt)
    torch.testing.assert_close(parts["image"], li)
    assert not parts["text"].requires_grad and loss.requires_grad
    other = randomised(TransformerConfig.preset("tiny", text_loss_weight=0.5, image_loss_weight=2.0))
    tl, il = other(text, image)
    lt2 = F.cross_entropy(tl.reshape(-1, VT), text[:, 1:].reshape(-1))
    li2 = F.cross_entropy(il.reshape(-1, VI), image.reshape(-1))
    torch.testing.assert_close(other.loss(text, image)[0], 0.5 * lt2 + 2.0 * li2)


def test_loss_can_ignore_pad_targets() -> None:
    model = randomised(TransformerConfig.preset("tiny", text_loss_ignore_pad=True))
    text, image = batch()
    text_logits, _ = model(text, image)
    targets = text[:, 1:]
    keep = targets != 0
    expected = F.cross_entropy(text_logits[keep], targets[keep])
    torch.testing.assert_close(model.loss(text, image)[1]["text"], expected)
    with pytest.raises(ConfigError, match="complete images"):
        model.loss(text, image[:, :5])


def test_initial_loss_is_uniform() -> None:
    """Zero-initialised heads: the untrained model predicts uniformly (loss = log vocab)."""
    model = DALLETransformer(TransformerConfig.preset("tiny"))
    loss, parts = model.loss(*batch())
    torch.testing.assert_close(parts["image"], torch.tensor(VI).log())
    torch.testing.assert_close(parts["text"], torch.tensor(VT).log())


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    text, image = batch()
    grads = []
    for ckpt in (False, True):
        model = randomised(TransformerConfig.preset("tiny", checkpoint_activations=ckpt, dropout=0.0)).train()
        model.loss(text, image)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_image_log_likelihood(tiny: DALLETransformer) -> None:
    text, image = batch()
    _, logits = tiny(text, image)
    expected = -F.cross_entropy(logits.transpose(1, 2), image, reduction="none").sum(1)
    ll = tiny.image_log_likelihood(text, image)
    assert ll.shape == (3,)
    torch.testing.assert_close(ll, expected)
    torch.testing.assert_close(tiny.image_log_likelihood(text, image, reduction="mean"), expected / (G * G))
    one = tiny.image_log_likelihood(text[:1], image)  # one caption, several candidate images
    torch.testing.assert_close(one[0], expected[0])


# ------------------------------------------------------------------------------------------ KV caching


@pytest.mark.parametrize("attn_types", [None] + [[a] * 2 for a in ATTN_TYPES])
def test_cached_decoding_equals_forward(attn_types: list[str] | None) -> None:
    depth = 4 if attn_types is None else 2
    model = randomised(TransformerConfig.preset("tiny", depth=depth, attn_types=attn_types))
    text, image = batch()
    _, full = model(text, image)
    for n_prime in (0, 1, 7, G * G - 1):
        logits = model.prefill(text, image[:, :n_prime])
        worst = (logits - full[:, n_prime]).abs().max()
        for j in range(n_prime + 1, G * G):
            logits = model.decode_step(image[:, j - 1], torch.tensor(T + j))
            worst = max(worst, (logits - full[:, j]).abs().max())
        assert worst < 1e-4, f"{attn_types} prime {n_prime}: max abs diff {worst}"


def test_cached_decoding_other_shapes() -> None:
    """A non-square-friendly size: text_len 3, 5x5 grid, int positions."""
    model = randomised(TransformerConfig.preset("tiny", text_len=3, image_grid=5, conv_kernel=3))
    gen = torch.Generator().manual_seed(3)
    text = torch.randint(0, VT, (2, 3), generator=gen)
    image = torch.randint(0, VI, (2, 25), generator=gen)
    _, full = model(text, image)
    logits = model.prefill(text, image[:, :4])
    assert (logits - full[:, 4]).abs().max() < 1e-4
    for j in range(5, 25):
        logits = model.decode_step(image[:, j - 1], 3 + j)
        assert (logits - full[:, j]).abs().max() < 1e-4


def test_cache_is_static_and_survives_inference_mode() -> None:
    model = randomised(TransformerConfig.preset("tiny"))
    text, image = batch()
    with torch.inference_mode():
        model.prefill(text)
    cache = model.cache
    storage = cache.k.data_ptr()
    model.prefill(text, image[:, :3])  # same batch: the same storage is reused and written in place
    model.decode_step(image[:, 3], T + 4)
    assert model.cache is cache and cache.k.data_ptr() == storage
    model.train()
    model.loss(text, image)[0].backward()  # masks built under inference mode still work for training
    with pytest.raises(ConfigError, match="prefill"):
        DALLETransformer(TransformerConfig.preset("tiny")).decode_step(image[:, 0], T + 1)


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_cpu_fp32(backend: str) -> None:
    cfg = TransformerConfig.preset("tiny", image_grid=8, text_len=16, attn_backend=backend)
    model = randomised(cfg, std=0.1)
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, VT, (2, 16), generator=gen)
    image = torch.randint(0, VI, (2, 64), generator=gen)
    with torch.no_grad():  # FlexAttention has no backward on the CPU: the reference needs no graph
        _, ref = model(text, image)
    cuda = model.to("cuda")
    _, out = cuda(text.cuda(), image.cuda())  # bf16 autocast inside; logits float32
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=5e-2, rtol=5e-2)
    logits = cuda.prefill(text.cuda(), image[:, :10].cuda())
    torch.testing.assert_close(logits.cpu(), ref[:, 10], atol=5e-2, rtol=5e-2)
    loss = cuda.train().loss(text.cuda(), image.cuda())[0]
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_cached_decoding_equals_forward() -> None:
    cfg = TransformerConfig.preset("tiny", cuda_autocast=False)
    model = randomised(cfg).to("cuda")
    text, image = (t.cuda() for t in batch())
    _, full = model(text, image)
    logits = model.prefill(text, image[:, :5])
    assert (logits - full[:, 5]).abs().max() < 1e-4
    for j in range(6, G * G):
        logits = model.decode_step(image[:, j - 1], torch.tensor(T + j, device="cuda"))
        assert (logits - full[:, j]).abs().max() < 1e-4


@pytest.mark.slow
def test_decode_step_compiles_to_one_graph() -> None:
    """decode_step traces with fullgraph=True into a single graph reused for every position (about 40 s)."""
    import torch._dynamo

    model = randomised(TransformerConfig.preset("tiny"))
    text, image = batch(2)
    _, full = model(text, image)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
    model.prefill(text, image[:, :3])
    for j in range(4, G * G):
        logits = step(image[:, j - 1], torch.tensor(T + j))
        assert (logits - full[:, j]).abs().max() < 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_forward_and_loss_read_no_value_back_from_the_device() -> None:
    """On an accelerator, forward and loss must not read values back (each read stalls the host): on the meta
    device any read fails, so the whole training loss running there shows that none is made."""
    with torch.device("meta"):
        model = DALLETransformer(TransformerConfig.preset("tiny", text_loss_ignore_pad=True))
    text, image = (t.to("meta") for t in batch(2))
    loss, parts = model.loss(text, image)
    assert loss.device.type == "meta" and loss.shape == () and set(parts) == {"text", "image"}


def test_text_loss_without_targets_is_zero_and_differentiable() -> None:
    """Every text target an ignored pad: the text loss is 0 (a sum over no targets), not NaN."""
    model = randomised(TransformerConfig.preset("tiny", text_loss_ignore_pad=True))
    text, image = batch(2)
    text[:, 1:] = 0
    loss, parts = model.loss(text, image)
    assert float(parts["text"]) == 0.0 and torch.isfinite(loss)
    loss.backward()


def test_ids_are_checked_where_generation_starts() -> None:
    model = randomised(TransformerConfig.preset("tiny"))
    text, _ = batch(1)
    with pytest.raises(ConfigError, match="prime ids must be in"):
        model.prefill(text, torch.tensor([[0, VI]]))


def test_cast_matmul_weights_keeps_embeddings_norms_and_heads_float32() -> None:
    model = DALLETransformer(TransformerConfig.preset("tiny")).cast_matmul_weights(torch.bfloat16)
    for name, p in model.named_parameters():
        in_block_linear = name.startswith("blocks.") and (".attn." in name or ".mlp." in name)
        assert p.dtype == (torch.bfloat16 if in_block_linear else torch.float32), name
    with pytest.raises(ConfigError):
        model.cast_matmul_weights(torch.int8)


def test_compiled_decoding_equals_eager() -> None:
    """compile_decoding (torch.compile of the one-token step; CUDA graphs on CUDA) samples the same tokens as
    eager decoding for the same generators (about 30 s of compilation on a 2-core CPU)."""
    from dalle.sampling import sample

    model = randomised(TransformerConfig.preset("tiny"))
    text, _ = batch(2)

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in (0, 1)]

    guided = {"top_k": 8, "temperature": 0.9, "guidance_scale": 2.0}
    eager = sample(model, text, generator=gens())
    eager_guided = sample(model, text, generator=gens(), **guided)
    model.compile_decoding()
    assert model.decoding_compiled
    compiled = sample(model, text, generator=gens())
    assert torch.equal(eager, compiled)
    # the race sampler runs the step, the filter and the draw as one compiled function, same tokens
    assert model._fused_decoder[0] is model._compiled_step
    assert torch.equal(eager_guided, sample(model, text, generator=gens(), **guided))
    model.prefill(text)
    position = torch.tensor(T + 1)
    fast = model.decode_step(eager[:, 0, 0], position).clone()
    assert torch.allclose(fast, model._step(eager[:, 0, 0], position), atol=1e-5)
    model.compile_decoding("off")
    assert not model.decoding_compiled

"""dalle.dvae against OpenAI's dall_e: same keys, same outputs on the same weights, fast decode, checks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dalle.dvae import Decoder, Encoder, map_pixels, resolve_dtype, unmap_pixels
from dalle.errors import ConfigError, ImageError

dall_e = pytest.importorskip("dall_e")
attr = pytest.importorskip("attr")

REL_TOL = 1e-5


def official(cls_name: str, **kwargs):
    """An OpenAI module; validators off so that configs below its minimums (n_hid=8, vocab=16) work too."""
    with attr.validators.disabled():
        return getattr(dall_e, cls_name)(**kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_same_tokens(logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    """argmax tokens must agree; a disagreement is only tolerated at an exact float tie in the reference."""
    ours, ref = logits.argmax(1), ref_logits.argmax(1)
    differ = ours != ref
    if differ.any():
        top2 = ref_logits.topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1])[differ]
        scale = ref_logits.abs().max()
        assert (margin <= 1e-6 * scale).all(), f"{int(differ.sum())} tokens differ, margins {margin[:5]}"


def copy_of(ref: torch.nn.Module, ours: torch.nn.Module) -> torch.nn.Module:
    """Load ref's weights into ours (strict); a module built on the meta device takes them over (assign)."""
    meta = ours.blocks.input.w.is_meta
    ours.load_state_dict(ref.state_dict(), strict=True, assign=meta)
    return ours.eval()


def test_map_unmap_pixels() -> None:
    x = torch.rand(2, 3, 4, 4)
    y = map_pixels(x)
    assert torch.allclose(y, 0.8 * x + 0.1)
    assert y.min() >= 0.1 and y.max() <= 0.9
    assert torch.allclose(unmap_pixels(y), x, atol=1e-6)
    assert unmap_pixels(torch.full((1, 1, 1, 1), 5.0)).item() == 1.0
    assert torch.equal(map_pixels(x), dall_e.map_pixels(x))
    assert torch.equal(unmap_pixels(x), dall_e.unmap_pixels(x))
    for bad in (torch.rand(3, 4, 4), torch.rand(1, 3, 4, 4, dtype=torch.float64)):
        with pytest.raises(ValueError):  # ImageError is a ValueError, as in OpenAI's code
            map_pixels(bad)
        with pytest.raises(ImageError):
            unmap_pixels(bad)


# ------------------------------------------------------------------------------------------- full size
@pytest.fixture(scope="module")
def full_size():
    """OpenAI's default encoder/decoder with seeded random weights, our copies, one real 256x256 image."""
    from dalle.images import preprocess, sample_image_path

    torch.manual_seed(1234)
    ref_enc, ref_dec = dall_e.Encoder(), dall_e.Decoder()
    ref_enc.requires_grad_(False)
    ref_dec.requires_grad_(False)
    enc = copy_of(ref_enc, Encoder(device="meta"))
    dec = copy_of(ref_dec, Decoder(device="meta"))
    x = preprocess(sample_image_path())
    with torch.no_grad():
        ref_logits = ref_enc(x)
        ref_tokens = ref_logits.argmax(1)
        one_hot = F.one_hot(ref_tokens, 8192).permute(0, 3, 1, 2).float()
        ref_stats = ref_dec(one_hot).float()
    return {
        "ref_enc": ref_enc,
        "ref_dec": ref_dec,
        "enc": enc,
        "dec": dec,
        "x": x,
        "ref_logits": ref_logits,
        "ref_tokens": ref_tokens,
        "one_hot": one_hot,
        "ref_stats": ref_stats,
    }


def test_full_size_state_dict_matches_official(full_size) -> None:
    for ours, ref, n_tensors, n_params in (
        (full_size["enc"], full_size["ref_enc"], 74, 53_786_240),
        (full_size["dec"], full_size["ref_dec"], 76, 43_829_766),
    ):
        sd, ref_sd = ours.state_dict(), ref.state_dict()
        assert list(sd) == list(ref_sd)
        assert all(sd[k].shape == ref_sd[k].shape for k in sd)
        assert len(sd) == n_tensors
        assert sum(p.numel() for p in ours.parameters()) == n_params
        # the module tree third-party code walks
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    assert full_size["dec"].blocks.group_1.upsample.scale_factor == 2
    assert full_size["enc"].blocks.group_1.block_1.post_gain == 1 / 64


def test_full_size_encoder_parity(full_size) -> None:
    with torch.no_grad():
        logits = full_size["enc"](full_size["x"])
    assert logits.shape == (1, 8192, 32, 32) and logits.dtype == torch.float32
    assert rel_err(logits, full_size["ref_logits"]) < REL_TOL
    assert_same_tokens(logits, full_size["ref_logits"])
    assert torch.equal(full_size["enc"].encode(full_size["x"]), logits.argmax(1))


def test_full_size_decoder_parity_and_fast_decode(full_size) -> None:
    dec, tokens = full_size["dec"], full_size["ref_tokens"]
    # the fast path (embedding lookup, no one-hot tensor) equals the one-hot 1x1 convolution exactly ...
    assert torch.equal(dec.embed(tokens), dec.blocks.input(full_size["one_hot"]))
    # ... and the whole decode matches OpenAI's decoder run on the one-hot tensor
    with torch.no_grad():
        stats = dec.decode_stats(tokens)
    assert stats.shape == (1, 6, 256, 256) and stats.dtype == torch.float32
    assert rel_err(stats, full_size["ref_stats"]) < REL_TOL
    images = unmap_pixels(torch.sigmoid(stats[:, :3]))
    expected = unmap_pixels(torch.sigmoid(full_size["ref_stats"][:, :3]))
    assert (images - expected).abs().max().item() < 1e-5
    # decode() is exactly that (same computation), checked on a small grid to keep this test fast
    assert torch.equal(
        dec.decode(tokens[:, :4, :4]), unmap_pixels(torch.sigmoid(dec.decode_stats(tokens[:, :4, :4])[:, :3]))
    )


# ------------------------------------------------------------------------------------------- small configs
SMALL = [
    # (encoder kwargs, decoder kwargs, input H, W)
    (
        {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512},
        {"n_init": 8, "n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512},
        32,
        32,
    ),
    (
        {"n_hid": 8, "n_blk_per_group": 1, "vocab_size": 16},
        {"n_init": 8, "n_hid": 8, "n_blk_per_group": 1, "vocab_size": 16},
        16,
        40,
    ),
    (
        {"n_hid": 12, "n_blk_per_group": 3, "vocab_size": 32, "input_channels": 1},
        {"n_init": 4, "n_hid": 12, "n_blk_per_group": 3, "vocab_size": 32, "output_channels": 1},
        24,
        8,
    ),
]


@pytest.mark.parametrize("enc_kw,dec_kw,h,w", SMALL)
def test_small_config_parity(enc_kw, dec_kw, h, w) -> None:
    torch.manual_seed(0)
    ref_enc, ref_dec = official("Encoder", **enc_kw), official("Decoder", **dec_kw)
    enc, dec = copy_of(ref_enc, Encoder(**enc_kw)), copy_of(ref_dec, Decoder(**dec_kw))
    x = map_pixels(torch.rand(2, enc_kw.get("input_channels", 3), h, w))
    with torch.no_grad():
        ref_logits, logits = ref_enc(x), enc(x)
        assert logits.shape == (2, enc_kw["vocab_size"], h // 8, w // 8)
        assert rel_err(logits, ref_logits) < REL_TOL
        assert_same_tokens(logits, ref_logits)
        tokens = ref_logits.argmax(1)
        one_hot = F.one_hot(tokens, dec_kw["vocab_size"]).permute(0, 3, 1, 2).float()
        ref_stats, stats = ref_dec(one_hot).float(), dec(one_hot)
        assert stats.shape == (2, 2 * dec_kw.get("output_channels", 3), h, w)
        assert rel_err(stats, ref_stats) < REL_TOL
        # soft (relaxed) inputs go through the same path
        soft = torch.softmax(torch.randn_like(one_hot), dim=1)
        assert rel_err(dec(soft), ref_dec(soft).float()) < REL_TOL
    # the fast path: an embedding lookup equal to the one-hot 1x1 convolution
    assert torch.equal(dec.embed(tokens), dec.blocks.input(one_hot))
    ch = dec_kw.get("output_channels", 3)
    expected = unmap_pixels(torch.sigmoid(ref_stats[:, :ch]))
    assert (dec.decode(tokens) - expected).abs().max().item() < 1e-6


def test_nchw_mode_is_bit_exact_with_official() -> None:
    torch.manual_seed(3)
    ref = official("Encoder", n_hid=8, n_blk_per_group=1, vocab_size=16)
    enc = copy_of(ref, Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16))
    enc.channels_last = False
    x = map_pixels(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        assert torch.equal(enc(x), ref(x))


def test_decode_token_shapes_and_checks() -> None:
    torch.manual_seed(0)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    tokens = torch.randint(0, 16, (2, 3, 5))
    out = dec.decode(tokens)
    assert out.shape == (2, 3, 24, 40) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    square = torch.randint(0, 16, (1, 16))
    assert torch.equal(dec.decode(square), dec.decode(square.view(1, 4, 4)))
    assert torch.equal(dec.decode(tokens.int()), out)
    for bad in (
        torch.full((1, 2, 2), 16),  # out of range
        torch.full((1, 2, 2), -1),
        torch.zeros(1, 2, 2),  # float
        torch.zeros(1, 15, dtype=torch.long),  # not a square grid
        torch.zeros(2, 2, dtype=torch.long).unsqueeze(0).unsqueeze(0),  # 4-d
        torch.zeros(0, 2, 2, dtype=torch.long),
    ):
        with pytest.raises(ConfigError):
            dec.decode(bad)
    with pytest.raises(ConfigError, match="channels"):
        dec(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ConfigError, match="float32"):
        dec(torch.zeros(1, 16, 2, 2, dtype=torch.float64))


def test_encoder_input_checks() -> None:
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ImageError, match="4-d"):
        enc(torch.zeros(3, 16, 16))
    with pytest.raises(ImageError, match="channels"):
        enc(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ImageError, match="float32"):
        enc(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ImageError, match="multiples of 8"):
        enc(torch.zeros(1, 3, 20, 16))
    tokens = enc.encode(map_pixels(torch.rand(3, 3, 16, 24)))
    assert tokens.shape == (3, 2, 3) and tokens.dtype == torch.long


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Encoder, {"n_hid": 6}),  # not divisible by 4
        (Encoder, {"n_hid": 0}),
        (Encoder, {"n_hid": 8.0}),
        (Encoder, {"n_hid": True}),
        (Encoder, {"n_blk_per_group": 0}),
        (Encoder, {"vocab_size": 1}),
        (Encoder, {"input_channels": -1}),
        (Encoder, {"use_mixed_precision": "yes"}),
        (Encoder, {"dtype": "float64"}),
        (Decoder, {"n_init": 0}),
        (Decoder, {"output_channels": 0}),
        (Decoder, {"n_hid": 10}),
        (Decoder, {"dtype": torch.int8}),
    ],
)
def test_constructor_validation(cls, kwargs) -> None:
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_config_round_trip_and_json() -> None:
    enc = Encoder(n_hid=8, n_blk_per_group=2, input_channels=4, vocab_size=32, dtype="bf16")
    dec = Decoder(n_init=4, n_hid=8, n_blk_per_group=1, output_channels=1, vocab_size=32)
    for m in (enc, dec):
        cfg = json.loads(json.dumps(m.config()))
        again = type(m)(**cfg)
        assert again.config() == m.config()
        assert {k: v.shape for k, v in again.state_dict().items()} == {
            k: v.shape for k, v in m.state_dict().items()
        }
    assert enc.config()["dtype"] == "bfloat16"


def test_dtype_api_on_cpu() -> None:
    assert resolve_dtype("fp16") is torch.float16
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(None) is None
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16, dtype=torch.float16)
    assert enc.dtype is torch.float16
    assert enc.compute_dtype() is torch.float32  # CPU always computes in float32
    assert enc.blocks.group_1.block_1.res_path.conv_1.cuda_dtype is torch.float16
    assert enc.blocks.output.conv.compute_dtype() is torch.float32
    enc.set_dtype(None)
    assert enc.blocks.group_1.block_1.res_path.conv_1.cuda_dtype is torch.bfloat16  # mixed precision default
    assert all(p.dtype == torch.float32 for p in enc.parameters())


def test_enclosing_autocast_does_not_override_the_layers_precision() -> None:
    """The modules choose their own precision (float32 throughout on CPU, the output layer pinned to float32
    on CUDA): an autocast around the call (as a pipeline or training loop may have) changes nothing."""
    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    x = map_pixels(torch.rand(2, 3, 16, 16))
    with torch.no_grad():
        logits, images = enc(x), dec.decode(enc.encode(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_ac, images_ac = enc(x), dec.decode(enc.encode(x))
    assert torch.equal(logits, logits_ac)
    assert torch.equal(images, images_ac)


def test_trainable_like_openai() -> None:
    """Parameters are ordinary trainable nn.Parameters (as in OpenAI's code) and gradients reach them all."""
    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    x = map_pixels(torch.rand(2, 3, 16, 16))
    z = torch.softmax(enc(x), dim=1)
    loss = dec(z)[:, :3].sub(x).abs().mean()
    loss.backward()
    for m in (enc, dec):
        assert all(p.requires_grad and p.grad is not None for p in m.parameters())
        assert all(isinstance(p, torch.nn.Parameter) for p in m.parameters())


def test_gradients_match_official() -> None:
    """Training sees the same gradients as with OpenAI's modules (the reordered decoder included)."""
    torch.manual_seed(0)
    ref_enc = official("Encoder", n_hid=8, n_blk_per_group=2, vocab_size=16)
    ref_dec = official("Decoder", n_init=8, n_hid=8, n_blk_per_group=2, vocab_size=16)
    enc = copy_of(ref_enc, Encoder(n_hid=8, n_blk_per_group=2, vocab_size=16)).train()
    dec = copy_of(ref_dec, Decoder(n_init=8, n_hid=8, n_blk_per_group=2, vocab_size=16)).train()
    x = map_pixels(torch.rand(2, 3, 16, 16))
    for e, d in ((ref_enc, ref_dec), (enc, dec)):
        z = torch.softmax(e(x) / 0.5, dim=1)
        d(z)[:, :3].sub(x).abs().mean().backward()
    for ours, ref in ((enc, ref_enc), (dec, ref_dec)):
        for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert rel_err(p.grad, q.grad) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_cuda_precision_modes(dtype, tol, monkeypatch) -> None:
    """Each compute dtype against OpenAI's CUDA path: float32 against its full-precision mode with TF32 off
    (TF32 convolutions alone differ by ~1e-3), the half types against its fp16 convolutions."""
    torch.manual_seed(0)
    full = dtype == torch.float32
    if full:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ref_enc = official(
        "Encoder",
        n_hid=64,
        n_blk_per_group=1,
        vocab_size=512,
        device=torch.device("cuda"),
        use_mixed_precision=not full,
    )
    ref_dec = official(
        "Decoder",
        n_init=16,
        n_hid=64,
        n_blk_per_group=1,
        vocab_size=512,
        device=torch.device("cuda"),
        use_mixed_precision=not full,
    )
    enc = copy_of(ref_enc, Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, device="cuda", dtype=dtype))
    dec = copy_of(
        ref_dec, Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512, device="cuda", dtype=dtype)
    )
    x = map_pixels(torch.rand(2, 3, 64, 64, device="cuda"))
    with torch.no_grad():
        ref_logits = ref_enc(x)  # OpenAI's own CUDA path: fp16 (or fp32) convs, fp32 logits
        logits = enc(x)
        assert logits.dtype == torch.float32
        assert enc.compute_dtype() is dtype
        assert rel_err(logits, ref_logits) < tol
        tokens = ref_logits.argmax(1)
        one_hot = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
        stats = dec.decode_stats(tokens)
        assert stats.dtype == torch.float32
        assert rel_err(stats, ref_dec(one_hot).float()) < tol


def test_cudnn_benchmark_only_inside_the_dvaes_own_cuda_calls(monkeypatch) -> None:
    """On CUDA the dVAE switches cuDNN's algorithm timing on for its own calls and restores the flag; never
    when deterministic algorithms are asked for, nor when switched off on the instance (the device is faked
    here)."""
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    monkeypatch.setattr(type(enc), "device", property(lambda self: torch.device("cuda")))
    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "benchmark", False)
    with enc._own_precision():
        assert cudnn.benchmark
    assert not cudnn.benchmark
    enc.cudnn_benchmark = False
    with enc._own_precision():
        assert not cudnn.benchmark
    enc.cudnn_benchmark = True
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with enc._own_precision():
        assert not cudnn.benchmark

"""dalle.vqgan against taming-transformers 0.0.1 and ruDALL-E 1.1.3, and safe reading of Lightning
checkpoints.

The references are test-only (installed ``--no-deps`` by the Makefile); only their model modules are imported:
``rudalle/vae/model.py`` is loaded under stub parent packages because ``rudalle/__init__.py`` needs
huggingface_hub, transformers, ... The file skips where they are absent.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from dalle.dvae import map_pixels, unmap_pixels
from dalle.errors import ConfigError, ImageError, ModelLoadError, UnsafePickleError
from dalle.loading import load_model, read_lightning_checkpoint
from dalle.vqgan import (
    PRESETS,
    VQGANDecoder,
    VQGANEncoder,
    infer_vqgan_config,
    load_vqgan,
    split_state_dict,
    vqgan_from_state_dict,
)

pytest.importorskip("einops")
pytest.importorskip("pywt")
taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")


def _load_rudalle_vae_model() -> types.ModuleType:
    """rudalle.vae.model without running rudalle/__init__.py or rudalle/vae/__init__.py."""
    spec = importlib.util.find_spec("rudalle")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rudalle is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {name: sys.modules.get(name) for name in ("rudalle", "rudalle.vae")}
    try:
        for name, folder in (("rudalle", root), ("rudalle.vae", root / "vae")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(folder)]  # a namespace-like stub: submodules import, __init__ never runs
            sys.modules[name] = stub
        return importlib.import_module("rudalle.vae.model")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


rudalle_model = _load_rudalle_vae_model()


class AttrDict(dict):
    """The attribute access ruDALL-E uses on its OmegaConf config (``config.model.params.ddconfig``)."""

    def __getattr__(self, key: str):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value) -> None:
        self[key] = value


TINY_GUMBEL = {
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "z_channels": 32,
    "double_z": False,
    "in_channels": 3,
    "out_ch": 3,
    "resolution": 32,
    "dropout": 0.0,
}
TINY_VQ = {
    "ch": 32,
    "ch_mult": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "z_channels": 16,
    "double_z": False,
    "in_channels": 3,
    "out_ch": 3,
    "resolution": 32,
    "dropout": 0.0,
}


def jitter_(module: nn.Module, scale: float = 0.05) -> nn.Module:
    """Perturb every parameter (GroupNorm's ones / zeros included) so that each one matters."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module.eval()


def rudalle_vae(dwt: bool = False, ddconfig: dict | None = None, n_embed: int = 64, embed_dim: int = 32):
    cfg = AttrDict(
        model=AttrDict(
            params=AttrDict(
                ddconfig=AttrDict(ddconfig or TINY_GUMBEL),
                n_embed=n_embed,
                embed_dim=embed_dim,
                kl_weight=1e-8,
            )
        )
    )
    return rudalle_model.VQGanGumbelVAE(cfg, dwt=dwt)


class TamingVQ(nn.Module):
    """taming's VQModel without Lightning and the loss: the same submodules and state-dict keys."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder = taming_model.Encoder(**ddconfig)
        self.decoder = taming_model.Decoder(**ddconfig)
        self.quantize = taming_quantize.VectorQuantizer(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x: torch.Tensor):
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))


def tiny_taming_vq(n_embed: int = 32, embed_dim: int = 8) -> TamingVQ:
    torch.manual_seed(1)
    ref = jitter_(TamingVQ(TINY_VQ, n_embed, embed_dim))
    with torch.no_grad():  # taming's U(-1/n, 1/n) codebook is nearly degenerate; spread it so ids are stable
        ref.quantize.embedding.weight.normal_()
    return ref


def shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


# -------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dwt", [False, True], ids=["plain", "dwt"])
def test_gumbel_matches_rudalle(dwt: bool) -> None:
    torch.manual_seed(0)
    vae = jitter_(rudalle_vae(dwt=dwt))
    # ruDALL-E loads the DWT checkpoint into the wrapper (keys "model.*"), the plain one into vae.model
    full = vae.state_dict() if dwt else vae.model.state_dict()
    enc_sd, dec_sd = split_state_dict(full)
    enc = VQGANEncoder(**TINY_GUMBEL, n_embed=64, embed_dim=32).eval()
    dec = VQGANDecoder(**TINY_GUMBEL, n_embed=64, embed_dim=32, dwt=dwt).eval()
    assert set(enc.state_dict()) == set(enc_sd) and set(dec.state_dict()) == set(dec_sd)
    enc.load_state_dict(enc_sd, strict=True)
    dec.load_state_dict(dec_sd, strict=True)

    x = map_pixels(torch.rand(2, 3, 32, 32))
    tokens = enc.encode(x)
    assert tokens.shape == (2, 16, 16) and tokens.dtype == torch.long
    ref_tokens = vae.get_codebook_indices(unmap_pixels(x), disable_gumbel_softmax=True)
    assert torch.equal(tokens.flatten(1), ref_tokens)
    assert len(tokens.unique()) > 4  # the weights are not degenerate

    with torch.no_grad():
        ref_img = vae.decode(ref_tokens)
        ref_raw = vae.model.decode(vae.model.quantize.embed(tokens).permute(0, 3, 1, 2))
    img = dec.decode(tokens.flatten(1))  # [B, h*w] is accepted for square grids
    side = 64 if dwt else 32
    assert img.shape == (2, 3, side, side) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.decode_raw(tokens), ref_raw, rtol=1e-5, atol=1e-5)


def test_gumbel_non_square_and_inferred_config() -> None:
    torch.manual_seed(2)
    vae = jitter_(rudalle_vae())
    enc, dec = vqgan_from_state_dict(vae.model.state_dict())  # config read off the shapes
    assert enc.config()["quantizer"] == "gumbel" and not dec.dwt and enc.factor == 2
    x = map_pixels(torch.rand(1, 3, 32, 48))
    with torch.no_grad():
        _, _, (_, _, ref) = vae.model.encode(unmap_pixels(x) * 2 - 1, disable_gumbel_softmax=True)
    tokens = enc.encode(x)
    assert torch.equal(tokens, ref) and tokens.shape == (1, 16, 24)
    assert dec.decode(tokens).shape == (1, 3, 32, 48)


def test_vq_matches_taming() -> None:
    ref = tiny_taming_vq()
    enc, dec = vqgan_from_state_dict(
        ref.state_dict(), {**TINY_VQ, "n_embed": 32, "embed_dim": 8, "quantizer": "vq"}
    )
    assert "quantize.embedding.weight" in enc.state_dict() and "quantize.embedding.weight" in dec.state_dict()
    x = map_pixels(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        _, _, (_, _, ref_idx) = ref.encode(unmap_pixels(x) * 2 - 1)
    tokens = enc.encode(x)
    assert tokens.shape == (2, 8, 8)
    assert torch.equal(tokens.flatten(), ref_idx.flatten())
    assert len(tokens.unique()) > 4
    with torch.no_grad():  # DALLE-pytorch's VQGanVAE.decode: codebook entries -> decode -> clamp -> [0, 1]
        quant = ref.quantize.get_codebook_entry(tokens.flatten(), (2, 8, 8, 8))
        ref_img = (ref.decode(quant).clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(dec.decode(tokens), ref_img, rtol=0, atol=1e-5)
    # inference from the shapes finds the same architecture
    inferred = infer_vqgan_config(ref.state_dict())
    assert inferred["ch_mult"] == [1, 1, 2] and inferred["quantizer"] == "vq" and inferred["n_embed"] == 32


@pytest.mark.parametrize("dwt", [False, True], ids=["plain", "dwt"])
def test_full_size_sber_keys_and_shapes(dwt: bool) -> None:
    cfg = PRESETS["sber-gumbel-f8"]
    dd = {k: v for k, v in cfg.items() if k not in ("n_embed", "embed_dim", "quantizer")}
    with torch.device("meta"):
        ref = rudalle_model.GumbelVQ(
            AttrDict(dd), n_embed=cfg["n_embed"], embed_dim=cfg["embed_dim"], dwt=dwt
        )
    enc = VQGANEncoder.from_preset("sber-gumbel-f8", device="meta")
    dec = VQGANDecoder.from_preset("sber-gumbel-f8", dwt=dwt, device="meta")
    ref_enc, ref_dec = split_state_dict(ref.state_dict())
    assert shapes(enc.state_dict()) == shapes(ref_enc)
    assert shapes(dec.state_dict()) == shapes(ref_dec)
    if (
        not dwt
    ):  # the halves cover the reference exactly (the DWT model's top-level post_quant_conv is unused)
        assert set(ref.state_dict()) == set(enc.state_dict()) | set(dec.state_dict())
    assert (
        enc.vocab_size == dec.vocab_size == 8192
        and enc.factor == 8
        and dec.output_factor == (16 if dwt else 8)
    )


@pytest.mark.parametrize("preset", ["taming-f16-1024", "taming-f16-16384"])
def test_full_size_taming_keys_and_shapes(preset: str) -> None:
    cfg = PRESETS[preset]
    dd = {k: v for k, v in cfg.items() if k not in ("n_embed", "embed_dim", "quantizer")}
    with torch.device("meta"):
        ref = TamingVQ(dd, cfg["n_embed"], cfg["embed_dim"])
    enc = VQGANEncoder.from_preset(preset, device="meta")
    dec = VQGANDecoder.from_preset(preset, device="meta")
    ref_enc, ref_dec = split_state_dict(ref.state_dict())
    assert shapes(enc.state_dict()) == shapes(ref_enc) and shapes(dec.state_dict()) == shapes(ref_dec)
    assert set(ref.state_dict()) == set(enc.state_dict()) | set(dec.state_dict())
    assert enc.factor == 16 and enc.vocab_size == cfg["n_embed"]
    assert infer_vqgan_config(ref.state_dict())["attn_resolutions"] == [16]


# --------------------------------------------------------------------------------------- config, contract
def test_config_round_trip_and_contract() -> None:
    for cls in (VQGANEncoder, VQGANDecoder):
        model = cls.from_ddconfig(TINY_GUMBEL, n_embed=64, embed_dim=32, quantizer="gumbel", device="meta")
        cfg = model.config()
        json.dumps(cfg)
        again = cls(**json.loads(json.dumps(cfg)), device="meta")
        assert shapes(again.state_dict()) == shapes(model.state_dict()) and again.config() == cfg
        assert model.device.type == "meta" and model.vocab_size == 64
    assert VQGANEncoder.kind == "vqgan-encoder" and VQGANDecoder.kind == "vqgan-decoder"
    enc = VQGANEncoder(**TINY_GUMBEL, n_embed=64, embed_dim=32)
    assert (
        enc.set_dtype("bf16") is enc and enc.dtype == torch.bfloat16 and enc.config()["dtype"] == "bfloat16"
    )
    assert enc.compute_dtype() == torch.float32  # CPU always computes in float32
    with pytest.raises(ConfigError):
        enc.set_dtype("int8")


@pytest.mark.parametrize(
    "overrides",
    [
        {"ch": 16},  # GroupNorm(32) needs widths divisible by 32
        {"embed_dim": 16},  # Gumbel: proj takes z_channels inputs fed with embed_dim channels
        {"quantizer": "lfq"},
        {"double_z": True},
        {"ch_mult": []},
        {"n_embed": 1},
        {"num_res_blocks": 1.5},
    ],
)
def test_bad_configs(overrides: dict) -> None:
    with pytest.raises(ConfigError):
        VQGANEncoder(**{**TINY_GUMBEL, "n_embed": 64, "embed_dim": 32, **overrides}, device="meta")


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="preset"):
        VQGANEncoder.from_preset("sber-f16")


@pytest.fixture(scope="module")
def tiny() -> tuple[VQGANEncoder, VQGANDecoder]:
    torch.manual_seed(0)
    return (
        jitter_(VQGANEncoder(**TINY_GUMBEL, n_embed=64, embed_dim=32)),
        jitter_(VQGANDecoder(**TINY_GUMBEL, n_embed=64, embed_dim=32)),
    )


def test_float32_inside_a_callers_autocast(tiny) -> None:
    """A surrounding autocast (e.g. the transformer's) does not change the tokenizer's float32 results."""
    enc, dec = tiny
    x = map_pixels(torch.rand(1, 3, 32, 32))
    tokens, img = enc.encode(x), dec.decode(torch.arange(16).view(1, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(enc.encode(x), tokens)
        out = dec.decode(torch.arange(16).view(1, 4, 4))
    assert out.dtype == torch.float32 and torch.equal(out, img)


@pytest.mark.parametrize(
    "x, match",
    [
        (map_pixels(torch.rand(1, 1, 32, 32)), "channels"),
        (map_pixels(torch.rand(1, 3, 32, 32))[0], "4-d"),
        (map_pixels(torch.rand(1, 3, 32, 32)).double(), "float32"),
        (map_pixels(torch.rand(1, 3, 31, 32)), "multiples of 2"),
        (torch.zeros(1, 3, 32, 32), "map_pixels"),  # raw [0, 1] pixels, not mapped
        ([[0.5]], "4-d"),
    ],
)
def test_encoder_rejects_bad_input(tiny, x, match) -> None:
    with pytest.raises(ImageError, match=match):
        tiny[0].encode(x)


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(1, 4, 4), "integer"),
        (torch.full((1, 4, 4), 64), r"\[0, 63\]"),
        (torch.full((1, 4, 4), -1), r"\[0, 63\]"),
        (torch.zeros(1, 15, dtype=torch.long), "square"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), "shape"),
        (torch.zeros(0, 4, 4, dtype=torch.long), "empty"),
        ([[1, 2]], "LongTensor"),
    ],
)
def test_decoder_rejects_bad_tokens(tiny, tokens, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny[1].decode(tokens)


# ------------------------------------------------------------------------------ Lightning checkpoints
@pytest.fixture
def fake_packages(monkeypatch):
    """Classes that pickle as OmegaConf's, Lightning's and taming's without those packages installed."""
    names = {
        "omegaconf.dictconfig": ["DictConfig"],
        "omegaconf.listconfig": ["ListConfig"],
        "omegaconf.base": ["ContainerMetadata", "Metadata"],
        "omegaconf.nodes": ["AnyNode", "IntegerNode"],
        "pytorch_lightning.callbacks.model_checkpoint": ["ModelCheckpoint"],
        "pytorch_lightning.utilities.parsing": ["AttributeDict"],
    }
    classes = {}
    for module, qualnames in names.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # the package and each parent, as pickle's import finds them
            name = ".".join(parts[:i])
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        for q in qualnames:
            base = (dict,) if q == "AttributeDict" else ()
            cls = type(q, base, {})
            cls.__module__, cls.__qualname__ = module, q
            setattr(sys.modules[module], q, cls)
            classes[q] = cls
    return classes


def _omegaconf_like(c: dict) -> object:
    """An object whose pickle matches an OmegaConf DictConfig's (metadata, typing.Any, nodes)."""
    meta = c["ContainerMetadata"]()
    meta.__dict__.update(
        ref_type=typing.Any,
        object_type=dict,
        optional=True,
        key=None,
        flags={},
        key_type=typing.Any,
        element_type=typing.Any,
    )
    node = c["AnyNode"]()
    node.__dict__.update(_val=256, _metadata=c["Metadata"](), _parent=None)
    ints = c["IntegerNode"]()
    ints.__dict__.update(_val=3, _metadata=None)
    lst = c["ListConfig"]()
    lst.__dict__.update(_content=[ints], _metadata=meta)
    cfg = c["DictConfig"]()
    cfg.__dict__.update(_metadata=meta, _parent=None, _content={"resolution": node, "ch_mult": lst})
    return cfg


def write_lightning_ckpt(path: Path, state_dict: dict, classes: dict, zip_format: bool = True) -> Path:
    ckpt_cb = classes["ModelCheckpoint"]
    hparams = classes["AttributeDict"](lr=4.5e-6)
    ckpt = {
        "epoch": 3,
        "global_step": np.int64(1200),
        "pytorch-lightning_version": "1.0.8",
        "state_dict": collections.OrderedDict(state_dict),
        "callbacks": {
            ckpt_cb: {
                "best_model_score": torch.tensor(0.25),
                "monitor": "val/rec_loss",
                "score": np.float64(0.5),
                "arr": np.arange(3),
            }
        },
        "callback_instance": ckpt_cb(),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [collections.defaultdict(list, last_epoch=[3])],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "config": _omegaconf_like(classes),
        "args": argparse.Namespace(base=["configs/x.yaml"], logdir=pathlib.PurePosixPath("/logs")),
        "dtype": np.dtype("float32"),
    }
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    return path


def with_loss_keys(sd: dict) -> dict:
    return {
        **sd,
        "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
        "loss.perceptual_loss.net.slice1.0.bias": torch.randn(4),
        "loss.logvar": torch.zeros(()),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_lightning_checkpoint_loads_safely(tmp_path, fake_packages, monkeypatch, zip_format) -> None:
    torch.manual_seed(3)
    vae = jitter_(rudalle_vae())
    sd = vae.model.state_dict()
    path = write_lightning_ckpt(tmp_path / "last.ckpt", with_loss_keys(sd), fake_packages, zip_format)
    for name in list(sys.modules):  # load with none of the fake packages importable
        if name.split(".")[0] in ("omegaconf", "pytorch_lightning"):
            monkeypatch.delitem(sys.modules, name)

    weights = read_lightning_checkpoint(path)
    assert list(weights) == list(sd)  # loss.* dropped, order kept
    assert all(torch.equal(weights[k], sd[k]) for k in sd)
    assert "omegaconf" not in sys.modules and "pytorch_lightning" not in sys.modules

    enc, dec = load_vqgan(path)  # architecture inferred from the shapes
    x = map_pixels(torch.rand(1, 3, 32, 32))
    ref = vae.get_codebook_indices(unmap_pixels(x), disable_gumbel_softmax=True)
    assert torch.equal(enc.encode(x).flatten(1), ref)
    assert not enc.training and not any(p.requires_grad for p in dec.parameters())


def test_lightning_checkpoint_is_not_a_dvae(tmp_path, fake_packages) -> None:
    """The dVAE loader keeps its strict allow-list: OmegaConf & co. are still refused there."""
    path = write_lightning_ckpt(tmp_path / "x.ckpt", {"blocks.input.w": torch.zeros(1)}, fake_packages)
    with pytest.raises(UnsafePickleError, match="omegaconf|numpy|pytorch_lightning|_codecs"):
        load_model(path)


class _Evil:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        import subprocess

        cmd = f"touch {self.marker}"
        if self.how == "system":
            return (os.system, (cmd,))  # pickled as posix.system
        if self.how == "eval":
            return (eval, (f"__import__('os').system({cmd!r})",))
        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("how", ["system", "eval", "subprocess"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_checkpoint_is_refused(tmp_path, how, zip_format) -> None:
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": {"encoder.conv_in.weight": torch.zeros(2)}, "hyper_parameters": _Evil(marker, how)}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafePickleError, match="refusing to load the global"):
        read_lightning_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_without_state_dict(tmp_path) -> None:
    path = tmp_path / "opt.ckpt"
    torch.save({"epoch": 1, "optimizer_states": []}, path)
    with pytest.raises(ModelLoadError, match="state_dict"):
        read_lightning_checkpoint(path)
    torch.save({"state_dict": {"a": torch.zeros(1), "b": 3}}, path)
    with pytest.raises(ModelLoadError, match="'b'"):
        read_lightning_checkpoint(path)
    plain = tmp_path / "plain.pt"
    torch.save({"encoder.conv_in.bias": torch.ones(2), "loss.logvar": torch.zeros(())}, plain)
    assert list(read_lightning_checkpoint(plain)) == ["encoder.conv_in.bias"]


def test_split_rejects_foreign_keys() -> None:
    with pytest.raises(ModelLoadError, match="unexpected keys"):
        split_state_dict({"encoder.conv_in.weight": torch.zeros(1), "blocks.input.w": torch.zeros(1)})
    enc, dec = split_state_dict({"blocks.input.w": torch.zeros(1)}, strict=False)
    assert enc == {} and dec == {}

"""dalle.images: loading every mode, the notebook's preprocessing, PIL conversion, grids, PNG metadata,
CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.dvae import Decoder, Encoder, map_pixels
from dalle.errors import ImageError
from dalle.images import (
    load_image,
    make_grid,
    preprocess,
    read_png_metadata,
    reconstruct,
    sample_image_path,
    save_png,
    to_pil,
    to_tensor,
)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (so resampling differences would show)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def notebook_preprocess(img: Image.Image, target_image_size: int = 256) -> torch.Tensor:
    """OpenAI's usage-notebook preprocessing, verbatim apart from the size argument."""
    import PIL
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    s = min(img.size)
    if s < target_image_size:
        raise ValueError(f"min dim for image {s} < {target_image_size}")
    r = target_image_size / s
    s = (round(r * img.size[1]), round(r * img.size[0]))
    img = TF.resize(img, s, interpolation=PIL.Image.LANCZOS)
    img = TF.center_crop(img, output_size=2 * [target_image_size])
    img = torch.unsqueeze(T.ToTensor()(img), 0)
    return map_pixels(img)


# ------------------------------------------------------------------------------------------- preprocess
@pytest.mark.parametrize("w,h", [(256, 256), (300, 257), (257, 300), (512, 384), (333, 999), (401, 263)])
def test_preprocess_matches_notebook(w, h) -> None:
    img = photo(w, h)
    x = preprocess(img)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert torch.equal(x, notebook_preprocess(img))
    assert 0.1 - 1e-6 <= x.min() and x.max() <= 0.9 + 1e-6


def test_preprocess_other_sizes_and_sample() -> None:
    img = photo(100, 75)
    x = preprocess(img, size=64)
    assert torch.equal(x, notebook_preprocess(img, 64))
    sample = preprocess(sample_image_path())
    assert sample.shape == (1, 3, 256, 256)
    assert sample_image_path().stat().st_size < 200_000
    with pytest.raises(ImageError, match="multiple of 8"):
        preprocess(img, size=60)
    with pytest.raises(ImageError, match="multiple of 8"):
        preprocess(img, size=0)


def test_small_images_need_allow_upscale() -> None:
    img = photo(200, 300)
    with pytest.raises(ImageError, match="200"):
        preprocess(img)
    with pytest.raises(ValueError):  # ImageError is a ValueError, like the notebook's error
        preprocess(photo(3, 3))
    x = preprocess(img, allow_upscale=True)
    assert x.shape == (1, 3, 256, 256)
    tiny = preprocess(Image.new("RGB", (1, 1), (255, 0, 0)), size=8, allow_upscale=True)
    assert tiny.shape == (1, 3, 8, 8)
    assert torch.allclose(tiny[0, :, 0, 0], torch.tensor([0.9, 0.1, 0.1]))


# ------------------------------------------------------------------------------------------------ modes
def _rgb(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel(xy)


def test_modes_become_rgb() -> None:
    assert _rgb(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    assert _rgb(Image.new("1", (4, 4), 1)) == (255, 255, 255)
    assert _rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)
    assert _rgb(Image.new("YCbCr", (4, 4), (128, 128, 128)))[0] in range(126, 131)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert _rgb(p) == (10, 20, 30)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    assert _rgb(rgba, (0, 0)) == (255, 255, 255)
    assert _rgb(rgba, (1, 1)) == (255, 0, 0)
    assert all(v in (127, 128) for v in _rgb(rgba, (2, 2)))
    la = Image.new("LA", (2, 2), (0, 0))
    assert _rgb(la) == (255, 255, 255)
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.info["transparency"] = 1
    assert _rgb(p) == (255, 255, 255)


def test_high_bit_depth_modes() -> None:
    arr16 = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    img16 = Image.fromarray(arr16)
    assert img16.mode.startswith("I;16")
    out = load_image(img16)
    assert [out.getpixel(p)[0] for p in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 255, 128, 1]
    assert _rgb(Image.new("I", (2, 2), 200)) == (200, 200, 200)
    assert _rgb(Image.new("I", (2, 2), 65535)) == (255, 255, 255)
    assert _rgb(Image.new("F", (2, 2), 0.5)) == (128, 128, 128)
    with pytest.raises(ImageError, match="negative"):
        load_image(Image.new("I", (2, 2), -5))


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "RGB"])
def test_every_mode_from_a_file(tmp_path, mode) -> None:
    base = photo(300, 260)
    img = (
        Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        if mode == "I;16"
        else (base.convert(mode))
    )
    path = tmp_path / f"img.{'tiff' if mode == 'CMYK' else 'png'}"
    img.save(path)
    x = preprocess(path)
    assert x.shape == (1, 3, 256, 256)
    assert load_image(str(path)).mode == "RGB"


def test_exif_orientation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


# ----------------------------------------------------------------------------------- other input kinds
def test_numpy_and_tensor_inputs() -> None:
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ref = Image.fromarray(hwc)
    assert np.array_equal(np.asarray(load_image(hwc)), hwc)
    assert np.array_equal(np.asarray(load_image(hwc.astype(np.float32) / 255)), hwc)
    assert load_image(hwc[:, :, 0]).getpixel((0, 0)) == (hwc[0, 0, 0],) * 3
    assert load_image(hwc[:, :, :1]).size == (30, 20)
    assert load_image(np.ones((4, 4), dtype=bool)).getpixel((0, 0)) == (255, 255, 255)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    assert np.array_equal(np.asarray(load_image(chw)), hwc)
    assert np.array_equal(np.asarray(load_image(chw.float() / 255)), hwc)
    assert np.array_equal(np.asarray(load_image((chw.float() / 255).unsqueeze(0))), hwc)
    assert np.array_equal(np.asarray(load_image(chw.half() / 255)), np.asarray(ref))  # exact at these values
    for bad in (
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((2, 4, 4, 3), dtype=np.uint8),
        np.full((4, 4, 3), 1.5, dtype=np.float32),
        np.full((4, 4), np.nan),
        np.zeros((4, 4, 3), dtype=np.int64),
        np.zeros((0, 4, 3), dtype=np.uint8),
        torch.zeros(5, 4, 4),
        torch.zeros(2, 3, 4, 4),
    ):
        with pytest.raises(ImageError):
            load_image(bad)
    with pytest.raises(ImageError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- broken files
def test_corrupt_files_name_the_file(tmp_path) -> None:
    good = io.BytesIO()
    photo(64, 64).save(good, format="PNG")
    data = good.getvalue()
    cases = {
        "truncated.png": data[: len(data) // 2],
        "header_only.png": data[:40],
        "text.png": b"this is not an image at all",
        "empty.jpg": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageError, match=name.replace(".", r"\.")):
            load_image(tmp_path / name)
        with pytest.raises(ImageError, match=name.replace(".", r"\.")):
            preprocess(tmp_path / name)
    with pytest.raises(ImageError, match="no such"):
        load_image(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------ output
def test_to_pil_and_to_tensor() -> None:
    x = torch.rand(3, 5, 7)
    img = to_pil(x)
    assert isinstance(img, Image.Image) and img.size == (7, 5) and img.mode == "RGB"
    assert (to_tensor(img) - x).abs().max() <= 0.5 / 255 + 1e-6  # rounded, not truncated
    batch = to_pil(torch.rand(2, 3, 4, 4))
    assert isinstance(batch, list) and len(batch) == 2
    assert to_pil(torch.full((3, 1, 1), 2.0)).getpixel((0, 0)) == (255, 255, 255)  # clamped
    assert to_pil(torch.zeros(1, 2, 2)).mode == "L"
    assert to_pil(torch.full((3, 1, 1), 7, dtype=torch.uint8)).getpixel((0, 0)) == (7, 7, 7)
    with pytest.raises(ImageError):
        to_pil(torch.zeros(2, 2))
    with pytest.raises(ImageError):
        to_pil(torch.zeros(5, 2, 2))


def test_make_grid() -> None:
    imgs = [Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(imgs)  # ceil(sqrt(5)) = 3 columns, 2 rows
    assert grid.size == (3 * 10 + 4 * 2, 2 * 8 + 3 * 2)
    assert grid.getpixel((2, 2)) == (0, 0, 0) and grid.getpixel((14, 2)) == (40, 0, 0)
    assert grid.getpixel((0, 0)) == (255, 255, 255)  # padding
    row = make_grid(imgs[:2], ncols=2, padding=0)
    assert row.size == (20, 8)
    captioned = make_grid(imgs[:2], ncols=2, captions=["a red thing", "a much longer caption that wraps"])
    assert captioned.width == row.width + 3 * 2 and captioned.height > 8 + 2 * 2 + 10
    # the caption band holds dark text pixels
    band = np.asarray(captioned)[8 + 4 :, :, :]
    assert (band < 100).any()
    mixed = make_grid([Image.new("RGB", (4, 4)), Image.new("L", (6, 2))], ncols=1, padding=1)
    assert mixed.size == (6 + 2, 4 + 4 + 3)
    with pytest.raises(ImageError):
        make_grid([])
    with pytest.raises(ImageError, match="captions"):
        make_grid(imgs, captions=["x"])
    with pytest.raises(ImageError):
        make_grid(imgs, ncols=0)


def test_png_metadata_round_trip(tmp_path) -> None:
    meta = {"prompt": "a red circle", "seed": "7", "unicode": "café ☕"}
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "sub" / "x.png", meta)
    assert read_png_metadata(path) == meta
    path2 = save_png(torch.rand(3, 4, 4), tmp_path / "t.png")
    assert read_png_metadata(path2) == {}
    with pytest.raises(ImageError):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "y.png", {"": "empty key"})
    with pytest.raises(ImageError):
        read_png_metadata(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------- reconstruction + CLI
def _tiny_dvae() -> tuple[Encoder, Decoder]:
    torch.manual_seed(0)
    return (
        Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16).eval(),
        Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16).eval(),
    )


def test_reconstruct_function() -> None:
    enc, dec = _tiny_dvae()
    original, rec = reconstruct(sample_image_path(), enc, dec, size=32)
    assert original.size == rec.size == (32, 32) and rec.mode == "RGB"
    x = preprocess(sample_image_path(), size=32)
    assert torch.equal(to_tensor(original), to_tensor(to_pil((x[0] - 0.1) / 0.8)))
    expected = to_pil(dec.decode(enc.encode(x))[0])
    assert np.array_equal(np.asarray(rec), np.asarray(expected))
    with pytest.raises(ImageError, match="vocab"):
        reconstruct(
            sample_image_path(), enc, Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32), 32
        )
    small = Image.new("RGB", (16, 16), (200, 30, 30))
    with pytest.raises(
        ImageError, match="allow_upscale"
    ):  # the same default as preprocess and DALLE.reconstruct
        reconstruct(small, enc, dec, size=32)
    assert reconstruct(small, enc, dec, size=32, allow_upscale=True)[1].size == (32, 32)


def test_reconstruct_cli(tmp_path, capsys) -> None:
    from dalle.cli import main
    from dalle.loading import save_model

    enc, dec = _tiny_dvae()
    torch.save(enc, tmp_path / "enc.pkl", _use_new_zipfile_serialization=False)
    dec_path = save_model(dec, tmp_path / "dec")
    out = tmp_path / "rec.png"
    rc = main(
        [
            "reconstruct",
            str(sample_image_path()),
            "--encoder",
            str(tmp_path / "enc.pkl"),
            "--decoder",
            str(dec_path),
            "--size",
            "32",
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "enc.pkl" in printed and "dec.safetensors" in printed and str(out) in printed
    grid = Image.open(out)
    assert grid.width >= 2 * 32 and grid.height > 32
    meta = read_png_metadata(out)
    assert "enc.pkl" in meta["weights"] and meta["size"] == "32"
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", "--encoder", str(tmp_path / "enc.pkl"), "--output", str(out)])
    assert info.value.code == 2
    rc = main(
        [
            "reconstruct",
            "--encoder",
            str(dec_path),
            "--decoder",
            str(tmp_path / "enc.pkl"),
            "--size",
            "32",
            "--output",
            str(out),
        ]
    )
    assert rc != 0
    capsys.readouterr()
    assert main(["reconstruct", "--model", str(tmp_path / "no-such-model"), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no dVAE weights" in err and "no-such-model" in err and "--encoder" in err

"""Training data: folders, tar shards, corrupt images, deterministic sharded batches, token shards."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.data.datasets import (
    ImageTextFolder,
    ShapesSource,
    TarShards,
    TokenShards,
    TokenShardWriter,
    center_crop,
    dvae_augment,
    make_batches,
    open_source,
    split_batch,
    to_uint8_tensor,
    transformer_augment,
)
from dalle.errors import ConfigError
from dalle.train.testing import make_image_folder, make_tar_shards, make_tiny_dvae_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_folder_source_and_corrupt_images_are_skipped_and_named(tmp_path) -> None:
    root = make_image_folder(tmp_path / "f", n=6, corrupt=(1, 3))
    (tmp_path / "f" / "no_caption.png").write_bytes((tmp_path / "f" / "img_000.png").read_bytes())
    with pytest.warns(UserWarning, match="1 images .* no .txt caption"):
        src = ImageTextFolder(root)
    assert len(src) == 6
    img, cap, name = src.get(1)
    assert img is None and name.endswith("img_001.png") and cap == "caption number 1"
    batches = _take(make_batches(src, batch_size=4, seed=0, transform=lambda im, r: center_crop(im, 16)), 3)
    skipped = {s for b in batches for s in b.skipped}
    assert {s.rsplit("/", 1)[1] for s in skipped} == {"img_001.png", "img_003.png"}
    for b in batches:
        assert b.images.shape == (4, 3, 16, 16) and b.images.dtype == torch.uint8
        assert all(c.startswith("caption number ") for c in b.captions)
        assert not {"caption number 1", "caption number 3"} & set(b.captions)
    assert ImageTextFolder(root, require_captions=False).get(0)[1] == "caption number 0"


def test_batches_depend_only_on_the_step_and_shard_across_ranks() -> None:
    src = ShapesSource(seed=3, size=32)
    one = _take(make_batches(src, batch_size=4, seed=1), 3)
    resumed = _take(make_batches(src, batch_size=4, seed=1, start_step=2), 1)[0]
    assert resumed.captions == one[2].captions and torch.equal(resumed.images, one[2].images)
    r0 = _take(make_batches(src, batch_size=2, rank=0, world_size=2, seed=1), 3)
    r1 = _take(make_batches(src, batch_size=2, rank=1, world_size=2, seed=1), 3)
    for s in range(3):
        assert r0[s].captions + r1[s].captions == one[s].captions
        assert r0[s].positions + r1[s].positions == one[s].positions
    parts = split_batch(one[0], 3)
    assert [len(p) for p in parts] == [1, 2, 1] and sum((p.captions for p in parts), []) == one[0].captions


def test_epoch_permutation_covers_every_training_item(tmp_path) -> None:
    src = ImageTextFolder(make_image_folder(tmp_path / "f", n=10))
    batches = _take(
        make_batches(src, batch_size=4, seed=5, exclude_last=2, transform=lambda im, r: center_crop(im, 8)), 4
    )
    caps = [c for b in batches for c in b.captions]
    assert sorted(caps[:8]) == sorted(f"caption number {i}" for i in range(8))  # epoch 1: a permutation
    assert sorted(caps[8:16]) == sorted(caps[:8]) and caps[8:16] != caps[:8]  # epoch 2: reshuffled
    workers = _take(
        make_batches(
            src,
            batch_size=4,
            seed=5,
            exclude_last=2,
            num_workers=2,
            transform=lambda im, r: center_crop(im, 8),
        ),
        4,
    )
    assert [c for b in workers for c in b.captions] == caps


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_upscale_warning_is_shown_once_however_many_workers_see_small_images(
    tmp_path, kind, monkeypatch
) -> None:
    import warnings

    import dalle.data.datasets as ds
    from dalle.data.datasets import open_source

    if kind == "folder":
        src = ImageTextFolder(make_image_folder(tmp_path / "f", n=8))
    else:
        make_tar_shards(tmp_path / "t", n_shards=2, per_shard=4)
        src = open_source(str(tmp_path / "t"))
    monkeypatch.setattr(ds, "_upscale_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = _take(
            make_batches(
                src, batch_size=2, seed=0, num_workers=2, transform=lambda im, r: center_crop(im, 96)
            ),
            6,
        )  # every image is smaller
    upscaled = [w for w in caught if "upscaled" in str(w.message)]
    assert len(upscaled) == 1, [str(w.message) for w in caught]  # one, not one per worker
    assert all(b.images.shape[-1] == 96 for b in batches)
    assert sum(len(b.notes) for b in batches) == 2  # each worker noted its first upscale once


def test_tar_shards_stream_skip_corrupt_and_resume(tmp_path) -> None:
    make_tar_shards(tmp_path / "t", n_shards=2, per_shard=4, corrupt=(2,))
    src = open_source(tmp_path / "t")
    assert isinstance(src, TarShards) and len(src.files) == 2
    raw = list(src.iter_raw(src.files))
    assert [key.rsplit(":", 1)[1] for _, _, key in raw] == [f"sample{k:05d}" for k in range(8)]
    assert raw[0][1] == "tar caption 0"
    crop = lambda im, r: center_crop(im, 16)  # noqa: E731
    batches = _take(make_batches(src, batch_size=4, seed=0, shuffle=False, transform=crop), 4)
    assert any(s.endswith("sample00002") for b in batches for s in b.skipped)
    assert all(len(b) == 4 and b.images.shape[1:] == (3, 16, 16) for b in batches)
    resumed = _take(make_batches(src, batch_size=4, seed=0, start_step=3, transform=crop), 1)[0]
    assert resumed.captions == batches[3].captions and torch.equal(resumed.images, batches[3].images)
    ranks = [
        _take(make_batches(src, batch_size=2, rank=r, world_size=2, seed=0, transform=crop), 2)
        for r in (0, 1)
    ]
    caps0 = {c for b in ranks[0] for c in b.captions}
    caps1 = {c for b in ranks[1] for c in b.captions}
    assert caps0 and caps1 and not caps0 & caps1  # one shard per rank


def test_augmentations_keep_size_and_are_seeded() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    for fn in (lambda r: dvae_augment(img, 64, r), lambda r: transformer_augment(img, 64, r)):
        a, b = fn(random.Random(1)), fn(random.Random(1))
        assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    assert center_crop(img, 32).size == (32, 32)
    with pytest.warns(UserWarning, match="upscaled"):
        import dalle.data.datasets as ds

        ds._upscale_warned = False
        assert center_crop(img.resize((20, 20)), 32).size == (32, 32)


def test_open_source_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot use"):
        open_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        open_source(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no captions"):
        open_source("shapes-dense")  # uncaptioned: dVAE only
    with pytest.raises(ConfigError, match="must be an integer"):
        open_source("shapes:x")


def test_shapes_sources_and_dense_scenes() -> None:
    from dalle.data import shapes

    plain, dense = (
        open_source("shapes:3", size=64),
        open_source("shapes-dense:3", require_captions=False, size=64),
    )
    img, caption, key = plain.get(5)
    assert key == "shapes:3:5" and caption == shapes.sample(5, seed=3)[1] and img.size == (64, 64)
    img, caption, key = dense.get(5)
    assert key == "shapes-dense:3:5" and caption == "" and img.size == (64, 64)
    assert img.tobytes() == shapes.dense_sample(5, seed=3, size=64)[0].tobytes()


def test_encode_dataset_equals_encoding_on_the_fly(tmp_path, capsys) -> None:
    from dalle.cli import main
    from dalle.train.config import TransformerTrainConfig
    from dalle.train.exports import load_dvae
    from dalle.train.transformer import TransformerTrainer, encode_images

    dvae = make_tiny_dvae_dir(tmp_path / "dvae", image_size=32)
    make_image_folder(tmp_path / "imgs", n=7, corrupt=(4,))
    out = tmp_path / "tokens"
    rc = main(
        [
            "encode-dataset",
            "--data",
            str(tmp_path / "imgs"),
            "--dvae",
            str(dvae),
            "--out",
            str(out),
            "--batch-size",
            "3",
            "--shard-size",
            "4",
            "--no-progress",
        ]
    )
    assert rc == 0
    shards = TokenShards(out)
    assert len(shards) == 6 and len(shards.meta["shards"]) == 2 and shards.meta["skipped_images"] == 1
    assert shards.tokens[0].dtype == np.uint16
    encoder, _, _ = load_dvae(dvae)
    by_caption = {}
    for i in range(len(shards)):
        tokens, caption, _ = shards.get(i)
        by_caption[caption] = tokens
    folder = ImageTextFolder(tmp_path / "imgs")
    for i in range(7):
        img, caption, _ = folder.get(i)
        if img is None:
            assert caption not in by_caption
            continue
        direct = encode_images(encoder, to_uint8_tensor(center_crop(img, 32))[None])[0].numpy()
        assert np.array_equal(by_caption[caption], direct)
    # the transformer trainer's on-the-fly path (no augmentation) gives the same tokens as the shards
    cfg = TransformerTrainConfig(
        out_dir=str(tmp_path / "run"),
        data=str(tmp_path / "imgs"),
        dvae=str(dvae),
        tokenizer_vocab=40,
        text_len=8,
        preset="tiny",
        batch_size=3,
        augment=False,
        eval_samples=0,
        bpe_dropout=0.0,
        progress=False,
    )
    trainer = TransformerTrainer(cfg)
    batch = next(trainer.batches(0))
    live = encode_images(trainer.encoder, batch.images)
    for caption, tokens in zip(batch.captions, live):
        assert np.array_equal(by_caption[caption], tokens.numpy())
    # empty caption files are said to train as caption-free samples
    make_image_folder(tmp_path / "quiet", n=3)
    (tmp_path / "quiet" / "img_001.txt").write_text("  \n")
    with pytest.warns(UserWarning, match="1 of 3 samples have an empty caption"):
        assert (
            main(
                [
                    "encode-dataset",
                    "--data",
                    str(tmp_path / "quiet"),
                    "--dvae",
                    str(dvae),
                    "--out",
                    str(tmp_path / "t3"),
                    "--no-progress",
                ]
            )
            == 0
        )
    from dalle.train.transformer import _collect_captions

    with pytest.warns(UserWarning, match="1 of the first 3 images have an empty caption file"):
        assert len(_collect_captions(ImageTextFolder(tmp_path / "quiet"), 100)) == 2
    # a folder whose images are all unreadable gives an error, not an empty dataset
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("a", "b"):
        (bad / f"{name}.png").write_bytes(b"not an image")
        (bad / f"{name}.txt").write_text("a red circle")
    assert (
        main(
            [
                "encode-dataset",
                "--data",
                str(bad),
                "--dvae",
                str(dvae),
                "--out",
                str(tmp_path / "t2"),
                "--no-progress",
            ]
        )
        == 1
    )
    assert not (tmp_path / "t2" / "meta.json").exists()
    assert "error: no readable image with a caption in" in capsys.readouterr().err
    # the shards record their encoder: training them under another dVAE of the same shape is refused
    other = make_tiny_dvae_dir(tmp_path / "other", image_size=32, seed=1)
    with pytest.raises(
        ConfigError, match=r"encoded by another dVAE than --dvae .*other \(its weights differ\)"
    ):
        TransformerTrainer(
            dataclasses.replace(cfg, data=str(out), dvae=str(other), out_dir=str(tmp_path / "r2"))
        )
    with pytest.raises(ConfigError, match="already holds token shards"):
        TokenShardWriter(out, grid=4, image_size=32, vocab_size=32)
    (meta := out / "meta.json").unlink()  # as an interrupted encode leaves it: shards, no meta.json
    with pytest.raises(ConfigError, match="is not empty .*interrupted encode"):
        TokenShardWriter(out, grid=4, image_size=32, vocab_size=32)
    assert not meta.exists() and any(out.iterdir())  # nothing was touched
    with pytest.raises(ConfigError, match="is a file"):
        TokenShardWriter(
            tmp_path / "imgs" / sorted(p.name for p in (tmp_path / "imgs").iterdir())[0],
            grid=4,
            image_size=32,
            vocab_size=32,
        )


def test_encode_dataset_upscale_warning_is_shown_once_with_workers(tmp_path, monkeypatch) -> None:
    import warnings

    import dalle.data.datasets as ds
    from dalle.cli import main

    dvae = make_tiny_dvae_dir(tmp_path / "dvae", image_size=32)
    make_image_folder(tmp_path / "imgs", n=8)  # every image is smaller than 96 px
    for workers in ("0", "2"):
        monkeypatch.setattr(ds, "_upscale_warned", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert (
                main(
                    [
                        "encode-dataset",
                        "--data",
                        str(tmp_path / "imgs"),
                        "--dvae",
                        str(dvae),
                        "--out",
                        str(tmp_path / f"out{workers}"),
                        "--image-size",
                        "96",
                        "--batch-size",
                        "2",
                        "--workers",
                        workers,
                        "--no-progress",
                    ]
                )
                == 0
            )
        upscaled = [w for w in caught if "upscaled" in str(w.message)]
        assert len(upscaled) == 1, (workers, [str(w.message) for w in caught])  # one, not one per worker
        assert len(TokenShards(tmp_path / f"out{workers}")) == 8


def test_encode_dataset_workers_and_image_size(tmp_path, capsys) -> None:
    from dalle.cli import main
    from dalle.data import shapes
    from dalle.train.config import TransformerTrainConfig
    from dalle.train.exports import load_dvae
    from dalle.train.transformer import TransformerTrainer, encode_images

    dvae = make_tiny_dvae_dir(tmp_path / "dvae", image_size=32)
    make_image_folder(tmp_path / "imgs", n=7, corrupt=(4,))
    make_tar_shards(tmp_path / "tars", n_shards=2, per_shard=4, corrupt=(2,))
    base = ["--dvae", str(dvae), "--batch-size", "3", "--no-progress"]
    for data, limit, count in (
        (tmp_path / "imgs", [], 6),
        (tmp_path / "imgs", ["--limit", "5"], 4),
        ("shapes:4", ["--limit", "7"], 7),
        (tmp_path / "tars", [], 7),
    ):
        runs = []
        for workers in ("0", "2"):  # tar shards are a stream and ignore the workers
            out = tmp_path / f"{len(runs)}-{count}-{str(data)[-4:]}"
            assert (
                main(
                    [
                        "encode-dataset",
                        "--data",
                        str(data),
                        "--out",
                        str(out),
                        *base,
                        *limit,
                        "--workers",
                        workers,
                    ]
                )
                == 0
            )
            runs.append(TokenShards(out))
        serial, parallel = runs
        assert len(serial) == len(parallel) == count
        assert serial.meta["skipped_images"] == parallel.meta["skipped_images"]
        for i in range(count):  # same samples, same order, same tokens
            a, b = serial.get(i), parallel.get(i)
            assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    # an endless source without --limit: an error before anything is written
    assert main(["encode-dataset", "--data", "shapes", "--out", str(tmp_path / "endless"), *base]) != 0
    assert "--limit" in capsys.readouterr().err and not (tmp_path / "endless").exists()

    # a larger side than the dVAE's own: a larger grid, equal to encoding the larger render directly
    out = tmp_path / "big"
    assert (
        main(
            [
                "encode-dataset",
                "--data",
                "shapes:2",
                "--limit",
                "5",
                "--out",
                str(out),
                "--image-size",
                "48",
                "--workers",
                "2",
                *base,
            ]
        )
        == 0
    )
    shards = TokenShards(out)
    assert shards.grid == 6 and shards.meta["image_size"] == 48
    encoder, _, _ = load_dvae(dvae)
    img, caption = shapes.sample(3, seed=2, size=48)
    tokens, stored_caption, _ = shards.get(3)
    assert stored_caption == caption
    assert np.array_equal(tokens, encode_images(encoder, to_uint8_tensor(img)[None])[0].numpy())
    assert (
        main(
            [
                "encode-dataset",
                "--data",
                "shapes:2",
                "--limit",
                "5",
                "--out",
                str(tmp_path / "bad"),
                "--image-size",
                "50",
                *base,
            ]
        )
        != 0
    )
    assert "multiple of 8" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert (
        main(
            [
                "encode-dataset",
                "--data",
                "shapes:2",
                "--limit",
                "5",
                "--out",
                str(tmp_path / "zero"),
                *base,
                "--batch-size",
                "0",
            ]
        )
        != 0
    )
    assert "--batch-size" in capsys.readouterr().err and not (tmp_path / "zero").exists()
    # the transformer trainer works at that side when told, and refuses shards of another grid otherwise
    settings = dict(
        data=str(out),
        dvae=str(dvae),
        tokenizer_vocab=40,
        text_len=8,
        preset="tiny",
        batch_size=2,
        eval_samples=0,
        bpe_dropout=0.0,
        progress=False,
    )
    trainer = TransformerTrainer(
        TransformerTrainConfig(out_dir=str(tmp_path / "run"), image_size=48, **settings)
    )
    assert trainer.image_size == 48 and trainer.net.transformer.config.image_grid == 6
    # without --image-size the shards' own side is used; another side is refused
    trainer = TransformerTrainer(TransformerTrainConfig(out_dir=str(tmp_path / "run2"), **settings))
    assert trainer.image_size == 48
    with pytest.raises(ConfigError, match=r"6x6 .* give --image-size 48"):
        TransformerTrainer(TransformerTrainConfig(out_dir=str(tmp_path / "run3"), image_size=32, **settings))


def test_training_images_are_decoded_as_inference_decodes_them(tmp_path) -> None:
    """16-bit and float images, EXIF rotation and transparency: the training loader and load_image agree."""
    import numpy as np
    from PIL import Image

    from dalle.data.datasets import ImageTextFolder
    from dalle.images import load_image

    ramp = (np.arange(48 * 40, dtype=np.uint32).reshape(40, 48) * 30).astype(
        np.uint16
    )  # up to 57570 of 65535
    Image.fromarray(ramp).save(tmp_path / "a16.png")
    rotated = Image.new("RGB", (48, 32), (200, 30, 30))
    rotated.paste((30, 30, 200), (0, 0, 24, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated.save(tmp_path / "b_exif.jpg", exif=exif, quality=95)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((10, 170, 70, 128), (0, 0, 20, 40))
    rgba.save(tmp_path / "c_alpha.png")
    for name in ("a16", "b_exif", "c_alpha"):
        (tmp_path / f"{name}.txt").write_text("a caption")
    folder = ImageTextFolder(tmp_path)
    for i, path in enumerate(folder.files):
        image, _, _ = folder.get(i)
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(load_image(path))), path.name
    sixteen = np.asarray(folder.get(0)[0])
    assert 100 < sixteen.mean() < 130  # scaled from 16 bits, not clipped to white
    assert folder.get(1)[0].size == (32, 48)  # turned upright


def test_data_that_leaves_nothing_to_train_on_is_explained(tmp_path) -> None:
    """A single tar shard held out whole for evaluation, and a folder of unreadable images: each says why."""
    from dalle.data.datasets import ImageTextFolder, make_batches, open_source
    from dalle.errors import ImageError
    from dalle.train.testing import make_image_folder, make_tar_shards

    make_tar_shards(tmp_path / "tar", n_shards=1, per_shard=4)
    shard = tmp_path / "tar" / "shard-00000.tar"
    source = open_source(str(shard), size=32)
    held = frozenset(f"{shard}:sample{k:05d}" for k in range(4))
    with pytest.raises(ConfigError, match="after 4 were held out for evaluation .*lower --eval-samples"):
        next(make_batches(source, batch_size=2, exclude_keys=held))
    make_image_folder(tmp_path / "bad", n=5, corrupt=(0, 1, 2, 3, 4))
    with pytest.raises(ImageError, match="none of the 5 training images is readable"):
        next(make_batches(ImageTextFolder(tmp_path / "bad"), batch_size=2))


def test_token_shards_refuse_ids_outside_the_vocabulary(tmp_path) -> None:
    """Ids are checked where they enter (the transformer does not read them back from a GPU in training)."""
    writer = TokenShardWriter(tmp_path / "tokens", grid=2, image_size=16, vocab_size=8)
    writer.add(np.array([[0, 1, 2, 7], [1, 2, 3, 9]], dtype=np.int64), ["fine", "corrupt"])
    writer.close()
    shards = TokenShards(tmp_path / "tokens")
    assert shards.get(0)[1] == "fine"
    with pytest.raises(ConfigError, match="outside the vocabulary of 8 codes"):
        shards.get(1)

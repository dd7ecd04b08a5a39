"""dalle.train.remap: a new dVAE under a trained transformer, its codes matched to the old ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dalle.cli import main as cli_main
from dalle.data.datasets import TokenShardWriter
from dalle.errors import ConfigError
from dalle.pipeline import DALLE
from dalle.train.exports import save_dvae_dir
from dalle.train.remap import remap_image_codes
from dalle.train.testing import make_tiny_dvae_dir
from tests.test_pipeline import build_tiny


def _permuted_dvae(pipe: DALLE, perm: torch.Tensor, path) -> None:
    """The pipeline's dVAE with its codes renumbered: new code j is old code perm[j]."""
    enc, dec = copy.deepcopy(pipe.encoder), copy.deepcopy(pipe.decoder)
    with torch.no_grad():
        out = enc.blocks.output.conv
        out.w.copy_(out.w[perm])
        out.b.copy_(out.b[perm])
        dec.blocks.input.w.copy_(dec.blocks.input.w[:, perm])
    save_dvae_dir(path, enc, dec, pipe.image_size)


def test_a_renumbered_dvae_is_matched_code_for_code(tmp_path, capsys) -> None:
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(3))
    _permuted_dvae(pipe, perm, tmp_path / "new")
    summary = remap_image_codes(tmp_path / "model", tmp_path / "new", tmp_path / "out", scenes=24, seed=1)
    assert summary["agreement"] == 1.0 and summary["new_codes_used"] == summary["old_codes_used"] > 1
    assert summary["map"] == {j: int(perm[j]) for j in summary["map"]}
    assert json.loads((tmp_path / "out" / "code_map.json").read_text())["map"] == {
        str(j): c for j, c in summary["map"].items()
    }

    out = DALLE.from_pretrained(tmp_path / "out", device="cpu")
    old, new = pipe.transformer, out.transformer
    used = torch.tensor(sorted(summary["map"]))
    unused = torch.tensor([j for j in range(32) if j not in summary["map"]])
    assert torch.equal(new.image_emb.weight[used], old.image_emb.weight[perm[used]])
    assert torch.equal(new.image_head.weight[used], old.image_head.weight[perm[used]])
    assert torch.equal(
        new.image_head.weight[unused], old.image_head.weight[unused]
    )  # unused codes keep their rows
    assert torch.equal(new.image_emb.weight[32], old.image_emb.weight[32])  # the image start token
    assert torch.equal(new.text_emb.weight, old.text_emb.weight)
    # the new model's dVAE is the new one: its codes of an image are the old codes renumbered
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(perm[out.encoder.encode(image)], pipe.encoder.encode(image))

    assert (
        cli_main(
            [
                "remap",
                str(tmp_path / "model"),
                str(tmp_path / "new"),
                str(tmp_path / "cli2"),
                "--scenes",
                "8",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert "the match holds on 100.0% of cells" in capsys.readouterr().out


def test_a_dvae_of_another_size_or_vocabulary_is_refused(tmp_path, capsys) -> None:
    build_tiny().save_pretrained(tmp_path / "model")
    make_tiny_dvae_dir(tmp_path / "big", image_size=64)
    with pytest.raises(ConfigError, match="--image-size 32"):
        remap_image_codes(tmp_path / "model", tmp_path / "big", tmp_path / "out")
    make_tiny_dvae_dir(tmp_path / "wide", vocab_size=64)
    with pytest.raises(ConfigError, match="--vocab-size 32"):
        remap_image_codes(tmp_path / "model", tmp_path / "wide", tmp_path / "out")
    with pytest.raises(ConfigError, match="--scenes"):
        remap_image_codes(tmp_path / "model", tmp_path / "wide", tmp_path / "out", scenes=0)
    assert cli_main(["remap", str(tmp_path / "model"), str(tmp_path / "wide"), str(tmp_path / "out")]) == 1
    assert "error: the new dVAE has 64 codes" in capsys.readouterr().err  # one line, no traceback
    assert not (tmp_path / "out").exists()


def test_codes_can_be_matched_on_a_folder_of_images(tmp_path) -> None:
    """--data: the user's own images (any size, unreadable ones skipped) instead of the shapes world."""
    from PIL import Image

    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(5))
    _permuted_dvae(pipe, perm, tmp_path / "new")
    photos = tmp_path / "photos"
    photos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):  # random blocky images of varying sizes, no captions
        small = (torch.rand(3, 4, 5, generator=g) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(small).resize((40 + 8 * i, 48), Image.NEAREST).save(photos / f"{i}.png")
    (photos / "broken.png").write_bytes(b"not a png")
    summary = remap_image_codes(
        tmp_path / "model", tmp_path / "new", tmp_path / "out", scenes=5, data=str(photos)
    )
    assert summary["data"] == str(photos) and summary["scenes"] == 5
    assert summary["agreement"] == 1.0 and summary["map"] == {j: int(perm[j]) for j in summary["map"]}
    # the broken file is skipped: asking for all 7 reads the 6 good ones
    assert (
        remap_image_codes(tmp_path / "model", tmp_path / "new", tmp_path / "all", scenes=7, data=str(photos))[
            "scenes"
        ]
        == 6
    )


def test_image_sources_without_images_are_refused(tmp_path, capsys) -> None:
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    _permuted_dvae(pipe, torch.arange(32), tmp_path / "new")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ConfigError, match="no readable image"):
        remap_image_codes(tmp_path / "model", tmp_path / "new", tmp_path / "out", data=str(broken))
    shards = tmp_path / "tokens"
    writer = TokenShardWriter(shards, grid=4, image_size=32, vocab_size=32)
    writer.add(torch.zeros(1, 16, dtype=torch.int64), ["a red circle"])
    writer.close()
    with pytest.raises(ConfigError, match="encoded tokens, not images"):
        remap_image_codes(tmp_path / "model", tmp_path / "new", tmp_path / "out", data=str(shards))
    assert (
        cli_main(
            [
                "remap",
                str(tmp_path / "model"),
                str(tmp_path / "new"),
                str(tmp_path / "out"),
                "--data",
                str(tmp_path / "nope"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_training_run_directory_is_taken_for_its_dvae_and_out_must_be_new(tmp_path, capsys) -> None:
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    _permuted_dvae(
        pipe, torch.arange(32), tmp_path / "run" / "dvae"
    )  # as `dalle train-dvae --out run` writes it
    assert (
        remap_image_codes(tmp_path / "model", tmp_path / "run", tmp_path / "out", scenes=4)["agreement"]
        == 1.0
    )
    before = (tmp_path / "out" / "transformer.safetensors").read_bytes()
    for out in ("out", "model"):  # an existing model (or the input itself) is never overwritten
        assert (
            cli_main(
                [
                    "remap",
                    str(tmp_path / "model"),
                    str(tmp_path / "run"),
                    str(tmp_path / out),
                    "--scenes",
                    "4",
                ]
            )
            == 1
        )
        assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "transformer.safetensors").read_bytes() == before

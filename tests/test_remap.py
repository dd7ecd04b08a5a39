"""dalle.train.remap: a new dVAE under a trained transformer, its codes matched to the old ones."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dalle.errors import ConfigError
from dalle.pipeline import DALLE
from dalle.train.common import save_dvae_dir
from dalle.train.remap import main, remap_image_codes
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
    assert torch.equal(new.image_head.weight[unused], old.image_head.weight[unused])  # unused codes keep their rows
    assert torch.equal(new.image_emb.weight[32], old.image_emb.weight[32])  # the image start token
    assert torch.equal(new.text_emb.weight, old.text_emb.weight)
    # the new model's dVAE is the new one: its codes of an image are the old codes renumbered
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(perm[out.encoder.encode(image)], pipe.encoder.encode(image))

    main([str(tmp_path / "model"), str(tmp_path / "new"), str(tmp_path / "cli"), "--scenes", "8"])
    assert "the match holds on 100.0% of cells" in capsys.readouterr().out


def test_a_dvae_of_another_size_or_vocabulary_is_refused(tmp_path) -> None:
    build_tiny().save_pretrained(tmp_path / "model")
    make_tiny_dvae_dir(tmp_path / "big", image_size=64)
    with pytest.raises(ConfigError, match="--image-size 32"):
        remap_image_codes(tmp_path / "model", tmp_path / "big", tmp_path / "out")
    make_tiny_dvae_dir(tmp_path / "wide", vocab_size=64)
    with pytest.raises(ConfigError, match="--vocab-size 32"):
        remap_image_codes(tmp_path / "model", tmp_path / "wide", tmp_path / "out")
    with pytest.raises(ConfigError, match="--scenes"):
        remap_image_codes(tmp_path / "model", tmp_path / "wide", tmp_path / "out", scenes=0)
    with pytest.raises(SystemExit, match="error: .*--vocab-size 32"):
        main([str(tmp_path / "model"), str(tmp_path / "wide"), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()

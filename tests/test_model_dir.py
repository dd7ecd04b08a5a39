"""One model-directory format: one version, one writer (dalle.model_dir.write_model_files), one reader."""

from __future__ import annotations

import json

import pytest
import torch

from dalle.errors import ModelLoadError
from tests.test_pipeline import build_tiny


def test_one_version_for_every_writer_and_reader() -> None:
    import dalle.model_dir as model_dir
    import dalle.pipeline as pipeline
    import dalle.train.common as common
    import dalle.train.exports as exports

    assert pipeline.FORMAT_VERSION == exports.MODEL_FORMAT_VERSION == common.MODEL_FORMAT_VERSION == 1
    assert (
        pipeline.FORMAT_VERSION is model_dir.FORMAT_VERSION
        and exports.MODEL_FORMAT_VERSION is model_dir.FORMAT_VERSION
    )
    assert common.write_model_dir is exports.write_model_dir and common.save_dvae_dir is exports.save_dvae_dir


def test_save_pretrained_and_the_trainers_export_write_the_same_files(tmp_path) -> None:
    from dalle.train.exports import write_model_dir

    pipe = build_tiny(trained_with_caption_dropout=True)
    pipe.save_pretrained(tmp_path / "pipeline")
    write_model_dir(
        tmp_path / "trainer",
        pipe.tokenizer,
        pipe.encoder,
        pipe.decoder,
        pipe.transformer,
        pipe.image_size,
        pipe.name,
        trained_with_caption_dropout=True,
    )
    names = sorted(p.name for p in (tmp_path / "pipeline").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "trainer").iterdir())
    assert names == sorted(
        [
            "config.json",
            "transformer.safetensors",
            "encoder.safetensors",
            "decoder.safetensors",
            "tokenizer.model",
        ]
    )
    for name in names:  # byte for byte
        assert (tmp_path / "pipeline" / name).read_bytes() == (tmp_path / "trainer" / name).read_bytes(), name
    for dtype, name in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        pipe.save_pretrained(tmp_path / f"p-{name}", weights_dtype=dtype)
        write_model_dir(
            tmp_path / f"t-{name}",
            pipe.tokenizer,
            pipe.encoder,
            pipe.decoder,
            pipe.transformer,
            pipe.image_size,
            pipe.name,
            trained_with_caption_dropout=True,
            weights_dtype=name,
        )
        for file in names:
            assert (tmp_path / f"p-{name}" / file).read_bytes() == (
                tmp_path / f"t-{name}" / file
            ).read_bytes()


def test_dvae_directories_are_the_image_tokenizer_half(tmp_path) -> None:
    from dalle.train.exports import load_dvae, save_dvae_dir

    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    save_dvae_dir(tmp_path / "dvae", pipe.encoder, pipe.decoder, pipe.image_size, {"steps": 3})
    config = json.loads((tmp_path / "dvae" / "config.json").read_text())
    assert config == {
        "format_version": 1,
        "kind": "dvae",
        "image_size": 32,
        "encoder": pipe.encoder.config(),
        "decoder": pipe.decoder.config(),
        "steps": 3,
    }
    for name in ("encoder.safetensors", "decoder.safetensors"):
        assert (tmp_path / "dvae" / name).read_bytes() == (tmp_path / "model" / name).read_bytes()
    x = torch.rand(1, 3, 32, 32)
    for source in ("dvae", "model"):
        enc, dec, size = load_dvae(tmp_path / source)
        assert size == 32 and torch.equal(enc.encode(x), pipe.encoder.encode(x))


def test_load_transformer_reads_the_transformer_of_a_model_directory(tmp_path) -> None:
    from dalle.model_dir import load_transformer

    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "half", weights_dtype=torch.float16)
    transformer = load_transformer(tmp_path / "half")
    assert transformer.config == pipe.transformer.config and not transformer.training
    for key, value in pipe.transformer.state_dict().items():
        assert transformer.state_dict()[key].dtype == torch.float32
        torch.testing.assert_close(transformer.state_dict()[key], value.half().float())
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    (tmp_path / "half" / "config.json").write_text(json.dumps({**config, "architecture": "rudalle"}))
    with pytest.raises(ModelLoadError, match="from_pretrained"):
        load_transformer(tmp_path / "half")
    (tmp_path / "half" / "config.json").write_text(json.dumps({**config, "transformer": {"depth": "x"}}))
    with pytest.raises(ModelLoadError, match="invalid model"):
        load_transformer(tmp_path / "half")

"""The bundled default model (`shapes`): installed with the package, loads and generates offline on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dalle.pipeline import DALLE, REGISTRY, describe_model

MiB = 2**20


def test_bundled_files_fit_the_size_budget():
    total = 0
    for (
        name,
        path,
    ) in REGISTRY.items():  # shapes (256 px, the default) and shapes-128 (the faster, weaker one)
        files = [f for f in path.iterdir() if f.is_file()]
        assert {f.name for f in files} >= {
            "config.json",
            "transformer.safetensors",
            "encoder.safetensors",
            "decoder.safetensors",
            "tokenizer.model",
        }
        assert all(f.stat().st_size <= 16 * MiB for f in files)
        total += sum(f.stat().st_size for f in files)
        config = json.loads((path / "config.json").read_text())
        assert config["image_size"] >= 128 and config["name"] == name
        assert name in describe_model(name)
    assert total <= 40 * MiB  # all bundled models together
    assert json.loads((REGISTRY["shapes"] / "config.json").read_text())["image_size"] == 256


@pytest.mark.integration
@pytest.mark.parametrize("name", ["shapes", "shapes-128"])
def test_bundled_model_generates_on_cpu(name):
    pipe = DALLE.from_pretrained(name, device="cpu")
    out = pipe.generate(
        ["a large red circle", "a blue square on the left"],
        num_images=1,
        seed=0,
        progress=False,
        return_tokens=True,
    )
    assert len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (pipe.image_size,) * 2 for im in out.images)
    assert out.tokens.shape == (2, pipe.grid, pipe.grid)
    assert int(out.tokens.max()) < pipe.transformer.config.image_vocab_size
    again = pipe.generate("a blue square on the left", seed=0, progress=False, return_tokens=True)
    assert torch.equal(again.tokens[0], out.tokens[1])
    # the pictures are not blank: some pixels differ from the white background
    assert any(min(im.convert("L").getextrema()) < 200 for im in out.images)


def test_bundled_dvae_reconstructs_a_rendered_scene():
    from dalle.data.shapes import render

    pipe = DALLE.from_pretrained("shapes", device="cpu")
    scene = render("a large blue square", size=pipe.image_size, seed=1)
    rec = pipe.reconstruct(scene)
    assert rec.size == scene.size
    # the reconstruction keeps the object's colour where the object is
    import numpy as np

    a, b = np.asarray(scene, dtype=np.float32), np.asarray(rec, dtype=np.float32)
    mse = float(((a - b) ** 2).mean())
    psnr = 10 * np.log10(255.0**2 / mse)
    assert psnr > 15, psnr


@pytest.mark.integration
def test_bundled_model_draws_the_colour_and_shape_it_is_asked_for():
    """A behavioural floor, far below the evaluation's targets: the model has learned colours and shapes."""
    from dalle.data import shapes

    pipe = DALLE.from_pretrained("shapes", device="cpu")
    prompts = ["a large blue square", "a large red triangle", "a large yellow circle"]
    images = pipe.generate(prompts, num_images=4, seed=0, progress=False)  # prompt-major: 4 per prompt
    assert len(images) == 12
    colour_right = shape_right = 0
    for k, image in enumerate(images):
        want = shapes.parse_caption(prompts[k // 4]).objects[0]
        found = shapes.parse(image)
        colour_right += any(o.colour == want.colour for o in found)
        shape_right += any((o.colour, o.shape) == (want.colour, want.shape) for o in found)
    assert colour_right >= 10, colour_right  # of 12
    assert shape_right >= 6, shape_right


def test_the_recipe_configs_are_valid_and_used_by_the_script() -> None:
    """Every config of the bundled model's recipe parses into its trainer's settings (so a renamed field
    cannot silently break the recipe), and train.sh or train-256.sh runs each of them."""
    from dalle.cli import build_parser
    from dalle.cli.train import build_config
    from dalle.train.config import DVAETrainConfig, TransformerTrainConfig

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "shapes"
    script = (recipe / "train.sh").read_text() + (recipe / "train-256.sh").read_text()
    configs = sorted(recipe.glob("*.json"))
    assert len(configs) >= 2
    for path in configs:
        command, cls = (
            ("train-dvae", DVAETrainConfig) if path.stem == "dvae" else ("train", TransformerTrainConfig)
        )
        cfg = build_config(cls, build_parser().parse_args([command, "--config", str(path)]), command)
        cfg.validate()
        assert f"--config recipes/shapes/{path.name}" in script

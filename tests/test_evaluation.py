"""Tests of dalle.evaluation and `dalle evaluate` with fake models (independent of the real pipeline)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from PIL import Image

from dalle.data import shapes
from dalle.errors import ConfigError
from dalle.evaluation import TARGETS, evaluate, format_results, reconstruction_psnr


class FakeEncoder:
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] == 3
        return x  # "tokens" are the mapped pixels themselves


class FakeDecoder:
    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return ((z - 0.1) / 0.8 + self.offset).clamp(0, 1)  # unmap_pixels, then an optional error


def recolour(prompt: str) -> str:
    spec = shapes.parse_caption(prompt)
    first = spec.objects[0]
    colours = list(shapes.COLOURS)
    other = colours[(colours.index(first.colour) + 1) % len(colours)]
    changed = shapes.ObjectSpec(other, first.shape, first.size, first.position)
    return shapes.make_caption(shapes.CaptionSpec((changed, *spec.objects[1:]), spec.relation))


class FakeModel:
    """generate() returns ground-truth renders (``mode="truth"``), blank images, or swaps colours."""

    def __init__(self, mode: str = "truth", image_size: int = 64, offset: float = 0.0) -> None:
        self.mode = mode
        self.image_size = image_size
        self.name = f"fake-{mode}"
        self.encoder = FakeEncoder()
        self.decoder = FakeDecoder(offset)
        self.calls: list[dict] = []

    def generate(self, prompts, num_images=1, seed=None, **kwargs):
        self.calls.append(dict(prompts=list(prompts), num_images=num_images, seed=seed, **kwargs))
        out = []
        for p in prompts:
            for k in range(num_images):
                if self.mode == "blank":
                    out.append(Image.new("RGB", (self.image_size,) * 2, "white"))
                elif self.mode == "half" and k % 2:  # every second image shows the wrong colour
                    out.append(shapes.render(recolour(p), self.image_size, seed=seed + k))
                else:
                    out.append(shapes.render(p, self.image_size, seed=seed + k))
        return out


def test_ground_truth_images_score_100_percent(tmp_path):
    model = FakeModel("truth")
    res = evaluate(
        model,
        prompts_per_set=6,
        images_per_prompt=2,
        seed=3,
        out_dir=tmp_path,
        psnr_images=5,
        examples_per_set=4,
    )
    assert set(res["sets"]) == set(shapes.EVAL_SETS)
    for name, r in res["sets"].items():
        assert (r["accuracy"], r["correct"], r["total"], r["prompts"]) == (1.0, 12, 12, 6)
        assert r["failures"] == {} and r["target"] == TARGETS[name]
        assert [p["prompt"] for p in r["per_prompt"]] == shapes.eval_prompts(name, 6)
    rec = res["reconstruction"]
    assert rec["images"] == 5 and rec["psnr_mean"] == pytest.approx(100.0) and rec["checker_accuracy"] == 1.0
    # the files: JSON equal to the returned dict, a grid of 3 sets + 1 reconstruction row of 4 examples
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    grid = Image.open(tmp_path / "examples.png")
    assert grid.width >= 4 * 64 and grid.height >= 4 * 64
    assert res["files"] == {
        "examples": str(tmp_path / "examples.png"),
        "results": str(tmp_path / "results.json"),
    }
    text = format_results(res)
    assert "one_object_seen" in text and "100.0%" in text and "12/12" in text and "PSNR 100.00 dB" in text


def test_blank_images_score_zero_and_name_the_reason():
    res = evaluate(FakeModel("blank"), prompts_per_set=3, images_per_prompt=2, psnr_images=0)
    for r in res["sets"].values():
        assert r["accuracy"] == 0.0 and r["failures"] == {"count": 6}
    assert res["reconstruction"] is None and res["files"] == {}


def test_wrong_images_are_counted_per_image():
    res = evaluate(
        FakeModel("half"), prompts_per_set=15, images_per_prompt=2, psnr_images=0, sets=["one_object_seen"]
    )
    r = res["sets"]["one_object_seen"]
    assert r["correct"] == 15 and r["total"] == 30 and r["accuracy"] == 0.5
    assert r["failures"] == {"colour": 15}
    assert all(p["correct"] == 1 and p["total"] == 2 for p in r["per_prompt"])


def test_generate_is_called_with_the_documented_arguments():
    model = FakeModel()
    evaluate(
        model,
        prompts_per_set=40,
        images_per_prompt=4,
        seed=7,
        guidance_scale=3.0,
        rerank=8,
        psnr_images=0,
        sets=["two_objects_seen"],
    )
    assert [len(c["prompts"]) for c in model.calls] == [16, 16, 8]  # groups of ~64 images
    for call in model.calls:
        assert call["num_images"] == 4 and call["seed"] == 7  # same base seed in every call
        assert call["temperature"] == 1.0 and call["progress"] is False
        assert call["guidance_scale"] == 3.0 and call["rerank"] == 8
        assert "batch_size" not in call
    model.calls.clear()
    evaluate(
        model, prompts_per_set=2, images_per_prompt=1, batch_size=5, psnr_images=0, sets=["one_object_seen"]
    )
    assert model.calls[0]["batch_size"] == 5 and model.calls[0]["guidance_scale"] is None


def test_reconstruction_psnr_measures_the_error():
    # every channel of every palette colour is >= 30/255, so an error of -0.01 is never clipped: 40 dB
    rec = reconstruction_psnr(FakeModel(offset=-0.01), num_images=4, batch_size=3)
    assert rec["images"] == 4
    assert rec["psnr_mean"] == pytest.approx(40.0, abs=0.01) and rec["psnr_min"] <= rec["psnr_max"]
    assert rec["checker_accuracy"] == 1.0
    bad = reconstruction_psnr(FakeModel(offset=-0.6), num_images=2)
    assert bad["psnr_mean"] < 10 and bad["checker_accuracy"] == 0.0


class BlankEveryThirdDecoder(FakeDecoder):
    """Decodes batches of one image; every third call from the second on comes back blank (white)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().decode(z)
        return torch.ones_like(out) if self.calls % 3 == 2 else out


def test_reconstruction_accuracy_is_reported_per_evaluation_set():
    # scenes cycle through the sets in EVAL_SETS order, so the blanked calls 2 and 5 are both two-object
    # scenes
    model = FakeModel()
    model.decoder = BlankEveryThirdDecoder()
    rec = reconstruction_psnr(model, num_images=7, batch_size=1)
    names = list(shapes.EVAL_SETS)
    assert names[1] == "two_objects_seen"
    assert rec["checker_by_set"] == {
        names[0]: {"accepted": 3, "images": 3, "accuracy": 1.0},
        names[1]: {"accepted": 0, "images": 2, "accuracy": 0.0},
        names[2]: {"accepted": 2, "images": 2, "accuracy": 1.0},
    }
    assert rec["checker_accuracy"] == pytest.approx(5 / 7)
    res = {"settings": evaluate(FakeModel(), prompts_per_set=1, psnr_images=0)["settings"], "sets": {}}
    text = format_results({**res, "reconstruction": rec})
    assert (
        "by set: one_object_seen 100% (3/3), two_objects_seen 0% (0/2), one_object_held_out 100% (2/2)"
        in text
    )


def test_bad_arguments_raise():
    for kwargs in (
        dict(sets=["nope"]),
        dict(images_per_prompt=0),
        dict(prompts_per_set=0),
        dict(psnr_images=-1),
    ):
        with pytest.raises(ConfigError):
            evaluate(FakeModel(), **kwargs)

    class Short(FakeModel):
        def generate(self, prompts, num_images=1, seed=None, **kwargs):
            return super().generate(prompts, num_images, seed, **kwargs)[:-1]

    with pytest.raises(RuntimeError, match="returned"):
        evaluate(Short(), prompts_per_set=2, psnr_images=0)


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def fake_pipeline(monkeypatch):
    loaded = {}

    class DALLE:
        @classmethod
        def from_pretrained(cls, name, device="auto"):
            loaded.update(name=name, device=device)
            return FakeModel()

    module = types.ModuleType("dalle.pipeline")
    module.DALLE = DALLE
    monkeypatch.setitem(sys.modules, "dalle.pipeline", module)
    return loaded


def test_cli_evaluate_prints_and_writes(tmp_path, capsys, fake_pipeline):
    from dalle.cli import main

    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            "some/dir",
            "--out",
            str(out),
            "--images-per-prompt",
            "1",
            "--prompts-per-set",
            "3",
            "--psnr-images",
            "2",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert fake_pipeline == {"name": "some/dir", "device": "cpu"}
    printed = capsys.readouterr().out
    assert "two_objects_seen" in printed and "100.0%" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["seed"] == 5 and results["settings"]["images_per_prompt"] == 1
    assert (out / "examples.png").is_file()


def test_cli_evaluate_usage_errors(tmp_path, fake_pipeline):
    from dalle.cli import main

    for argv in (
        ["--images-per-prompt", "0"],
        ["--rerank", "2", "--images-per-prompt", "4"],
        ["--sets", "x"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2
    assert fake_pipeline == {}  # nothing loaded


def test_cli_defaults_match_the_library():
    import dalle.cli.evaluate as cli_eval
    import dalle.evaluation as ev

    assert cli_eval.DEFAULT_PROMPTS_PER_SET == ev.DEFAULT_PROMPTS_PER_SET
    assert cli_eval.DEFAULT_IMAGES_PER_PROMPT == ev.DEFAULT_IMAGES_PER_PROMPT


@pytest.mark.filterwarnings("ignore")  # the tiny model's text_len may truncate prompts
def test_runs_on_a_real_tiny_pipeline(tmp_path):
    """Interface check against dalle.pipeline.DALLE (random weights, so accuracy is not asserted)."""
    tiny = pytest.importorskip("tests.test_pipeline")
    model = tiny.build_tiny()
    res = evaluate(
        model,
        prompts_per_set=1,
        images_per_prompt=2,
        psnr_images=2,
        out_dir=tmp_path,
        sets=["one_object_seen"],
    )
    r = res["sets"]["one_object_seen"]
    assert r["total"] == 2 and 0.0 <= r["accuracy"] <= 1.0
    assert res["settings"]["image_size"] == 32 and res["reconstruction"]["images"] == 2
    assert (tmp_path / "examples.png").is_file()

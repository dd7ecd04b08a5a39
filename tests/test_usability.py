"""Small API and feedback for users (issue 22): unfamiliar words, long prompts, repr, save_pretrained."""

from __future__ import annotations

import warnings

import pytest

from dalle.errors import ConfigError
from dalle.pipeline import DALLE
from dalle.tokenizer import TruncationWarning
from tests.test_pipeline import build_tiny


@pytest.fixture(scope="module")
def shapes() -> DALLE:
    return DALLE.from_pretrained("shapes", device="cpu")


def test_words_the_tokenizer_spells_out_are_named(shapes: DALLE) -> None:
    assert shapes.unfamiliar_words("a red circle above a blue square") == []
    assert shapes.unfamiliar_words("a purple elephant next to a xyzzy") == ["elephant", "next", "xyzzy"]
    prompt = "a purple elephant"
    with pytest.warns(UserWarning, match=r"spells out 'elephant' piece by piece.*never saw this word"):
        shapes._warn_if_no_text([prompt], shapes.encode_text([prompt]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shapes._warn_if_no_text(["a large green triangle"], shapes.encode_text(["a large green triangle"]))


def test_a_long_prompt_warning_says_what_to_do(shapes: DALLE) -> None:
    prompt = " ".join(["a red circle"] * 100)
    with pytest.warns(
        TruncationWarning, match=rf"longer than the {shapes.text_len} tokens.*shorten the prompt"
    ):
        ids = shapes.encode_text([prompt])
    assert ids.shape == (1, shapes.text_len)


def test_repr_describes_the_model(shapes: DALLE) -> None:
    text = repr(shapes)
    assert (
        text.startswith("DALLE(name='shapes'")
        and "256px" in text
        and "layers" in text
        and "device='cpu'" in text
    )


def test_save_pretrained_does_not_overwrite_unless_told(tmp_path) -> None:
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "model")
    with pytest.raises(ConfigError, match="already holds a model directory.*overwrite=True"):
        pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds files"):
        pipe.save_pretrained(tmp_path / "other")
    assert pipe.save_pretrained(tmp_path / "model", overwrite=True) == tmp_path / "model"
    (tmp_path / "empty").mkdir()
    pipe.save_pretrained(tmp_path / "empty")
    assert DALLE.from_pretrained(tmp_path / "empty", device="cpu").grid == pipe.grid


def test_demo_notes_name_exactly_the_held_out_prompts() -> None:
    from dalle.cli.generate import DEMO
    from dalle.data.shapes import COLOURS, SHAPES, is_held_out

    for prompt, note in DEMO:
        words = prompt.split()
        pairs = [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]
        held = any(is_held_out(c, s) for c, s in pairs)
        assert held == ("never seen" in note), prompt


def test_grid_captions_scale_with_the_tiles() -> None:
    from dalle.images import _font

    small, large = _font(64), _font(512)
    assert large.getbbox("Ag")[3] > small.getbbox("Ag")[3]


def test_the_errors_users_catch_are_exported() -> None:
    import dalle
    from dalle import errors

    for name in ("ConfigError", "CheckpointError", "OutOfMemoryError", "ModelLoadError", "DalleError"):
        assert getattr(dalle, name) is getattr(errors, name) and name in dalle.__all__

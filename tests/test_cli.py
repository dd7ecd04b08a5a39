"""The `dalle` command run as a subprocess: outputs, metadata and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_pipeline import build_tiny


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "dalle", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    build_tiny().save_pretrained(path)
    return path


def test_generate_writes_grid_and_images_with_metadata(model_dir, tmp_path):
    grid = tmp_path / "grid.png"
    out_dir = tmp_path / "imgs"
    r = run_cli(
        "generate",
        "a red circle",
        "a blue square",
        "--model",
        str(model_dir),
        "-n",
        "2",
        "--seed",
        "7",
        "--output",
        str(grid),
        "--output-dir",
        str(out_dir),
        "--temperature",
        "0.9",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    files = sorted(out_dir.glob("*.png"))
    assert len(files) == 4
    with Image.open(files[2]) as im:
        meta = dict(im.text)
        assert im.size == (32, 32)
    assert meta["prompt"] == "a blue square"
    assert meta["seed"] == "7"
    assert meta["model"] == "tiny-test"
    assert json.loads(meta["settings"])["temperature"] == 0.9
    with Image.open(grid) as im:
        assert "a red circle" in im.text["prompt"]
        assert im.size[0] > 32 * 2
    # same seed, same images
    again = tmp_path / "again"
    r = run_cli(
        "generate",
        "a blue square",
        "--model",
        str(model_dir),
        "-n",
        "1",
        "--seed",
        "7",
        "--output-dir",
        str(again),
        "--temperature",
        "0.9",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    (single,) = list(again.glob("*.png"))
    with Image.open(single) as a, Image.open(files[2]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "a red circle", "-n", "0"],
        ["generate", "a red circle", "--temperature", "-1"],
        ["generate", "a red circle", "--top-p", "2"],
        ["generate", "a red circle", "-n", "4", "--rerank", "2"],
        ["generate", "a red circle", "--seed", str(2**32)],  # CPU generators would repeat seed - 2**32
        ["generate", "a red circle", "--seed", "-1"],
        ["generate", "a red circle", "--output", "grid.jpg"],  # PNG only: the metadata needs it
        ["generate"],
        ["no-such-command"],
        ["train", "--data", "shapes", "--dvae", "nowhere", "--out", "nowhere", "--steps", "-1"],
        ["train", "--data", "shapes", "--dvae", "nowhere", "--out", "nowhere", "--preset", "nope"],
    ],
)
def test_bad_arguments_exit_2(args, model_dir):
    r = (
        run_cli(*args, "--model", str(model_dir))
        if args[0] == "generate" and len(args) > 1
        else run_cli(*args)
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    if args[0] in ("generate", "train") and len(args) > 1:  # the subcommand's usage, not the top-level one
        assert f"usage: dalle {args[0]} " in r.stderr, r.stderr


def test_unwritable_outputs_are_refused_before_sampling(model_dir, tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    cases = {
        str(tmp_path / "folder"): "is a directory; give a file name",
        str(tmp_path / "file.png" / "grid.png"): "cannot create the folder",
    }
    for output, message in cases.items():
        r = run_cli(
            "generate",
            "a red circle",
            "--model",
            str(model_dir),
            "--output",
            output,
            "--output-dir",
            str(tmp_path / "each"),
            "--quiet",
        )
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not list((tmp_path / "each").glob("*.png"))  # nothing was sampled, nothing half-written


def test_missing_model_exits_1_with_one_line(tmp_path):
    r = run_cli("generate", "a red circle", "--model", str(tmp_path / "nope"), "--quiet")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "generate", "a red circle", "--model", str(tmp_path / "nope"), "--quiet")
    assert r.returncode == 1
    assert "Traceback" in r.stderr


def test_complete_unreadable_image_exits_1(model_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    r = run_cli("complete", str(bad), "a red circle", "--model", str(model_dir), "--quiet")
    assert r.returncode == 1
    assert "bad.png" in r.stderr and "Traceback" not in r.stderr


def test_complete_writes_images(model_dir, tmp_path):
    src = tmp_path / "src.png"
    Image.new("RGB", (32, 32), (40, 90, 220)).save(src)
    out = tmp_path / "done.png"
    r = run_cli(
        "complete",
        str(src),
        "a blue square",
        "--rows",
        "2",
        "--model",
        str(model_dir),
        "-n",
        "2",
        "--seed",
        "1",
        "--output",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    with Image.open(out) as im:
        assert json.loads(im.text["settings"])["rows"] == 2
    r = run_cli("complete", str(src), "a blue square", "--rows", "9", "--model", str(model_dir), "--quiet")
    assert r.returncode == 2


def test_complete_records_the_default_rows_and_reconstruct_warns_on_enlarging(model_dir, tmp_path, capsys):
    from dalle.cli import main

    src = tmp_path / "src.png"
    Image.new("RGB", (40, 32), (40, 90, 220)).save(src)
    out = tmp_path / "done.png"
    assert (
        main(
            [
                "complete",
                str(src),
                "a blue square",
                "--model",
                str(model_dir),
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    with Image.open(out) as im:
        assert (
            json.loads(im.text["settings"])["rows"] == 2
        )  # the paper's 15 of 32 rows of a 4x4 grid, rounded
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20), (40, 90, 220)).save(tiny)
    with pytest.warns(UserWarning, match="20x20, smaller than 32 px: it is enlarged .*--no-upscale"):
        assert (
            main(["reconstruct", str(tiny), "--model", str(model_dir), "--output", str(tmp_path / "r.png")])
            == 0
        )
    assert (
        main(
            [
                "reconstruct",
                str(tiny),
                "--model",
                str(model_dir),
                "--no-upscale",
                "--output",
                str(tmp_path / "r2.png"),
            ]
        )
        == 1
    )
    assert "leave out --no-upscale to enlarge it" in capsys.readouterr().err


def test_info(model_dir):
    r = run_cli("info", "--model", str(model_dir))
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "cache" in r.stdout and "tiny-test" in r.stdout


def test_info_says_youtokentome_is_optional(monkeypatch, capsys):
    import dalle.cli.info as info
    from dalle.cli import main

    monkeypatch.setattr(info, "_version", lambda dist: "not installed" if dist == "youtokentome" else "1.0")
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("youtokentome"))
    assert "not installed (optional" in line and "pure-Python" in line


@pytest.mark.integration
def test_demo_runs_offline(tmp_path):
    from dalle.cli.generate import DEMO_PROMPTS

    r = run_cli("demo", "--output-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    written = list(tmp_path.glob("*.png"))
    assert len(written) == 1
    with Image.open(written[0]) as im:
        meta = dict(im.text)
    # the PNG and the console both say which model or weights produced it
    assert meta["model"] == "shapes" and meta["software"].startswith("dalle ")
    assert json.loads(meta["settings"])["command"] == "demo" and len(meta["seed"].split(",")) == len(
        DEMO_PROMPTS
    )
    assert "wrote" in r.stdout
    # the console says which prompt is a combination the model never saw
    assert "5. a large green triangle  (never seen in training" in r.stdout


def test_threads_flag_sets_torchs_cpu_threads(model_dir, tmp_path):
    import torch

    from dalle.cli import main

    before = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "generate",
                    "a red circle",
                    "--model",
                    str(model_dir),
                    "-n",
                    "1",
                    "--threads",
                    "1",
                    "--quiet",
                    "--output",
                    str(tmp_path / "g.png"),
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exc:
        main(["reconstruct", "--model", str(model_dir), "--threads", "0"])
    assert exc.value.code == 2

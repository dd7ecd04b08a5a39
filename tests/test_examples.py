"""The example notebook and its script version run top to bottom on CPU (against a tiny model)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

from tests.test_pipeline import build_tiny

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    build_tiny().save_pretrained(root / "tiny")
    return {"DALLE_MODEL": str(root / "tiny"), "DALLE_EXAMPLE_OUT": str(root / "out")}


@pytest.mark.integration
def test_script_runs(model_env, monkeypatch):
    for key, value in model_env.items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(EXAMPLES / "quickstart.py"), run_name="__main__")
    out = Path(model_env["DALLE_EXAMPLE_OUT"])
    assert {p.name for p in out.glob("*.png")} == {
        "text_to_image.png",
        "completion.png",
        "reconstruction.png",
    }


@pytest.mark.integration
def test_notebook_executes(model_env, monkeypatch, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in model_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DALLE_EXAMPLE_OUT", str(tmp_path / "nb"))
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors
    assert (tmp_path / "nb" / "completion.png").is_file()
    assert os.environ["DALLE_MODEL"] == model_env["DALLE_MODEL"]

"""scripts/letters_sweep.py: every sweep command parses and validates as a `dalle train-dvae` configuration (a
wrong flag would kill a run on the one-shot GPU), the metrics parsing and the table, and (integration) one
tiny CPU run end to end."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import letters_sweep
    finally:
        sys.path.remove(str(REPO / "scripts"))
    yield letters_sweep


@pytest.mark.parametrize("smoke", [False, True])
def test_every_sweep_command_is_a_valid_train_dvae_configuration(
    sweep: ModuleType, tmp_path: Path, smoke: bool
) -> None:
    from dalle.cli import build_parser
    from dalle.cli.train import build_config
    from dalle.train.config import DVAETrainConfig

    args = argparse.Namespace(device="cuda", threads=2)
    runs = sweep.SMOKE_RUNS if smoke else sweep.RUNS
    assert len({r.name for r in runs}) == len(runs)
    for run in runs:
        steps = sweep.SMOKE_STEPS if smoke else run.steps(1.0)
        cmd = sweep.build_cmd(run, steps, tmp_path / run.name, args, 150.0, 32)
        assert cmd[1:4] == ["-m", "dalle", "train-dvae"]
        ns = build_parser().parse_args(cmd[3:])
        cfg = build_config(DVAETrainConfig, ns, "train-dvae")
        cfg.validate()
        assert cfg.data == "letters" and cfg.image_size == 64 and cfg.eval_images == 36
        assert cfg.steps == steps and cfg.batch_size == run.batch
        assert cfg.tau_steps == round(sweep.TAU_SHARE * steps) and cfg.kl_steps == 1
        assert cfg.device == "cuda" and cfg.time_limit == pytest.approx(2.5, abs=1e-3)
        assert cfg.eval_every == cfg.sample_every == max(1, steps // 32)
        assert sweep.vocab_of(run) == cfg.vocab_size


def test_metrics_parsing_and_table(sweep: ModuleType, tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    recs = [
        {"kind": "train", "step": 1, "kl": 1.0, "tau": 1.0},
        {
            "kind": "eval",
            "step": 500,
            "psnr": 17.5,
            "codes_used": 25,
            "perplexity": 9.0,
            "flat_psnr": 17.78,
            "cell_variety": 7.0,
        },
        {
            "kind": "eval",
            "step": 1000,
            "psnr": 21.25,
            "codes_used": 40,
            "perplexity": 20.0,
            "flat_psnr": 17.78,
            "cell_variety": 7.0,
        },
        {"kind": "train", "step": 1500, "kl": 3.5, "tau": 0.0625},
        {
            "kind": "eval",
            "step": 1500,
            "psnr": 19.0,
            "codes_used": 5,
            "perplexity": 3.0,
            "flat_psnr": 17.78,
            "cell_variety": 7.0,
        },
        {
            "kind": "summary",
            "step": 1500,
            "usable": False,
            "psnr": 19.0,
            "codes_used": 5,
            "problems": [
                "PSNR 19.0 dB is below 20 dB (an RMS error of 10% of the range)",
                "5 codes in use (of 256) for images with 7 common cell colours: the codebook has collapsed",
            ],
        },
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "ev')
    parsed = sweep.read_metrics(run_dir / "metrics.jsonl")
    assert parsed["updates"] == 1500 and len(parsed["evals"]) == 3 and parsed["last_train"]["kl"] == 3.5
    result = {
        "name": "x",
        "flags": ["--lr", "1e-3"],
        "steps": 2000,
        "vocab_size": 256,
        "wall_s": 12.0,
        "status": "done",
        **parsed,
    }
    sweep.summarize_run(result)
    assert result["best"] == {"step": 1000, "psnr": 21.25, "codes_used": 40}
    assert result["final"]["psnr"] == 19.0
    assert result["verdict"] == "UNUSABLE: PSNR < 20 dB; 5 codes < 7 cell colours"
    tab = sweep.table([result])
    assert (
        "| x | `--lr 1e-3` | 1500/2000 | 12 | 500: 17.5/25, 1k: 21.2/40, 1.5k: 19.0/5 | **21.25** (1k, 40) |"
        in tab
    )
    assert "3.50 / 5.55, 0.0625" in tab
    assert len(sweep.pick_evals(list(range(32)), 8)) == 8 and sweep.pick_evals(list(range(32)), 8)[-1] == 31


@pytest.mark.integration
def test_letters_sweep_smoke_runs_one_tiny_cpu_run(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "letters_sweep.py"),
            "--out",
            str(out),
            "--smoke",
            "--only",
            "smoke-recipe",
            "--parallel",
            "1",
            "--threads",
            "1",
            "--time-limit",
            "100",
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "letters-sweep.json").read_text())
    (run,) = report["runs"]
    assert run["status"] == "done" and run["updates"] == 12 and len(run["evals"]) == 3
    assert all(isinstance(e["psnr"], float) for e in run["evals"])
    assert run["verdict"].startswith(("usable", "UNUSABLE"))
    assert "| smoke-recipe |" in (out / "letters-sweep.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "best-run-samples.png",
        "letters-sweep.json",
        "letters-sweep.md",
    ]

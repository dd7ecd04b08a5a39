"""scripts/gpu_check.py in its CPU smoke mode: every section runs its CPU part on tiny configurations, so the
one-shot GPU check cannot rot between the sessions that have a GPU (about 25 s on a 2-core machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_gpu_check_cpu_smoke_writes_a_report_without_failures(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "scripts"))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(out),
            "--wheels",
            str(tmp_path / "no-wheels"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (out / "gpu-check.md").is_file() and (out / "gpu-check.json").is_file(), proc.stdout + proc.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"] == "cpu-smoke"
    sections = report["sections"]
    assert list(sections) == [name for name, *_ in gpu_check.SECTIONS]  # every section ran, in order
    markdown = (out / "gpu-check.md").read_text()
    for name, title, *_ in gpu_check.SECTIONS:
        result = sections[name]
        assert f"## {title}: " in markdown
        failed = [c for c in result["checks"] if c["status"] == "FAIL"]
        assert result["status"] != "FAIL" and not failed, (name, failed, result.get("error"))
        assert result["checks"], name  # a section that checked nothing would hide a broken section function
        for check in result["checks"]:
            if check["status"] == "SKIP":
                assert check["detail"].strip(), (name, check)  # every skip says why
    assert proc.returncode == 0, proc.stdout + proc.stderr

#!/usr/bin/env python3
"""Sweep `dalle train-dvae --data letters` settings in parallel (issue 22: the dVAE does not learn the
letters).

    PYTHONPATH=. python3 scripts/letters_sweep.py --out OUT --time-limit 230 --device cuda --parallel 16 --threads 1
    .venv/bin/python scripts/letters_sweep.py --out /tmp/sweep --smoke --parallel 1      # CPU check, < 2 min

Runs the configurations in :data:`RUNS` (each ``recipes/letters/dvae-paper.json`` plus its own flags) as
subprocesses ``python -m dalle train-dvae``, ``--parallel`` at a time (they share the one GPU), and ends
within ``--time-limit`` seconds whatever happens:

* each run gets a step count (by batch size, times ``--scale``) *and* the trainer's own ``--time-limit``
  (minutes of its training loop), sized from the time left and the number of waves
  (``ceil(runs / parallel)``). Whichever comes first ends the run cleanly: final evaluation, run summary
  (``dvae_verdict``), export. Under the time limit the trainer's schedules (tau, lr) follow the share of the
  time spent, so they complete even when the GPU is slower than guessed; the run is then not reproducible step
  for step (fine for a sweep).
* tau anneals over 3/4 of the steps (``--tau-steps``, as the recipe's 1500 of 2000), the learning rate over
  all of them; ``--eval-every`` is 1/``--evals`` of the steps (32 by default, so a run cut to a third of its
  steps by the time limit still has ~10 evaluations), with a sample grid at each evaluation.
* a hard deadline backs this up: runs still alive ``--grace`` seconds before the end get SIGTERM (the trainer
  saves a checkpoint and stops, without a summary), then SIGKILL; what they logged is still reported.

Where the numbers come from (``dalle/train/loop.py``, ``dalle/train/dvae.py``): ``RUN/metrics.jsonl`` holds
``{"kind": "train", step, loss, nll, kl, beta, tau, lr, grad_norm, samples_per_s, ...}`` every ``--log-every``
steps, ``{"kind": "eval", step, psnr, perplexity, codes_used, flat_psnr, cell_variety}`` (EMA weights, argmax
codes, the held-out images) every ``--eval-every`` steps and at the last, and at the end ``{"kind":
"summary", step, usable, problems, advice, ...}`` (the verdict also goes to stderr). Sample grids (8 held-out
originals over their reconstructions) are ``RUN/samples/step-XXXXXXXX.png``.

Writes only ``OUT/letters-sweep.md`` (the table), ``OUT/letters-sweep.json`` (everything parsed, with each
failed run's log tail) and ``OUT/best-run-samples.png`` (the best run's sample grid at its best evaluation
over the one at its end), rewritten as runs finish so that a sweep cut short still leaves a report. The run
directories (checkpoints, logs, all samples) stay in ``--runs-dir`` (default: a new temporary folder).
"""  # noqa: E501 - the example command above is kept whole (ruff applies this to the whole docstring)

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "letters" / "dvae-paper.json"

# base step counts at --scale 1, by batch size: upper bounds; the per-run --time-limit usually ends them first
STEPS_BY_BATCH = {16: 20000, 64: 16000, 128: 12000}
TAU_SHARE = 0.75  # the recipe's tau_steps 1500 of 2000


@dataclass
class Run:
    """One configuration: recipes/letters/dvae-paper.json plus ``flags`` (train-dvae flags, verified by
    --help)."""

    name: str
    why: str
    flags: list[str]
    batch: int = 16  # the batch size these flags give (sets the step count)

    def steps(self, scale: float) -> int:
        return max(1, round(STEPS_BY_BATCH.get(self.batch, 16000) * scale))


def _b(batch: int, lr: str) -> list[str]:
    return ["--batch-size", str(batch), "--lr", lr, "--lr-end", f"{float(lr) / 10:g}"]


B64 = _b(64, "3e-4")  # the base of most variations: batch 64, lr 3e-4 -> 3e-5
# Ordered by importance: with --parallel 8 the first eight form the first wave, and a sweep cut short loses
# the last ones. Shared by all (from the recipe): n_hid 32, one block a group, n_init 64, 256 codes, EMA 0.99,
# KL weight 6.6 from the first update (kl_steps 1), tau 1 -> 1/16, eval on the 36 held-out letters.
RUNS: list[Run] = [
    Run(
        "recipe-long",
        "the recipe as it is (batch 16, lr 1e-4), only longer: does it just need more updates?",
        [],
        16,
    ),
    Run(
        "b64-lr3e-4",
        "batch 64, lr 3e-4 (the base of the variations below): do larger batches / steps help?",
        B64,
        64,
    ),
    Run("b128-lr1e-3", "batch 128, lr 1e-3: the largest batch and step size", _b(128, "1e-3"), 128),
    Run(
        "b64-hid64",
        "n_hid 64, n_init 128: is the decoder too small to draw strokes and colour?",
        [*B64, "--n-hid", "64", "--n-init", "128"],
        64,
    ),
    Run(
        "b64-v1024",
        "1024 codes: more codes, each less polluted by the random codes sampled at white cells",
        [*B64, "--vocab-size", "1024"],
        64,
    ),
    Run(
        "b64-tau1",
        "tau held at 1 (--tau-end 1): is the collapse driven by the falling temperature?",
        [*B64, "--tau-end", "1"],
        64,
    ),
    Run(
        "b64-kl1-tau16",
        "KL weight 1 (less pull of every cell towards the uniform posterior), tau 16 -> 1/16 "
        "(which kept beta 1 from saturating early on the CPU)",
        [*B64, "--kl-weight", "1", "--tau-start", "16"],
        64,
    ),
    Run(
        "b64-st",
        "straight-through: the decoder sees one-hot codes in training, as in evaluation",
        [*B64, "--straight-through"],
        64,
    ),
    Run(
        "b16-lr3e-4",
        "the recipe's batch 16 with lr 3e-4: separates the lr from the batch effect",
        _b(16, "3e-4"),
        16,
    ),
    Run("b64-lr1e-3", "batch 64, lr 1e-3", _b(64, "1e-3"), 64),
    Run("b128-lr3e-4", "batch 128, lr 3e-4", _b(128, "3e-4"), 128),
    Run(
        "b64-hid64-blk2",
        "n_hid 64, two blocks a group (the paper's depth), n_init 128",
        [*B64, "--n-hid", "64", "--n-blk-per-group", "2", "--n-init", "128"],
        64,
    ),
    Run("b64-v512", "512 codes", [*B64, "--vocab-size", "512"], 64),
    Run(
        "b64-kl13",
        "KL weight 13.2 (2x the paper's; not tried yet): does a stronger pull make it worse or better?",
        [*B64, "--kl-weight", "13.2"],
        64,
    ),
    Run(
        "b64-st-tau1",
        "straight-through with tau held at 1: hard codes forward, soft gradients that stay wide",
        [*B64, "--straight-through", "--tau-end", "1"],
        64,
    ),
    Run(
        "b128-hid64-v1024",
        "everything larger at once: batch 128, lr 5e-4, n_hid 64, n_init 128, 1024 codes",
        [*_b(128, "5e-4"), "--n-hid", "64", "--n-init", "128", "--vocab-size", "1024"],
        128,
    ),
]

# --smoke: tiny CPU runs that exercise the flags the sweep uses (a wrong flag kills a run at once)
SMOKE_STEPS = 12
SMOKE_RUNS: list[Run] = [
    Run("smoke-recipe", "the recipe, a few updates", ["--batch-size", "4"], 4),
    Run(
        "smoke-st-tau1-v512",
        "straight-through, tau held at 1, 512 codes, KL 1, lr 3e-4",
        [
            "--batch-size",
            "4",
            "--straight-through",
            "--tau-end",
            "1",
            "--vocab-size",
            "512",
            "--kl-weight",
            "1",
            "--lr",
            "3e-4",
            "--lr-end",
            "3e-5",
        ],
        4,
    ),
    Run(
        "smoke-hid64-blk2",
        "n_hid 64, two blocks a group, tau 16 -> 1/16",
        [
            "--batch-size",
            "4",
            "--n-hid",
            "64",
            "--n-blk-per-group",
            "2",
            "--n-init",
            "128",
            "--tau-start",
            "16",
        ],
        4,
    ),
]


# ------------------------------------------------------------------------------------------------ parsing
def read_metrics(path: Path) -> dict[str, Any]:
    """Parse a run's metrics.jsonl: eval records, the last train record, the summary (if any)."""
    evals: list[dict[str, Any]] = []
    last_train: dict[str, Any] = {}
    summary: dict[str, Any] | None = None
    max_step = 0
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if not isinstance(rec, dict):
                continue
            max_step = max(max_step, int(rec.get("step", 0) or 0))
            kind = rec.get("kind")
            if kind == "eval":
                evals.append(rec)
            elif kind == "train":
                last_train = rec
            elif kind == "summary":
                summary = rec
    return {"evals": evals, "last_train": last_train, "summary": summary, "updates": max_step}


def short_problem(text: str) -> str:
    """A dvae_verdict problem in a few words (the JSON keeps the full text)."""
    m = re.match(r"PSNR ([\d.]+) dB is below ([\d.]+) dB", text)
    if m:
        return f"PSNR < {m.group(2)} dB"
    m = re.match(r"PSNR [\d.]+ dB is not ([\d.]+) dB better than .*\(([\d.]+) dB\)", text)
    if m:
        return f"< flat {m.group(2)} + {m.group(1)} dB"
    m = re.match(r"(\d+) codes in use \(of (\d+)\) for images with (\d+) common cell colours", text)
    if m:
        return f"{m.group(1)} codes < {m.group(3)} cell colours"
    m = re.match(r"(\d+) codes in use \(of (\d+)\)", text)
    if m:
        return f"{m.group(1)} codes: collapsed"
    return text.split(": ")[0]


def verdict_line(result: dict[str, Any]) -> str:
    summary = result.get("summary")
    if summary:
        if summary.get("usable"):
            return "usable"
        return "UNUSABLE: " + "; ".join(short_problem(p) for p in summary.get("problems", []))
    status = result.get("status", "?")
    return f"no summary ({status})"


def fmt(x: Any, spec: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _kstep(step: int) -> str:
    return f"{step / 1000:.3g}k" if step >= 1000 else str(step)


def pick_evals(evals: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` evaluations spread evenly over the run, the last always among them."""
    if len(evals) <= n:
        return evals
    idx = sorted({round(i * (len(evals) - 1) / (n - 1)) for i in range(n)})
    return [evals[i] for i in idx]


def summarize_run(result: dict[str, Any]) -> None:
    """Add best / final / KL figures to a run result parsed from its metrics."""
    evals = result.get("evals") or []
    best = max(evals, key=lambda e: e.get("psnr", -1e9)) if evals else None
    final = evals[-1] if evals else None
    result["best"] = (
        {"step": best["step"], "psnr": best.get("psnr"), "codes_used": best.get("codes_used")}
        if best
        else None
    )
    result["final"] = (
        {
            "step": final["step"],
            "psnr": final.get("psnr"),
            "codes_used": final.get("codes_used"),
            "perplexity": final.get("perplexity"),
        }
        if final
        else None
    )
    if evals:
        result["flat_psnr"] = evals[0].get("flat_psnr")
        result["cell_variety"] = evals[0].get("cell_variety")
    result["verdict"] = verdict_line(result)


def table(results: list[dict[str, Any]], max_evals: int = 8) -> str:
    """The markdown table of the runs (in sweep order)."""
    head = (
        "| run | flags | updates | wall s | held-out PSNR dB / codes_used, by update "
        "| best PSNR (update, codes) | final PSNR / codes | final KL / ln K, tau | verdict |"
    )
    lines = [head, "|---|---|---:|---:|---|---|---|---|---|"]
    for r in results:
        evals = r.get("evals") or []
        shown = pick_evals(evals, max_evals)
        cells = ", ".join(
            f"{_kstep(int(e['step']))}: {fmt(e.get('psnr'))}/{e.get('codes_used', '-')}" for e in shown
        )
        if len(shown) < len(evals):
            cells += f" ({len(evals)} evals, {len(shown)} shown)"
        best, final = r.get("best"), r.get("final")
        best_s = (
            f"**{fmt(best['psnr'], '.2f')}** ({_kstep(int(best['step']))}, {best['codes_used']})"
            if best
            else "-"
        )
        final_s = f"{fmt(final['psnr'], '.2f')} / {final['codes_used']}" if final else "-"
        lt = r.get("last_train") or {}
        k = r.get("vocab_size")
        kl_s = "-"
        if "kl" in lt:
            kl_s = f"{fmt(lt['kl'], '.2f')} / {fmt(math.log(k), '.2f')}" if k else fmt(lt["kl"], ".2f")
            kl_s += f", {fmt(lt.get('tau'), '.3g')}"
        flags = " ".join(r.get("flags") or []) or "(recipe)"
        lines.append(
            f"| {r['name']} | `{flags}` | {r.get('updates', 0)}/{r.get('steps', '?')} "
            f"| {fmt(r.get('wall_s'), '.0f')} "
            f"| {cells or '-'} | {best_s} | {final_s} | {kl_s} | {r.get('verdict', '-')} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Job:
    run: Run
    steps: int
    run_dir: Path
    log: Path
    cmd: list[str]
    train_limit_s: float
    proc: subprocess.Popen[bytes] | None = None
    t0: float = 0.0
    wall_s: float | None = None
    rc: int | None = None
    killed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def vocab_of(run: Run) -> int:
    flags = run.flags
    if "--vocab-size" in flags:
        return int(flags[flags.index("--vocab-size") + 1])
    return int(json.loads(RECIPE.read_text()).get("vocab_size", 256))


def build_cmd(
    run: Run, steps: int, run_dir: Path, args: argparse.Namespace, train_limit_s: float, evals: int
) -> list[str]:
    every = max(1, steps // evals)
    cmd = [
        sys.executable,
        "-m",
        "dalle",
        "train-dvae",
        "--config",
        str(RECIPE),
        "--out",
        str(run_dir),
        "--steps",
        str(steps),
        "--tau-steps",
        str(max(1, round(TAU_SHARE * steps))),
        "--eval-every",
        str(every),
        "--sample-every",
        str(every),
        "--eval-images",
        "36",
        "--log-every",
        str(max(1, min(every, steps // 100 or 1))),
        "--ckpt-every",
        str(steps),
        "--keep-checkpoints",
        "1",
        "--plot-every",
        "0",
        "--no-progress",
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--time-limit",
        f"{max(train_limit_s, 1.0) / 60.0:.4f}",
    ]
    return cmd + run.flags


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to the process group of a child this script started (its DataLoader workers included)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def collect(job: Job, status: str) -> dict[str, Any]:
    parsed = read_metrics(job.run_dir / "metrics.jsonl")
    result: dict[str, Any] = {
        "name": job.run.name,
        "why": job.run.why,
        "flags": job.run.flags,
        "steps": job.steps,
        "vocab_size": vocab_of(job.run),
        "train_time_limit_s": round(job.train_limit_s, 1),
        "cmd": shlex.join(job.cmd),
        "rc": job.rc,
        "status": status,
        "wall_s": round(job.wall_s, 1) if job.wall_s is not None else None,
        "run_dir": str(job.run_dir),
        **parsed,
    }
    if job.rc not in (0, None) or not parsed["evals"]:
        result["log_tail"] = log_tail(job.log)
    lt = parsed["last_train"]
    if lt:
        result["samples_per_s"] = lt.get("samples_per_s")
    summarize_run(result)
    return result


def best_samples_png(results: list[dict[str, Any]], out: Path) -> str | None:
    """Stack the best run's sample grid at its best evaluation over the one at its end into one PNG."""
    scored = [r for r in results if r.get("best") and r["best"].get("psnr") is not None]
    if not scored:
        return None
    best = max(scored, key=lambda r: r["best"]["psnr"])
    samples = Path(best["run_dir"]) / "samples"
    steps = [best["best"]["step"], best["final"]["step"] if best.get("final") else None]
    paths = []
    for s in steps:
        p = samples / f"step-{int(s):08d}.png" if s is not None else None
        if p is not None and p.is_file() and p not in paths:
            paths.append(p)
    if not paths:
        return None
    try:
        from PIL import Image

        ims = [Image.open(p).convert("RGB") for p in paths]
        w = max(im.width for im in ims)
        gap = 6
        canvas = Image.new("RGB", (w, sum(im.height for im in ims) + gap * (len(ims) - 1)), (128, 128, 128))
        y = 0
        for im in ims:
            canvas.paste(im, (0, y))
            y += im.height + gap
        dest = out / "best-run-samples.png"
        canvas.save(dest)
    except Exception as exc:  # noqa: BLE001 - a missing picture must not lose the report
        return f"(could not write the picture: {exc})"
    what = " over ".join(f"update {p.stem.split('-')[-1].lstrip('0') or '0'}" for p in paths)
    return (
        f"`best-run-samples.png`: run **{best['name']}**, 8 held-out originals over their reconstructions, "
        f"{what}"
    )


def write_report(
    out: Path, args: argparse.Namespace, results: list[dict[str, Any]], meta: dict[str, Any], final: bool
) -> str:
    tab = table(results)
    flat = next((r.get("flat_psnr") for r in results if r.get("flat_psnr") is not None), None)
    variety = next((r.get("cell_variety") for r in results if r.get("cell_variety") is not None), None)
    picture = best_samples_png(results, out) if final else None
    md = [
        "# letters dVAE sweep (scripts/letters_sweep.py)",
        "",
        f"{'Final' if final else 'Partial (runs still going)'} report. "
        f"Device `{args.device}` ({meta.get('device_name')}), "
        f"{meta.get('started')} UTC, {len(results)} of {meta['n_runs']} runs reported, "
        f"--parallel {args.parallel}, "
        f"--threads {args.threads}, --time-limit {args.time_limit:g} s, --scale {args.scale:g}, "
        f"python {platform.python_version()}, torch {meta.get('torch')}.",
        "",
        "Every run: `dalle train-dvae --config recipes/letters/dvae-paper.json` + "
        f"`{meta['common']}` + its flags. "
        "`--steps` is an upper bound; the trainer's `--time-limit` "
        "(its training loop's share of the sweep's time) usually ends a run first, "
        "and then tau and the lr follow the share of time spent (they still complete).",
        "",
        f"Scale: painting each held-out image its mean colour gives **{fmt(flat, '.2f')} dB** (`flat_psnr`); "
        f"the images hold {fmt(variety, '.0f')} common cell colours (`cell_variety`). "
        "The run summary calls a dVAE usable at PSNR >= 20 dB and >= 3 dB above flat, "
        "with codes_used >= cell_variety.",
        "",
        tab,
        "",
    ]
    if picture:
        md += [picture, ""]
    md += ["Why each run:", ""]
    md += [f"* **{r['name']}**: {r['why']}" for r in results]
    failed = [r for r in results if r.get("log_tail") and r.get("rc") not in (0, None)]
    for r in failed:
        md += [
            "",
            f"### {r['name']}: exit {r['rc']} ({r['status']}), log tail",
            "",
            "```",
            r["log_tail"],
            "```",
        ]
    (out / "letters-sweep.md").write_text("\n".join(md) + "\n")
    payload = {"meta": meta, "args": vars(args), "runs": results}
    tmp = out / "letters-sweep.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, out / "letters-sweep.json")
    return tab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, type=Path, help="report folder (letters-sweep.md/.json, one PNG)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds the whole sweep may take (default 230; --smoke: 110)",
    )
    p.add_argument("--device", default=None, help="train-dvae --device (default cuda; --smoke: cpu)")
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (default 8; --smoke: 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per run (default: cores // parallel, at least 1)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every run's step count (by batch size: "
        + ", ".join(f"b{b} {n}" for b, n in STEPS_BY_BATCH.items())
        + ")",
    )
    p.add_argument("--evals", type=int, default=None, help="evaluations per run's --steps (default 32)")
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    p.add_argument(
        "--runs-dir", type=Path, default=None, help="where the run directories go (default: a temp dir)"
    )
    p.add_argument(
        "--startup-s",
        type=float,
        default=None,
        help="seconds a run needs outside its training loop: start-up and the final evaluation/export "
        "(default 35 on CUDA, 25 on the CPU)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="SIGTERM runs still alive this many seconds before the deadline, SIGKILL at it (default 10)",
    )
    p.add_argument("--smoke", action="store_true", help=f"2-3 tiny CPU runs of {SMOKE_STEPS} updates")
    p.add_argument("--list", action="store_true", help="print the runs and their commands, run nothing")
    args = p.parse_args(argv)

    t_start = time.monotonic()
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    args.time_limit = args.time_limit or (110.0 if smoke else 230.0)
    args.parallel = max(1, args.parallel or (1 if smoke else 8))
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // args.parallel)
    evals = args.evals or (3 if smoke else 32)
    startup = (
        args.startup_s if args.startup_s is not None else (35.0 if args.device.startswith("cuda") else 25.0)
    )
    runs = SMOKE_RUNS if smoke else RUNS
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(want) - {r.name for r in runs})
        if unknown:
            p.error(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in want]

    def steps_of(run: Run) -> int:
        return SMOKE_STEPS if smoke else run.steps(args.scale)

    if args.list:
        runs_dir = args.runs_dir or Path(tempfile.gettempdir()) / "letters-sweep-runs-XXXX"
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="letters-sweep-runs-"))
        runs_dir.mkdir(parents=True, exist_ok=True)

    waves = math.ceil(len(runs) / args.parallel)
    deadline = t_start + args.time_limit - 3.0  # 3 s to write the report
    kill_at = deadline - args.grace
    slot = (kill_at - time.monotonic()) / waves
    common = (
        f"--steps N --tau-steps 0.75N --eval-every N/{evals} --sample-every N/{evals} --eval-images 36 "
        "--ckpt-every N --keep-checkpoints 1 --plot-every 0 --no-progress "
        f"--device {args.device} --threads {args.threads} --time-limit T"
    )

    if args.list:
        for run in runs:
            cmd = build_cmd(run, steps_of(run), runs_dir / run.name, args, slot - startup, evals)
            print(f"{run.name}: {run.why}\n  {shlex.join(cmd)}")
        return 0

    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "n_runs": len(runs),
        "waves": waves,
        "slot_s": round(slot, 1),
        "common": common,
        "runs_dir": str(runs_dir),
        "smoke": smoke,
        "cpu_count": os.cpu_count(),
        "steps_by_batch": STEPS_BY_BATCH,
        "scale": args.scale,
    }
    try:  # cheap and informative; the children import torch anyway
        import torch

        meta["torch"] = torch.__version__
        if args.device.startswith("cuda"):
            if not torch.cuda.is_available():
                print("letters_sweep: --device cuda but torch sees no CUDA device", file=sys.stderr)
                return 2
            meta["device_name"] = torch.cuda.get_device_name()
        else:
            meta["device_name"] = platform.processor() or platform.machine()
    except ImportError:
        meta["torch"] = None
    print(
        f"letters_sweep: {len(runs)} runs, {args.parallel} at a time ({waves} waves of ~{slot:.0f} s), "
        f"device {args.device}, threads {args.threads}, deadline in {deadline - time.monotonic():.0f} s; "
        f"run directories in {runs_dir}",
        flush=True,
    )

    write_report(args.out, args, [], meta, final=False)  # something to read even if the sweep is cut short
    pending = list(runs)
    running: list[Job] = []
    results: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    env = child_env(args.threads)
    min_train = 3.0 if smoke else 20.0

    def finish(job: Job, status: str) -> None:
        job.wall_s = time.monotonic() - job.t0
        results[job.run.name] = collect(job, status)
        r = results[job.run.name]
        print(
            f"[{time.monotonic() - t_start:6.0f} s] {job.run.name}: {status}, rc {job.rc}, "
            f"{r['updates']}/{job.steps} updates, best {fmt((r['best'] or {}).get('psnr'), '.2f')} dB, "
            f"final {fmt((r['final'] or {}).get('psnr'), '.2f')} dB / "
            f"{(r['final'] or {}).get('codes_used', '-')} "
            f"codes; {r['verdict']}",
            flush=True,
        )
        ordered = [results[r.name] for r in runs if r.name in results]
        write_report(args.out, args, ordered, meta, final=False)

    def on_term(
        signum: int, frame: Any
    ) -> None:  # the sweep itself told to stop: stop the runs, still report
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        while pending or running:
            now = time.monotonic()
            # start runs while there are free slots and enough time left
            while pending and len(running) < args.parallel:
                left = kill_at - now
                # the waves still to start, this run's included, share the time left equally
                budget = left / math.ceil(len(pending) / args.parallel)
                train_limit = budget - startup
                run = pending.pop(0)
                if train_limit < min_train:
                    skipped.append(run.name)
                    results[run.name] = {
                        "name": run.name,
                        "why": run.why,
                        "flags": run.flags,
                        "status": "not started",
                        "steps": steps_of(run),
                        "updates": 0,
                        "evals": [],
                        "verdict": "not started (no time left)",
                        "best": None,
                        "final": None,
                    }
                    continue
                steps = steps_of(run)
                run_dir = runs_dir / run.name
                cmd = build_cmd(run, steps, run_dir, args, train_limit, evals)
                log = runs_dir / f"{run.name}.log"
                job = Job(run, steps, run_dir, log, cmd, train_limit)
                with open(log, "wb") as fh:
                    fh.write((shlex.join(cmd) + "\n").encode())
                    fh.flush()
                    job.proc = subprocess.Popen(
                        cmd,
                        cwd=REPO,
                        env=env,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                job.t0 = time.monotonic()
                running.append(job)
                print(
                    f"[{job.t0 - t_start:6.0f} s] start {run.name}: {steps} steps, training limit "
                    f"{train_limit:.0f} s",
                    flush=True,
                )
            for job in list(running):
                assert job.proc is not None
                rc = job.proc.poll()
                if rc is not None:
                    job.rc = rc
                    running.remove(job)
                    if job.killed:
                        status = job.killed
                    elif rc == 0:
                        status = "done"
                    else:
                        status = f"failed (exit {rc})"
                    finish(job, status)
            now = time.monotonic()
            if running and now >= kill_at:
                for job in running:
                    if job.killed is None:
                        assert job.proc is not None
                        job.killed = "stopped at the sweep's deadline (SIGTERM)"
                        signal_group(job.proc, signal.SIGTERM)
            if running and now >= deadline:
                for job in list(running):
                    assert job.proc is not None
                    signal_group(job.proc, signal.SIGKILL)
                    try:
                        job.rc = job.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        job.rc = None
                    job.killed = "killed at the sweep's deadline (SIGKILL)"
                    running.remove(job)
                    finish(job, job.killed)
            if pending or running:
                time.sleep(0.5)
    except KeyboardInterrupt:
        for job in running:
            assert job.proc is not None
            signal_group(job.proc, signal.SIGKILL)
            job.proc.wait()
            job.rc = job.proc.returncode
            finish(job, "interrupted")

    ordered = [results[r.name] for r in runs if r.name in results]
    meta["total_s"] = round(time.monotonic() - t_start, 1)
    tab = write_report(args.out, args, ordered, meta, final=True)
    print()
    print(tab)
    print()
    print(f"letters_sweep: {meta['total_s']} s; report {args.out / 'letters-sweep.md'}", flush=True)
    ok = [r for r in ordered if r.get("evals")]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

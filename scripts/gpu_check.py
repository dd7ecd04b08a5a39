"""One-shot GPU check of `dalle`: correctness and speed of every CUDA path, written as one report.

    PYTHONPATH=. python scripts/gpu_check.py --out OUT [--only 2,5] [--cpu-smoke] [--time-limit 540]

Sections (each returns a dict; one failing section is reported and the rest still run):

1. gpu-tests        the ``gpu``-marked pytest tests
2. cached-decode    prefill + decode_step vs the full forward, bf16 and fp32, under each SDPA backend
3. flex-vs-sdpa     FlexAttention vs SDPA forward and backward under bf16: errors and times
4. bundled-model    the bundled ``shapes`` model: same seed twice, batch of 4 vs one by one, rerank, complete,
                    guidance
5. compiled-decode  DALLE(compile=True) / compile_decoding() vs eager: tokens, logits, tokens/s
6. paper-memory     paper preset (random weights): default batch size and peak memory vs the prediction
7. training         20 steps of ``train`` and ``train-dvae`` with grad accumulation (+ activation
                    checkpointing for the transformer): samples/s and MFU
8. benchmarks       benchmarks/bench_dvae.py and bench_peers.py on CUDA (OpenAI's dall_e, transformers)

Without CUDA (or with ``--cpu-smoke``) every section runs its CPU-runnable part on tiny configurations, so
that the script cannot rot (tests/test_gpu_check.py runs it that way). Writes ``OUT/gpu-check.md`` (the
report), ``OUT/gpu-check.json`` (raw figures) and ``OUT/gpu-check.log`` (subprocess output, tracebacks),
rewritten after every section so that a run cut short still leaves a report.

Reference packages missing on the device (OpenAI's ``dall_e``) travel as wheels:
``scripts/gpu_check_wheels.sh`` downloads them into ``.whl/``; this script installs what it finds there
(``--wheels``) into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
GOAL_MET, GOAL_MISSED = "GOAL MET", "GOAL MISSED"
PROMPT = "a red circle"
# dense bf16 tensor-core peak of the datasheets (SXM parts), for MFU; the measured matmul ceiling is
# reported too
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


# ---------------------------------------------------------------------------------------------- plumbing
class SectionTimeout(BaseException):
    """A section ran past its hard limit (a BaseException: the per-case ``except Exception`` must not swallow
    it)."""


@dataclass
class Context:
    """What every section gets: where it runs, how small, and how long it may take."""

    device: torch.device
    smoke: bool
    out: Path
    tmp: Path
    log: Callable[[str], None]
    deadline: float
    peak_flops: dict[str, float] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Section:
    """Collects a section's checks, figures and notes; ``status`` is FAIL if any check failed, else PASS if
    any passed, else SKIP. Goal rows (performance targets) are listed apart and never fail a section."""

    def __init__(self, budget: float) -> None:
        self.start = time.monotonic()
        self.budget = budget
        self.checks: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []

    def check(self, name: str, ok: bool | None, detail: str = "") -> bool:
        status = SKIP if ok is None else (PASS if ok else FAIL)
        self.checks.append({"name": name, "status": status, "detail": detail})
        return bool(ok)

    def skip(self, name: str, reason: str) -> None:
        self.check(name, None, reason)

    def goal(self, name: str, met: bool, detail: str) -> None:
        self.checks.append({"name": name, "status": GOAL_MET if met else GOAL_MISSED, "detail": detail})

    def fig(self, key: str, value: Any) -> Any:
        self.figures[key] = value
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)

    def out_of_time(self) -> bool:
        return time.monotonic() - self.start > self.budget

    def result(self) -> dict[str, Any]:
        kinds = {c["status"] for c in self.checks}
        status = FAIL if FAIL in kinds else PASS if PASS in kinds else SKIP
        return {"status": status, "checks": self.checks, "figures": self.figures, "notes": self.notes}


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after ``seconds`` (SIGALRM; a no-op where there is none)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"ran past its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(wall seconds, result) of one call, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def median_time(fn: Callable[[], Any], device: torch.device, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds per call: CUDA events on the GPU, the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(fn, device)[0])
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_subprocess(
    cmd: list[str],
    timeout: float,
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> tuple[int | None, str]:
    """(return code or None on timeout, combined output); the output also goes to the log."""
    log(f"$ {' '.join(cmd)}  (timeout {timeout:.0f} s)")
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env or os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=max(5.0, timeout),
        )
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        out += (
            (exc.stderr or b"").decode(errors="replace")
            if isinstance(exc.stderr, bytes)
            else (exc.stderr or "")
        )
        rc = None
    log(out)
    return rc, out


def randomise_heads(model: torch.nn.Module, seed: int = 0) -> None:
    """Random output heads: the default initialisation zeroes them, which gives uniform logits and would hide
    every difference in the trunk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (model.text_head, model.image_head):
            w = torch.randn(head.weight.shape, generator=gen) / math.sqrt(head.weight.shape[1])
            head.weight.copy_(w.to(head.weight.device, head.weight.dtype))


def tokens_equal(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """Equality of token grids, with the first differing (row, cell) when they differ."""
    a, b = a.reshape(a.shape[0], -1).cpu(), b.reshape(b.shape[0], -1).cpu()
    if a.shape != b.shape:
        return False, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a != b).nonzero()
    if len(diff) == 0:
        return True, f"{a.numel()} tokens identical"
    row, cell = (int(x) for x in diff[0])
    return False, f"{len(diff)} of {a.numel()} tokens differ; first at row {row}, cell {cell}"


def tiny_pipeline(device: torch.device, seed: int = 0) -> Any:
    """A small DALLE from parts (bundled tokenizer, tiny dVAE, tiny transformer with random heads), for
    --cpu-smoke."""
    from dalle.dvae import Decoder, Encoder
    from dalle.pipeline import DALLE, REGISTRY
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig

    tok = BPETokenizer.load(REGISTRY["shapes"] / "tokenizer.model")
    torch.manual_seed(seed)
    cfg = TransformerConfig.preset(
        "tiny", text_vocab_size=tok.vocab_size, text_len=16, image_grid=4, text_pad_id=tok.pad_id
    )
    model = DALLETransformer(cfg)
    randomise_heads(model, seed)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=cfg.image_vocab_size)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=cfg.image_vocab_size)
    return DALLE(tok, enc, dec, model, 32, name="tiny", trained_with_caption_dropout=True, device=device)


# ---------------------------------------------------------------------------------- 1. pytest gpu tests
def section_gpu_tests(ctx: Context, s: Section) -> None:
    """``python -m pytest -m gpu -q`` in a subprocess (the gpu-marked files only in --cpu-smoke)."""
    if importlib.util.find_spec("pytest") is None:
        s.skip(
            "pytest -m gpu",
            "pytest is not importable here; carry its wheel (scripts/gpu_check_wheels.sh pytest)",
        )
        return
    targets = ["tests"]
    if ctx.smoke:  # collecting the whole suite costs seconds; only these files hold gpu tests
        targets = sorted(
            str(p.relative_to(REPO))
            for p in (REPO / "tests").glob("test_*.py")
            if "mark.gpu" in p.read_text()
        )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rfEs",
        "--continue-on-collection-errors",
        *targets,
    ]
    seconds, (rc, out) = timed(
        lambda: run_subprocess(cmd, min(s.budget, ctx.remaining() - 5), ctx.log), ctx.device
    )
    s.fig("seconds", round(seconds, 1))
    summary = next(
        (
            ln.strip("= ")
            for ln in reversed(out.splitlines())
            if re.search(
                r"\d+ (passed|failed|skipped|"
                r"deselected|error)",
                ln,
            )
        ),
        "",
    )
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    s.fig("counts", counts)
    s.fig("summary", summary)
    failed = [ln.strip() for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    if failed:
        s.fig("failed", failed[:20])
    if rc is None:
        s.check("pytest -m gpu", False, f"timed out after {s.budget:.0f} s; see gpu-check.log")
    elif rc == 5 or (rc == 0 and not counts.get("passed")):
        reason = "no CUDA: every gpu test skipped" if not ctx.cuda else "no gpu test ran"
        s.skip("pytest -m gpu", f"{reason} ({summary or 'no tests collected'})")
    else:
        s.check("pytest -m gpu", rc == 0, summary + ("; " + "; ".join(failed[:5]) if failed else ""))


# ----------------------------------------------------------------------- 2. cached decode vs full forward
def _sdpa_backends() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    names = ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION")
    return {n: getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def _unsupported(exc: BaseException) -> bool:
    # CUDA says "No available kernel. Aborting execution.", the CPU
    # "No viable backend for scaled_dot_product_attention"
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("no available kernel" in text or "no viable backend" in text)


def section_cached_decode(ctx: Context, s: Section) -> None:
    """Logits of prefill + decode_step against the teacher-forced forward, per dtype and SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dalle.transformer import DALLETransformer, TransformerConfig

    dev = ctx.device
    if ctx.smoke:
        cfg = TransformerConfig.preset(
            "tiny", attn_types=["full", "row", "column", "conv"], attn_backend="sdpa"
        )
    else:
        cfg = TransformerConfig.preset(
            "tiny",
            text_len=32,
            image_grid=16,
            depth=4,
            heads=4,
            head_dim=64,
            text_vocab_size=256,
            image_vocab_size=512,
            attn_types=["full", "row", "column", "conv"],
            attn_backend="sdpa",
        )
    s.fig(
        "model",
        f"depth {cfg.depth} ({', '.join(cfg.layer_types)}), d_model {cfg.d_model}, "
        f"text {cfg.text_len} + {cfg.image_grid}x{cfg.image_grid} cells, batch 2",
    )
    torch.manual_seed(0)
    base = DALLETransformer(cfg).eval()
    randomise_heads(base)
    base = base.to(dev)
    text = torch.randint(1, cfg.text_vocab_size, (2, cfg.text_len))
    text[1, cfg.text_len // 2 :] = cfg.text_pad_id  # one caption shorter than text_len: pads in the stream
    image = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
    text, image = text.to(dev), image.to(dev)
    n0 = 5  # primed cells: prefill covers text, start-of-image and cells 0..4
    positions = torch.arange(cfg.seq_len, device=dev)

    base.cuda_dtype = torch.float32
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = base(text, image)[1].float()

    dtypes = {"fp32": torch.float32} if not ctx.cuda else {"fp32": torch.float32, "bf16": torch.bfloat16}
    if not ctx.cuda:
        s.skip("bf16", "CPU computes in float32 (bf16 is CUDA's autocast); runs on CUDA")
    tol = {"fp32": 1e-4, "bf16": 3e-2}  # relative error: fp32 arithmetic, and bf16 operands through 4 layers
    rows = []
    for dname, dtype in dtypes.items():
        model = copy.deepcopy(base)
        model.cuda_dtype = dtype
        if ctx.cuda and dtype != torch.float32:
            model.cast_matmul_weights(dtype)  # the pipeline's rule on CUDA
        for bname, backend in _sdpa_backends().items():
            name = f"{dname} {bname}"
            try:
                with torch.no_grad(), sdpa_kernel([backend]):
                    full = model(text, image)[1]
                    cached = [model.prefill(text, image[:, :n0])]
                    for j in range(n0 + 1, cfg.image_len):
                        cached.append(model.decode_step(image[:, j - 1], positions[cfg.text_len + j]).clone())
                    sync(dev)
            except Exception as exc:  # noqa: BLE001 - a backend that rejects masks is reported, not fatal
                message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                if _unsupported(exc):
                    rows.append({"case": name, "result": "unsupported"})
                    s.check(name, None, f"unsupported: {message}")
                else:  # any other error fails this case only; the other backends still run
                    rows.append({"case": name, "result": f"error: {type(exc).__name__}"})
                    s.check(name, False, f"{type(exc).__name__}: {message}")
                    ctx.log(f"[cached-decode] {name}: {traceback.format_exc()}")
                continue
            finally:
                model.reset_cache()
            got = torch.stack(cached, 1)
            want = full[:, n0:]
            row = {
                "case": name,
                "cached_vs_full_max_abs": max_abs(got, want),
                "cached_vs_full_rel": rel_err(got, want),
                "full_vs_fp32_math_rel": rel_err(full, ref),
                "cached_vs_fp32_math_rel": rel_err(got, ref[:, n0:]),
            }
            rows.append(row)
            s.check(
                name,
                row["cached_vs_full_rel"] < tol[dname] and row["full_vs_fp32_math_rel"] < tol[dname],
                f"cached vs full: max abs {row['cached_vs_full_max_abs']:.2e}, "
                f"rel {row['cached_vs_full_rel']:.2e}; "
                f"full vs fp32 MATH rel {row['full_vs_fp32_math_rel']:.2e} (tolerance {tol[dname]:.0e})",
            )
        del model
    s.fig("cases", rows)


# ------------------------------------------------------------------------------ 3. FlexAttention vs SDPA
def section_flex(ctx: Context, s: Section) -> None:
    """``dalle.attention.attend`` with backend flex vs sdpa: forward and backward errors against a float32
    reference (upcast inputs), and times. CPU: forward only (FlexAttention has no CPU backward), one type."""
    from dalle.attention import ATTN_TYPES, AttentionMasks, attend

    dev = ctx.device
    # four mask types, each compiled for the forward with and without grad mode: more than dynamo's default 8
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 32))
    if ctx.smoke:
        masks, shape, dtype, types, backward = (
            AttentionMasks(8, 6),
            (1, 2, 44, 16),
            torch.float32,
            ["row"],
            False,
        )
        s.skip(
            "bf16 backward",
            "CPU: FlexAttention has no backward there and bf16 is CUDA's; forward in fp32 only",
        )
    else:
        masks, shape, dtype, types, backward = (
            AttentionMasks(256, 32),
            (4, 8, 1280, 64),
            torch.bfloat16,
            ATTN_TYPES,
            True,
        )
    s.fig("shape", f"B{shape[0]} H{shape[1]} L{shape[2]} D{shape[3]} {str(dtype).replace('torch.', '')}")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for attn_type in types:
        if s.out_of_time():
            s.skip(attn_type, "section time budget reached")
            continue
        q, k, v, do = (torch.randn(shape, device=dev, generator=gen) for _ in range(4))
        # float32 reference on upcast inputs (SDPA MATH through the dense additive mask)
        qr, kr, vr = (t.clone().requires_grad_(backward) for t in (q, k, v))
        ref = attend(qr, kr, vr, masks, attn_type, "sdpa")
        if backward:
            ref.backward(do)
        row: dict[str, Any] = {"type": attn_type}
        outs = {}
        for backend in ("sdpa", "flex"):
            qb, kb, vb = (t.to(dtype).requires_grad_(backward) for t in (q, k, v))
            out = attend(qb, kb, vb, masks, attn_type, backend)
            row[f"{backend}_fwd_rel"] = rel_err(out, ref)
            if backward:
                out.backward(do.to(dtype))
                row[f"{backend}_grad_rel"] = max(
                    rel_err(t.grad, r.grad) for t, r in ((qb, qr), (kb, kr), (vb, vr))
                )
            outs[backend] = out.detach()

            def fwd(qb=qb, kb=kb, vb=vb, backend=backend, attn_type=attn_type) -> Any:
                with torch.no_grad():
                    return attend(qb, kb, vb, masks, attn_type, backend)

            reps = 3 if ctx.smoke else 10
            row[f"{backend}_fwd_ms"] = median_time(fwd, dev, reps=reps, warmup=1) * 1e3
            if backward:
                grad_out = do.to(dtype)

                def fwd_bwd(qb=qb, kb=kb, vb=vb, backend=backend, attn_type=attn_type, grad=grad_out) -> None:
                    attend(qb, kb, vb, masks, attn_type, backend).backward(grad)

                row[f"{backend}_fwd_bwd_ms"] = median_time(fwd_bwd, dev, reps=reps, warmup=1) * 1e3
        row["flex_vs_sdpa_fwd_rel"] = rel_err(outs["flex"], outs["sdpa"])
        rows.append(row)
        # FlexAttention must be as close to the float32 reference as SDPA at this precision, within a margin
        limit_f = max(2 * row["sdpa_fwd_rel"], 1e-5 if dtype == torch.float32 else 1e-2)
        ok = row["flex_fwd_rel"] <= limit_f
        detail = (
            f"fwd rel err vs fp32: flex {row['flex_fwd_rel']:.2e}, sdpa {row['sdpa_fwd_rel']:.2e}; "
            f"fwd flex {row['flex_fwd_ms']:.3f} ms, sdpa {row['sdpa_fwd_ms']:.3f} ms"
        )
        if backward:
            limit_b = max(2 * row["sdpa_grad_rel"], 2e-2)
            ok = ok and row["flex_grad_rel"] <= limit_b
            detail += (
                f"; grad rel err flex {row['flex_grad_rel']:.2e}, sdpa {row['sdpa_grad_rel']:.2e}; fwd+bwd "
                f"flex {row['flex_fwd_bwd_ms']:.3f} ms, sdpa {row['sdpa_fwd_bwd_ms']:.3f} ms"
            )
        s.check(attn_type, ok, detail)
    s.fig("cases", rows)


# ------------------------------------------------------------------------------------ 4. bundled model
def section_bundled(ctx: Context, s: Section) -> None:
    """The bundled model (``shapes``; a tiny pipeline in --cpu-smoke): determinism, batch independence,
    rerank, complete and guidance."""
    from dalle.pipeline import DALLE

    if ctx.smoke:
        pipe = tiny_pipeline(ctx.device)
        s.note("--cpu-smoke: a tiny random pipeline stands in for the bundled model (same code path)")
    else:
        pipe = DALLE.from_pretrained("shapes", device=ctx.device)
    s.fig(
        "model",
        f"{pipe.name}: {pipe.grid}x{pipe.grid} tokens, dtype {str(pipe.dtype).replace('torch.', '')}, "
        f"guidance {'yes' if pipe.trained_with_caption_dropout else 'no'}",
    )
    gen = dict(progress=False, return_tokens=True)

    t, a = timed(lambda: pipe.generate(PROMPT, num_images=2, seed=0, **gen), ctx.device)
    s.fig("generate_2_images_s", round(t, 3))
    b = pipe.generate(PROMPT, num_images=2, seed=0, **gen)
    s.check("same seed twice", *tokens_equal(a.tokens, b.tokens))

    t4, batched = timed(lambda: pipe.generate(PROMPT, num_images=4, seed=10, batch_size=4, **gen), ctx.device)
    singles = torch.cat(
        [pipe.generate(PROMPT, num_images=1, seed=10 + k, batch_size=1, **gen).tokens for k in range(4)]
    )
    s.fig("generate_batch_of_4_s", round(t4, 3))
    s.check("batch of 4 vs one by one", *tokens_equal(batched.tokens, singles))

    if s.out_of_time():
        s.skip("rerank / complete / guidance", "section time budget reached")
        return
    r = pipe.generate(PROMPT, num_images=1, rerank=4, seed=0, **gen)
    ok = len(r.images) == 1 and r.scores is not None and bool(torch.isfinite(r.scores).all())
    s.check(
        "rerank 4 -> 1",
        ok,
        f"{len(r.images)} image, scores {r.scores.tolist() if r.scores is not None else None}",
    )

    rows = pipe.completion_rows
    c = pipe.complete(a.images[0], PROMPT, num_images=2, seed=0, **gen)
    source = pipe.encode_image(a.images[0]).cpu().reshape(1, pipe.grid, pipe.grid)
    kept = bool((c.tokens[:, :rows] == source[:, :rows]).all())
    s.check("complete", len(c.images) == 2 and kept, f"2 images; top {rows} token rows kept: {kept}")

    if pipe.trained_with_caption_dropout:
        g = pipe.generate(PROMPT, num_images=2, seed=0, guidance_scale=3.0, **gen)
        ok = len(g.images) == 2 and all(im.size == (pipe.image_size, pipe.image_size) for im in g.images)
        s.check("guidance 3.0", ok, f"{len(g.images)} images of {g.images[0].size}")
    else:
        s.skip("guidance", f"{pipe.name} was not trained with caption dropout")


# ----------------------------------------------------------------------------------- 5. compiled decode
def _sample_tokens(model: Any, text: torch.Tensor, seed: int) -> torch.Tensor:
    from dalle.sampling import sample

    gens = [torch.Generator(device=model.device).manual_seed(seed + i) for i in range(text.shape[0])]
    return sample(model, text, generator=gens)


def _compile(model: Any, smoke: bool) -> None:
    if smoke:
        # inductor's C++ code generation takes tens of seconds on a small CPU: the smoke run checks that the
        # step traces as one graph (what CUDA graphs need), with dynamo's eager backend instead
        model.compile_decoding(backend="eager", fullgraph=True)
    else:
        model.compile_decoding()  # mode "reduce-overhead" on CUDA


def section_compiled(ctx: Context, s: Section) -> None:
    """Compiled decode step vs eager: teacher-forced logits, sampled tokens for a seed, and tokens/s of the
    12x768 ``small`` preset (random weights) at batch 1 and 16; then DALLE(compile=True) on the bundled
    model."""
    from dalle.sampling import sample
    from dalle.transformer import DALLETransformer, TransformerConfig

    dev = ctx.device
    torch.manual_seed(0)
    if ctx.smoke:
        cfg, batches = TransformerConfig.preset("tiny"), (1, 4)
    else:
        cfg, batches = TransformerConfig.preset("small"), (1, 16)
    model = DALLETransformer(cfg).eval()
    randomise_heads(model)
    model = model.to(dev)
    if ctx.cuda:  # the pipeline's precision rules
        model.cuda_dtype = torch.bfloat16
        model.cast_matmul_weights(torch.bfloat16)
    s.fig(
        "model",
        f"preset {'tiny' if ctx.smoke else 'small'}: depth {cfg.depth}, d_model {cfg.d_model}, "
        f"{cfg.image_len} image tokens" + (", bf16 (pipeline rules)" if ctx.cuda else ", fp32"),
    )
    texts = {b: torch.randint(1, cfg.text_vocab_size, (b, cfg.text_len), device=dev) for b in batches}

    def warm_up(b: int) -> None:  # a short primed sample: allocations, decode tables, (compilation)
        prime = torch.zeros(b, cfg.image_len - 8, dtype=torch.long, device=dev)
        sample(
            model,
            texts[b],
            generator=[torch.Generator(device=dev).manual_seed(i) for i in range(b)],
            prime=prime,
        )

    eager = {}
    for b in batches:
        warm_up(b)
        eager[b] = timed(lambda b=b: _sample_tokens(model, texts[b], 0), dev)
    # teacher-forced logits of the eager step along the eager sample
    image = eager[1][1].reshape(1, -1)
    steps = min(cfg.image_len - 1, 64)
    positions = torch.arange(cfg.seq_len, device=dev)

    def teacher_forced() -> torch.Tensor:
        out = [model.prefill(texts[1], image[:, :1])]
        for j in range(2, steps + 1):
            out.append(model.decode_step(image[:, j - 1], positions[cfg.text_len + j]).clone())
        return torch.stack(out, 1)

    ref_logits = teacher_forced()
    t_compile, _ = timed(lambda: (_compile(model, ctx.smoke), warm_up(batches[0])), dev)
    s.fig("compile_and_warm_up_s", round(t_compile, 1))
    if ctx.cuda:  # did inductor capture CUDA graphs, or skip them (and why)?
        from torch._dynamo.utils import counters

        s.fig(
            "inductor_cudagraph_counters", {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
        )
    got_logits = teacher_forced()
    tol = 1e-4 if not ctx.cuda else 3e-2
    err = rel_err(got_logits, ref_logits)
    s.check(
        "teacher-forced logits, compiled vs eager",
        err < tol,
        f"rel err {err:.2e}, max abs {max_abs(got_logits, ref_logits):.2e} over {steps} steps "
        f"(tolerance {tol:.0e})",
    )
    compiled = {}
    for b in batches:
        if s.out_of_time():
            s.skip(f"compiled batch {b}", "section time budget reached")
            continue
        if b != batches[0]:
            warm_up(b)  # a new batch size compiles / records anew
        compiled[b] = timed(lambda b=b: _sample_tokens(model, texts[b], 0), dev)
    same, detail = tokens_equal(compiled[1][1], eager[1][1])
    if (
        ctx.cuda
    ):  # bf16: fused kernels round differently; a near-tie then flips one token and the rest follows
        s.fig("random_model_tokens_identical_bf16", same)
        s.note(f"random-weight model, bf16, seed 0, batch 1: compiled vs eager tokens: {detail}")
    else:
        s.check("same tokens for a seed (batch 1)", same, detail)
    n = cfg.image_len
    for b in batches:
        s.fig(f"eager_batch{b}_s", round(eager[b][0], 3))
        s.fig(f"eager_batch{b}_tokens_per_s", round(n * b / eager[b][0], 1))
        if b in compiled:
            s.fig(f"compiled_batch{b}_s", round(compiled[b][0], 3))
            s.fig(f"compiled_batch{b}_tokens_per_s", round(n * b / compiled[b][0], 1))
    if ctx.cuda and 1 in compiled:
        t1 = compiled[1][0]
        s.goal(
            "1024 image tokens, 12x768, batch 1 <= 0.30 s",
            t1 <= 0.30,
            f"compiled {t1:.3f} s, eager {eager[1][0]:.3f} s ({eager[1][0] / t1:.1f}x)",
        )
    model.compile_decoding(mode="off")
    model = None  # the closures above hold the name: drop the model through it
    torch._dynamo.reset()  # drops the compiled graphs and their CUDA-graph memory
    free_memory(dev)

    # the user-facing switch on the bundled model: same seed, same tokens
    if ctx.smoke:
        s.skip(
            "DALLE(compile=True) on the bundled model",
            "CUDA only (inductor on a CPU is too slow for a smoke run)",
        )
        return
    if s.out_of_time():
        s.skip("DALLE(compile=True) on the bundled model", "section time budget reached")
        return
    from dalle.pipeline import DALLE

    plain = DALLE.from_pretrained("shapes", device=dev)
    fast = DALLE.from_pretrained("shapes", device=dev, compile=True)
    kw = dict(num_images=2, seed=0, progress=False, return_tokens=True)
    a = plain.generate(PROMPT, **kw).tokens
    t_first, _ = timed(lambda: fast.generate(PROMPT, **kw), dev)
    t_fast, b = timed(lambda: fast.generate(PROMPT, **kw), dev)
    t_plain, _ = timed(lambda: plain.generate(PROMPT, **kw), dev)
    s.fig("bundled_generate_2_eager_s", round(t_plain, 3))
    s.fig("bundled_generate_2_compiled_s", round(t_fast, 3))
    s.fig("bundled_compile_first_call_s", round(t_first, 1))
    s.check("DALLE(compile=True) same tokens as eager (shapes, seed 0)", *tokens_equal(b.tokens, a))
    plain = fast = None
    torch._dynamo.reset()


# -------------------------------------------------------------------------------- 6. paper preset memory
class _StopSampling(Exception):
    pass


def _stop_after(k: int) -> Callable[[int, torch.Tensor], None]:
    calls = [0]

    def callback(step: int, tokens: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] >= k:
            raise _StopSampling

    return callback


def section_paper(ctx: Context, s: Section) -> None:
    """Paper preset with random weights through the pipeline's CUDA rules: its default batch size and the peak
    memory of sampling a few tokens at that batch size, against kv_cache_bytes / batch_size_for_memory."""
    from dalle.dvae import Decoder, Encoder
    from dalle.pipeline import DALLE, REGISTRY, batch_size_for_memory, kv_cache_bytes
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig

    cfg = TransformerConfig.preset("paper")
    with torch.device("meta"):
        meta = DALLETransformer(cfg)
    params = meta.num_parameters()
    meta.cast_matmul_weights(torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    cache_row = kv_cache_bytes(cfg, torch.bfloat16)
    del meta
    s.fig("parameters", params)
    s.fig("weights_gib_bf16_rule", round(weight_bytes / 2**30, 2))
    s.fig("kv_cache_gib_per_row", round(cache_row / 2**30, 3))
    for gib in (80, 141):  # what the rule gives on an H100 and an H200 after the weights
        free = gib * 2**30 - weight_bytes
        s.fig(f"predicted_batch_{gib}gib", batch_size_for_memory(free, cache_row))
    s.check(
        "prediction computed (meta device)",
        cache_row > 0 and weight_bytes > 0,
        f"{params / 1e9:.2f}B parameters, {weight_bytes / 2**30:.1f} GiB of weights, "
        f"{cache_row / 2**30:.2f} GiB KV cache per row",
    )

    tok = BPETokenizer.load(REGISTRY["shapes"] / "tokenizer.model")
    if not ctx.cuda:
        # the measuring code path on a tiny pipeline: the default batch size and a stopped sampling run
        pipe = tiny_pipeline(ctx.device)
        bs = pipe._default_batch_size()
        try:
            pipe.generate([PROMPT] * bs, progress=False, seed=0, callback=_stop_after(3))
        except _StopSampling:
            pass
        s.check(
            "tiny pipeline: default batch, sampling stopped after 3 tokens",
            bs >= 1 and pipe.transformer.cache is None,
            f"default batch {bs}; KV cache released after the stop: {pipe.transformer.cache is None}",
        )
        s.skip("peak memory at the paper size", "CUDA only")
        return
    total = torch.cuda.get_device_properties(ctx.device).total_memory
    fp32_bytes = params * 4
    if total < fp32_bytes * 1.15:
        s.skip(
            "peak memory at the paper size",
            f"the GPU has {total / 2**30:.0f} GiB; building the model in float32 "
            f"first needs {fp32_bytes / 2**30:.0f} GiB",
        )
        return
    free_memory(ctx.device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = DALLETransformer(cfg)
    pipe = DALLE(
        tok, Encoder(), Decoder(), model, 256, name="paper-random", device=ctx.device
    )  # casts to bf16
    del model
    free_memory(ctx.device)
    s.fig("build_s", round(time.perf_counter() - t0, 1))
    allocated = torch.cuda.memory_allocated(ctx.device)
    free, _ = torch.cuda.mem_get_info(ctx.device)
    bs = pipe._default_batch_size()
    s.fig("allocated_after_build_gib", round(allocated / 2**30, 2))
    s.fig("free_before_sampling_gib", round(free / 2**30, 2))
    s.fig("default_batch_size", bs)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    k = 4
    start = time.perf_counter()
    try:
        pipe.generate([PROMPT] * bs, progress=False, seed=0, callback=_stop_after(k))
    except _StopSampling:
        pass
    sync(ctx.device)
    s.fig(f"prefill_and_{k}_tokens_s", round(time.perf_counter() - start, 2))
    peak = torch.cuda.max_memory_allocated(ctx.device)
    extra = peak - allocated
    predicted = bs * cache_row
    s.fig("peak_gib", round(peak / 2**30, 2))
    s.fig("sampling_extra_gib", round(extra / 2**30, 2))
    s.fig("predicted_kv_cache_gib", round(predicted / 2**30, 2))
    s.fig("extra_over_prediction", round(extra / predicted, 3))
    s.check(
        "peak within the rule's budget",
        extra <= free / 2,
        f"batch {bs}: sampling took {extra / 2**30:.1f} GiB above the weights; predicted KV caches "
        f"{predicted / 2**30:.1f} GiB; the rule budgets half the free {free / 2**30:.1f} GiB "
        "for two caches per row",
    )
    pipe.transformer.reset_cache()
    del pipe
    free_memory(ctx.device)


# ------------------------------------------------------------------------------------------ 7. training
def transformer_flops_per_sample(cfg: Any) -> float:
    """Forward FLOPs of one sample: the blocks' matmuls, dense attention over the whole stream (what SDPA
    computes with a mask) and both heads. Training (forward + backward) is 3x this; activation checkpointing
    recomputes one more forward, which MFU does not count."""
    t, d, n = cfg.seq_len, cfg.d_model, cfg.image_len
    per_layer = 2 * t * d * d * (4 + 2 * cfg.mlp_ratio) + 4 * t * t * d
    heads = 2 * d * ((cfg.text_len - 1) * cfg.text_vocab_size + n * cfg.image_vocab_size)
    return cfg.depth * per_layer + heads


def _train_rate(run_dir: Path, batch: int, skip: int) -> tuple[float, list[float]]:
    """Samples/s between the ``skip``-th and the last logged step, and every step's loss."""
    from dalle.train.common import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    losses = [float(r["loss"]) for r in rows]
    rows = rows[skip:] if len(rows) > skip + 1 else rows
    span = rows[-1]["time"] - rows[0]["time"]
    steps = rows[-1]["step"] - rows[0]["step"]
    return (batch * steps / span if span > 0 else float("nan")), losses


def section_training(ctx: Context, s: Section) -> None:
    """``dalle train`` (token shards, grad accumulation 2, activation checkpointing) and ``dalle train-dvae``
    (grad accumulation 2) for a few steps each through the trainers' own loops."""
    from dalle.pipeline import REGISTRY
    from dalle.train.common import init_distributed
    from dalle.train.config import DVAETrainConfig, TransformerTrainConfig
    from dalle.train.dvae import DVAETrainer
    from dalle.train.testing import TINY_DVAE, TINY_TRANSFORMER, make_tiny_dvae_dir
    from dalle.train.transformer import TransformerTrainer

    info = init_distributed(str(ctx.device))
    bundled = REGISTRY["shapes"]
    quiet = dict(eval_every=0, sample_every=0, plot_every=0, ckpt_every=10**6, log_every=1, progress=False)
    steps = 3 if ctx.smoke else 20
    skip = 1 if ctx.smoke else 5  # warm-up steps left out of the rate

    def transformer_run(name: str, variant: dict[str, Any]) -> None:
        """One ``dalle train`` run; ``variant``: TransformerTrainConfig overrides
        (compile, checkpointing, ...)."""
        ckpt = variant.get("checkpoint_activations", True)
        if ctx.smoke:
            dvae = make_tiny_dvae_dir(ctx.tmp / "tiny-dvae", image_size=32)
            tcfg = TransformerTrainConfig(
                **{
                    **TINY_TRANSFORMER,
                    **quiet,
                    "dvae": str(dvae),
                    "data": "shapes",
                    "tokenizer": str(bundled / "tokenizer.model"),
                    "steps": steps,
                    "grad_accum": 2,
                    "checkpoint_activations": True,
                    "eval_samples": 0,
                    "device": str(ctx.device),
                    "out_dir": str(ctx.tmp / f"train-{name}"),
                    **variant,
                }
            )
        else:
            from dalle.train.encode import EncodeConfig, encode_dataset

            batch = 32
            shards = ctx.tmp / "tokens"
            if not shards.is_dir():
                t, _ = timed(
                    lambda: encode_dataset(
                        EncodeConfig(
                            data="shapes:1",
                            dvae=str(bundled),
                            out_dir=str(shards),
                            limit=batch * (steps + 2),
                            image_size=256,
                            device=str(ctx.device),
                            progress=False,
                        )
                    ),
                    ctx.device,
                )
                s.fig("encode_dataset_s", round(t, 1))
            settings: dict[str, Any] = dict(
                data=str(shards),
                dvae=str(bundled),
                tokenizer=str(bundled / "tokenizer.model"),
                preset="small",
                text_len=256,
                batch_size=batch,
                grad_accum=2,
                checkpoint_activations=True,
                steps=steps,
                warmup_steps=2,
                bpe_dropout=0.0,
                eval_samples=0,
                device=str(ctx.device),
                out_dir=str(ctx.tmp / f"train-{name}"),
            )
            tcfg = TransformerTrainConfig(**{**settings, **quiet, **variant})
        trainer = TransformerTrainer(tcfg, info)
        model_cfg = trainer.tcfg
        wall, _ = timed(trainer.fit, ctx.device)
        rate, losses = _train_rate(Path(tcfg.out_dir), tcfg.batch_size, skip)
        del trainer
        free_memory(ctx.device)
        how = (
            f"batch {tcfg.batch_size} (grad accumulation {tcfg.grad_accum})"
            + (", activation checkpointing" if ckpt else "")
            + (", compiled" if tcfg.compile else "")
        )
        s.fig(
            f"{name}",
            f"depth {model_cfg.depth}, d_model {model_cfg.d_model}, stream {model_cfg.seq_len}, "
            f"{how}, {steps} steps",
        )
        s.fig(f"{name}_wall_s", round(wall, 1))
        s.fig(f"{name}_samples_per_s", round(rate, 2))
        s.fig(f"{name}_losses", [round(x, 4) for x in losses])
        finite = len(losses) == steps and all(math.isfinite(x) for x in losses)
        s.check(
            f"{name}: {steps} steps, finite losses",
            finite,
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {rate:.1f} samples/s ({how})",
        )
        flops = transformer_flops_per_sample(model_cfg)
        if ctx.cuda:
            achieved = 3 * flops * rate
            s.fig(f"{name}_tflops", round(achieved / 1e12, 1))
            for peak_name, peak in ctx.peak_flops.items():
                s.fig(f"{name}_mfu_vs_{peak_name}", round(achieved / peak, 3))
            peak = ctx.peak_flops.get("datasheet") or ctx.peak_flops.get("measured_matmul")
            if peak:
                recompute = (
                    "; with the recomputation of checkpointing the hardware did "
                    f"{4 / 3 * achieved / peak:.1%}"
                    if ckpt
                    else ""
                )
                s.goal(
                    f">= 45% MFU ({name}: {how})",
                    achieved / peak >= 0.45,
                    f"{achieved / 1e12:.0f} TFLOP/s = {achieved / peak:.1%} of {peak / 1e12:.0f} "
                    f"({'datasheet' if 'datasheet' in ctx.peak_flops else 'measured'}){recompute}",
                )
        else:
            s.skip(f"{name}: MFU", "CUDA only")

    def dvae_run() -> None:
        if ctx.smoke:
            dcfg = DVAETrainConfig(
                **{
                    **TINY_DVAE,
                    **quiet,
                    "steps": steps,
                    "grad_accum": 2,
                    "device": str(ctx.device),
                    "out_dir": str(ctx.tmp / "train-d"),
                }
            )
        else:
            dcfg = DVAETrainConfig(
                data="shapes",
                image_size=128,
                batch_size=16,
                grad_accum=2,
                steps=steps,
                eval_images=8,
                device=str(ctx.device),
                out_dir=str(ctx.tmp / "train-d"),
                **quiet,
            )
        dtrainer = DVAETrainer(dcfg, info)
        wall, _ = timed(dtrainer.fit, ctx.device)
        rate, losses = _train_rate(Path(dcfg.out_dir), dcfg.batch_size, skip)
        del dtrainer
        free_memory(ctx.device)
        s.fig(
            "dvae",
            f"n_hid {dcfg.n_hid}, {dcfg.image_size} px, batch {dcfg.batch_size} (grad accumulation 2), "
            f"{steps} steps; images rendered and augmented on the host in the loop",
        )
        s.fig("dvae_wall_s", round(wall, 1))
        s.fig("dvae_samples_per_s", round(rate, 2))
        finite = len(losses) == steps and all(math.isfinite(x) for x in losses)
        s.check(
            f"train-dvae: {steps} steps, finite losses",
            finite,
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {rate:.1f} samples/s",
        )
        s.note(
            "train-dvae has no activation checkpointing option (DVAETrainConfig); "
            "it runs with grad accumulation only"
        )

    # each run is reported on its own: one failing does not hide the other
    runs: list[tuple[str, Callable[[], None]]] = [("train", lambda: transformer_run("train", {}))]
    if (
        not ctx.smoke
    ):  # inductor's CPU compilation is too slow for a smoke run (tests/test_compiled_training.py)
        runs.append(
            (
                "train-compiled",
                lambda: transformer_run(
                    "train-compiled", {"compile": True, "checkpoint_activations": False, "grad_accum": 1}
                ),
            )
        )
    runs.append(("train-dvae", dvae_run))
    for name, run in runs:
        if s.out_of_time():
            s.skip(name, "section time budget reached")
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001
            ctx.log(f"[training] {name}: {traceback.format_exc()}")
            s.check(
                name, False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            )
            free_memory(ctx.device)


# ---------------------------------------------------------------------------------------- 8. benchmarks
def _table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header separators left out)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def section_benchmarks(ctx: Context, s: Section) -> None:
    """benchmarks/bench_dvae.py (ours in bf16 vs OpenAI's dall_e fp16 at batch 32) and bench_peers.py (our
    decode vs transformers GPT-2 generate) with their CUDA options, as subprocesses. bench_transformer.py's
    CUDA section (cached sampling, compiled step, attention kernels) is covered by sections 3 and 5."""
    py = sys.executable
    env = os.environ.copy()
    # ---- dVAE vs OpenAI's dall_e
    if importlib.util.find_spec("dall_e") is None:
        s.skip(
            "dVAE vs dall_e",
            "OpenAI's dall_e is not importable: run scripts/gpu_check_wheels.sh here and pass "
            "carry ['.whl'] (DALL-E's wheel; attrs is on the device)",
        )
    elif ctx.smoke:
        s.skip("dVAE vs dall_e", "full-size dVAE: about 30 s per image pair on a small CPU; CUDA only")
    else:
        # ours as shipped (cuDNN algorithm timing on), then compiled; dall_e runs beside ours in each
        # (bench_dvae.py --no-cudnn-benchmark times ours with cuDNN's heuristic choice, for attribution)
        variants = (("", []), ("compiled", ["--compile"]))
        for label, extra in variants:
            if label and s.out_of_time():
                s.skip(f"bench_dvae.py {' '.join(extra)}", "section time budget reached")
                continue
            cmd = [
                py,
                "benchmarks/bench_dvae.py",
                "--device",
                "cuda",
                "--batch-sizes",
                "32",
                "--dtype",
                "bfloat16",
                "--repeats",
                "5",
                "--warmup",
                "2",
                *extra,
            ]
            rc, out = run_subprocess(cmd, min(150.0, ctx.remaining() - 5), ctx.log, env)
            rows = [r for r in _table_rows(out) if r and r[0] in ("encode", "decode")]
            key = f"_{label.replace(' ', '_')}" if label else ""
            s.fig(f"bench_dvae{key}_rows", rows)
            name = f"bench_dvae.py --device cuda {' '.join(extra)}".strip()
            if rc != 0 or len(rows) != 2:
                s.check(name, False, f"exit {rc}; see gpu-check.log")
                continue
            s.check(
                name,
                True,
                "; ".join(f"{r[0]}: dall_e {r[2]} s/img, dalle {r[3]} s/img, {r[4]}" for r in rows),
            )
            for r in rows:
                speedup = float(r[4].rstrip("x"))
                s.fig(f"dvae_{r[0]}{key}_speedup", speedup)
                s.goal(
                    f"dVAE {r[0]} >= 2.5x dall_e fp16 at batch 32{' (' + label + ')' if label else ''}",
                    speedup >= 2.5,
                    f"{speedup:.2f}x",
                )
    # ---- sampling vs transformers GPT-2 generate
    if s.out_of_time():
        s.skip("bench_peers.py", "section time budget reached")
        return
    if ctx.smoke:
        shape = [
            "--depth",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--grid",
            "4",
            "--text-len",
            "4",
            "--text-vocab",
            "32",
            "--image-vocab",
            "32",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    else:
        shape = [
            "--depth",
            "12",
            "--heads",
            "12",
            "--head-dim",
            "64",
            "--grid",
            "32",
            "--text-len",
            "256",
            "--text-vocab",
            "16384",
            "--image-vocab",
            "8192",
            "--device",
            "cuda",
        ]
    cmd = [
        py,
        "benchmarks/bench_peers.py",
        *shape,
        "--batch",
        "1",
        "--repeats",
        "1",
        "--skip",
        "dalle-pytorch",
    ]
    rc, out = run_subprocess(cmd, min(200.0, ctx.remaining() - 5), ctx.log, env)
    rows = {r[0]: r[1] for r in _table_rows(out) if len(r) >= 2}
    s.fig("bench_peers_rows", rows)
    ours = rows.get("dalle (this library)")
    if rc != 0 or ours is None:
        s.check("bench_peers.py", False, f"exit {rc}; see gpu-check.log")
        return
    s.check("bench_peers.py: dalle sampling", True, ours)
    hf = rows.get("transformers GPT-2 generate")
    if hf is not None:
        s.check("bench_peers.py: transformers GPT-2 generate", True, hf)
        m = re.search(r"([\d.]+)x ours", hf)
        if m:
            s.fig("transformers_time_over_ours", float(m.group(1)))
    else:
        s.skip(
            "transformers GPT-2 generate",
            rows.get("transformers", "transformers is not importable")
            + "; it is on the device image (5.17); else carry its wheel with its dependencies",
        )
    s.note(
        "bench_peers builds its models with default settings: ours under bf16 autocast on CUDA, "
        "GPT-2 in float32"
    )


# ------------------------------------------------------------------------------------------------- driver
SECTIONS: list[tuple[str, str, Callable[[Context, Section], None], float]] = [
    # (name, title, function, time budget in seconds on a GPU)
    ("gpu-tests", "1. gpu-marked pytest tests", section_gpu_tests, 150),
    (
        "cached-decode",
        "2. cached decode vs full forward, per dtype and SDPA backend",
        section_cached_decode,
        40,
    ),
    ("flex-vs-sdpa", "3. FlexAttention vs SDPA, forward and backward, bf16", section_flex, 75),
    (
        "bundled-model",
        "4. bundled model: determinism, batching, rerank, complete, guidance",
        section_bundled,
        45,
    ),
    ("compiled-decode", "5. compiled decode vs eager, tokens/s", section_compiled, 120),
    ("paper-memory", "6. paper preset: default batch size and peak memory", section_paper, 60),
    ("training", "7. training: train and train-dvae, samples/s, MFU", section_training, 180),
    ("benchmarks", "8. benchmark suite's GPU sections", section_benchmarks, 150),
]


def environment(device: torch.device) -> tuple[dict[str, Any], dict[str, float]]:
    """What ran where; on CUDA also the measured bf16 matmul ceiling (for MFU)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "youtokentome": importlib.util.find_spec("youtokentome") is not None,
        "dall_e": importlib.util.find_spec("dall_e") is not None,
        "transformers": importlib.util.find_spec("transformers") is not None,
        "pytest": importlib.util.find_spec("pytest") is not None,
    }
    peaks: dict[str, float] = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
        )
        for key, value in DATASHEET_BF16.items():
            if key in props.name:
                peaks["datasheet"] = value
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        t = median_time(lambda: a @ b, device, reps=10, warmup=3)
        peaks["measured_matmul"] = 2 * n**3 / t
        env["bf16_matmul_tflops_measured"] = round(peaks["measured_matmul"] / 1e12, 1)
        del a, b
        free_memory(device)
    return env, peaks


def install_wheels(folder: Path, log: Callable[[str], None]) -> str | None:
    """Install the wheels in ``folder`` (no index, no dependencies) into a temporary folder put on sys.path
    and PYTHONPATH (so subprocesses see them too); returns that folder."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return None
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--target",
        str(site),
        *map(str, wheels),
    ]
    rc, _ = run_subprocess(cmd, 120, log)
    if rc != 0:
        log(f"installing the wheels of {folder} failed (exit {rc}); going on without them")
        return None
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    importlib.invalidate_caches()
    return str(site)


def write_report(out: Path, env: dict[str, Any], results: dict[str, dict[str, Any]], started: float) -> None:
    total = time.monotonic() - started
    report = {
        "environment": env,
        "mode": "cpu-smoke" if env.get("smoke") else "cuda",
        "total_s": round(total, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sections": results,
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [
        f"# dalle GPU check ({report['mode']})",
        "",
        f"`{report['command']}`; total {total:.0f} s.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "| section | status | checks | goals | time |", "|---|---|---|---|---:|"]
    for name, title, _, _ in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        counts = {st: sum(c["status"] == st for c in r["checks"]) for st in (PASS, FAIL, SKIP)}
        goals = ", ".join(
            f"{c['status'].lower()}" for c in r["checks"] if c["status"] in (GOAL_MET, GOAL_MISSED)
        )
        summary = ", ".join(f"{n} {st.lower()}" for st, n in counts.items() if n)
        lines.append(f"| {title} | **{r['status']}** | {summary} | {goals} | {r.get('seconds', 0):.0f} s |")
    for name, title, _, _ in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        lines += ["", f"## {title}: {r['status']}", ""]
        if r.get("reason"):
            lines += [r["reason"], ""]
        if r["checks"]:
            lines += ["| check | status | detail |", "|---|---|---|"]
            lines += [f"| {c['name']} | {c['status']} | {c['detail']} |" for c in r["checks"]]
        simple = {k: v for k, v in r["figures"].items() if not isinstance(v, (list, dict))}
        if simple:
            lines += ["", "| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in simple.items()]
        for key, value in r["figures"].items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                cols = list(dict.fromkeys(c for row in value for c in row))
                lines += ["", f"{key}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                for row in value:
                    cells = [
                        f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                        for c in cols
                    ]
                    lines.append("| " + " | ".join(cells) + " |")
        for note in r["notes"]:
            lines.append(f"- {note}")
        if r.get("error"):
            lines += ["", "```", r["error"].rstrip(), "```"]
    (out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def parse_only(value: str | None) -> list[str]:
    names = [n for n, *_ in SECTIONS]
    if not value:
        return names
    chosen = []
    for item in value.split(","):
        item = item.strip()
        if item.isdigit() and 1 <= int(item) <= len(SECTIONS):
            chosen.append(names[int(item) - 1])
        elif item in names:
            chosen.append(item)
        else:
            raise SystemExit(f"--only: unknown section {item!r}; use 1-{len(SECTIONS)} or {', '.join(names)}")
    return [n for n in names if n in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="outputs/gpu-check", help="report folder (default outputs/gpu-check)"
    )
    parser.add_argument("--only", help="comma-separated section numbers or names (default: all)")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny configurations on the CPU (automatic without CUDA)"
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=540.0,
        help="seconds for the whole run (default 540): a section that would start with less than "
        "its budget left is skipped",
    )
    parser.add_argument(
        "--wheels", default=".whl", help="folder of wheels to install first if present (default .whl)"
    )
    args = parser.parse_args(argv)

    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "gpu-check.log").open("w")

    def log(text: str) -> None:
        log_file.write(text.rstrip() + "\n")
        log_file.flush()

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu") if smoke else torch.device("cuda")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    site = install_wheels(REPO / args.wheels, log)
    chosen = parse_only(args.only)
    env, peaks = environment(device)
    env.update(smoke=smoke, wheels_installed=site is not None)
    # a run that hangs in native code still ends, leaving the report of the sections done so far
    import faulthandler

    faulthandler.dump_traceback_later(args.time_limit + 45, exit=True, file=log_file)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(
            device=device,
            smoke=smoke,
            out=out,
            tmp=Path(tmp),
            log=log,
            deadline=started + args.time_limit,
            peak_flops=peaks,
        )
        for name, title, fn, budget in SECTIONS:
            if name not in chosen:
                continue
            if smoke:
                budget = 60.0
            print(f"[gpu-check] {title} ...", flush=True)
            sec = Section(budget)
            if ctx.remaining() < min(budget, 30.0):
                res = sec.result()
                res.update(status=SKIP, reason=f"skipped: {ctx.remaining():.0f} s left of --time-limit")
            else:
                error = None
                try:
                    with hard_limit(min(budget * 2, max(ctx.remaining(), 10.0))), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fn(ctx, sec)
                except (Exception, SectionTimeout) as exc:  # noqa: BLE001 - one failing section must not stop the others
                    error = traceback.format_exc()
                    log(f"[{name}] {error}")
                    sec.check(
                        "section ran to the end",
                        False,
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        if str(exc)
                        else type(exc).__name__,
                    )
                res = sec.result()
                if error:
                    res["error"] = error[-4000:]
            res["seconds"] = round(time.monotonic() - sec.start, 1)
            results[name] = res
            print(f"[gpu-check] {title}: {res['status']} ({res['seconds']:.0f} s)", flush=True)
            free_memory(device)
            write_report(out, env, results, started)
    faulthandler.cancel_dump_traceback_later()
    if site is not None:
        shutil.rmtree(site, ignore_errors=True)
    total = time.monotonic() - started
    # a compact copy of the report last, for when only the end of the output comes back
    print(f"\n[gpu-check] report: {out / 'gpu-check.md'}; total {total:.0f} s", flush=True)
    for name, title, *_ in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        print(
            f"{r['status']:4}  {title} ({r['seconds']:.0f} s){'  ' + r['reason'] if r.get('reason') else ''}"
        )
        for c in r["checks"]:
            print(f"      {c['status']}: {c['name']}: {c['detail'][:300]}")
        for key, value in r["figures"].items():
            if not isinstance(value, (list, dict)):
                print(f"      {key} = {value}")
    log_file.close()
    return 1 if any(r["status"] == FAIL for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())

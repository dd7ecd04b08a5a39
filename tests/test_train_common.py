"""Training infrastructure: schedules, the paper's dVAE loss terms, EMA, atomic checkpoints, metrics,
config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dalle.errors import CheckpointError, ConfigError
from dalle.seeds import derive_seed
from dalle.train.checkpoints import CheckpointManager
from dalle.train.config import DVAETrainConfig, TransformerTrainConfig
from dalle.train.dvae import gumbel_noise, kl_to_uniform, logit_laplace_nll, schedules
from dalle.train.ema import EMA
from dalle.train.outputs import MetricsLogger, read_metrics
from dalle.train.schedules import cosine_schedule, warmup_lr


# ---------------------------------------------------------------------------------------------- schedules
def test_cosine_schedule_formula() -> None:
    for step in (0, 1, 37, 99, 100, 500):
        expected = 2.0 + (8.0 - 2.0) * 0.5 * (1 + math.cos(math.pi * min(step, 100) / 100))
        assert cosine_schedule(step, 100, 8.0, 2.0) == pytest.approx(expected)
    assert cosine_schedule(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine_schedule(10, 0, 1.0, 0.25) == 0.25  # zero-length schedule: already at the end


def test_dvae_schedules_follow_the_paper_scaled_to_the_run() -> None:
    cfg = DVAETrainConfig(steps=3_000_000)
    n = cfg.resolved_steps()
    assert n == {"kl_steps": 5_000, "tau_steps": 150_000, "lr_steps": 1_200_000}
    s0, mid, end = schedules(0, cfg), schedules(2_500, cfg), schedules(2_000_000, cfg)
    assert (s0["beta"], s0["tau"], s0["lr"]) == (0.0, 1.0, 1e-4)
    assert mid["beta"] == pytest.approx(6.6 / 2)  # half-way through the beta warm-up
    assert schedules(75_000, cfg)["tau"] == pytest.approx((1 + 1 / 16) / 2)
    assert (end["beta"], end["tau"], end["lr"]) == (6.6, 1 / 16, 1.25e-6)
    short = DVAETrainConfig(steps=3000, kl_steps=100)
    assert short.resolved_steps() == {
        "kl_steps": 100,
        "tau_steps": 1500,
        "lr_steps": 3000,
    }  # capped shares (issue 22)
    b = schedules(30, short)["beta"]
    assert b == pytest.approx(6.6 * 0.5 * (1 - math.cos(math.pi * 30 / 100)))


def test_transformer_lr_warmup_and_decay() -> None:
    assert warmup_lr(0, 1.0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_lr(9, 1.0, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_lr(55, 1.0, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_lr(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_lr(55, 1.0, 10, 100, 0.0, "linear") == pytest.approx(0.5)
    assert warmup_lr(80, 1.0, 10, 100, 0.0, "constant") == 1.0
    r = TransformerTrainConfig(steps=430_000).resolved()
    assert r == {"warmup_steps": 5000, "lr_end": pytest.approx(4.5e-4 / 32)}
    with pytest.raises(ConfigError):
        warmup_lr(50, 1.0, 10, 100, 0.0, "step")


# ---------------------------------------------------------------------------------------------- loss terms
def test_kl_to_uniform_matches_the_definition() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 3, 3)
    q = logits.softmax(1)
    expected = (q * (q.log() - math.log(1 / 16))).sum(dim=(1, 2, 3))
    assert torch.allclose(kl_to_uniform(logits), expected, atol=1e-5)
    assert torch.allclose(kl_to_uniform(torch.zeros(1, 16, 2, 2)), torch.zeros(1), atol=1e-6)  # uniform q
    peaked = torch.full((1, 16, 1, 1), -1e4)
    peaked[0, 3] = 0
    assert kl_to_uniform(peaked).item() == pytest.approx(math.log(16), rel=1e-4)  # one-hot: log K


def test_logit_laplace_nll_is_the_papers_density() -> None:
    x = torch.tensor([0.1, 0.3, 0.5, 0.9]).view(1, 1, 2, 2)
    mu = torch.tensor([0.0, -1.0, 0.5, 2.0]).view(1, 1, 2, 2)
    ln_b = torch.tensor([0.0, -0.5, 0.3, -1.0]).view(1, 1, 2, 2)
    nll = logit_laplace_nll(x, torch.cat([mu, ln_b], 1))
    b = ln_b.exp()
    density = 1 / (2 * b * x * (1 - x)) * torch.exp(-(torch.logit(x) - mu).abs() / b)
    assert torch.allclose(nll, -density.log(), atol=1e-5)
    # it integrates to 1 over (0, 1): check numerically for one (mu, b)
    xs = torch.linspace(1e-4, 1 - 1e-4, 200_001).view(1, 1, 1, -1)
    stats = torch.cat([torch.full_like(xs, 0.7), torch.full_like(xs, -0.2)], 1)
    integral = torch.trapezoid((-logit_laplace_nll(xs, stats)).exp().flatten(), xs.flatten())
    assert integral.item() == pytest.approx(1.0, abs=2e-3)


def test_gumbel_noise_is_per_sample_and_gumbel_distributed() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 1)]
    noise = gumbel_noise((1000,), gens, torch.device("cpu"))
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    big = gumbel_noise((200_000,), [torch.Generator().manual_seed(0)], torch.device("cpu"))
    assert big.mean().item() == pytest.approx(0.5772, abs=0.02)  # Euler-Mascheroni constant
    assert derive_seed(1, "a") == derive_seed(1, "a") != derive_seed(1, "b")


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_tracks_parameters_with_warmed_up_decay() -> None:
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    before = ema.shadow["weight"].clone()
    d = ema.current_decay()  # min(0.5, 1/10)
    assert d == pytest.approx(0.1)
    ema.update(lin, 1)
    assert torch.allclose(ema.shadow["weight"], d * before + (1 - d) * 1.0)
    ema2 = EMA(lin, decay=0.9, every=3)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    ema2.update(lin, 1)
    assert ema2.updates == 0
    # a run shorter than `every` steps exports what it trained, not the initial weights the average still
    # holds
    assert torch.equal(ema2.model_state(lin)["weight"], lin.weight.detach())
    ema2.update(lin, 3)
    assert ema2.updates == 1
    assert not torch.equal(ema2.model_state(lin)["weight"], lin.weight.detach())
    with pytest.raises(ConfigError):
        EMA(lin, decay=1.0)


# ---------------------------------------------------------------------------------------------- checkpoints
def _weights(v: float) -> dict[str, dict[str, torch.Tensor]]:
    w = torch.full((3, 2), v)
    return {"model": {"a": w, "tied": w}, "ema": {"a": torch.full((3, 2), v / 2)}}


def test_checkpoints_round_trip_and_keep_last_k(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep=2)
    assert mgr.latest() is None
    for step in (1, 2, 3):
        mgr.save(step, _weights(float(step)), {"step": step, "rng": torch.get_rng_state()})
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["step-00000002", "step-00000003"]
    step, weights, state = CheckpointManager.load(mgr.latest())
    assert step == 3 and state["step"] == 3
    assert torch.equal(weights["model"]["tied"], torch.full((3, 2), 3.0))
    assert torch.equal(weights["ema"]["a"], torch.full((3, 2), 1.5))


def test_failed_disk_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    mgr = CheckpointManager(tmp_path / "ck", keep=3)
    good = mgr.save(4, _weights(4.0), {"step": 4})
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:  # half a file, then the disk is full
            fh.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(
        CheckpointError, match=r"step 8.*No space left.*step-00000004 is intact; \d+ MiB are free on its disk"
    ):
        mgr.save(8, _weights(8.0), {"step": 8})
    monkeypatch.setattr(torch, "save", real_save)
    assert mgr.latest() == good
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000004"]  # no temp leftovers
    step, weights, _ = CheckpointManager.load(good)
    assert step == 4 and torch.equal(weights["model"]["a"], torch.full((3, 2), 4.0))


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path / "ck")
    mgr.save(2, _weights(2.0), {"step": 2})
    (tmp_path / "ck" / "step-00000004.tmp-123").mkdir()  # a writer killed mid-way
    (tmp_path / "ck" / "step-00000006").mkdir()  # no meta.json: never completed
    assert mgr.latest().name == "step-00000002"
    mgr.clean_stale()
    assert not (tmp_path / "ck" / "step-00000004.tmp-123").exists()
    (tmp_path / "ck" / "step-00000002" / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        CheckpointManager.load(tmp_path / "ck" / "step-00000002")


class _RunsCode:
    """Pickles to a call of os.system: what a hostile checkpoint would hold."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_state_that_would_run_code_is_refused(tmp_path) -> None:
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(2, _weights(2.0), {"step": 2})
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "payload": _RunsCode(marker)}, path / "state.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        CheckpointManager.load(path)
    assert not marker.exists()


def test_rng_state_is_plain_data_and_round_trips(tmp_path) -> None:
    import random

    import numpy as np

    from dalle.seeds import rng_state, set_rng_state

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    mgr = CheckpointManager(tmp_path / "ck")
    path = mgr.save(1, _weights(1.0), {"step": 1, "rng": rng_state()})
    expected = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    _, _, state = CheckpointManager.load(path)  # weights_only=True
    set_rng_state(state["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_truncate_after_resume_point(tmp_path) -> None:
    log = MetricsLogger(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log({"kind": "train", "step": s, "loss": 1.0 / s})
    with open(tmp_path / "m.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # cut short by a crash
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "m.jsonl")] == [1, 2, 3]


def test_loss_curve_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from dalle.train.outputs import plot_loss_curve

    log = MetricsLogger(tmp_path / "m.jsonl")
    for s in range(1, 20):
        log.log({"kind": "train", "step": s, "loss": 1.0 / s})
    log.log({"kind": "eval", "step": 19, "psnr": 20.0})
    out = plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "loss.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- CLI config
def test_config_file_and_flags(tmp_path) -> None:
    from dalle.cli import build_parser
    from dalle.cli.train import build_config

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[dvae]\nsteps = 7\nlr = 0.01\nout = "somewhere"\n\n[train]\nsteps = 99\n')
    args = build_parser().parse_args(["train-dvae", "--config", str(cfg_file), "--lr", "0.5", "--no-augment"])
    cfg = build_config(DVAETrainConfig, args, "train-dvae")
    assert (cfg.steps, cfg.lr, cfg.augment, cfg.out_dir) == (7, 0.5, False, "somewhere")
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--sample-prompts", "a b", "c"])
    cfg = build_config(TransformerTrainConfig, args, "train")
    assert cfg.steps == 99 and cfg.sample_prompts == ["a b", "c"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    args = build_parser().parse_args(["train-dvae", "--config", str(bad)])
    with pytest.raises(ConfigError, match="stepz"):
        build_config(DVAETrainConfig, args, "train-dvae")
    # top-level settings are shared; a command's table overrides them
    shared = tmp_path / "shared.toml"
    shared.write_text("seed = 3\nsteps = 5\n\n[train]\nsteps = 9\n")
    cfg = build_config(
        TransformerTrainConfig, build_parser().parse_args(["train", "--config", str(shared)]), "train"
    )
    assert (cfg.seed, cfg.steps) == (3, 9)
    cfg = build_config(
        DVAETrainConfig, build_parser().parse_args(["train-dvae", "--config", str(shared)]), "train-dvae"
    )
    assert (cfg.seed, cfg.steps) == (3, 5)
    # values of the wrong type are refused, naming the setting (not coerced or failing deep inside)
    for setting, why in [
        ({"steps": 4.7}, "'steps' must be a whole number"),
        ({"steps": "four"}, "'steps' must be a whole number"),
        ({"progress": "false"}, "'progress' must be true or false"),
        ({"sample_prompts": "a red circle"}, "'sample_prompts' must be a list"),
        ({"sample_prompts": ["a", 3]}, "'sample_prompts' must be a list of str"),
        ({"lr": "0.1"}, "'lr' must be a number"),
        ({"tokenizer": 5}, "'tokenizer' must be a string"),
        ({"steps": None}, "'steps' must not be null"),
    ]:
        bad.write_text(json.dumps(setting))
        with pytest.raises(ConfigError, match=f"bad.json: setting {why}"):
            build_config(
                TransformerTrainConfig, build_parser().parse_args(["train", "--config", str(bad)]), "train"
            )
    bad.write_text(json.dumps({"lr": 1, "sample_prompts": ["a"], "tokenizer": None}))  # an int is a number
    cfg = build_config(
        TransformerTrainConfig, build_parser().parse_args(["train", "--config", str(bad)]), "train"
    )
    assert cfg.lr == 1 and cfg.sample_prompts == ["a"]


def test_toml_config_without_a_toml_reader_says_what_to_do(tmp_path, monkeypatch) -> None:
    import sys

    from dalle.cli.train import load_config_file

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("steps = 7\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10 without the tomli backport
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="TOML needs Python 3.11"):
        load_config_file(cfg_file, "train")
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7}))
    assert load_config_file(tmp_path / "c.json", "train") == {"steps": 7}


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="multiples of 8"):
        DVAETrainConfig(image_size=100).validate()
    with pytest.raises(ConfigError, match="grad_accum"):
        DVAETrainConfig(batch_size=2, grad_accum=4).validate()
    with pytest.raises(ConfigError, match="caption_dropout"):
        TransformerTrainConfig(caption_dropout=1.5).validate()


def test_progress_bar_end_under_a_time_limit_is_the_estimated_last_step() -> None:
    from types import SimpleNamespace

    from dalle.train.loop import estimated_last_step

    loop = SimpleNamespace(time_limit=10.0, steps=100_000)  # 600 s
    # 50 steps in the first 60 s of this process, the run at 60 s: 540 s left at 50/60 steps a second
    assert estimated_last_step(50, 60.0, 50, 60.0, loop) == 50 + 450
    # resumed at step 200 and 300 s: 20 steps in 30 s since, 270 s left
    assert estimated_last_step(20, 30.0, 220, 330.0, loop) == 220 + 180
    assert estimated_last_step(0, 0.0, 7, 0.0, loop) == 7  # no rate yet: no guess beyond the step
    assert estimated_last_step(5, 1.0, 5, 700.0, loop) == 5  # time spent: the run ends here
    assert estimated_last_step(10**6, 1.0, 10, 1.0, loop) == 100_000  # never past --steps


def test_resume_compares_the_data_path_not_its_spelling(tmp_path, monkeypatch) -> None:
    from dalle.train.loop import _differs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    assert not _differs("data", "imgs/", "./imgs") and not _differs("data", "imgs", str(tmp_path / "imgs"))
    assert _differs("data", "imgs", "other") and _differs("data", "shapes:0", "shapes:1")
    assert _differs("seed", 0, 1) and not _differs("seed", 3, 3)


def test_settings_that_init_decides_are_said_to_be_ignored(tmp_path) -> None:
    import warnings

    from dalle.cli import build_parser
    from dalle.cli.train import build_config

    init = tmp_path / "init"
    init.mkdir()
    (init / "config.json").write_text(
        json.dumps(
            {
                "transformer": {"text_len": 16},
                "decoder": {"vocab_size": 32, "n_hid": 8, "n_blk_per_group": 1, "n_init": 8},
            }
        )
    )

    def build(*argv):
        args = build_parser().parse_args(list(argv))
        cls = TransformerTrainConfig if argv[0] == "train" else DVAETrainConfig
        return build_config(cls, args, argv[0])

    with pytest.warns(
        UserWarning, match=r"--preset tiny, --text-len 32 ignored: --init .*init brings its own"
    ):
        build("train", "--init", str(init), "--text-len", "32", "--preset", "tiny")
    with pytest.warns(UserWarning, match=r"--n-hid 16, --vocab-size 64 ignored"):
        build("train-dvae", "--init", str(init), "--vocab-size", "64", "--n-hid", "16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("train", "--init", str(init), "--text-len", "16")  # the init model's own value
        build("train-dvae", "--init", str(init), "--new-decoder", "--n-hid", "16")  # a new decoder takes it
        build("train", "--text-len", "32")  # no --init


def test_model_flags_accept_registered_names(tmp_path, monkeypatch) -> None:
    """--dvae / --init / remap's NEW_DVAE take a registered name (the bundled models) as well as a directory;
    a directory of that name in the working directory wins."""
    from dalle.pipeline import REGISTRY
    from dalle.train.exports import load_dvae, model_path

    monkeypatch.chdir(tmp_path)
    assert model_path("shapes") == REGISTRY["shapes"]
    assert model_path("no-such-model") == Path("no-such-model")
    encoder, decoder, size = load_dvae("shapes")
    assert encoder.vocab_size == decoder.vocab_size and size == 256
    (tmp_path / "shapes").mkdir()
    assert model_path("shapes") == Path("shapes")


def test_mse_reconstruction_term_is_squared_pixel_error_over_two_sigma_squared() -> None:
    """recon_loss "mse": the decoded mean's error in pixel units, over 2 sigma^2; gradients reach mu; bad
    settings are refused."""
    from dalle.dvae import map_pixels, unmap_pixels
    from dalle.train.dvae import DVAELoss, gaussian_nll

    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 8, 8)
    stats = torch.randn(2, 6, 8, 8, requires_grad=True)
    nll = gaussian_nll(map_pixels(pixels), stats, 0.3)
    decoded = (torch.sigmoid(stats[:, :3]) - 0.1) / 0.8  # unmap_pixels before its clamp to [0, 1]
    assert torch.allclose(nll, (decoded - pixels).square() / (2 * 0.3**2), atol=1e-5)
    inside = (decoded >= 0) & (decoded <= 1)
    assert torch.equal(unmap_pixels(torch.sigmoid(stats[:, :3]))[inside], decoded[inside])
    nll.sum().backward()
    assert stats.grad[:, :3].abs().sum() > 0 and stats.grad[:, 3:].abs().sum() == 0  # ln b unused
    assert DVAELoss.__init__.__defaults__[-3:] == ("logit-laplace", 0.1, 0.0)  # the paper's loss by default
    for bad in ({"recon_loss": "l2"}, {"recon_sigma": 0.0}):
        with pytest.raises(ConfigError, match="recon_"):
            DVAETrainConfig(**{"out_dir": "x", **bad}).validate()


def test_trainer_reads_its_batches_from_the_data_contract_it_was_given(tmp_path) -> None:
    """The base Trainer takes the data contract in its constructor; batches come from it alone: its source,
    batch size and transform, without the held-out samples it names, in the order its seed fixes."""
    from dalle.data import letters
    from dalle.data.datasets import open_source
    from dalle.train.config import LoopConfig
    from dalle.train.distributed import DistInfo
    from dalle.train.loop import TrainData, Trainer

    seen: list[bytes] = []

    def transform(img, rng):
        seen.append(img.tobytes())
        return img.resize((32, 32))

    source = open_source("letters", require_captions=False, size=64)
    data = TrainData(source=source, transform=transform, batch_size=8, seed=3, exclude_last=350)
    trainer = Trainer(LoopConfig(out_dir=str(tmp_path / "run")), DistInfo(device=torch.device("cpu")), data)
    assert trainer.data is data
    batches = trainer.batches(0)
    got = [next(batches) for _ in range(5)]
    assert all(b.images is not None and tuple(b.images.shape) == (8, 3, 32, 32) for b in got)
    # 40 draws through the contract's transform: every one of the 10 training letters, none of the 350
    # held out
    assert set(seen) == {letters.sample(i)[0].tobytes() for i in range(10)}
    # the same contract and step give the same batch again
    again = next(Trainer(LoopConfig(out_dir=str(tmp_path / "b")), trainer.info, data).batches(0))
    assert again.positions == got[0].positions and torch.equal(again.images, got[0].images)


def test_usage_kl_is_ln_k_minus_the_entropy_of_the_batch_mean_posterior() -> None:
    """usage_kl: 0 when the codes are used equally on average (even if every position is certain), ln K
    when one code takes every position, ln K - ln 2 for two codes half each; it weights into the loss as
    usage_weight * usage_kl and its gradient reaches the encoder's logits."""
    from dalle.train.dvae import DVAELoss, usage_kl

    k = 16
    big = 60.0
    one_code = torch.zeros(2, k, 4, 4)
    one_code[:, 3] = big
    assert usage_kl(one_code).item() == pytest.approx(math.log(k), abs=1e-4)
    assert usage_kl(torch.zeros(2, k, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    certain_and_spread = torch.zeros(1, k, 4, 4)  # 16 positions, each certain of its own code
    for i in range(16):
        certain_and_spread[0, i, i // 4, i % 4] = big
    assert usage_kl(certain_and_spread).item() == pytest.approx(0.0, abs=1e-4)
    assert kl_to_uniform(certain_and_spread).item() == pytest.approx(16 * math.log(k), rel=1e-4)
    halves = torch.zeros(2, k, 4, 4)
    halves[0, 1], halves[1, 2] = big, big
    assert usage_kl(halves).item() == pytest.approx(math.log(k) - math.log(2), abs=1e-4)

    from dalle.dvae import Decoder, Encoder

    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=k)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=k)
    x = torch.rand(2, 3, 16, 16) * 0.8 + 0.1
    noise = torch.zeros(2, k, 2, 2)
    plain = DVAELoss(enc, dec, recon_loss="mse", recon_sigma=0.3)
    weighted = DVAELoss(enc, dec, recon_loss="mse", recon_sigma=0.3, usage_weight=0.5)
    loss0, logs0 = plain(x, noise, 1.0, 0.0)
    loss1, logs1 = weighted(x, noise, 1.0, 0.0)
    assert logs0["usage_kl"] == logs1["usage_kl"] > 0
    assert (loss1 - loss0).item() == pytest.approx(0.5 * logs1["usage_kl"].item(), rel=1e-5)
    enc.zero_grad()
    (loss1 - loss0).backward()
    assert enc.blocks.output.conv.w.grad.abs().sum() > 0  # the usage term trains the encoder
    for bad in ({"usage_weight": -0.1}, {"gumbel_scale": -1.0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DVAETrainConfig(**{"out_dir": "x", **bad}).validate()


def test_gumbel_scale_zero_makes_the_relaxation_deterministic(tmp_path) -> None:
    """gumbel_scale 0: no noise, so the loss of a batch does not depend on the step (the noise seed); the
    paper's scale 1 draws new noise each step; 0.5 halves it."""
    from dalle.data.datasets import Batch
    from dalle.train.dvae import DVAETrainer

    def trainer(scale: float) -> DVAETrainer:
        cfg = DVAETrainConfig(
            out_dir=str(tmp_path / f"run{scale}"),
            data="letters",
            image_size=16,
            n_hid=8,
            n_blk_per_group=1,
            n_init=8,
            vocab_size=16,
            eval_images=0,
            gumbel_scale=scale,
            progress=False,
        )
        t = DVAETrainer(cfg)
        t.schedule(0)
        return t

    images = (torch.rand(2, 3, 16, 16) * 255).to(torch.uint8)
    micro = Batch(captions=["", ""], images=images, positions=[0, 1])
    with torch.no_grad():
        quiet = trainer(0.0)
        assert torch.equal(quiet.forward(micro, 1)[0], quiet.forward(micro, 2)[0])
        noisy = trainer(1.0)
        assert not torch.equal(noisy.forward(micro, 1)[0], noisy.forward(micro, 2)[0])
    assert DVAETrainConfig.gumbel_scale == 1.0 and DVAETrainConfig.usage_weight == 0.0  # the paper's

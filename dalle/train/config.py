"""Settings of the trainers as plain dataclasses (no torch import, so the CLI can build its flags cheaply).

Each field is a ``dalle train-dvae`` / ``dalle train`` flag (``batch_size`` -> ``--batch-size``) and a key of
the optional ``--config`` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dalle.errors import ConfigError


@dataclass
class LoopConfig:
    """Settings of the shared training loop (both trainers embed these)."""

    out_dir: str = "runs/run"
    steps: int = 1000
    grad_accum: int = 1
    clip_grad: float | None = None
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 500
    sample_every: int = 500
    plot_every: int = 200
    max_nonfinite: int = 20
    progress: bool = True
    seed: int = 0
    # minutes of training after which the run ends as if at its last step; the schedules then follow the
    # further of the step and the share of this time spent (so they complete), which is not reproducible
    time_limit: float | None = None


# the paper's run: 3M updates; beta warm-up 5k, tau annealing 150k, step-size annealing 1.2M
PAPER_STEPS = 3_000_000
PAPER_BETA_STEPS, PAPER_TAU_STEPS, PAPER_LR_STEPS = 5_000, 150_000, 1_200_000
PAPER_BETA_FRAC = PAPER_BETA_STEPS / PAPER_STEPS
PAPER_TAU_FRAC = PAPER_TAU_STEPS / PAPER_STEPS
PAPER_LR_FRAC = PAPER_LR_STEPS / PAPER_STEPS
# Default schedule lengths. Tau and step size: the paper's lengths in updates, but at most half / all of the
# run. A short run used to get the paper's *fractions* for these too (issue 22): 1000 updates meant tau at
# 1/16 after 50 and the step size at 1.25e-6 for the last 600, which froze the (random) gumbel choices early.
# KL warm-up: the paper's *fraction* of the run (5k of 3M updates: 2 of 1000, i.e. the full KL weight almost
# from the start). A warm-up of a tenth of the run (the previous default) saturates the encoder on sparse
# images: while beta is low, the cheapest way to remove the gumbel noise from the decoder's input is one code
# at every position with certainty (KL = ln K, codes_used 1), and that does not recover. Measured on
# `--data letters` (64 px, n_hid 32, 256 codes, batch 16, tau 1 at the start; BENCHMARKS.md, "dVAE on the
# letters dataset"): warm-up 100-300 updates at lr 1e-4 or 3e-4, and a constant beta of 1 or 3 from the first
# update at lr 3e-4 -> KL = ln K within 50 updates; the paper's beta 6.6 from the first update (lr 1e-4 or
# 3e-4) -> no saturation in the first 1000 updates (KL at most 1.5-2.4 over the first 500). It does not make
# letters learnable yet: the codes still concentrate onto a few later on. A 3M-update run still gets the
# paper's 5k.
MAX_BETA_SHARE, MAX_TAU_SHARE, MAX_LR_SHARE = PAPER_BETA_FRAC, 0.5, 1.0


@dataclass
class DVAETrainConfig(LoopConfig):
    """Everything ``dalle train-dvae`` accepts (see the module docstring for the paper's values)."""

    data: str = "shapes"
    image_size: int = 256
    crop_size: int | None = None  # train on random crops of this side (the dVAE is fully convolutional)
    batch_size: int = 8  # per rank; the global batch is batch_size * world size
    n_hid: int = 256
    n_blk_per_group: int = 2
    n_init: int = 128
    vocab_size: int = 8192
    lr: float = 1e-4
    lr_end: float = 1.25e-6
    lr_steps: int | None = None  # default: the paper's 1.2M updates, at most the whole run
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    kl_weight: float = 6.6
    kl_steps: int | None = (
        None  # beta warm-up length; default the paper's 5k/3M of the run (2 of 1000 updates)
    )
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16.0
    tau_steps: int | None = None  # default the paper's 150k updates, at most half the run
    ema_decay: float = 0.999
    ema_every: int = 1
    straight_through: bool = False  # NOT the paper: one-hot forward, soft backward
    # reconstruction term: "logit-laplace" (the paper's eq. 2) or, NOT the paper, "mse": squared error of the
    # decoded mean in pixel units / (2 recon_sigma^2), i.e. a Gaussian of fixed width (for sparse images,
    # where logit-Laplace's learned scale rewards certainty about the background over the colour of the
    # strokes)
    recon_loss: str = "logit-laplace"
    recon_sigma: float = 0.1
    # NOT the paper: weight of KL(batch-mean posterior || uniform), i.e. ln K minus the entropy of the codes'
    # average use over the batch. It keeps many codes in use without pushing any one position's posterior
    # towards uniform (the per-position KL does that), against the collapse onto a few codes on sparse images
    usage_weight: float = 0.0
    # NOT the paper: scale of the gumbel noise added to the logits before the relaxed softmax (1: the paper's
    # gumbel-softmax; 0: a deterministic softmax of logits / tau, annealed towards the argmax as tau falls)
    gumbel_scale: float = 1.0
    freeze_encoder: bool = False  # NOT the paper: train only the decoder, on the init encoder's argmax codes
    new_decoder: bool = False  # with init: a fresh decoder of n_init / n_hid / n_blk_per_group, not init's
    augment: bool = True
    hflip: bool = True
    eval_images: int = 64
    eval_data: str | None = None
    num_workers: int = 0
    device: str = "auto"
    channels_last: bool = True  # NHWC convolutions (oneDNN / cuDNN); on this CPU 0-5% faster than NCHW
    init: str | None = None  # start from a trained dVAE directory
    export_ema: bool = True

    def resolved_steps(self) -> dict[str, int]:
        """Schedule lengths actually used unless set: the KL warm-up the paper's share of ``steps`` (5k/3M),
        tau and step size the paper's lengths in updates capped at half and all of ``steps`` (see
        MAX_BETA_SHARE)."""

        def length(value: int | None, paper: int, share: float) -> int:
            return int(value) if value is not None else max(1, min(paper, round(self.steps * share)))

        return {
            "kl_steps": length(self.kl_steps, PAPER_BETA_STEPS, MAX_BETA_SHARE),
            "tau_steps": length(self.tau_steps, PAPER_TAU_STEPS, MAX_TAU_SHARE),
            "lr_steps": length(self.lr_steps, PAPER_LR_STEPS, MAX_LR_SHARE),
        }

    def validate(self) -> None:
        """Raise ConfigError for inconsistent values."""
        train = self.crop_size or self.image_size
        if self.image_size % 8 or train % 8 or train > self.image_size:
            raise ConfigError(
                f"image_size ({self.image_size}) and crop_size ({self.crop_size}) must be multiples of 8 and "
                "crop_size <= image_size (the dVAE downsamples by 8)"
            )
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ConfigError(f"time_limit is in minutes and must be > 0, got {self.time_limit}")
        if self.grad_accum > self.batch_size:
            raise ConfigError(
                f"grad_accum ({self.grad_accum}) cannot exceed the per-rank batch ({self.batch_size})"
            )
        if (self.freeze_encoder or self.new_decoder) and not self.init:
            raise ConfigError(
                "freeze_encoder and new_decoder work on a trained dVAE: also pass --init DVAE_DIR "
                "(a `dalle train-dvae` output or a model directory)"
            )
        if not 0 < self.tau_end <= self.tau_start:
            raise ConfigError(f"need 0 < tau_end <= tau_start, got {self.tau_end} and {self.tau_start}")
        if self.recon_loss not in RECON_LOSSES:
            raise ConfigError(f"recon_loss must be one of {', '.join(RECON_LOSSES)}, got {self.recon_loss!r}")
        if not self.recon_sigma > 0:
            raise ConfigError(f"recon_sigma must be > 0, got {self.recon_sigma}")
        if not self.gumbel_scale >= 0:
            raise ConfigError(f"gumbel_scale must be >= 0, got {self.gumbel_scale}")
        if not self.usage_weight >= 0:
            raise ConfigError(f"usage_weight must be >= 0, got {self.usage_weight}")


RECON_LOSSES = ("logit-laplace", "mse")
PAPER_WARMUP_FRAC = 5_000 / 430_000
# precisions the exported transformer weights may be stored in; loading always gives float32 (or the asked
# dtype)
WEIGHTS_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class TransformerTrainConfig(LoopConfig):
    """Everything ``dalle train`` accepts (see the module docstring for the paper's values)."""

    data: str = "shapes"
    dvae: str | None = None  # a dVAE or model directory (needed for raw images and for the output model)
    tokenizer: str | None = None  # a tokenizer.model; None trains one on the training captions
    tokenizer_vocab: int = 16384
    tokenizer_samples: int = 100_000
    image_size: int | None = (
        None  # image side the model works at; default the token shards', else the dVAE's own
    )
    text_len: int = 256
    preset: str = "small"
    depth: int | None = None
    heads: int | None = None
    head_dim: int | None = None
    dropout: float | None = None
    attn_types: list[str] | None = None
    conv_kernel: int | None = None
    checkpoint_activations: bool = False
    compile: bool = False  # torch.compile the training forward and backward (not with fsdp)
    batch_size: int = 8  # per rank
    lr: float = 4.5e-4
    lr_end: float | None = None  # default lr / 32
    warmup_steps: int | None = None  # default PAPER_WARMUP_FRAC of the run
    lr_decay: str = "cosine"
    weight_decay: float = 4.5e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.96
    adam_eps: float = 1e-8
    clip_grad: float | None = 4.0
    ema_decay: float = 0.99
    ema_every: int = 25
    bpe_dropout: float = 0.1
    caption_dropout: float = 0.0
    augment: bool = True
    fsdp: bool = False
    bf16: bool = True  # bfloat16 autocast on CUDA
    cpu_bf16: bool = False  # bfloat16 autocast on the CPU too (fast only where the CPU has native bfloat16)
    eval_samples: int = 64
    sample_prompts: list[str] | None = None
    sample_count: int = 4
    num_workers: int = 0
    device: str = "auto"
    name: str = "custom"
    init: str | None = None  # start from an existing model directory (fine-tuning)
    export_ema: bool = True
    weights_dtype: str = (
        "float32"  # precision of the exported transformer.safetensors (float16 halves the file)
    )

    def resolved(self) -> dict[str, Any]:
        """Warm-up length and final learning rate actually used."""
        warmup = (
            self.warmup_steps
            if self.warmup_steps is not None
            else max(1, round(self.steps * PAPER_WARMUP_FRAC))
        )
        return {
            "warmup_steps": int(warmup),
            "lr_end": self.lr_end if self.lr_end is not None else self.lr / 32,
        }

    def validate(self) -> None:
        """Raise ConfigError for inconsistent values."""
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("steps, batch_size and grad_accum must be >= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ConfigError(f"time_limit is in minutes and must be > 0, got {self.time_limit}")
        if self.grad_accum > self.batch_size:
            raise ConfigError(
                f"grad_accum ({self.grad_accum}) cannot exceed the per-rank batch ({self.batch_size})"
            )
        for name in ("bpe_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        from dalle.transformer import PRESET_NAMES

        if self.preset not in PRESET_NAMES:
            raise ConfigError(
                f"unknown transformer preset {self.preset!r}; choose one of {', '.join(PRESET_NAMES)}"
            )
        if self.lr_decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_decay must be cosine, linear or constant, got {self.lr_decay!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ConfigError(
                f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {self.weights_dtype!r}"
            )
        if self.compile and self.fsdp:
            raise ConfigError("compile is not supported together with fsdp yet: drop one of the two flags")


__all__ = ["WEIGHTS_DTYPES", "DVAETrainConfig", "LoopConfig", "TransformerTrainConfig"]

"""Stage 1: training the discrete VAE as in the paper (§2.1, Appendix A).

Per step, for mapped pixels ``x`` [B, 3, H, W] (``map_pixels`` of the augmented image):

* ``logits = encoder(x)`` [B, K, H/8, W/8];
* soft gumbel-softmax sample ``z = softmax((logits + g) / tau)`` (relaxed in both passes, no
  straight-through);
* ``mu, ln_b = decoder(z)`` split into 3 + 3 channels;
* logit-Laplace negative log-likelihood of the mapped pixels,
  ``ln(2 b) + ln x + ln(1 - x) + |logit(x) - mu| / b``, summed over pixels and channels;
* KL of the **plain** softmax of the logits (no noise) against the uniform prior over K codes, summed over
  positions;
* ``loss = (nll + beta * kl) / (H * W * C)``, averaged over the batch (effective KL weight beta / 192 at the
  paper's sizes).

Schedules (all cosine, :func:`schedules`): beta 0 -> 6.6, tau 1 -> 1/16, learning rate 1e-4 -> 1.25e-6. Unless
set, beta warms up over the paper's share of the run (5k of 3M updates: almost at once in a short run; a
longer warm-up saturates the encoder on sparse images, issue 22), tau and the step size over the paper's 150k
and 1.2M updates capped at half and all of the run (the paper's fractions of a short run froze tau at 1/16
before anything was learned). AdamW (0.9, 0.999), eps 1e-8, weight decay 1e-4; EMA of the weights (decay
0.999) is what gets exported and evaluated. Not in the paper: ``freeze_encoder`` (with ``init``) trains only
the decoder, on the one-hot argmax codes of the frozen encoder, i.e. the codes ``encode`` gives and a
transformer samples; the token space stays the same, so a transformer trained on it keeps working with the new
decoder. ``new_decoder`` starts that decoder afresh. Also outside the paper, for sparse flat-colour images
on which the paper's relaxation collapses onto a few codes (issue 22): ``gumbel_scale`` (0: a deterministic
``softmax(logits / tau)``) and ``usage_weight`` (a KL of the batch-mean posterior to uniform,
:func:`usage_kl`); ``recipes/letters/dvae.json`` combines them. Evaluation: hard (argmax) reconstructions
of held-out images -> PSNR, and the perplexity of the code histogram (exp of its entropy; K means every
code equally used) plus the number of codes used; the run ends with a summary (:func:`dvae_verdict`) that
warns loudly when those say the dVAE is unusable.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dalle.seeds import make_generator, seed_everything
from dalle.train.config import PAPER_BETA_FRAC, PAPER_LR_FRAC, PAPER_TAU_FRAC, DVAETrainConfig  # noqa: F401
from dalle.train.distributed import DistInfo, load_full_state_dict
from dalle.train.ema import EMA
from dalle.train.exports import save_dvae_dir
from dalle.train.loop import TrainData, Trainer
from dalle.train.outputs import save_image_grid
from dalle.train.schedules import cosine_schedule

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder


def schedules(step: float, cfg: DVAETrainConfig) -> dict[str, float]:
    """beta (KL weight), tau (temperature) and the learning rate at ``step`` (0-based), all cosine."""
    n = cfg.resolved_steps()
    return {
        "beta": cosine_schedule(step, n["kl_steps"], 0.0, cfg.kl_weight),
        "tau": cosine_schedule(step, n["tau_steps"], cfg.tau_start, cfg.tau_end),
        "lr": cosine_schedule(step, n["lr_steps"], cfg.lr, cfg.lr_end),
    }


def logit_laplace_nll(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Per-value negative log-likelihood [B, C, H, W] of mapped pixels ``x`` under the logit-Laplace
    distribution with ``mu = stats[:, :C]`` and ``ln b = stats[:, C:]`` (paper eq. 2)."""
    c = x.shape[1]
    mu, ln_b = stats[:, :c], stats[:, c:]
    logit_x = torch.log(x) - torch.log1p(-x)
    return ln_b + math.log(2.0) + torch.log(x) + torch.log1p(-x) + (logit_x - mu).abs() * torch.exp(-ln_b)


def gaussian_nll(x: torch.Tensor, stats: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-value squared error [B, C, H, W] of the decoded mean, in pixel units ([0, 1]), over ``2 sigma^2``:
    a Gaussian of fixed width ``sigma`` (constant terms left out). ``x`` are mapped pixels,
    ``mu = stats[:, :C]`` as for :func:`logit_laplace_nll` (the decoded image is
    ``unmap_pixels(sigmoid(mu))``). Not the paper's."""
    c = x.shape[1]
    from dalle.dvae import logit_laplace_eps

    diff = (torch.sigmoid(stats[:, :c]) - x) / (
        1.0 - 2.0 * logit_laplace_eps
    )  # unmap_pixels without its clamp
    return diff.square() / (2.0 * sigma * sigma)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || uniform(K)) summed over positions, per sample [B] (logits [B, K, h, w])."""
    log_q = F.log_softmax(logits, dim=1)
    k = logits.shape[1]
    return (log_q.exp() * (log_q + math.log(k))).sum(dim=(1, 2, 3))


def usage_kl(logits: torch.Tensor) -> torch.Tensor:
    """KL(q_bar || uniform(K)) of the batch-mean posterior ``q_bar`` (the softmax of ``logits`` [B, K, h, w]
    averaged over samples and positions): ln K minus the entropy of the codes' average use, 0 when every code
    is used equally, ln K when one code takes every position. A scalar."""
    q_bar = F.softmax(logits.float(), dim=1).mean(dim=(0, 2, 3))
    return (q_bar * (q_bar.clamp_min(1e-30).log() + math.log(logits.shape[1]))).sum()


def gumbel_noise(
    shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device
) -> torch.Tensor:
    """Standard Gumbel noise [B, ...] with sample ``i`` drawn from ``generators[i]``."""
    out = torch.empty((len(generators), *shape), device=device)
    for i, g in enumerate(generators):
        out[i].exponential_(generator=g)
    return out.log_().neg_()


class DVAELoss(nn.Module):
    """Encoder + decoder with the paper's relaxed ELB as ``forward`` (the module DDP wraps)."""

    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        straight_through: bool = False,
        freeze_encoder: bool = False,
        recon_loss: str = "logit-laplace",
        recon_sigma: float = 0.1,
        usage_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.straight_through = straight_through
        self.recon_loss = recon_loss
        self.recon_sigma = recon_sigma
        self.usage_weight = usage_weight
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            encoder.requires_grad_(False)

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor, tau: float, beta: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for mapped pixels ``x`` and gumbel ``noise`` shaped like the logits."""
        if self.freeze_encoder:  # decoder training: it sees the one-hot codes that `encode` gives
            with torch.no_grad():
                logits = self.encoder(x)
            z = F.one_hot(logits.argmax(dim=1), logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        else:
            logits = self.encoder(x)
            z = F.softmax((logits + noise) / tau, dim=1)
        if (
            self.straight_through and not self.freeze_encoder
        ):  # outside the paper: the decoder sees the one-hot sample
            hard = F.one_hot(z.argmax(dim=1), z.shape[1]).permute(0, 3, 1, 2).to(z.dtype)
            z = hard - z.detach() + z
        stats = self.decoder(z).float()
        b, c, h, w = x.shape
        if self.recon_loss == "mse":
            nll = gaussian_nll(x, stats, self.recon_sigma).sum(dim=(1, 2, 3))
        else:
            nll = logit_laplace_nll(x, stats).sum(dim=(1, 2, 3))
        kl = kl_to_uniform(logits)
        loss = ((nll + beta * kl) / (c * h * w)).mean()
        usage = usage_kl(logits)  # of the plain softmax (measured on letters: better than of logits / tau)
        if self.usage_weight:
            loss = loss + self.usage_weight * usage
        positions = logits.shape[2] * logits.shape[3]
        return loss, {
            "nll": (nll / (c * h * w)).mean().detach(),
            "kl": (kl / positions).mean().detach(),
            "usage_kl": usage.detach(),
        }


@torch.no_grad()
def reconstruction_metrics(
    encoder: Encoder, decoder: Decoder, images: torch.Tensor, batch_size: int = 16
) -> tuple[dict[str, float], torch.Tensor]:
    """PSNR (dB, images in [0, 1]) of argmax reconstructions, code perplexity and codes used.

    ``images``: uint8 [N, 3, S, S]. Returns (metrics, reconstructions as float [N, 3, S, S] in [0, 1]).
    """
    from dalle.data.datasets import uint8_to_mapped

    device = next(encoder.parameters()).device
    counts = torch.zeros(encoder.vocab_size, dtype=torch.float64)
    psnrs, recons = [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        x = uint8_to_mapped(chunk).to(device)
        tokens = encoder.encode(x)
        counts += torch.bincount(tokens.flatten().cpu(), minlength=encoder.vocab_size).double()
        rec = decoder.decode(tokens).float().clamp(0, 1).cpu()
        target = chunk.float() / 255.0
        mse = ((rec - target) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs.append(10.0 * torch.log10(1.0 / mse))
        recons.append(rec)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    metrics = {
        "psnr": torch.cat(psnrs).mean().item(),
        "perplexity": math.exp(entropy),
        "codes_used": int((counts > 0).sum().item()),
    }
    return metrics, torch.cat(recons)


# ---------------------------------------------------------------------------------------------- run verdict
# A dVAE is judged unusable (the run summary says so loudly) when any of these holds on its held-out images:
# * PSNR below MIN_PSNR_DB: an RMS error of 10% of the pixel range (25 grey levels) everywhere, or letters /
#   edges missing on a flat background, which is what collapsed runs give (issue 22: 16 dB, grey blobs);
# * PSNR less than MIN_GAIN_DB above the flat-colour baseline (every image painted in its own mean colour):
#   the codes then carry next to no information about where anything is;
# * fewer codes in use than the images have common cell colours (:func:`cell_variety`): even the flat
#   colours cannot all be drawn (a collapsed codebook: 1-8 codes on coloured letters).
MIN_PSNR_DB = 20.0
MIN_GAIN_DB = 3.0
# the settings of recipes/letters/dvae.json that keep a dVAE on sparse flat-colour images from collapsing
SPARSE_FLAGS = (
    "--gumbel-scale 0 --usage-weight 0.05 --kl-weight 0 --recon-loss mse --recon-sigma 0.3 --lr 3e-4"
)


def saturation_cure(cfg: DVAETrainConfig | None) -> str:
    """What to change after the encoder's softmax saturated (KL = ln K), for the run's relaxation."""
    if cfg is not None and cfg.gumbel_scale == 0:
        return (
            "Without gumbel noise only the code-usage term holds the softmax open at the start: raise "
            f"--usage-weight (now {cfg.usage_weight:g}; 0.05 held on letters, 0 saturated at once and "
            "0.01-0.02 within 40 updates); see recipes/letters/README.md"
        )
    return (
        "On sparse flat-colour images (letters, icons) use the deterministic relaxation with a code-usage "
        f"term instead: {SPARSE_FLAGS} (recipes/letters/dvae.json). With the paper's relaxation, give the "
        "full --kl-weight (6.6) from the start (leave --kl-steps unset, or 1: a warm-up of 100+ updates or "
        "--kl-weight 1-3 saturated within 50 updates on letters); --tau-start 16 delays it"
    )


def flat_colour_psnr(images: torch.Tensor) -> float:
    """Mean PSNR (dB) of replacing each uint8 image [N, 3, S, S] by its own mean colour: the floor a useful
    dVAE must clear by a margin."""
    x = images.float() / 255.0
    mse = ((x - x.mean(dim=(2, 3), keepdim=True)) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return (10.0 * torch.log10(1.0 / mse)).mean().item()


def cell_variety(images: torch.Tensor, levels: int = 4, min_share: float = 0.005) -> int:
    """Common cell colours of uint8 images [N, 3, S, S]: the mean colours of their 8x8 cells (one token each),
    quantised to ``levels`` per channel, counted where they cover at least ``min_share`` of the cells. A dVAE
    needs at least one code for each (7 for the letters dataset and for shapes scenes; photos reach
    dozens)."""
    b, c, h, w = images.shape
    cells = images[:, :, : h - h % 8, : w - w % 8].float()
    cells = cells.reshape(b, c, h // 8, 8, w // 8, 8).mean(dim=(3, 5))
    q = (cells * levels / 256.0).long().clamp_(0, levels - 1)
    keys = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    counts = torch.bincount(keys.flatten(), minlength=levels**3)
    return max(1, int((counts >= max(1.0, min_share * keys.numel())).sum().item()))


def dvae_verdict(
    metrics: Mapping[str, float],
    *,
    vocab_size: int,
    steps: int,
    last_train: Mapping[str, Any] | None = None,
    cfg: DVAETrainConfig | None = None,
) -> tuple[bool, list[str], list[str]]:
    """Judge a trained dVAE from its evaluation ``metrics`` (``psnr``, ``codes_used``, and ``flat_psnr`` /
    ``cell_variety`` where known). Returns (usable, problems, advice): what is wrong, and which flags to
    change, using the last training record (``kl``, ``beta``) and the settings to tell the failure modes
    apart."""
    problems: list[str] = []
    psnr, codes = metrics.get("psnr"), metrics.get("codes_used")
    flat, variety = metrics.get("flat_psnr"), metrics.get("cell_variety")
    if psnr is not None and psnr < MIN_PSNR_DB:
        problems.append(
            f"PSNR {psnr:.1f} dB is below {MIN_PSNR_DB:.0f} dB (an RMS error of 10% of the range)"
        )
    if psnr is not None and flat is not None and psnr < flat + MIN_GAIN_DB:
        problems.append(
            f"PSNR {psnr:.1f} dB is not {MIN_GAIN_DB:.0f} dB better than painting each image in its mean "
            f"colour ({flat:.1f} dB): the codes carry almost no information"
        )
    if codes is not None and variety is not None and codes < variety:
        problems.append(
            f"{int(codes)} codes in use (of {vocab_size}) for images with {int(variety)} common cell "
            "colours: the codebook has collapsed"
        )
    elif codes is not None and codes <= 2:
        problems.append(f"{int(codes)} codes in use (of {vocab_size}): the codebook has collapsed")
    if not problems:
        return True, [], []
    advice: list[str] = []
    kl = (last_train or {}).get("kl")
    ln_k = math.log(vocab_size)
    if kl is not None and kl >= 0.98 * ln_k:
        advice.append(
            f"the encoder's softmax saturated (KL {kl:.2f} = ln {vocab_size}): each position picks one of a "
            f"few codes for sure and unused codes get no gradient. {saturation_cure(cfg)}"
        )
    elif kl is not None and kl < 0.1 * ln_k and (cfg is None or cfg.gumbel_scale > 0):
        # (without gumbel noise a near-uniform plain softmax is expected: logits / tau carries the choice)
        advice.append(
            f"the posterior stayed near uniform (KL {kl:.2f} of ln {vocab_size} = {ln_k:.2f}): the KL term "
            "won and the gumbel noise picks the codes, so the decoder learns the average image; train "
            "longer, lengthen --tau-steps (or leave it unset: half the run) or lower --kl-weight (then also "
            "raise --tau-start, e.g. 16, or the encoder saturates); a long --kl-steps warm-up is no cure: "
            f"while the KL weight is low the encoder saturates instead. On sparse images: {SPARSE_FLAGS}"
        )
    if steps < 1000:
        advice.append(f"only {steps} updates: train longer (--steps, --time-limit) or use a smaller model")
    if cfg is not None and cfg.n_hid >= 128 and cfg.image_size <= 128:
        advice.append(
            f"--n-hid {cfg.n_hid} is the paper's width for 256-px photos; small flat-colour images learn in "
            "CPU minutes with --n-hid 32 --n-blk-per-group 1 --n-init 64"
        )
    if vocab_size > 1024:
        advice.append(f"--vocab-size {vocab_size} is more than a small dataset can fill: try 512")
    advice.append(
        "a recipe measured to work on sparse flat-colour images (coloured letters on white: 21 dB with 19 "
        "codes after 1000 updates, 9-10 CPU minutes): --config recipes/letters/dvae.json; what else was "
        "tried: recipes/letters/README.md"
    )
    return False, problems, advice


def format_verdict(usable: bool, problems: list[str], advice: list[str], metrics: Mapping[str, float]) -> str:
    """The run summary as text: one line when usable, a loud multi-line warning otherwise."""
    head = ", ".join(
        f"{k} {metrics[k]:.4g}"
        for k in ("psnr", "flat_psnr", "codes_used", "cell_variety", "perplexity")
        if k in metrics
    )
    if usable:
        return f"dVAE summary: {head} (usable)"
    bar = "!" * 78
    lines = [bar, "WARNING: THIS dVAE IS UNUSABLE (" + head + ")"]
    lines += [f"  - {p}" for p in problems]
    lines.append("What to change:")
    lines += [f"  * {a}" for a in advice]
    lines.append(bar)
    return "\n".join(lines)


def dvae_transform(cfg: DVAETrainConfig, img: Any, rng: random.Random) -> Any:
    """The dVAE trainer's per-sample step: the paper's augmentation (``cfg.augment``, with ``cfg.hflip``) or a
    centre crop to ``cfg.image_size``, then a random ``cfg.crop_size`` crop when that is smaller."""
    from dalle.data.datasets import center_crop, dvae_augment

    size = cfg.image_size
    img = dvae_augment(img, size, rng, flip=cfg.hflip) if cfg.augment else center_crop(img, size)
    crop = cfg.crop_size
    if crop and crop < size:
        x, y = rng.randint(0, size - crop), rng.randint(0, size - crop)
        img = img.crop((x, y, x + crop, y + crop))
    return img


class DVAETrainer(Trainer):
    """Trains an :class:`dalle.dvae.Encoder` / :class:`dalle.dvae.Decoder` pair (one process or torchrun
    DDP)."""

    kind = "dvae"
    cfg: DVAETrainConfig
    net: DVAELoss

    def __init__(self, cfg: DVAETrainConfig, info: DistInfo | None = None) -> None:
        from dalle.data.datasets import center_crop, held_out, open_source, to_uint8_tensor
        from dalle.dvae import Decoder, Encoder

        cfg.validate()
        info = info or DistInfo(device=torch.device("cpu"))
        source = open_source(cfg.data, require_captions=False, size=cfg.image_size)
        eval_source = (
            open_source(cfg.eval_data, require_captions=False, size=cfg.image_size) if cfg.eval_data else None
        )
        if eval_source is not None:
            imgs, _, _, _ = held_out(eval_source, cfg.eval_images, cfg.image_size)
            exclude_last, exclude_keys = 0, frozenset[str]()
        else:
            imgs, _, exclude_last, exclude_keys = held_out(source, cfg.eval_images, cfg.image_size)
        data = TrainData(
            source=source,
            transform=functools.partial(dvae_transform, cfg),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            exclude_last=exclude_last,
            exclude_keys=exclude_keys,
        )
        super().__init__(cfg, info, data)
        self.cfg = cfg
        seed_everything(cfg.seed)
        if cfg.init:
            from dalle.train.exports import load_dvae

            encoder, decoder, _ = load_dvae(cfg.init)
            if cfg.new_decoder:
                decoder = Decoder(
                    n_init=cfg.n_init,
                    n_hid=cfg.n_hid,
                    n_blk_per_group=cfg.n_blk_per_group,
                    vocab_size=encoder.vocab_size,
                )
        else:
            encoder = Encoder(n_hid=cfg.n_hid, n_blk_per_group=cfg.n_blk_per_group, vocab_size=cfg.vocab_size)
            decoder = Decoder(
                n_init=cfg.n_init,
                n_hid=cfg.n_hid,
                n_blk_per_group=cfg.n_blk_per_group,
                vocab_size=cfg.vocab_size,
            )
        self.vocab_size = encoder.vocab_size
        self.net = DVAELoss(
            encoder,
            decoder,
            straight_through=cfg.straight_through,
            freeze_encoder=cfg.freeze_encoder,
            recon_loss=cfg.recon_loss,
            recon_sigma=cfg.recon_sigma,
            usage_weight=cfg.usage_weight,
        ).to(info.device)
        self._memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net.to(memory_format=self._memory_format)
        self.model: nn.Module = self.net
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for p in self.net.parameters():
            if p.requires_grad:  # a frozen encoder (freeze_encoder) stays out of the optimizer
                (decay if p.dim() > 1 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )
        self.ema = EMA(self.net, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None
        self.eval_images = (
            torch.stack([to_uint8_tensor(center_crop(im, cfg.image_size)) for im in imgs]) if imgs else None
        )
        self.last_eval: dict[str, float] = {}
        self._collapsed_steps = 0
        self._last_record: dict[str, Any] = {}
        # what the run summary judges the PSNR and the codes in use against (see dvae_verdict)
        self._baseline: dict[str, float] = {}
        if self.eval_images is not None:
            self._baseline = {
                "flat_psnr": flat_colour_psnr(self.eval_images),
                "cell_variety": float(cell_variety(self.eval_images)),
            }

    # -------------------------------------------------------------- step
    def schedule(self, step: float) -> dict[str, float]:
        """Set the learning rate; remember beta and tau for :meth:`forward`."""
        s = schedules(step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = s["lr"]
        self._sched = s
        return s

    def forward(self, micro: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Relaxed ELB of one micro-batch; gumbel noise is seeded by (seed, step, global position)."""
        from dalle.data.datasets import uint8_to_mapped

        dev = self.info.device
        x = uint8_to_mapped(micro.images).to(dev, non_blocking=True)  # the encoder makes it channels-last
        grid = (self.vocab_size, x.shape[2] // 8, x.shape[3] // 8)
        if self.cfg.gumbel_scale > 0:
            gens = [make_generator(dev, self.cfg.seed, "gumbel", step, p) for p in micro.positions]
            noise = gumbel_noise(grid, gens, dev)
            if self.cfg.gumbel_scale != 1:
                noise = noise * self.cfg.gumbel_scale
        else:
            noise = torch.zeros((len(micro.positions), *grid), device=dev)
        return self.model(x, noise, self._sched["tau"], self._sched["beta"])

    def after_step(self, record: Mapping[str, Any]) -> None:
        """Warn once when the posterior has collapsed: KL at ln K means every position is a one-hot on one
        code, the softmax is saturated and the run cannot recover. Not with a frozen encoder: the KL is then
        fixed by its weights (nothing in the run can change it), and only the decoder learns."""
        self._last_record = dict(record)
        if self.cfg.freeze_encoder:
            return
        collapsed = record.get("kl", 0.0) >= 0.995 * math.log(self.vocab_size)
        self._collapsed_steps = self._collapsed_steps + 1 if collapsed else 0
        if self._collapsed_steps == 20 and self.info.is_main:
            msg = (
                f"dVAE posterior collapse at step {self.step}: KL = ln {self.vocab_size} for 20 steps, so "
                "every position is one code with certainty and training cannot recover. "
                + saturation_cure(self.cfg)
            )
            warnings.warn(msg, stacklevel=2)
            if self._bar is not None:
                self._bar.write("warning: " + msg)

    # -------------------------------------------------------------- settings
    def config_dict(self) -> dict[str, Any]:
        """Resolved settings (and the keys a resume must match)."""
        d = asdict(self.cfg)
        d.update(self.cfg.resolved_steps())
        d["model"] = {"encoder": self.net.encoder.config(), "decoder": self.net.decoder.config()}
        d["global_batch"] = self.cfg.batch_size * self.info.world_size
        d["world_size"] = self.info.world_size
        return d

    # -------------------------------------------------------------- evaluation and outputs
    def _export_modules(self) -> tuple[Encoder, Decoder]:
        """Plain copies of encoder and decoder holding the EMA (or raw) weights, in eval mode."""
        net = copy.deepcopy(self.net).to(memory_format=torch.contiguous_format)  # safetensors wants NCHW
        if self.ema is not None and self.cfg.export_ema:
            load_full_state_dict(net, self.ema.model_state(self.net))
        net.eval()
        return net.encoder, net.decoder

    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR and codebook usage of the EMA weights (main rank)."""
        if not self.info.is_main or self.eval_images is None:
            return {}
        enc, dec = self._export_modules()
        metrics, recons = reconstruction_metrics(enc, dec, self.eval_images)
        metrics.update(self._baseline)
        self.last_eval = metrics
        self._last_recons = recons
        return metrics

    def write_samples(self, step: int) -> None:
        """Originals (top) and their reconstructions (bottom) of up to 8 held-out images."""
        if not self.info.is_main or self.eval_images is None:
            return
        from PIL import Image

        n = min(8, len(self.eval_images))
        recons = getattr(self, "_last_recons", None)
        if recons is None or len(recons) < n:
            enc, dec = self._export_modules()
            _, recons = reconstruction_metrics(enc, dec, self.eval_images[:n])
        tiles = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in self.eval_images[:n]]
        tiles += [
            Image.fromarray((r.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for r in recons[:n]
        ]
        save_image_grid(tiles, self.out / "samples" / f"step-{step:08d}.png", ncols=n)

    def finish(self) -> Path | None:
        """Write ``<out>/dvae`` (EMA weights unless export_ema is off); returns its path on rank 0."""
        if not self.info.is_main:
            return None
        enc, dec = self._export_modules()
        extra = {"steps": self.step, "eval": self.last_eval, "ema": bool(self.ema and self.cfg.export_ema)}
        summary = self.summarize()
        if summary is not None:
            extra["usable"] = summary["usable"]
        return save_dvae_dir(self.out / "dvae", enc.cpu(), dec.cpu(), self.cfg.image_size, extra)

    def summarize(self) -> dict[str, Any] | None:
        """The run summary (main rank): judge the last evaluation with :func:`dvae_verdict`, print it to
        stderr (a loud warning, and a Python warning, when the dVAE is unusable) and log it to metrics.jsonl
        as ``{"kind": "summary", "usable", "problems", "advice", ...}``. None without an evaluation."""
        import sys

        if not self.info.is_main:
            return None
        if not self.last_eval:
            print(
                "dVAE summary: no evaluation ran (--eval-images 0 or --eval-every 0), so the result is not "
                "judged; run `dalle reconstruct` on a few images to check it",
                file=sys.stderr,
            )
            return None
        usable, problems, advice = dvae_verdict(
            self.last_eval,
            vocab_size=self.vocab_size,
            steps=self.step,
            last_train=self._last_record,
            cfg=self.cfg,
        )
        text = format_verdict(usable, problems, advice, self.last_eval)
        print(text, file=sys.stderr, flush=True)
        if not usable:
            warnings.warn("the trained dVAE is unusable: " + "; ".join(problems), stacklevel=2)
        record = {
            "kind": "summary",
            "step": self.step,
            "usable": usable,
            "problems": problems,
            "advice": advice,
            **self.last_eval,
        }
        self.metrics.log(record)
        return record


def train_dvae(cfg: DVAETrainConfig, resume: bool | str = False, info: DistInfo | None = None) -> Path | None:
    """Train a dVAE per ``cfg``; returns the exported dVAE directory (rank 0)."""
    return DVAETrainer(cfg, info).fit(resume=resume)


__all__ = [
    "DVAELoss",
    "DVAETrainConfig",
    "DVAETrainer",
    "gumbel_noise",
    "kl_to_uniform",
    "gaussian_nll",
    "logit_laplace_nll",
    "reconstruction_metrics",
    "schedules",
    "cell_variety",
    "dvae_verdict",
    "flat_colour_psnr",
    "format_verdict",
    "train_dvae",
]

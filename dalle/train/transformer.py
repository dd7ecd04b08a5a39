"""Stage 2: training the transformer on (caption, image tokens) pairs (paper §2.2, §2.6, Appendix B.2).

* Loss: :meth:`dalle.transformer.DALLETransformer.loss` (per-kind mean cross-entropy, 1/8 text + 7/8 image).
* AdamW beta1 0.9, beta2 0.96, eps 1e-8, weight decay 4.5e-2 on matrices (embeddings included, as in
  nanoGPT; not on biases and LayerNorm gains); linear warm-up to 4.5e-4 (the paper's 5k of 430k updates
  unless set), then a decay schedule (cosine by default) down to ``lr / 32`` (the paper ends 32x lower
  after halvings on plateaus); gradients clipped to norm 4.
* bfloat16 autocast on CUDA (the model's ``cuda_autocast``); on the CPU float32 unless ``cpu_bf16`` (bfloat16
  autocast, about twice as fast on CPUs with native bfloat16); master weights and logits always float32.
* EMA of the weights (paper: decay 0.99 every 25 updates), exported as the final model unless turned off.
* BPE dropout (0.1 in the paper) and optional caption dropout for classifier-free guidance: a dropped
  caption is the empty string, i.e. all pads, which is the unconditional input guidance uses.
* Gradient accumulation; torchrun with DDP or FSDP2 (``fsdp=True``: each block, then the whole model, is
  sharded with ``fully_shard``).

Data: token shards from ``dalle encode-dataset`` (no encoder at training time), or any image source
(folder, tar shards, ``shapes``) encoded on the fly by the frozen dVAE encoder (argmax tokens, never gumbel
noise: trap 9 of the spec). The output is a model directory (:func:`dalle.train.exports.write_model_dir`)
that :meth:`dalle.pipeline.DALLE.from_pretrained` loads.

Determinism: caption-dropout and BPE-dropout decisions, augmentation and data order are seeded by (seed,
global position), so a resumed run, or N ranks, see exactly what one uninterrupted process sees.
"""

from __future__ import annotations

import copy
import functools
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from dalle.errors import ConfigError
from dalle.sampling import sample
from dalle.seeds import derive_seed, make_generator, seed_everything
from dalle.train.config import TransformerTrainConfig
from dalle.train.distributed import DistInfo, barrier, full_state_dict
from dalle.train.ema import EMA
from dalle.train.exports import load_dvae, model_path, write_model_dir
from dalle.train.loop import TrainData, Trainer, check_image_size
from dalle.train.outputs import save_image_grid, warn_once
from dalle.train.schedules import warmup_lr

if TYPE_CHECKING:  # pragma: no cover
    from dalle.dvae import Decoder, Encoder
    from dalle.transformer import DALLETransformer
    from dalle.vqgan import VQGANEncoder


def resize_grid_embeddings(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """A transformer state dict with its row and column embeddings linearly resampled to ``grid`` cells, so
    that a model trained on one image side can start training on another (every other weight is independent
    of the grid). Cell centres map to cell centres."""
    import torch.nn.functional as F

    out = dict(state)
    for key in ("row_emb.weight", "col_emb.weight"):
        w = state[key]
        out[key] = (
            F.interpolate(w.float().T[None], size=grid, mode="linear", align_corners=False)[0]
            .T.contiguous()
            .to(w.dtype)
        )
    return out


class TransformerLoss(nn.Module):
    """Wraps a DALLETransformer so that ``forward`` is its training loss (what DDP / FSDP2 hook)."""

    def __init__(self, transformer: DALLETransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self, text: torch.Tensor, image: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``transformer.loss(text, image)``."""
        return self.transformer.loss(text, image)


def prepare_encoder(encoder: nn.Module) -> nn.Module:
    """Freeze ``encoder`` for tokenizing images (eval mode, no gradients) and give it channels-last weights,
    a little faster on CPU (the encoder turns its input channels-last itself). ``encode-dataset`` and the
    trainer both prepare their encoder with this, so pre-encoded and on-the-fly tokens are the same."""
    encoder.eval().requires_grad_(False)
    return encoder.to(memory_format=torch.channels_last)


def encoder_digest(encoder: nn.Module) -> str:
    """SHA-256 of the encoder's weights (``encode-dataset`` records it in ``meta.json``; training on the
    shards checks it against its ``--dvae``)."""
    import hashlib

    digest = hashlib.sha256()
    for v in encoder.state_dict().values():
        digest.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_images(encoder: Encoder | VQGANEncoder, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, S, S] -> argmax image tokens [B, (S/8)^2] (int64, raster order).

    ``encoder`` is used as it is (see :func:`prepare_encoder` for the setting every caller here uses).
    """
    from dalle.data.datasets import uint8_to_mapped

    device = next(encoder.parameters()).device
    tokens = encoder.encode(uint8_to_mapped(images).to(device))
    return tokens.reshape(tokens.shape[0], -1)


def caption_dropped(seed: int, position: int, p: float) -> bool:
    """Whether the caption of the sample at global ``position`` is replaced by the empty string."""
    return p > 0 and random.Random(derive_seed(seed, "caption-dropout", position)).random() < p


def load_dvae_any(spec: str, device: torch.device) -> tuple[Encoder, Decoder, int]:
    """A dVAE from a directory (``dalle train-dvae`` output or a model directory) or ``ENC,DEC`` weight files
    that :func:`dalle.loading.load_model` reads (OpenAI's .pkl files included); image size 256 for the
    latter."""
    if "," in spec:
        from dalle.loading import load_model

        enc_path, dec_path = spec.split(",", 1)
        # load_model gives an Encoder or a Decoder by the file's contents; the spec names ENC first
        encoder, decoder = load_model(enc_path, device), load_model(dec_path, device)
        return cast("Encoder", encoder), cast("Decoder", decoder), 256
    return load_dvae(spec, device)


def _collect_captions(source: Any, n: int) -> list[str]:
    from dalle.data.datasets import ShapesSource, TarShards, TokenShards

    if isinstance(source, ShapesSource):
        from dalle.data import shapes

        return shapes.captions(n, seed=source.seed)
    out: list[str] = []
    if isinstance(source, TarShards):
        for _, text, _ in source.iter_raw(source.files):
            out.extend(line for line in text.splitlines() if line.strip())
            if len(out) >= n:
                break
        return out[:n]
    if isinstance(source, TokenShards):
        for shard in source.captions:
            for cap in shard:
                out.extend(line for line in cap.splitlines() if line.strip())
                if len(out) >= n:
                    return out[:n]
        return out
    empty = 0
    for path in source.files[:n]:
        txt = path.with_suffix(".txt")
        if txt.is_file():
            lines = [line for line in txt.read_text(errors="replace").splitlines() if line.strip()]
            empty += not lines
            out.extend(lines)
    if empty:
        warnings.warn(
            f"{empty} of the first {min(n, len(source.files))} images have an empty caption file; they "
            "train as caption-free samples (the model's unconditional mode)",
            UserWarning,
            stacklevel=3,
        )
    return out[:n]


def transformer_transform(augment: bool, image_size: int, img: Any, rng: random.Random) -> Any:
    """The transformer trainer's per-sample step: the paper's augmentation at ``image_size`` (``augment``) or
    a centre crop."""
    from dalle.data.datasets import center_crop, transformer_augment

    if augment:
        return transformer_augment(img, image_size, rng)
    return center_crop(img, image_size)


class TransformerTrainer(Trainer):
    """Trains a :class:`dalle.transformer.DALLETransformer` (one process, torchrun DDP or FSDP2)."""

    kind = "transformer"
    cfg: TransformerTrainConfig
    net: TransformerLoss

    def __init__(
        self, cfg: TransformerTrainConfig, info: DistInfo | None = None, resume: bool = False
    ) -> None:
        from dalle.data.datasets import ShapesSource, TokenShards, held_out, open_source
        from dalle.tokenizer import BPETokenizer
        from dalle.transformer import DALLETransformer, TransformerConfig

        cfg.validate()
        info = info or DistInfo(device=torch.device("cpu"))
        seed_everything(cfg.seed)
        dev = info.device

        # ---- data source and dVAE
        source = open_source(cfg.data, require_captions=True, size=256)
        pretokenized = isinstance(source, TokenShards)
        if cfg.dvae is None and cfg.init is None:
            raise ConfigError(
                "give --dvae (a trained dVAE directory): it encodes images and goes into the model"
            )
        if cfg.dvae is not None:
            encoder, decoder, image_size = load_dvae_any(cfg.dvae, dev)
        else:
            assert cfg.init is not None  # checked above
            encoder, decoder, image_size = load_dvae(cfg.init, dev)
        if pretokenized and cfg.image_size is None:  # shards know the side they were encoded at
            image_size = int(source.meta.get("image_size", source.grid * 8))
        image_size = check_image_size(cfg.image_size, image_size)
        prepare_encoder(encoder)
        decoder.eval().requires_grad_(False)
        if isinstance(source, ShapesSource):
            source = ShapesSource(seed=source.seed, size=image_size)
        grid = image_size // 8
        if pretokenized:
            meta = source.meta
            if source.grid != grid or source.image_vocab_size != encoder.vocab_size:
                raise ConfigError(
                    f"token shards in {cfg.data} hold {source.grid}x{source.grid} grids of "
                    f"{source.image_vocab_size} codes but the dVAE makes {grid}x{grid} of "
                    f"{encoder.vocab_size}; encode the data with this dVAE"
                    + (
                        f", or give --image-size {source.grid * 8} (the shards' side)"
                        if source.grid != grid
                        else ""
                    )
                )
            if meta.get("encoder") not in (None, encoder.config()) or meta.get("encoder_sha256") not in (
                None,
                encoder_digest(encoder),
            ):
                raise ConfigError(
                    f"the token shards in {cfg.data} were encoded by another dVAE than --dvae {cfg.dvae} "
                    f"(its {'configuration' if meta.get('encoder') != encoder.config() else 'weights'} "
                    "differ); train with the dVAE that encoded them, or encode the data again with this one"
                )

        # ---- the held-out evaluation samples (encoded after the model is built, on the main rank)
        n_eval = cfg.eval_samples
        held_imgs: list[Any] = []
        held_caps: list[str] = []
        exclude_last, exclude_keys = 0, frozenset[str]()
        if pretokenized:
            n_eval = min(n_eval, len(source) // 10)
            exclude_last = max(n_eval, 0)
        elif n_eval > 0:
            held_imgs, held_caps, exclude_last, exclude_keys = held_out(source, n_eval, image_size)
        data = TrainData(
            source=source,
            transform=functools.partial(transformer_transform, cfg.augment, image_size),
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            num_workers=cfg.num_workers,
            exclude_last=exclude_last,
            exclude_keys=exclude_keys,
        )
        super().__init__(cfg, info, data)
        self.cfg = cfg
        if not resume:
            self.refuse_finished_run()
        self.pretokenized = pretokenized
        self.encoder, self.decoder, self.image_size = encoder, decoder, image_size
        self._inputs_digest: tuple[str, str] | None = None

        # ---- tokenizer: given, reused from the run directory, or trained on the training captions
        tok_file = self.out / "tokenizer.model"
        if cfg.tokenizer:
            self.tokenizer = BPETokenizer.load(cfg.tokenizer)
        elif cfg.init:
            self.tokenizer = BPETokenizer.load(model_path(cfg.init) / "tokenizer.model")
        else:
            if info.is_main and not (resume and tok_file.is_file()):
                caps = _collect_captions(source, cfg.tokenizer_samples)
                if not caps:
                    raise ConfigError(f"no captions found in {cfg.data} to train a tokenizer on")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "fewer merges than asked" is expected for small worlds
                    tok = BPETokenizer.train(caps, vocab_size=cfg.tokenizer_vocab)
                self.out.mkdir(parents=True, exist_ok=True)
                tok.save(tok_file)
            barrier(info)
            self.tokenizer = BPETokenizer.load(tok_file)

        # ---- model
        overrides = {
            k: getattr(cfg, k)
            for k in ("depth", "heads", "head_dim", "dropout", "attn_types", "conv_kernel")
            if getattr(cfg, k) is not None
        }
        if cfg.init:
            import json

            base = json.loads((model_path(cfg.init) / "config.json").read_text())["transformer"]
            fixed = {
                k: v for k, v in overrides.items() if k in ("depth", "heads", "head_dim") and v != base.get(k)
            }
            if fixed:  # the weights' shapes: only dropout, attention types and the conv kernel may change
                raise ConfigError(
                    f"--init {cfg.init} has "
                    + ", ".join(f"{k} {base.get(k)}" for k in fixed)
                    + "; "
                    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in fixed.items())
                    + " cannot change it when fine-tuning (the weights have its shapes); leave it out"
                )
            # another image side than init's (--image-size): the position embeddings are resized to the grid
            tcfg = TransformerConfig.from_dict(
                {
                    **base,
                    **overrides,
                    "image_grid": grid,
                    "cuda_autocast": cfg.bf16,
                    "checkpoint_activations": cfg.checkpoint_activations,
                }
            )
        else:
            tcfg = TransformerConfig.preset(
                cfg.preset,
                **{
                    **overrides,
                    "text_vocab_size": self.tokenizer.vocab_size,
                    "text_len": cfg.text_len,
                    "image_vocab_size": self.encoder.vocab_size,
                    "image_grid": grid,
                    "text_pad_id": self.tokenizer.pad_id,
                    "checkpoint_activations": cfg.checkpoint_activations,
                    "cuda_autocast": cfg.bf16,
                },
            )
        if tcfg.text_vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's text vocabulary "
                f"{tcfg.text_vocab_size}"
                + (f" (from --init {cfg.init})" if cfg.init else "")
                + "; use a tokenizer of at most that size, or the one the model was trained with"
            )
        self.tcfg = tcfg
        transformer = DALLETransformer(tcfg)
        if cfg.init:
            from safetensors.torch import load_file

            state = load_file(str(model_path(cfg.init) / "transformer.safetensors"))
            if base["image_grid"] != grid:
                state = resize_grid_embeddings(state, grid)
            try:
                transformer.load_state_dict(state)
            except RuntimeError as exc:
                raise ConfigError(
                    f"--init {cfg.init}: its weights do not fit the model described by its "
                    f"config.json and the flags ({str(exc).splitlines()[0]})"
                ) from None
        self.net = TransformerLoss(transformer).to(dev)
        self.model: nn.Module = self.net
        if cfg.compile:
            # in place: the state dict keeps its names; evaluation and sampling call the transformer directly,
            # so only the training (and evaluation-loss) forward and its backward are compiled
            self.net.compile(dynamic=False)
        if info.distributed and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in transformer.blocks:
                fully_shard(block)
            fully_shard(self.net)
        elif info.distributed:
            ids = [dev.index] if dev.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for _, p in self.net.named_parameters():
            (decay if p.dim() > 1 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )
        self.ema = EMA(self.net, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None
        self.loop.clip_grad = cfg.clip_grad

        # ---- held-out evaluation set (tokens + captions), prepared on the main rank
        self.eval_tokens: torch.Tensor | None = None
        self.eval_captions: list[str] = []
        self.has_eval = False  # the same on every rank, so that collective exports stay in step
        if pretokenized:
            if n_eval > 0:
                items = [source.get(i) for i in range(len(source) - n_eval, len(source))]
                self.eval_tokens = torch.stack([torch.from_numpy(t) for t, _, _ in items])
                self.eval_captions = [c.splitlines()[0] if c else "" for _, c, _ in items]
                self.has_eval = True
        elif n_eval > 0:
            from dalle.data.datasets import to_uint8_tensor

            self.has_eval = bool(held_imgs)
            self.eval_captions = [c.splitlines()[0] if c else "" for c in held_caps]
            if held_imgs and info.is_main:
                batch = torch.stack([to_uint8_tensor(im) for im in held_imgs])
                self.eval_tokens = torch.cat(
                    [encode_images(self.encoder, batch[i : i + 32]).cpu() for i in range(0, len(batch), 32)]
                )
        self.last_eval: dict[str, float] = {}
        self._export_step: int | None = None  # the step of the export below (same value on every rank)
        self._export_model: DALLETransformer | None = None

    # -------------------------------------------------------------- data
    def encode_text(self, captions: list[str], positions: list[int], train: bool = True) -> torch.Tensor:
        """Caption dropout, then BPE (with BPE dropout in training) to [B, text_len]; both seeded per
        position."""
        from dalle.tokenizer import TruncationWarning

        seeds = None
        if train:
            captions = [
                "" if caption_dropped(self.cfg.seed, p, self.cfg.caption_dropout) else c
                for c, p in zip(captions, positions)
            ]
            if self.cfg.bpe_dropout > 0:
                seeds = [derive_seed(self.cfg.seed, "bpe-dropout", p) for p in positions]
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", TruncationWarning
            )  # long captions keep their first text_len tokens
            return self.tokenizer.encode(
                captions,
                text_len=self.tcfg.text_len,
                dropout=self.cfg.bpe_dropout if train else 0.0,
                seeds=seeds,
            )

    # -------------------------------------------------------------- step
    def schedule(self, step: float) -> dict[str, float]:
        """Warm-up then decay of the learning rate. Under a time limit ``step`` is the time-based position:
        the decay and the default warm-up (a share of the run) follow it, an explicit ``warmup_steps`` counts
        optimizer steps (a few hundred steps are a tiny, unpredictable share of the time)."""
        r = self.cfg.resolved()
        if self.step < r["warmup_steps"] and self.cfg.warmup_steps is not None:
            step = float(self.step)
        lr = warmup_lr(step, self.cfg.lr, r["warmup_steps"], self.cfg.steps, r["lr_end"], self.cfg.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr}

    def forward(self, micro: Any, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch (image tokens from the shards or the frozen encoder)."""
        dev = self.info.device
        if micro.tokens is not None:
            image = micro.tokens.to(dev)
        else:
            image = encode_images(self.encoder, micro.images)
        text = self.encode_text(micro.captions, micro.positions).to(dev)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.cpu_bf16 and dev.type == "cpu"):
            return self.model(text, image)

    # -------------------------------------------------------------- settings
    def config_dict(self) -> dict[str, Any]:
        """Resolved settings (and the keys a resume must match)."""
        d = asdict(self.cfg)
        d.update(self.cfg.resolved())
        d["model"] = self.tcfg.to_dict()
        d["image_size"] = self.image_size
        d["global_batch"] = self.cfg.batch_size * self.info.world_size
        d["world_size"] = self.info.world_size
        if (
            self._inputs_digest is None
        ):  # the dVAE and tokenizer the run trains on (a resume must use the same)
            import hashlib

            self._inputs_digest = (
                encoder_digest(self.encoder),
                hashlib.sha256(self.tokenizer.to_bytes()).hexdigest(),
            )
        d["dvae_sha256"], d["tokenizer_sha256"] = self._inputs_digest
        return d

    # -------------------------------------------------------------- outputs
    def export_transformer(self) -> DALLETransformer | None:
        """A plain DALLETransformer with the EMA (or raw) weights on rank 0, None elsewhere (collective).

        Every rank makes the same decision (export anew, or reuse this step's export), so that all of them
        enter the same gathers. Tensors are gathered one by one to the CPU and only rank 0 keeps them; the
        model takes them over without a second initialisation, and moves to the training device only where
        it fits beside the sharded training state (else it stays on the CPU, with a warning).
        """
        if self._export_step == self.step:
            return self._export_model
        ema = self.ema if self.cfg.export_ema else None
        keep = self.info.is_main
        state = ema.model_state(self.net, keep) if ema is not None else full_state_dict(self.net, keep)
        self._export_step, self._export_model = self.step, None
        if not keep:
            return None
        from dalle.transformer import DALLETransformer

        prefix = "transformer."
        plain = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        model = DALLETransformer.from_state_dict(copy.deepcopy(self.tcfg), plain)
        self._export_model = model.to(self._export_device(model)).eval()
        return self._export_model

    def _export_device(self, model: nn.Module) -> torch.device:
        dev = self.info.device
        if dev.type != "cuda":
            return dev
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free, _ = torch.cuda.mem_get_info(dev)
        if 2 * need > free:  # the weights plus room for activations and the sampling KV cache
            warn_once(
                f"the exported model ({need / 2**30:.1f} GiB) does not fit beside the training state on "
                f"{dev} ({free / 2**30:.1f} GiB free): evaluation and samples run on the CPU"
            )
            return torch.device("cpu")
        return dev

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss (text, image, weighted) of the exported weights."""
        if not self.has_eval:
            return {}
        model = self.export_transformer()
        if model is None or self.eval_tokens is None:
            return {}
        totals = {"loss": 0.0, "text": 0.0, "image": 0.0}
        n = len(self.eval_tokens)
        dev = model.device  # the training device, or the CPU when the export does not fit there
        for i in range(0, n, 16):
            tokens = self.eval_tokens[i : i + 16].to(dev)
            text = self.encode_text(self.eval_captions[i : i + 16], [], train=False).to(dev)
            loss, parts = model.loss(text, tokens)
            k = len(tokens)
            totals["loss"] += float(loss) * k
            totals["text"] += float(parts["text"]) * k
            totals["image"] += float(parts["image"]) * k
        self.last_eval = {f"eval_{key}": v / n for key, v in totals.items()}
        return self.last_eval

    def _sample_prompts(self) -> list[str]:
        if self.cfg.sample_prompts:
            return list(self.cfg.sample_prompts)[: max(self.cfg.sample_count, 1)]
        return self.eval_captions[: self.cfg.sample_count]

    @torch.no_grad()
    def write_samples(self, step: int) -> None:
        """One image per sample prompt (seeded 0, 1, ...), decoded by the dVAE, as a captioned grid."""
        prompts = self._sample_prompts()
        if not prompts:  # the same decision on every rank (captions are known everywhere)
            return
        model = self.export_transformer()
        if model is None:
            return
        from PIL import Image

        dev = model.device
        text = self.encode_text(prompts, [], train=False).to(dev)
        gens = [make_generator(dev, "samples", i) for i in range(len(prompts))]
        tokens = sample(model, text, generator=gens)
        model.reset_cache()  # the KV cache would otherwise stay allocated through training
        images = self.decoder.decode(tokens.to(self.info.device)).float().clamp(0, 1).cpu()
        tiles = [
            Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images
        ]
        save_image_grid(tiles, self.out / "samples" / f"step-{step:08d}.png", captions=prompts)

    def finish(self) -> Path | None:
        """Write the model directory ``<out>/model`` (rank 0); every rank must call it."""
        model = self.export_transformer()
        if model is None:
            return None
        return write_model_dir(
            self.out / "model",
            self.tokenizer,
            self.encoder.cpu(),
            self.decoder.cpu(),
            model.cpu(),
            self.image_size,
            self.cfg.name,
            trained_with_caption_dropout=self.cfg.caption_dropout > 0,
            weights_dtype=self.cfg.weights_dtype,
        )


def train_transformer(
    cfg: TransformerTrainConfig, resume: bool | str = False, info: DistInfo | None = None
) -> Path | None:
    """Train a transformer per ``cfg``; returns the model directory (rank 0)."""
    return TransformerTrainer(cfg, info, resume=bool(resume)).fit(resume=resume)


__all__ = [
    "TransformerLoss",
    "TransformerTrainConfig",
    "TransformerTrainer",
    "caption_dropped",
    "encode_images",
    "load_dvae_any",
    "prepare_encoder",
    "encoder_digest",
    "resize_grid_embeddings",
    "train_transformer",
]

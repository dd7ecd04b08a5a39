"""``dalle train-dvae``, ``dalle encode-dataset`` and ``dalle train``: the training commands.

Every setting is a flag named after its config field (``batch_size`` -> ``--batch-size``; ``out_dir`` is
``--out``) and can also come from ``--config FILE`` (JSON or TOML; a flat table, or one table per command
named ``train-dvae``/``dvae``, ``encode-dataset``, ``train``/``transformer``). Flags override the file.
Run under ``torchrun --nproc_per_node=N`` for DDP (and ``--fsdp`` for FSDP2 sharding of the transformer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from dalle.cli import add_threads_flag
from dalle.train.encode import EncodeConfig, encode_dataset  # the library's; importable from here as before

ORDER = 60

_SECTIONS = {
    "train-dvae": ("train-dvae", "train_dvae", "dvae"),
    "encode-dataset": ("encode-dataset", "encode_dataset"),
    "train": ("train", "transformer"),
}

_HELP: dict[str, str] = {
    "data": "training data: a folder of images with .txt captions, .tar shards (file, folder or glob), "
    "token shards from `dalle encode-dataset` (train only), 'shapes[:SEED]' (the built-in shapes world), "
    "'shapes-dense[:SEED]' (its uncaptioned dense scenes, train-dvae only) or 'letters' "
    "(360 coloured letters on white, 64 px)",
    "out_dir": "run directory: checkpoints/, metrics.jsonl, loss.png, samples/ and the final model",
    "steps": "optimizer steps; the schedules scale with this",
    "batch_size": "samples per rank and step (the global batch is this times the number of ranks)",
    "grad_accum": "split each rank's batch into this many micro-batches (same result, less memory)",
    "image_size": "image side in pixels, a multiple of 8 (train-dvae: of the training images; "
    "train: default the token shards' side, else the dVAE's own: the dVAE is fully convolutional, "
    "so any side works)",
    "crop_size": "train on random crops of this side (the dVAE is fully convolutional; faster)",
    "seed": "seed for the initial weights, data order, augmentation and noise",
    "lr": "peak learning rate",
    "lr_end": "final learning rate",
    "kl_weight": "final KL weight beta (paper 6.6)",
    "kl_steps": "steps of the cosine beta warm-up (default: the paper's 5k/3M of the run)",
    "tau_steps": "steps of the cosine temperature annealing (default: the paper's 150k/3M of the run)",
    "lr_steps": "steps of the cosine learning-rate annealing (default: the paper's 1.2M/3M of the run)",
    "warmup_steps": "linear learning-rate warm-up steps (default: the paper's 5k/430k of the run)",
    "ema_decay": "decay of the exponential moving average of the weights (0 turns it off)",
    "ema_every": "update the moving average every this many steps",
    "eval_images": "held-out images for PSNR and codebook usage",
    "eval_samples": "held-out samples for the evaluation loss",
    "ckpt_every": "write a checkpoint every this many steps (and at the end / on SIGTERM or Ctrl-C)",
    "keep_checkpoints": "how many checkpoints to keep",
    "time_limit": "end the run after this many minutes of its training loop (evaluations and checkpoints "
    "included), as at its last step; the decay schedules follow the further of the step and the share "
    "of the time spent, so they complete (not reproducible step for step)",
    "max_nonfinite": "stop after this many non-finite losses in a row (the last good checkpoint stays)",
    "dvae": "trained dVAE: a `dalle train-dvae` output or model directory, or ENC.pkl,DEC.pkl",
    "tokenizer": "a tokenizer.model; by default one is trained on the training captions",
    "tokenizer_vocab": "vocabulary size when training a tokenizer",
    "caption_dropout": "probability of replacing a caption with the empty one "
    "(enables classifier-free guidance)",
    "bpe_dropout": "BPE dropout probability (paper 0.1; 0 makes resumption exact)",
    "fsdp": "shard the transformer with FSDP2 under torchrun",
    "preset": "transformer size preset: tiny, small or paper; --depth/--heads/--head-dim override it",
    "sample_prompts": "prompts for the sample grids (default: held-out captions)",
    "name": "model name stored in config.json",
    "init": "start from these weights (a dVAE directory for train-dvae, a model directory for train)",
    "num_workers": "DataLoader worker processes for image decoding",
    "weights_dtype": "precision of the exported transformer weights: float32, float16 (half the file) "
    "or bfloat16",
    "bf16": "bfloat16 autocast for CUDA training (float32 master weights and logits)",
    "cpu_bf16": "bfloat16 autocast for CPU training too: about 2x faster on a CPU with native bfloat16 "
    "(AVX512-BF16 or AMX; check `lscpu`), but it can be slower on one without",
    "compile": "torch.compile the training forward and backward (faster steps after a first slow one; "
    "not with --fsdp)",
    "checkpoint_activations": "recompute each block's activations in the backward pass (less memory, about "
    "a third more compute)",
    "recon_loss": "dVAE reconstruction term: logit-laplace (the paper) or mse "
    "(not the paper: squared error / (2 recon_sigma^2); better on sparse images such as letters on white, "
    "see recipes/letters)",
    "recon_sigma": "width of the mse reconstruction term, in pixel units",
    "usage_weight": "weight of KL(batch-mean posterior || uniform), which keeps many codes in use without "
    "blurring any one position's choice (not the paper; 0 = off; recipes/letters uses 0.05)",
    "gumbel_scale": "scale of the gumbel noise in the relaxed dVAE bottleneck: 1 = the paper's "
    "gumbel-softmax, 0 = a deterministic softmax(logits / tau) that tau anneals towards the argmax "
    "(recipes/letters)",
    "device": "auto, cpu, cuda or cuda:N (under torchrun each rank takes its LOCAL_RANK GPU)",
}


def _field_type(tp: Any) -> tuple[Any, bool]:
    """(base type, is_list) of a dataclass field annotation such as ``int | None`` or ``list[str] | None``."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing, "Any": Any})  # noqa: S307 - our own dataclass annotations
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _add_config_flags(p: argparse.ArgumentParser, config_cls: type) -> None:
    for f in dataclasses.fields(config_cls):
        flag = "--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")
        tp, is_list = _field_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(f.name, f.name.replace("_", " "))
        if default is not None and not isinstance(default, bool):
            help_text += f" (default {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] += f" (default {'on' if default else 'off'})"
        elif is_list:
            kwargs.update(nargs="+", type=tp, metavar=f.name.upper())
        elif tp in (int, float, str):
            kwargs.update(type=tp, metavar=f.name.upper() if tp is str else None)
        else:
            continue  # dict-valued fields come from the config file only
        p.add_argument(flag, **kwargs)


def _common_flags(p: argparse.ArgumentParser, resumable: bool = True) -> None:
    p.add_argument(
        "--config", metavar="FILE", help="JSON or TOML file with any of the settings (flags override it)"
    )
    add_threads_flag(p)
    if resumable:
        p.add_argument(
            "--resume",
            nargs="?",
            const=True,
            default=False,
            metavar="CHECKPOINT",
            help="continue the run in --out from its newest checkpoint (or from CHECKPOINT)",
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``dalle train-dvae``, ``dalle encode-dataset``, ``dalle train`` and ``dalle remap`` to the
    subcommand parsers."""
    from dalle.train.config import DVAETrainConfig, TransformerTrainConfig

    p = sub.add_parser(
        "train-dvae",
        help="train a discrete VAE (stage 1)",
        description="Train the dVAE with the paper's objective (relaxed ELB, cosine beta/tau/lr schedules).",
    )
    _common_flags(p)
    _add_config_flags(p, DVAETrainConfig)
    p.set_defaults(func=run_train_dvae, _command="train-dvae")

    p = sub.add_parser(
        "encode-dataset",
        help="turn an image dataset into dVAE token shards for transformer training",
        description="Run the dVAE encoder once over a dataset (centre crop, argmax tokens) and write "
        "memory-mapped token shards with the captions.",
    )
    _common_flags(p, resumable=False)
    p.add_argument("--data", default=argparse.SUPPRESS, help=_HELP["data"])
    p.add_argument("--dvae", default=argparse.SUPPRESS, help=_HELP["dvae"])
    p.add_argument("--out", dest="out_dir", default=argparse.SUPPRESS, help="output directory (must be new)")
    p.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="encode at most this many samples")
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="images per encoder batch (32)")
    p.add_argument("--shard-size", type=int, default=argparse.SUPPRESS, help="samples per shard (50000)")
    p.add_argument(
        "--image-size",
        type=int,
        default=argparse.SUPPRESS,
        help="image side to encode at, a multiple of 8 (default: the dVAE's own; the dVAE is fully "
        "convolutional, so a larger side gives a larger token grid)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=argparse.SUPPRESS,
        help="processes that read, render and crop batches of images while the encoder runs (0: in this "
        "process); the output is the same for any number. Tar shards are a stream and are always read "
        "in this process",
    )
    p.add_argument("--device", default=argparse.SUPPRESS, help=_HELP["device"])
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no progress output (default: a bar on a terminal, a line every 10 s elsewhere)",
    )
    p.set_defaults(func=run_encode_dataset, _command="encode-dataset")

    p = sub.add_parser(
        "train",
        help="train the transformer (stage 2) and write a model directory",
        description="Train the DALL-E transformer on captions + dVAE tokens; the result in OUT/model loads "
        "with DALLE.from_pretrained and `dalle generate --model OUT/model`.",
    )
    _common_flags(p)
    _add_config_flags(p, TransformerTrainConfig)
    p.set_defaults(func=run_train, _command="train")

    p = sub.add_parser(
        "remap",
        help="put a new dVAE under a trained transformer (its codes matched to the old ones)",
        description="Encode images with the model's dVAE and NEW_DVAE, start each new code's image embedding "
        "and output row from the old code it most often replaces at the same cell, and write the model with "
        "the new dVAE to OUT (with code_map.json), ready for `dalle train --init OUT --dvae OUT`.",
    )
    p.add_argument("model_dir", metavar="MODEL", help="the trained model directory (or a registered name)")
    p.add_argument("new_dvae", metavar="NEW_DVAE", help="the new dVAE (a directory written by train-dvae)")
    p.add_argument("out_dir", metavar="OUT", help="the model directory to write")
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="images to match the codes on: a folder, .tar shards or 'shapes[:SEED]' (default: the "
        "shapes world with --seed)",
    )
    p.add_argument("--scenes", type=int, default=500, metavar="N", help="how many images (default 500)")
    p.add_argument("--seed", type=int, default=7, help="the shapes stream's seed without --data (default 7)")
    add_threads_flag(p)
    p.set_defaults(func=run_remap, _command="remap")


# ------------------------------------------------------------------------------------------------ config
def _toml_module(path: Path) -> Any:
    """``tomllib`` (Python 3.11+) or, before 3.11, the ``tomli`` backport."""
    from dalle.errors import ConfigError

    try:
        import tomllib

        return tomllib
    except ImportError:
        try:
            import tomli

            return tomli
        except ImportError:
            raise ConfigError(
                f"cannot read config file {path}: TOML needs Python 3.11+ or the tomli package "
                "(pip install tomli); or write the settings as JSON"
            ) from None


def load_config_file(path: str | os.PathLike[str], command: str) -> dict[str, Any]:
    """Settings for ``command`` from a JSON or TOML file (flat, or sectioned by command)."""
    from dalle.errors import ConfigError

    p = Path(path)
    try:
        text = p.read_text()
        if p.suffix.lower() == ".toml":
            data = _toml_module(p).loads(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a table / object of settings")
    sections = {n for names in _SECTIONS.values() for n in names}
    # top-level settings are shared by every command; the command's own table (if any) overrides them
    values = {
        k.replace("-", "_"): v
        for k, v in data.items()
        if not (k in sections and isinstance(v, dict)) and not k.startswith("_")
    }
    for name in _SECTIONS[command]:
        if isinstance(data.get(name), dict):
            values.update({k.replace("-", "_"): v for k, v in data[name].items()})
    return values


def _type_error(value: Any, hint: Any) -> str | None:
    """Why ``value`` (from a config file) does not fit the field type ``hint``, or None when it does."""
    if value is None:
        return None if type(None) in typing.get_args(hint) else "must not be null"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return None if any(_type_error(value, a) is None for a in args) else _type_error(value, args[0])
    origin = typing.get_origin(hint) or hint
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be a whole number"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin in (list, tuple):
        if not isinstance(value, list):
            return "must be a list"
        item = args[0] if args else Any
        bad = [v for v in value if item is not Any and _type_error(v, item) is not None]
        return f"must be a list of {getattr(item, '__name__', item)}" if bad else None
    return None


def _check_file_types(config_cls: type, values: dict[str, Any], source: str) -> None:
    from dalle.errors import ConfigError

    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        why = _type_error(value, hints.get(name, Any))
        if why is not None:
            raise ConfigError(f"{source}: setting {name!r} {why}, got {value!r}")


def build_config(config_cls: type, args: argparse.Namespace, command: str) -> Any:
    """Dataclass defaults <- config file <- command-line flags."""
    from dalle.errors import ConfigError

    names = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        file_values = load_config_file(args.config, command)
        if "out" in file_values and "out_dir" not in file_values:
            file_values["out_dir"] = file_values.pop("out")
        unknown = sorted(set(file_values) - names)
        if unknown:
            raise ConfigError(
                f"unknown settings in {args.config}: {', '.join(unknown)}; see `dalle {command} --help`"
            )
        _check_file_types(config_cls, file_values, str(args.config))
        values.update(file_values)
    values.update({k: v for k, v in vars(args).items() if k in names})  # flags left out are not in args
    try:
        cfg = config_cls(**values)
    except TypeError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    if hasattr(cfg, "validate"):
        from dalle.cli import UsageError

        try:
            cfg.validate()  # inconsistent flags are bad arguments (exit 2), found before anything is loaded
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    _warn_ignored_with_init(cfg, set(values))
    return cfg


def _warn_ignored_with_init(cfg: Any, given: set[str]) -> None:
    """Settings that ``--init`` decides (the architecture it brings) are ignored when given with another value
    than the init model's: say so."""
    if not getattr(cfg, "init", None):
        return
    from dalle.train.exports import model_path

    try:
        init = json.loads((model_path(cfg.init) / "config.json").read_text())
    except (OSError, ValueError):
        return  # the trainer reports an unreadable --init
    if hasattr(cfg, "text_len"):  # dalle train: the init model's text stream
        own = {"text_len": init.get("transformer", {}).get("text_len"), "preset": None}
    else:  # dalle train-dvae: the init dVAE's codebook, and its decoder unless --new-decoder
        dec = init.get("decoder", {})
        own = {"vocab_size": dec.get("vocab_size")}
        if not cfg.new_decoder:
            own.update({k: dec.get(k) for k in ("n_hid", "n_blk_per_group", "n_init")})
    ignored = sorted(k for k in own if k in given and getattr(cfg, k) != own[k])
    if ignored:
        import warnings

        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in ignored)
        warnings.warn(
            f"{flags} ignored: --init {cfg.init} brings its own architecture, which is fine-tuned as it is",
            UserWarning,
            stacklevel=3,
        )


def _run_trainer(make_and_fit: Any, cfg: Any, args: argparse.Namespace, what: str) -> int:
    from dalle.train.distributed import close_distributed, init_distributed
    from dalle.train.loop import TrainingInterrupted

    info = init_distributed(cfg.device)
    try:
        try:
            out = make_and_fit(cfg, args.resume, info)
        except TrainingInterrupted as exc:
            if info.is_main:
                again = (
                    "the same command" if args.resume is True else "the same command with --resume (no path)"
                )
                print(
                    f"interrupted after step {exc.step}; checkpoint {exc.checkpoint}; continue with {again}",
                    file=sys.stderr,
                )
            return 128 + int(exc.signum)
        if info.is_main:
            print(f"{what} written to {out}")
        return 0
    finally:
        close_distributed()


def run_train_dvae(args: argparse.Namespace) -> int:
    """``dalle train-dvae``."""
    from dalle.train.dvae import DVAETrainConfig, train_dvae

    cfg = build_config(DVAETrainConfig, args, "train-dvae")
    return _run_trainer(lambda c, r, i: train_dvae(c, resume=r, info=i), cfg, args, "dVAE")


def run_train(args: argparse.Namespace) -> int:
    """``dalle train``."""
    from dalle.train.transformer import TransformerTrainConfig, train_transformer

    cfg = build_config(TransformerTrainConfig, args, "train")
    return _run_trainer(lambda c, r, i: train_transformer(c, resume=r, info=i), cfg, args, "model directory")


def run_remap(args: argparse.Namespace) -> int:
    """``dalle remap``."""
    from dalle.train.remap import remap_image_codes

    s = remap_image_codes(args.model_dir, args.new_dvae, args.out_dir, args.scenes, args.seed, args.data)
    print(
        f"{s['scenes']} images of {s['data']}: {s['new_codes_used']} new codes matched to "
        f"{s['old_codes_used']} old ones; the match holds on {100 * s['agreement']:.1f}% of cells; "
        f"wrote {args.out_dir}"
    )
    return 0


def run_encode_dataset(args: argparse.Namespace) -> int:
    """``dalle encode-dataset``."""
    cfg = build_config(EncodeConfig, args, "encode-dataset")
    out, count, skipped = encode_dataset(cfg)
    print(
        f"encoded {count} samples into {out}" + (f"; skipped {skipped} unreadable images" if skipped else "")
    )
    return 0

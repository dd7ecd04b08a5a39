"""Compatibility module: the training infrastructure now lives in one module per concern.

* :mod:`dalle.seeds`: seeds derived from keys, global RNG states;
* :mod:`dalle.train.schedules`: cosine and warm-up schedules;
* :mod:`dalle.train.distributed`: ``torchrun`` (DDP, FSDP2) and full state dicts of sharded modules;
* :mod:`dalle.train.ema`: the exponential moving average of the weights;
* :mod:`dalle.train.checkpoints`: atomic checkpoints;
* :mod:`dalle.train.outputs`: metrics, loss plots, sample grids;
* :mod:`dalle.train.exports`: the dVAE and model directories a run writes, and loading a dVAE back;
* :mod:`dalle.train.loop`: the loop both trainers share, signals, the run lock.

Names importable from here before the split still are.
"""

from __future__ import annotations

from dalle.seeds import derive_seed, make_generator, rng_state, seed_everything, set_rng_state
from dalle.train.checkpoints import CHECKPOINT_FORMAT, CheckpointManager
from dalle.train.config import LoopConfig
from dalle.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    close_distributed,
    full_state_dict,
    init_distributed,
    is_dtensor,
    load_full_state_dict,
    main_decides,
    unwrap,
)
from dalle.train.ema import EMA
from dalle.train.exports import MODEL_FORMAT_VERSION, load_dvae, model_path, save_dvae_dir, write_model_dir
from dalle.train.loop import (
    StopSignal,
    Trainer,
    TrainingInterrupted,
    check_image_size,
    deepcopy_module,
    describe_params,
    estimated_last_step,
)
from dalle.train.outputs import MetricsLogger, plot_loss_curve, read_metrics, save_image_grid, warn_once
from dalle.train.schedules import cosine_schedule, warmup_lr

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT_VERSION",
    "CheckpointManager",
    "DistInfo",
    "EMA",
    "LoopConfig",
    "MetricsLogger",
    "StopSignal",
    "Trainer",
    "TrainingInterrupted",
    "all_reduce_sum",
    "barrier",
    "check_image_size",
    "close_distributed",
    "cosine_schedule",
    "deepcopy_module",
    "derive_seed",
    "describe_params",
    "estimated_last_step",
    "full_state_dict",
    "init_distributed",
    "is_dtensor",
    "load_dvae",
    "load_full_state_dict",
    "main_decides",
    "make_generator",
    "model_path",
    "plot_loss_curve",
    "read_metrics",
    "rng_state",
    "save_dvae_dir",
    "save_image_grid",
    "seed_everything",
    "set_rng_state",
    "unwrap",
    "warmup_lr",
    "warn_once",
    "write_model_dir",
]

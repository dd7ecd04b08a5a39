"""`dalle train --compile`: torch.compile of the training forward and backward (in place) gives the eager
run's losses and a state dict with the same names (inductor on the CPU: about a minute of compilation)."""

from __future__ import annotations

import pytest
import torch

from dalle.errors import ConfigError
from dalle.train.config import TransformerTrainConfig
from dalle.train.outputs import read_metrics
from dalle.train.testing import TINY_TRANSFORMER, make_tiny_dvae_dir
from dalle.train.transformer import TransformerTrainer

pytestmark = pytest.mark.integration


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


def test_compiled_training_matches_eager(tmp_path) -> None:
    dvae = make_tiny_dvae_dir(tmp_path / "dvae")
    base = {
        **TINY_TRANSFORMER,
        "dvae": str(dvae),
        "steps": 3,
        "ckpt_every": 100,
        "eval_samples": 0,
        "grad_accum": 2,
    }
    eager = TransformerTrainer(TransformerTrainConfig(**{**base, "out_dir": str(tmp_path / "eager")}))
    eager.fit()
    compiled = TransformerTrainer(
        TransformerTrainConfig(**{**base, "compile": True, "out_dir": str(tmp_path / "compiled")})
    )
    assert compiled.net._compiled_call_impl is not None  # compiled in place
    compiled.fit()
    a, b = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
    sa, sb = eager.net.state_dict(), compiled.net.state_dict()
    assert sa.keys() == sb.keys()  # no "_orig_mod." prefixes: checkpoints and exports are unchanged
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-3, atol=1e-4) for k in sa)


def test_compile_with_fsdp_is_refused() -> None:
    with pytest.raises(ConfigError, match="fsdp"):
        TransformerTrainConfig(
            **{**TINY_TRANSFORMER, "compile": True, "fsdp": True, "out_dir": "x"}
        ).validate()

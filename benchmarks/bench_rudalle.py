"""ruDALL-E generation: `dalle` against rudalle's own ``generate_images``, same random weights, same run.

    .venv/bin/python benchmarks/bench_rudalle.py                    # CPU: 2 layers of Malevich width, batch 1
    .venv/bin/python benchmarks/bench_rudalle.py --depth 24 --batch 8 --device cuda

Both sides run a reduced-depth Malevich (width 2048, 16 heads, 128 text + 32x32 image tokens, v3 layout)
with random weights (timing only), float32, top_k 1024 / top_p 0.99, one image per prompt row:

* rudalle 1.1.3: ``rudalle.pipelines.generate_images`` (its cached loop, transformers' top-k/top-p filter,
  ``torch.multinomial``, then one uncached forward for the perplexity score) with a stand-in VAE whose decode
  returns a constant image (a VQGAN's decode costs both sides the same);
* dalle: :func:`dalle.sampling.sample` with ``sampler="multinomial", filter="rudalle"`` on
  :class:`dalle.rudalle.RuDalleTransformer` (static KV cache, one-token decode step) plus the same perplexity
  pass (:func:`dalle.rudalle.rerank_scores`), i.e. what ``DALLE.generate(rerank=...)`` adds.

rudalle's package ``__init__`` files import packages that no longer install, so its model and pipeline modules
are loaded from their files under stub parent packages. It needs ``pip install --no-deps rudalle==1.1.3`` and
``pip install transformers more_itertools matplotlib einops``; transformers >= 4.40 no longer has
``top_k_top_p_filtering``, so ``dalle.rudalle.top_k_top_p_filtering`` (the same rule) is patched in and the
script says so. With the same seed both sides draw the same tokens (printed as a check).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import torch

from dalle.rudalle import RuDalleConfig, RuDalleTransformer, rerank_scores, top_k_top_p_filtering
from dalle.sampling import sample


def load_rudalle() -> types.SimpleNamespace:
    """rudalle's DalleModel and generate_images, without running its package __init__ files."""
    spec = importlib.util.find_spec("rudalle")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("rudalle is not installed: pip install --no-deps rudalle==1.1.3")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in (("rudalle", root), ("rudalle.dalle", root / "dalle")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]
        sys.modules[name] = pkg
    import transformers

    patched = not hasattr(transformers, "top_k_top_p_filtering")
    if patched:
        transformers.top_k_top_p_filtering = top_k_top_p_filtering
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = importlib.import_module("rudalle.dalle.model")
        pipelines = importlib.import_module("rudalle.pipelines")
    return types.SimpleNamespace(
        model=model, pipelines=pipelines, patched=patched, transformers=transformers.__version__
    )


class _Tokenizer:
    """Stands in for rudalle's tokenizer: a fixed caption of ids."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def encode_text(self, text: str, text_seq_length: int) -> torch.Tensor:
        return self.ids


class _VAE:
    """Stands in for the VQGAN: decode returns a constant image (the same cost would be paid by both
    sides)."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.zeros(codes.shape[0], 3, 8, 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=2, help="layers (default 2; Malevich has 24)")
    p.add_argument("--batch", type=int, default=1, help="images generated at once (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side, best kept (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    ref = load_rudalle()
    params = dict(
        num_layers=a.depth,
        hidden_size=2048,
        num_attention_heads=16,
        embedding_dropout_prob=0.0,
        attention_dropout_prob=0.0,
        output_dropout_prob=0.0,
        image_tokens_per_dim=32,
        text_seq_length=128,
        vocab_size=16384 + 128,
        image_vocab_size=8192,
        cogview_sandwich_layernorm=True,
        cogview_pb_relax=True,
    )
    torch.manual_seed(0)
    theirs = ref.model.DalleModel(device=device, hf_version="v3", **params).to(device).eval()
    ours = RuDalleTransformer(RuDalleConfig.from_rudalle_params(hf_version="v3", **params))
    ours.load_state_dict(theirs.state_dict())
    ours = ours.to(device).eval()
    ids = torch.randint(4, 16384, (128,), generator=torch.Generator().manual_seed(1))
    ids[0], ids[20], ids[21:] = 2, 3, 0
    top_k, top_p = 1024, 0.99

    def run_theirs() -> torch.Tensor:
        captured = []
        vae = _VAE()
        orig = vae.decode
        vae.decode = lambda codes: (captured.append(codes.cpu()), orig(codes))[1]
        ref.pipelines.generate_images(
            "caption",
            _Tokenizer(ids),
            theirs,
            vae,
            top_k=top_k,
            top_p=top_p,
            images_num=a.batch,
            bs=a.batch,
            seed=a.seed,
        )
        return torch.cat(captured)

    def run_ours() -> torch.Tensor:
        torch.manual_seed(a.seed)
        text = ids.unsqueeze(0).repeat(a.batch, 1).to(device)
        codes = sample(ours, text, top_k=top_k, top_p=top_p, sampler="multinomial", filter="rudalle")
        codes = codes.reshape(a.batch, -1)
        _, logits = ours(text, codes)
        rerank_scores(logits, codes, "v3")  # rudalle's perplexity, as generate_images computes it
        return codes.cpu()

    def timed(fn):  # best of --repeats
        best, out = float("inf"), None
        for _ in range(a.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, out

    import io
    from contextlib import redirect_stderr

    t_ours, codes_ours = timed(run_ours)
    print(f"dalle: {t_ours / a.batch:.2f} s / image", flush=True)
    with redirect_stderr(io.StringIO()):  # rudalle's tqdm bar
        t_theirs, codes_theirs = timed(run_theirs)
    print(f"rudalle: {t_theirs / a.batch:.2f} s / image", flush=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, transformers {ref.transformers}, device {device}"
    )
    if ref.patched:
        print(
            "note: this transformers has no top_k_top_p_filtering; dalle.rudalle.top_k_top_p_filtering "
            "(the same rule) was patched in for rudalle"
        )
    print(
        f"model: {a.depth} layers x 2048 wide, 32x32 grid, batch {a.batch}, "
        f"top_k {top_k}, top_p {top_p}, fp32"
    )
    print(f"tokens identical: {'yes' if torch.equal(codes_theirs, codes_ours) else 'no'}")
    print("| implementation | s / image | ratio |")
    print("|---|---:|---:|")
    print(f"| rudalle 1.1.3 generate_images | {t_theirs / a.batch:.2f} | 1.00 |")
    print(f"| dalle (sample + perplexity pass) | {t_ours / a.batch:.2f} | {t_theirs / t_ours:.2f}x faster |")


if __name__ == "__main__":
    main()

"""The DALLE pipeline on a tiny random model saved to a temporary directory."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.errors import ConfigError, ModelLoadError, OutOfMemoryError
from dalle.pipeline import DALLE, describe_model, generate

CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle on the left",
    "a small yellow circle above a purple square",
    "a large orange triangle at the top",
]


def build_tiny(trained_with_caption_dropout: bool = False, seed: int = 0) -> DALLE:
    from dalle.dvae import Decoder, Encoder
    from dalle.tokenizer import BPETokenizer
    from dalle.transformer import DALLETransformer, TransformerConfig

    torch.manual_seed(seed)
    tok = BPETokenizer.train(CAPTIONS * 4, vocab_size=80)
    enc = Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32)
    dec = Decoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
    cfg = TransformerConfig.preset(
        "tiny", text_vocab_size=tok.vocab_size, text_len=24, image_vocab_size=32, image_grid=4
    )
    transformer = DALLETransformer(cfg)
    # The output heads start at zero (uniform predictions); randomise them so that samples depend on the
    # caption and on the seed, as they do for a trained model.
    with torch.no_grad():
        for head in (transformer.text_head, transformer.image_head):
            head.weight.normal_(0.0, 0.5)
    return DALLE(
        tok,
        enc,
        dec,
        transformer,
        image_size=32,
        name="tiny-test",
        trained_with_caption_dropout=trained_with_caption_dropout,
        device="cpu",
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return DALLE.from_pretrained(tiny_dir, device="cpu")


def _tokens(pipe, prompts, **kw):
    return pipe.generate(prompts, progress=False, return_tokens=True, **kw).tokens


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        build_tiny().save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    files = sorted(p for p in (tmp_path / "m").iterdir() if p.is_file())
    assert {p.name for p in files} >= {"transformer.safetensors", "encoder.safetensors", "tokenizer.model"}
    for p in files:  # not the 0600 of the temporary files they were written as
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p.name, oct(p.stat().st_mode))


def test_save_load_round_trip(tiny_dir):
    original = build_tiny()
    loaded = DALLE.from_pretrained(tiny_dir, device="cpu")
    for a, b in zip(original.transformer.state_dict().values(), loaded.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(_tokens(original, "a red circle", seed=3), _tokens(loaded, "a red circle", seed=3))
    assert loaded.name == "tiny-test"
    assert loaded.image_size == 32 and loaded.grid == 4
    text = describe_model(tiny_dir)
    assert "tiny-test" in text and "4x4 tokens" in text


def test_generate_returns_pil_images(pipe):
    images = pipe.generate(["a red circle", "a blue square"], num_images=2, seed=0, progress=False)
    assert len(images) == 4
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in images)


def test_seed_is_per_image_and_batch_invariant(pipe):
    prompts = ["a red circle", "a blue square"]
    big = _tokens(pipe, prompts, num_images=3, seed=11, batch_size=6)
    small = _tokens(pipe, prompts, num_images=3, seed=11, batch_size=1)
    assert torch.equal(big, small)
    # image k of a prompt with seed s is image 0 with seed s + k, alone in its batch
    for k in range(3):
        alone = _tokens(pipe, "a blue square", num_images=1, seed=11 + k)
        assert torch.equal(alone[0], big[3 + k])
    # different seeds give different samples (random model: near-uniform distribution)
    assert not torch.equal(big[0], big[1])


def test_different_prompts_in_one_batch(pipe):
    mixed = _tokens(pipe, ["a red circle", "a green triangle on the left"], num_images=2, seed=5)
    alone = _tokens(pipe, "a green triangle on the left", num_images=2, seed=5)
    assert torch.equal(mixed[2:], alone)


def test_seed_none_is_recorded(pipe):
    out = pipe.generate("a red circle", num_images=2, progress=False, return_tokens=True)
    again = _tokens(pipe, "a red circle", num_images=1, seed=out.seeds[1])
    assert torch.equal(again[0], out.tokens[1])


def test_guidance_requires_caption_dropout(pipe):
    with pytest.raises(ConfigError, match="caption dropout"):
        pipe.generate("a red circle", guidance_scale=3.0, progress=False)


def test_guidance_on_and_off():
    model = build_tiny(trained_with_caption_dropout=True)
    plain = _tokens(model, "a red circle", num_images=4, seed=1)
    guided = _tokens(model, "a red circle", num_images=4, seed=1, guidance_scale=3.0)
    assert guided.shape == plain.shape
    assert not torch.equal(plain, guided)
    # guidance_scale 1 is the conditional distribution itself
    assert torch.equal(_tokens(model, "a red circle", num_images=4, seed=1, guidance_scale=1.0), plain)
    for bad in (0, -1.0, "3", float("nan")):
        with pytest.raises(ConfigError, match="guidance_scale must be a number > 0"):
            model.generate("a red circle", guidance_scale=bad, progress=False)


def test_rerank_keeps_the_best_by_score(pipe):
    def brightness(prompt, images):
        return torch.tensor([float(np.asarray(im.convert("L"), dtype=np.float64).mean()) for im in images])

    candidates = pipe.generate("a red circle", num_images=6, seed=2, progress=False, return_tokens=True)
    scores = brightness("a red circle", candidates.images)
    best = torch.argsort(scores, descending=True, stable=True)[:2]
    out = pipe.generate(
        "a red circle", num_images=2, seed=2, rerank=6, scorer=brightness, progress=False, return_tokens=True
    )
    assert torch.equal(out.tokens, candidates.tokens[best])
    assert out.seeds == [candidates.seeds[int(i)] for i in best]
    assert torch.allclose(out.scores, scores[best])


def test_rerank_builtin_likelihood(pipe):
    candidates = _tokens(pipe, "a blue square", num_images=5, seed=9)
    ll = pipe.score(["a blue square"] * 5, candidates)
    out = pipe.generate("a blue square", num_images=2, seed=9, rerank=5, progress=False, return_tokens=True)
    best = torch.argsort(ll, descending=True, stable=True)[:2]
    assert torch.equal(out.tokens, candidates[best])
    with pytest.raises(ConfigError, match="rerank"):
        pipe.generate("a blue square", num_images=3, rerank=2, progress=False)


def test_completion_keeps_primed_rows(pipe):
    source = Image.new("RGB", (40, 48), (200, 30, 30))
    source.paste((20, 20, 220), (0, 24, 40, 48))
    original = pipe.encode_image(source)
    out = pipe.complete(
        source, "a red circle", rows=2, num_images=3, seed=0, progress=False, return_tokens=True
    )
    assert out.tokens.shape == (3, 4, 4)
    for grid in out.tokens:
        assert torch.equal(grid[:2], original[0, :2].cpu())
    assert len(out.images) == 3
    with pytest.raises(ConfigError, match="rows"):
        pipe.complete(source, "a red circle", rows=5, progress=False)


def test_callback_and_progress(pipe, capsys):
    steps = []
    pipe.generate("a red circle", seed=0, progress=True, callback=lambda step, tokens: steps.append(step))
    assert steps, "callback was never called"
    assert steps == sorted(steps)
    err = capsys.readouterr().err
    assert "%" in err or "it/s" in err or "s/it" in err  # tqdm bar


def test_temperature_zero_is_greedy_decoding(pipe):
    """temperature=0: the most likely token at every cell, so every seed gives the same image, and each cell
    is the argmax of the model's logits given the cells before it (checked against a teacher-forced pass)."""
    a = pipe.generate("a red circle", seed=0, temperature=0, progress=False, return_tokens=True)
    b = pipe.generate("a red circle", seed=1, temperature=0, progress=False, return_tokens=True)
    assert torch.equal(a.tokens, b.tokens)
    t = pipe.transformer
    text = pipe.tokenizer.encode(["a red circle"], t.config.text_len).to(t.device)
    image = a.tokens.reshape(1, -1).to(t.device)
    with torch.no_grad():
        logits = t(text, image)[1]
    assert torch.equal(logits[0].argmax(-1), image[0])


def test_bad_arguments(pipe):
    with pytest.raises(ConfigError, match="num_images"):
        pipe.generate("a", num_images=0, progress=False)
    with pytest.raises(ConfigError, match="temperature"):
        pipe.generate("a", temperature=-0.5, progress=False)
    with pytest.raises(ConfigError, match="top_p"):
        pipe.generate("a", top_p=1.5, progress=False)
    with pytest.raises(TypeError, match="prompt 1"):
        pipe.generate(["a", None], progress=False)
    with pytest.raises(ConfigError, match="no prompts"):
        pipe.generate([], progress=False)
    for prompts in (None, 5):
        with pytest.raises(TypeError, match="prompts must be a string or a list of strings"):
            pipe.generate(prompts, progress=False)
    assert len(pipe.generate((p for p in ["a", "b"]), progress=False)) == 2  # any iterable of strings
    for bs in (0, -2, 1.5):
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            pipe.generate("a", batch_size=bs, progress=False)
        with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
            pipe.complete(Image.new("RGB", (32, 32)), "a", batch_size=bs, progress=False)


def test_out_of_memory_is_reported_with_batch_size(pipe, monkeypatch):
    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipe.transformer, "prefill", boom)
    with pytest.raises(OutOfMemoryError, match="batch of 4 .*batch_size"):
        pipe.generate("a red circle", num_images=4, batch_size=4, progress=False)


def test_cpu_allocator_failures_are_out_of_memory_errors(pipe, monkeypatch):
    def no_memory(*args, **kwargs):  # how the CPU allocator reports it: no "out of memory" in the message
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 40000000000 bytes."
        )

    monkeypatch.setattr(pipe.transformer, "prefill", no_memory)
    with pytest.raises(OutOfMemoryError, match="sampling a batch of 3 .*batch_size"):
        pipe.generate("a red circle", num_images=3, batch_size=3, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(pipe.decoder, "decode", no_memory)
    with pytest.raises(OutOfMemoryError, match="decoding a batch of 2 .*batch_size"):
        pipe.generate("a red circle", num_images=2, batch_size=2, progress=False)
    monkeypatch.undo()

    def other_error(*args, **kwargs):
        raise RuntimeError("some unrelated failure")

    monkeypatch.setattr(pipe.decoder, "decode", other_error)
    with pytest.raises(RuntimeError, match="unrelated"):
        pipe.generate("a red circle", progress=False)


def test_decoding_goes_in_batches_and_the_cache_is_freed(pipe, monkeypatch):
    sizes = []
    decode = pipe.decoder.decode

    def counting(tokens, *args, **kwargs):
        sizes.append(len(tokens))
        return decode(tokens, *args, **kwargs)

    monkeypatch.setattr(pipe.decoder, "decode", counting)
    out = pipe.generate(
        "a red circle", num_images=5, batch_size=2, seed=3, progress=False, return_tokens=True
    )
    assert sizes == [2, 2, 1] and len(out.images) == 5
    assert pipe.transformer.cache is None  # the KV cache does not outlive the call
    monkeypatch.undo()
    whole = pipe.decode_tokens(out.tokens)
    for a, b in zip(whole, out.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    flat = pipe.decode_tokens(out.tokens.reshape(5, -1)[:1])
    assert np.array_equal(np.asarray(flat[0]), np.asarray(whole[0]))


def test_bad_tokens_and_seeds_are_reported(pipe):
    g = pipe.grid
    with pytest.raises(ConfigError, match="not image token grids"):
        pipe.decode_tokens(torch.zeros(g * g + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="integer tensor"):
        pipe.decode_tokens(torch.zeros(1, g, g))
    with pytest.raises(ConfigError, match=r"\[0, 32\)"):
        pipe.decode_tokens(torch.full((1, g, g), 32))
    with pytest.raises(ConfigError, match="one 4x4 token grid per prompt"):
        pipe.score(["a", "b"], torch.zeros(1, g, g, dtype=torch.long))
    for seed in ("7", 1.5, -1, True, 2**32, 2**64):
        with pytest.raises(ConfigError, match="seed"):
            pipe.generate("a red circle", seed=seed, progress=False)
    assert len(pipe.generate("a red circle", seed=np.int64(4), progress=False)) == 1
    # CPU generators keep 32 bits of a seed, so every image's seed (seed + k) must stay below 2**32
    assert len(pipe.generate("a red circle", num_images=2, seed=2**32 - 2, progress=False)) == 2
    with pytest.raises(ConfigError, match=r"from 0 to 4294967294 .*got 4294967295"):
        pipe.generate("a red circle", num_images=2, seed=2**32 - 1, progress=False)
    with pytest.raises(ConfigError, match=r"from 0 to 4294967293"):
        pipe.generate("a red circle", num_images=1, rerank=3, seed=2**32 - 2, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_pipeline_dtype_reaches_every_module(tiny_dir, dtype):
    pipe = DALLE.from_pretrained(tiny_dir, device="cpu", dtype=dtype)
    assert pipe.encoder.dtype == dtype and pipe.decoder.dtype == dtype  # their CUDA precision
    assert pipe.transformer.cuda_compute_dtype() == (None if dtype == torch.float32 else dtype)
    default = DALLE.from_pretrained(tiny_dir, device="cpu")
    assert default.transformer.cuda_compute_dtype() is None  # float32 on CPU


def test_prompts_without_known_tokens_warn(pipe):
    with pytest.warns(UserWarning, match="'' is empty.*not trained with empty captions"):
        pipe.generate("", progress=False, seed=0)
    with pytest.warns(UserWarning, match="no character the tokenizer knows"):
        pipe.generate("\u4e2d\u6587", progress=False, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("a red circle", progress=False, seed=0)


def test_a_local_model_directory_wins_over_a_registered_name(tiny_dir, tmp_path, monkeypatch):
    from dalle.pipeline import REGISTRY, resolve_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()  # a folder without config.json (say, data) does not hide the bundled model
    assert resolve_model("shapes") == REGISTRY["shapes"]
    shutil.copytree(tiny_dir, tmp_path / "shapes", dirs_exist_ok=True)
    with pytest.warns(UserWarning, match="'shapes' in the current directory is used, not the bundled model"):
        assert resolve_model("shapes") == Path("shapes")
    with pytest.warns(UserWarning, match="pass './shapes' to say you mean the directory"):
        assert DALLE.from_pretrained("shapes", device="cpu").name == "tiny-test"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_model("./shapes") == Path("shapes")  # explicit: no warning
        assert resolve_model(None) == REGISTRY["shapes"]  # the default is the bundled model, whatever is here
        assert DALLE.from_pretrained(device="cpu").name != "tiny-test"


def test_directory_errors(tiny_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory"):
        DALLE.from_pretrained(tmp_path / "nope", device="cpu")

    broken = tmp_path / "missing"
    shutil.copytree(tiny_dir, broken)
    (broken / "tokenizer.model").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.model"):
        DALLE.from_pretrained(broken, device="cpu")

    future = tmp_path / "future"
    shutil.copytree(tiny_dir, future)
    cfg = json.loads((future / "config.json").read_text())
    cfg["format_version"] = 99
    (future / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="format_version 99"):
        DALLE.from_pretrained(future, device="cpu")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_dir, mismatched)
    cfg = json.loads((mismatched / "config.json").read_text())
    cfg["transformer"]["heads"] = cfg["transformer"]["heads"] * 2
    (mismatched / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="transformer.safetensors"):
        DALLE.from_pretrained(mismatched, device="cpu")

    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_dir, garbage)
    (garbage / "encoder.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelLoadError, match="encoder.safetensors"):
        DALLE.from_pretrained(garbage, device="cpu")


def test_top_level_generate_with_model_dir(tiny_dir):
    images = generate("a red circle", model=str(tiny_dir), device="cpu", seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_cuda_default_batch_follows_free_memory():
    from dalle.pipeline import batch_size_for_memory, kv_cache_bytes
    from dalle.transformer import TransformerConfig

    paper = TransformerConfig.preset("paper")
    per_row = kv_cache_bytes(paper, torch.bfloat16)
    assert per_row == 2 * 64 * 62 * 1280 * 64 * 2  # 1.3 GB of keys and values per sampled image
    assert batch_size_for_memory(60 * 2**30, per_row) == 12
    assert batch_size_for_memory(2 * 2**30, per_row) == 1  # never below one; OutOfMemoryError says what to do
    small = kv_cache_bytes(TransformerConfig.preset("tiny"), torch.float32)
    assert batch_size_for_memory(60 * 2**30, small) == 32

"""Parity of dalle.rudalle with rudalle 1.1.3 (a test-only reference; skipped where it is not installed).

rudalle's package __init__ files import huggingface_hub's removed ``cached_download`` (and omegaconf, cv2,
...), so the reference modules are loaded from their files under stub parent packages, which are removed
from sys.modules again afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from dalle.errors import ConfigError, TokenizerError
from dalle.rudalle import (
    RUDALLE_MODELS,
    RuDalleConfig,
    RuDalleTokenizer,
    RuDalleTransformer,
    build_masks,
    ce_to_ppl,
    generate_codes,
    rerank_scores,
    rudalle_filter_logits,
    top_k_top_p_filtering,
)

TINY = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    embedding_dropout_prob=0.0,
    attention_dropout_prob=0.0,
    output_dropout_prob=0.0,
    text_seq_length=8,
    image_tokens_per_dim=14,
    vocab_size=40 + 8,
    image_vocab_size=24,
    cogview_sandwich_layernorm=True,
    cogview_pb_relax=True,
)
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_reference() -> types.SimpleNamespace:
    spec = importlib.util.find_spec("rudalle")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rudalle (test-only reference) is not installed")
    pytest.importorskip("einops")
    root = Path(next(iter(spec.submodule_search_locations)))
    names = ("rudalle", "rudalle.dalle", "huggingface_hub")
    saved = {name: sys.modules.get(name) for name in names}
    loaded_before = set(sys.modules)
    try:
        for name, path in (("rudalle", root), ("rudalle.dalle", root / "dalle")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
        hub = types.ModuleType("huggingface_hub")
        hub.hf_hub_url = hub.cached_download = None
        sys.modules["huggingface_hub"] = hub
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script in their transformer module
            model = importlib.import_module("rudalle.dalle.model")
        ns = types.SimpleNamespace(
            model=model,
            transformer=importlib.import_module("rudalle.dalle.transformer"),
            masks=importlib.import_module("rudalle.dalle.image_attention"),
        )
        try:
            ns.tokenizer = importlib.import_module("rudalle.tokenizer")
        except ImportError:  # youtokentome missing
            ns.tokenizer = None
    finally:
        for name in set(sys.modules) - loaded_before:
            if name.startswith("rudalle"):
                del sys.modules[name]
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return ns


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
    return _load_reference()


def _pair(ref: types.SimpleNamespace, version: str, seed: int = 0, **overrides):
    """A randomly initialised reference model and ours with the same weights (eval mode)."""
    params = {**TINY, **overrides}
    torch.manual_seed(seed)
    theirs = ref.model.DalleModel(device="cpu", hf_version=version, **params).eval()
    with torch.no_grad():  # move LayerNorms etc. away from the identity so every parameter matters
        for p in theirs.parameters():
            p.add_(0.2 * torch.randn_like(p))
    config = RuDalleConfig.from_rudalle_params(hf_version=version, **params)
    ours = RuDalleTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _inputs(config: RuDalleConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, config.bpe_vocab_size, (batch, config.text_len), generator=g)
    text[:, 0] = 2
    text[0, 5:] = 0  # pads, replaced by per-position pad tokens
    text[1, -1] = 0
    image = torch.randint(0, config.image_vocab_size, (batch, config.image_len), generator=g)
    return text, image


def _ref_logits(model, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([text, image], dim=1)
    length = model.total_seq_length
    mask = torch.tril(torch.ones(ids.shape[0], 1, length, length))
    with torch.no_grad():
        return model(ids, mask)[0]


# ------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("text_len,grid", [(8, 14), (3, 5)])
def test_masks_equal_reference(ref, version: str, text_len: int, grid: int) -> None:
    ours = build_masks(text_len, grid, version)
    theirs = {
        "row_mask": ref.masks.get_row_mask(text_len, grid, is_bool_mask=True),
        "col_mask": ref.masks.get_col_mask(text_len, grid, is_bool_mask=True),
        "conv_mask": ref.masks.get_conv_mask(text_len, grid, is_bool_mask=True, hf_version=version),
    }
    for name, mask in theirs.items():
        assert torch.equal(ours[name], mask), name


def test_layer_schedule() -> None:
    assert RuDalleConfig.preset("malevich").layer_types[:6] == [
        "row",
        "column",
        "row",
        "row",
        "row",
        "column",
    ]
    assert RuDalleConfig.preset("malevich").layer_types[-1] == "conv"
    # as in the reference: a last layer with (l - 1) % 4 == 0 stays a column layer
    assert RuDalleConfig(depth=6).layer_types == ["row", "column", "row", "row", "row", "column"]


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_joint_logits_equal_reference(ref, version: str, attn_impl: str) -> None:
    theirs, ours = _pair(ref, version)
    ours.config.attn_impl = attn_impl
    for layer in ours.transformer.layers:
        layer.attention.impl = attn_impl
    c = ours.config
    text, image = _inputs(c)
    for m in (0, 5, c.image_len - 1, c.image_len):
        expected = _ref_logits(theirs, text, image[:, :m])
        got = ours.joint_logits(text, image[:, :m])
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_forward_slices_joint_head(ref, version: str) -> None:
    theirs, ours = _pair(ref, version, seed=3)
    c = ours.config
    text, image = _inputs(c)
    joint = _ref_logits(theirs, text, image)  # v2: stream cut to seq_len slots
    s, t, v = c.text_slots, c.text_len, c.text_vocab_size
    assert s == (t + 1 if version == "v2" else t)
    text_logits, image_logits = ours(text, image)
    assert text_logits.dtype == image_logits.dtype == torch.float32
    torch.testing.assert_close(image_logits, joint[:, s - 1 : s - 1 + c.image_len, v:], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(text_logits, joint[:, s - t : s - 1, :v], atol=ATOL, rtol=ATOL)
    # a prefix of the image gives the same leading predictions (the last token is never an input)
    _, head = ours(text, image[:, :7])
    torch.testing.assert_close(head, image_logits[:, :7], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_loss_and_gradients_equal_reference(ref, version: str) -> None:
    theirs, ours = _pair(ref, version, seed=4)
    theirs.train()
    ours.train()
    text, image = _inputs(ours.config)
    length = theirs.total_seq_length
    loss_ref, parts_ref = theirs(
        torch.cat([text, image], 1), torch.tril(torch.ones(2, 1, length, length)), return_loss=True
    )
    loss, parts = ours.loss(text, image)
    torch.testing.assert_close(loss, loss_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(parts["image"], parts_ref["image"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(parts["text"], parts_ref["text"], atol=ATOL, rtol=ATOL)
    loss_ref.backward()
    loss.backward()
    for name in (
        "text_embeddings.weight",
        "image_row_embeddings.weight",
        "transformer.layers.1.mlp.dense_h_to_4h.weight",
        "to_logits.1.bias",
    ):
        got, expected = ours.get_parameter(name).grad, theirs.get_parameter(name).grad
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_cached_decoding_equals_forward(version: str, attn_impl: str) -> None:
    torch.manual_seed(0)
    config = RuDalleConfig.from_rudalle_params(
        hf_version=version, attn_impl=attn_impl, **{**TINY, "image_tokens_per_dim": 6}
    )
    model = RuDalleTransformer(config).eval()
    text, image = _inputs(config)
    _, full = model(text, image)
    for n0 in (0, 3):
        steps = [model.prefill(text, image[:, :n0])]
        for j in range(n0 + 1, config.image_len):
            steps.append(model.decode_step(image[:, j - 1], torch.tensor(config.text_len + j)))
        torch.testing.assert_close(torch.stack(steps, 1), full[:, n0:], atol=ATOL, rtol=ATOL)
    assert model.cache is not None and model.cache.k.shape[3] == config.seq_len
    model.reset_cache()
    assert model.cache is None


def test_sampling_drives_model_cached_and_uncached() -> None:
    from dalle.sampling import sample

    torch.manual_seed(0)
    model = RuDalleTransformer(
        RuDalleConfig.from_rudalle_params(hf_version="v2", **{**TINY, "image_tokens_per_dim": 4})
    )
    text, _ = _inputs(model.config)
    runs = [
        sample(
            model, text, top_k=5, generator=[torch.Generator().manual_seed(i) for i in range(2)], use_cache=c
        )
        for c in (True, False)
    ]
    assert runs[0].shape == (2, 4, 4)
    assert torch.equal(runs[0], runs[1])
    ll = model.image_log_likelihood(text[:1], runs[0].reshape(2, -1))
    assert ll.shape == (2,) and bool((ll < 0).all())


def test_generate_codes_keeps_prompt_cells() -> None:
    torch.manual_seed(0)
    config = RuDalleConfig.from_rudalle_params(hf_version="v3", **{**TINY, "image_tokens_per_dim": 4})
    model = RuDalleTransformer(config).eval()
    text, image = _inputs(config)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:1] = True  # first row kept (a prefix) ...
    mask[:, -1] = True  # ... and the right column (not a prefix)
    out = generate_codes(
        model,
        text,
        top_k=4,
        top_p=0.9,
        prompt=image[:1],
        prompt_mask=mask,
        generator=torch.Generator().manual_seed(0),
    )
    flat = mask.reshape(-1)
    assert torch.equal(out[:, flat], image[:1].expand(2, -1)[:, flat])
    assert out.shape == (2, 16) and int(out.max()) < config.image_vocab_size


# ------------------------------------------------------------------------------------------ full sizes


@pytest.mark.parametrize("name", ["malevich", "malevich-v2", "kandinsky"])
def test_full_size_state_dict_matches_reference(ref, monkeypatch, name: str) -> None:
    params = dict(RUDALLE_MODELS[name])
    version = params.pop("hf_version")
    length = params["text_seq_length"] + params["image_tokens_per_dim"] ** 2
    for fn in ("get_row_mask", "get_col_mask", "get_conv_mask"):  # their Python-loop masks take seconds
        monkeypatch.setattr(ref.transformer, fn, lambda *a, **k: torch.ones(length, length, dtype=torch.bool))
    with torch.device("meta"):
        theirs = ref.model.DalleModel(device="meta", hf_version=version, **params)
        ours = RuDalleTransformer(RuDalleConfig.preset(name))
    expected = {k: (tuple(v.shape), v.dtype) for k, v in theirs.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    c = ours.config
    assert (c.text_len, c.image_grid, c.image_len, c.seq_len, c.text_vocab_size) == (
        128,
        32,
        1024,
        1152,
        16512,
    )


def test_checkpoint_loading_ignores_masks(ref, tmp_path: Path) -> None:
    theirs, ours = _pair(ref, "v3", seed=5)
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("_mask")}  # a file without masks
    path = tmp_path / "pytorch_model.bin"
    torch.save({"module." + k: v.half() for k, v in state.items()}, path)
    loaded = RuDalleTransformer.from_rudalle_checkpoint(path, ours.config)
    text, image = _inputs(ours.config)
    assert loaded.text_embeddings.weight.dtype == torch.float32
    torch.testing.assert_close(
        loaded.joint_logits(text, image), ours.half().float().joint_logits(text, image)
    )
    # masks in a state dict never replace the model's own (the reference rebuilds its masks too)
    bad = dict(theirs.state_dict(), **{"transformer.row_mask": torch.zeros_like(theirs.transformer.row_mask)})
    ours.load_state_dict(bad, strict=True)
    assert bool(ours.transformer.row_mask.any())


# ------------------------------------------------------------------------------------------- tokenizer


CAPTIONS = [
    "Котик сидит на окне",
    "a red bird on a branch",
    "КРАСНАЯ Машина",
    "",
    "   ",
    "  padded  words\tand\ttabs\n",
    "слово " * 40,
    "emoji 😀 and ▁marker",
    "ab",
    "abc abc abc",
    "Ёлка и ЁЖИК",
    "nbsp\xa0a\u3000b\x85c\x1cd\u2028e\x0bf\x0cg\rh",
]


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    yttm = pytest.importorskip("youtokentome")
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    lines = [
        "котик сидит на окне и смотрит на улицу",
        "a red bird on a branch of a tree",
        "красная машина едет",
        "ёлка и ёжик в лесу",
        "abc abd abe",
        "маленький котик",
    ] * 20
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    model = folder / "bpe.model"
    yttm.BPE.train(data=str(corpus), vocab_size=90, model=str(model), n_threads=1)
    return model


def test_tokenizer_matches_reference(ref, bpe_model: Path) -> None:
    if ref.tokenizer is None:
        pytest.skip("youtokentome is not installed")
    import youtokentome as yttm

    from dalle._pybpe import PyBPE

    wrapper = ref.tokenizer.YTTMTokenizerWrapper(yttm.BPE(model=str(bpe_model)))
    ours = RuDalleTokenizer.load(bpe_model)
    pure = RuDalleTokenizer(
        types.SimpleNamespace(_bpe=PyBPE(bpe_model.read_bytes()), vocab_size=ours.vocab_size)
    )
    assert ours.vocab_size == wrapper.vocab_size() == len(ours.vocab())
    for text_len in (16, 128):
        expected = torch.stack([wrapper.encode_text(t.lower().strip(), text_len) for t in CAPTIONS])
        assert torch.equal(ours.encode(CAPTIONS, text_len=text_len), expected)
        assert torch.equal(pure.encode(CAPTIONS, text_len=text_len), expected)
    ids = ours.encode(CAPTIONS[0], text_len=16)
    assert ids.shape == (1, 16) and ids[0, 0] == 2
    assert ours.decode(ids[0]) == wrapper.decode_text(ids[0])
    assert ours.decode(ids) == [wrapper.decode_text(ids[0])]
    long = ours.encode("слово " * 40, text_len=16)[0]
    assert long[-1] != 3 and bool((long != 0).all())  # truncated: the EOS is cut off
    empty = ours.encode("", text_len=16)[0]
    assert empty[:2].tolist() == [2, 3] and not empty[2:].any()
    with pytest.raises(TokenizerError):
        ours.encode("x", text_len=0)
    with pytest.raises(TypeError):
        ours.encode([None])


# --------------------------------------------------------------------------------------- sampling rules


def _filter_loop(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Row-by-row formulation of transformers' top-k / top-p filter (stable order for equal logits)."""
    out = logits.clone()
    for row in out:
        values = row.tolist()
        if top_k > 0:
            kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
            for i, x in enumerate(values):
                if x < kth:
                    row[i] = -math.inf
        if top_p < 1.0:
            values = row.tolist()
            order = sorted(range(len(values)), key=lambda i: -values[i])
            peak = max(values)
            weights = [math.exp(values[i] - peak) for i in order]
            total, before = sum(weights), 0.0
            for rank, i in enumerate(order):
                if rank > 0 and before > top_p:
                    row[i] = -math.inf
                before += weights[rank] / total
    return out


def test_top_k_top_p_filtering_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 40, generator=g) * 2).round(decimals=0)  # many ties
    for top_k, top_p in ((0, 1.0), (5, 1.0), (1, 1.0), (0, 0.5), (7, 0.8), (0, 0.0), (100, 0.95)):
        got = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
        assert torch.equal(got, _filter_loop(logits, top_k, top_p)), (top_k, top_p)
    assert torch.equal(
        rudalle_filter_logits(logits, 2.0, 5, 0.9), top_k_top_p_filtering(logits / 2.0, 5, 0.9)
    )
    kept = top_k_top_p_filtering(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), top_k=2)
    assert torch.equal(kept.isfinite(), torch.tensor([[False, True, True, False]]))
    with pytest.raises(ConfigError):
        top_k_top_p_filtering(logits, top_k=-1)
    with pytest.raises(ConfigError):
        rudalle_filter_logits(logits, temperature=0.0)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_rerank_scores_match_reference(ref, version: str) -> None:
    theirs, ours = _pair(ref, version, seed=6)
    c = ours.config
    text, image = _inputs(c)
    n, v = c.image_len, c.text_vocab_size
    joint = _ref_logits(theirs, text, image)  # generate_images: slots -n .. -2 scored against cells 1 .. n-1
    ce = torch.nn.functional.cross_entropy(
        joint[:, -n:-1, v:].transpose(1, 2), image[:, 1:], reduction="none"
    )
    expected = ce.exp().mean(1)
    _, image_logits = ours(text, image)
    torch.testing.assert_close(rerank_scores(image_logits, image, version), expected, atol=1e-5, rtol=1e-5)
    aligned = rerank_scores(image_logits, image, version, reference_alignment=False)
    if version == "v3":
        torch.testing.assert_close(aligned, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ce_to_ppl(torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])), torch.tensor([3.0]))


# ------------------------------------------------------------------------------------------- validation


def test_input_validation() -> None:
    config = RuDalleConfig.from_rudalle_params(hf_version="v3", **{**TINY, "image_tokens_per_dim": 4})
    model = RuDalleTransformer(config)
    text, image = _inputs(config)
    with pytest.raises(ConfigError):
        model(text.float(), image)
    with pytest.raises(ConfigError):
        model(torch.zeros(1, config.text_len + 1, dtype=torch.long), image[:1])
    with pytest.raises(ConfigError):
        model(torch.full((1, 3), config.text_vocab_size), image[:1])
    with pytest.raises(ConfigError):
        model(text, image + config.image_vocab_size)
    with pytest.raises(ConfigError):
        model(text, image[:1])
    with pytest.raises(ConfigError):
        model.prefill(text, image)  # a prime must leave a cell to predict
    with pytest.raises(ConfigError):
        model.decode_step(image[:, 0], config.text_len + 1)  # no cache yet
    with pytest.raises(ConfigError):
        RuDalleConfig(version="v1")
    with pytest.raises(ConfigError):
        RuDalleConfig.preset("dalle-mini")
    with pytest.raises(ConfigError):
        RuDalleConfig.from_dict({"depth": 2, "width": 3})
    assert RuDalleConfig.from_dict(config.to_dict()) == config
    short = model._check_text(text[:, :3])
    assert short.shape == (2, config.text_len) and not short[:, 3:].any()
    assert model._check_image(image.view(2, 4, 4)).shape == (2, 16)

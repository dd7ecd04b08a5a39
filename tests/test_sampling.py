"""Sampling: logit filters, per-sample generators, priming, guidance, callbacks, and the end-to-end proof
that a tiny model memorises caption -> grid pairs and samples them back."""

from __future__ import annotations

import time

import pytest
import torch

from dalle.errors import ConfigError
from dalle.sampling import apply_filter, filter_logits, sample, sample_logits
from dalle.transformer import DALLETransformer, TransformerConfig

T, G, VT, VI = 8, 6, 64, 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> DALLETransformer:
    torch.manual_seed(0)
    m = DALLETransformer(TransformerConfig.preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def texts(b: int = 3) -> torch.Tensor:
    text = torch.randint(1, VT, (b, T), generator=torch.Generator().manual_seed(1))
    text[0, 4:] = 0
    return text


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# --------------------------------------------------------------------------------------------- filters


def test_filter_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, True, False], [True, True, True, True]]  # ties at the k-th stay
    # softmax of row 0 is about [0.09, 0.67, 0.24, 0.03]: top_p 0.5 keeps 1 token, 0.8 keeps 2
    assert filter_logits(logits[:1], top_p=0.5).isfinite().sum() == 1
    assert filter_logits(logits[:1], top_p=0.8).isfinite().tolist() == [[False, True, True, False]]
    assert filter_logits(logits[:1], top_p=1.0).isfinite().all()
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)
    assert filter_logits(logits, temperature=0).isfinite().sum(1).tolist() == [1, 1]
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            filter_logits(logits, **bad)


def test_sample_logits_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    draws = sample_logits(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    top2 = sample_logits(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------- sample


def test_sample_shape_and_seeds(model: DALLETransformer) -> None:
    text = texts()
    a = sample(model, text, generator=gens(1, 2, 3))
    assert a.shape == (3, G, G) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < VI
    assert torch.equal(a, sample(model, text, generator=gens(1, 2, 3)))
    assert not torch.equal(a, sample(model, text, generator=gens(4, 5, 6)))


def test_sample_does_not_depend_on_its_batch(model: DALLETransformer) -> None:
    text = texts()
    together = sample(model, text, generator=gens(10, 11, 12))
    for i, seed in enumerate((10, 11, 12)):
        alone = sample(model, text[i : i + 1], generator=gens(seed))
        assert torch.equal(alone[0], together[i])


def test_cache_and_no_cache_sample_the_same(model: DALLETransformer) -> None:
    text = texts(2)
    cached = sample(model, text, generator=gens(5, 6), top_p=0.9)
    uncached = sample(model, text, generator=gens(5, 6), top_p=0.9, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prime_is_kept(model: DALLETransformer) -> None:
    text = texts(2)
    prime = torch.randint(0, VI, (2, 2 * G + 3), generator=torch.Generator().manual_seed(2))
    out = sample(model, text, prime=prime, generator=gens(1, 2))
    assert torch.equal(out.view(2, -1)[:, : prime.shape[1]], prime)
    # the no-cache path agrees, whole rows given as [B, rows, grid] work, a full prime is returned as is
    assert torch.equal(out, sample(model, text, prime=prime, generator=gens(1, 2), use_cache=False))
    rows = prime[:, : 2 * G].view(2, 2, G)
    assert torch.equal(
        sample(model, text, prime=rows, generator=gens(1, 2)).view(2, -1)[:, : 2 * G], rows.view(2, -1)
    )
    full = torch.randint(0, VI, (2, G * G))
    assert torch.equal(sample(model, text, prime=full).view(2, -1), full)
    with pytest.raises(ConfigError, match="prime"):
        sample(model, text, prime=prime[:, :3] + VI)


def test_guidance(model: DALLETransformer) -> None:
    text = texts(2)
    plain = sample(model, text, generator=gens(1, 2))
    assert torch.equal(sample(model, text, generator=gens(1, 2), guidance_scale=1.0), plain)
    uncond = sample(model, torch.zeros_like(text), generator=gens(1, 2))
    assert torch.equal(sample(model, text, generator=gens(1, 2), guidance_scale=0.0), uncond)
    strong = sample(model, text, generator=gens(1, 2), guidance_scale=3.0, prime=plain.view(2, -1)[:, :4])
    assert strong.shape == (2, G, G)


def test_callback_progress_and_mode(model: DALLETransformer) -> None:
    calls: list[tuple[int, tuple[int, ...]]] = []
    model.train()
    out = sample(
        model,
        texts(2),
        generator=gens(1, 2),
        callback=lambda s, t: calls.append((s, tuple(t.shape))),
        callback_every=10,
        progress=True,
        prime=torch.zeros(2, 3, dtype=torch.long),
    )
    assert model.training  # restored
    model.eval()
    assert [s for s, _ in calls] == [13, 23, 33, 36] and all(shape == (2, G, G) for _, shape in calls)
    last: list[torch.Tensor] = []
    sample(
        model,
        texts(2),
        generator=gens(1, 2),
        callback=lambda s, t: last.append(t),
        prime=torch.zeros(2, 3, dtype=torch.long),
    )
    assert len(last) == G * G - 3 and torch.equal(last[-1], out)


def test_bad_generators(model: DALLETransformer) -> None:
    with pytest.raises(ConfigError, match="one per text row"):
        sample(model, texts(3), generator=gens(1, 2))
    with pytest.raises(ConfigError, match="callback_every"):
        sample(model, texts(1), callback_every=0)


# ------------------------------------------------------------------------- samplers, filters, forced cells


def test_rudalle_filter_differs_from_dalle_filter_at_the_threshold() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    # dalle drops a token once the mass before it reaches top_p; transformers keeps the token that crosses it
    assert apply_filter(logits, top_p=0.5, filter="dalle").isfinite().tolist() == [[True, False, False]]
    assert apply_filter(logits, top_p=0.5, filter="rudalle").isfinite().tolist() == [[True, True, False]]
    # top_k 0 / top_p 1 switch transformers' filters off; the same call is refused by dalle's filter
    assert apply_filter(logits, top_k=0, top_p=1.0, filter="rudalle").isfinite().all()
    with pytest.raises(ConfigError, match="top_k"):
        apply_filter(logits, top_k=0, filter="dalle")
    with pytest.raises(ConfigError, match="filter must be one of"):
        apply_filter(logits, filter="nucleus")


def test_multinomial_sampler_draws_like_torch_multinomial() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    probs = apply_filter(logits, top_k=7, top_p=0.9, filter="rudalle").softmax(-1)
    one = sample_logits(
        logits,
        top_k=7,
        top_p=0.9,
        generator=torch.Generator().manual_seed(5),
        sampler="multinomial",
        filter="rudalle",
    )
    assert torch.equal(
        one, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(5)).squeeze(1)
    )
    rows = sample_logits(
        logits, top_k=7, top_p=0.9, generator=gens(1, 2, 3), sampler="multinomial", filter="rudalle"
    )
    expected = [int(torch.multinomial(probs[i : i + 1], 1, generator=g)) for i, g in enumerate(gens(1, 2, 3))]
    assert rows.tolist() == expected
    with pytest.raises(ConfigError, match="sampler must be one of"):
        sample_logits(logits, sampler="gumbel")


def _border_mask(width: int = 1) -> torch.Tensor:
    mask = torch.zeros(G, G, dtype=torch.bool)
    mask[:width] = mask[-width:] = True
    mask[:, :width] = mask[:, -width:] = True
    return mask


@pytest.mark.parametrize("sampler", ["race", "multinomial"])
def test_forced_cells_are_kept_and_the_rest_sampled(model: DALLETransformer, sampler: str) -> None:
    text = texts(2)
    given = torch.randint(0, VI, (1, G * G), generator=torch.Generator().manual_seed(3))
    mask = _border_mask()
    out = sample(model, text, generator=gens(1, 2), prompt_tokens=given, prompt_mask=mask, sampler=sampler)
    flat = out.view(2, -1)
    keep = mask.view(-1)
    assert torch.equal(flat[:, keep], given.expand(2, -1)[:, keep])
    assert not torch.equal(flat[:, ~keep], given.expand(2, -1)[:, ~keep])
    # the cache-free path agrees, and each row is independent of its batch
    assert torch.equal(
        out,
        sample(
            model,
            text,
            generator=gens(1, 2),
            prompt_tokens=given,
            prompt_mask=mask,
            sampler=sampler,
            use_cache=False,
        ),
    )
    alone = sample(model, text[1:], generator=gens(2), prompt_tokens=given, prompt_mask=mask, sampler=sampler)
    assert torch.equal(alone[0], out[1])
    # a raster prefix given as a mask is the same as prime
    prefix = torch.zeros(G * G, dtype=torch.bool)
    prefix[: 2 * G + 1] = True
    via_mask = sample(
        model, text, generator=gens(1, 2), prompt_tokens=given, prompt_mask=prefix, sampler=sampler
    )
    via_prime = sample(model, text, generator=gens(1, 2), prime=given[:, : 2 * G + 1], sampler=sampler)
    assert torch.equal(via_mask, via_prime)


def test_forced_cells_per_row(model: DALLETransformer) -> None:
    text = texts(2)
    given = torch.randint(0, VI, (2, G, G), generator=torch.Generator().manual_seed(4))
    masks = torch.stack([_border_mask(), torch.zeros(G, G, dtype=torch.bool)])
    masks[1, 2:4, 1:5] = True  # a block inside the second image
    out = sample(model, text, generator=gens(7, 8), prompt_tokens=given, prompt_mask=masks, callback_every=5)
    assert torch.equal(out[masks], given[masks])
    assert torch.equal(
        out,
        sample(model, text, generator=gens(7, 8), prompt_tokens=given, prompt_mask=masks, use_cache=False),
    )
    for i in range(2):  # forced cells draw no randomness: a row alone samples the same cells
        alone = sample(
            model,
            text[i : i + 1],
            generator=gens(7 + i),
            prompt_tokens=given[i : i + 1],
            prompt_mask=masks[i],
        )
        assert torch.equal(alone[0], out[i])
    everything = torch.ones(G * G, dtype=torch.bool)
    assert torch.equal(sample(model, text, prompt_tokens=given, prompt_mask=everything), given)


def test_forced_cells_bad_input(model: DALLETransformer) -> None:
    text = texts(2)
    given = torch.zeros(1, G * G, dtype=torch.long)
    mask = _border_mask()
    with pytest.raises(ConfigError, match="both"):
        sample(model, text, prompt_tokens=given)
    with pytest.raises(ConfigError, match="not both"):
        sample(model, text, prompt_tokens=given, prompt_mask=mask, prime=given[:, :3])
    with pytest.raises(ConfigError, match="prompt_tokens must be"):
        sample(model, text, prompt_tokens=given[:, :5], prompt_mask=mask)
    with pytest.raises(ConfigError, match="bool"):
        sample(model, text, prompt_tokens=given, prompt_mask=mask.long())
    with pytest.raises(ConfigError, match="prompt_mask must be"):
        sample(model, text, prompt_tokens=given, prompt_mask=mask[:3])
    with pytest.raises(ConfigError, match="prompt_tokens ids"):
        sample(model, text, prompt_tokens=given + VI, prompt_mask=mask)


# --------------------------------------------------------------------------------------- end to end


def test_tiny_model_memorises_and_samples_back() -> None:
    """Masks, embeddings and loss fit together: 4 captions (of different lengths) -> random 6x6 grids are
    learnt on the CPU in seconds and sampled back exactly with top_k=1 (and at a low temperature)."""
    torch.manual_seed(0)
    model = DALLETransformer(TransformerConfig.preset("tiny", heads=4, head_dim=16))
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(1, VT, (4, T), generator=gen)
    for i, length in enumerate((2, 3, 5, 8)):
        text[i, length:] = 0
    grids = torch.randint(0, VI, (4, G * G), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    start = time.perf_counter()
    model.train()
    steps = 0
    while steps < 600:
        steps += 1
        loss, parts = model.loss(text, grids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if parts["image"] < 0.01:
            break
    train_s = time.perf_counter() - start
    model.eval()
    print(f"\noverfit: {steps} steps, {train_s:.1f} s, image loss {float(parts['image']):.4f}")
    assert parts["image"] < 0.05
    greedy = sample(model, text, top_k=1, generator=gens(0, 1, 2, 3))
    assert torch.equal(greedy.view(4, -1), grids)
    cool = sample(model, text, temperature=0.3, generator=gens(4, 5, 6, 7))
    assert torch.equal(cool.view(4, -1), grids)
    completed = sample(model, text, top_k=1, prime=grids[:, : 2 * G])  # image completion from two rows
    assert torch.equal(completed.view(4, -1), grids)
    ll = model.image_log_likelihood(text, grids)
    shuffled = model.image_log_likelihood(text, grids.roll(1, 0))
    assert (ll > shuffled).all()  # reranking prefers the matching grid

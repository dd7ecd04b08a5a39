"""Sampling image tokens from the DALL-E transformer: logit filters and the cached decode loop.

Randomness: each sampled token is ``argmax(log p - log E)`` with ``E ~ Exponential(1)`` drawn per vocabulary
entry (the exponential race, equivalent to drawing from ``p``). With a *list* of generators, row ``b`` draws
its noise from ``generator[b]`` alone and always the same amount per step, so a sample does not depend on
the batch it runs in. A single generator (or ``None``, the global RNG) draws the noise for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from dalle.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from dalle.transformer import DALLETransformer

Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of float logits [B, V]; removed entries become
    -inf. ``temperature == 0`` keeps only the argmax (greedy decoding)."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        top_k = 1
    else:
        logits = logits / temperature
    if top_k is not None:
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens before it already reach top_p (the first one always stays)
            drop_sorted = (probs.cumsum(-1) - probs) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _noise(shape: torch.Size, device: torch.device, generator: Generators) -> torch.Tensor:
    """-log(Exponential(1)) noise [B, V]; per-row generators make each row independent of the batch."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        e = torch.empty(shape, device=gen_device).exponential_(generator=generator)
    else:
        rows = [torch.empty(shape[1:], device=g.device).exponential_(generator=g) for g in generator]
        e = torch.stack(rows)
    return -e.to(device).clamp_min_(torch.finfo(torch.float32).tiny).log()


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """Draw one token per row from float logits [B, V] after :func:`filter_logits`; returns [B] long."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    noise = _noise(filtered.shape, filtered.device, generator)
    return (filtered.log_softmax(-1) + noise).argmax(-1)


def _check_generators(generator: Generators, batch: int) -> Generators:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generator = list(generator)
    if len(generator) != batch or not all(isinstance(g, torch.Generator) for g in generator):
        raise ConfigError(
            f"generator must be one torch.Generator or a list of {batch} (one per text row), "
            f"got a list of {len(generator)}"
        )
    return generator


@torch.no_grad()
def sample(
    model: DALLETransformer,
    text: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    prime: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = False,
    *,
    callback_every: int = 1,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample image token grids [B, grid, grid] (long, on the model's device) for text ids [B, t].

    - ``temperature`` / ``top_k`` / ``top_p``: see :func:`filter_logits` (the paper uses plain t = 1).
    - ``generator``: a torch.Generator, or a list with one per row (batch-independent samples).
    - ``prime``: [B, n] (or [B, rows, grid]) image tokens in raster order; the first n cells are kept as given
      (image completion) and the rest are sampled. A batch of 1 is broadcast.
    - ``guidance_scale``: classifier-free guidance; each row also runs with an all-pad caption in the same
      batched cached decode and the logits become ``uncond + s * (cond - uncond)`` (s = 1 is plain sampling;
      only meaningful for models trained with caption dropout).
    - ``callback(step, tokens)``: called every ``callback_every`` sampled tokens and at the end, with
      ``step`` = number of cells filled so far and ``tokens`` a [B, grid, grid] copy (unfilled cells are 0).
    - ``progress``: show a tqdm progress bar. ``use_cache=False`` recomputes the whole prefix at every step
      (slow; for benchmarks and tests).
    The model is put in eval mode while sampling and restored afterwards.
    """
    c = model.config
    text = model._check_text(text)
    batch, n_cells, device = text.shape[0], c.image_len, model.device
    generator = _check_generators(generator, batch)
    if callback_every < 1:
        raise ConfigError(f"callback_every must be >= 1, got {callback_every}")
    if prime is None:
        prime = torch.zeros(batch, 0, dtype=torch.long, device=device)
    prime = model._check_image(prime, "prime")
    if prime.shape[0] == 1 and batch > 1:
        prime = prime.expand(batch, -1)
    if prime.shape[0] != batch:
        raise ConfigError(f"prime batch {prime.shape[0]} does not match text batch {batch}")
    n_prime = prime.shape[1]

    tokens = torch.zeros(batch, n_cells, dtype=torch.long, device=device)
    tokens[:, :n_prime] = prime
    if n_prime == n_cells:
        return tokens.view(batch, c.image_grid, c.image_grid)

    guided = guidance_scale is not None
    if guided:
        uncond = torch.full_like(text, c.text_pad_id)
        text_in = torch.cat([text, uncond])
        prime_in = torch.cat([prime, prime])
    else:
        text_in, prime_in = text, prime

    def combine(logits: torch.Tensor) -> torch.Tensor:
        if not guided:
            return logits
        cond, unc = logits[:batch], logits[batch:]
        return unc + guidance_scale * (cond - unc)

    def full_logits(n: int) -> torch.Tensor:
        # no cache: teacher-forced pass over the text and cells 0..n (cell n's logits predict cell n)
        img = torch.cat([tokens[:, :n], tokens[:, :1]], 1)  # a dummy last token, never an input
        if guided:
            img = torch.cat([img, img])
        return model(text_in, img)[1][:, -1]

    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cells - n_prime, desc="sampling", unit="tok")
    # every slot's position as a device tensor made once, not one host-to-device copy per token
    positions = torch.arange(c.text_len + n_cells, device=device)
    try:
        with model._autocast(device):  # entered once: the steps inside find it active
            logits = model.prefill(text_in, prime_in) if use_cache else full_logits(n_prime)
            for j in range(n_prime, n_cells):
                if j > n_prime:
                    if use_cache:
                        step_in = tokens[:, j - 1]
                        step_in = torch.cat([step_in, step_in]) if guided else step_in
                        logits = model.decode_step(step_in, positions[c.text_len + j])
                    else:
                        logits = full_logits(j)
                tokens[:, j] = sample_logits(combine(logits), temperature, top_k, top_p, generator)
                if bar is not None:
                    bar.update(1)
                done = j + 1
                if callback is not None and ((done - n_prime) % callback_every == 0 or done == n_cells):
                    callback(done, tokens.view(batch, c.image_grid, c.image_grid).clone())
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return tokens.view(batch, c.image_grid, c.image_grid)

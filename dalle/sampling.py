"""Sampling image tokens from the DALL-E transformer: logit filters and the cached decode loop.

Two samplers draw a token from the filtered distribution ``p`` of each row:

* ``"race"`` (dalle's default): ``argmax(log p - log E)`` with ``E ~ Exponential(1)`` drawn per vocabulary
  entry (the exponential race, equivalent to drawing from ``p``);
* ``"multinomial"`` (ruDALL-E's default): ``torch.multinomial(p, 1)``, as rudalle's ``generate_images`` draws,
  so the same generator state gives rudalle's tokens.

Two filters turn logits into ``p``: ``"dalle"`` (:func:`filter_logits`) and ``"rudalle"``
(:func:`dalle.rudalle.rudalle_filter_logits`: temperature, then transformers' ``top_k_top_p_filtering``,
which keeps the token that crosses ``top_p`` where :func:`filter_logits` stops before a token once the mass
before it reaches ``top_p``). ``None`` takes the model's ``default_sampler`` / ``default_filter`` (race /
dalle unless the model class says otherwise, as :class:`~dalle.rudalle.RuDalleTransformer` does).

Randomness: with a *list* of generators, row ``b`` draws from ``generator[b]`` alone and always the same
amount per sampled cell, so a sample does not depend on the batch it runs in. A single generator (or
``None``, the global RNG) draws for the whole batch at once. Forced cells (image prompts) draw nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from dalle.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from dalle.rudalle import RuDalleTransformer
    from dalle.transformer import DALLETransformer

Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS: tuple[str, ...] = ("race", "multinomial")
FILTERS: tuple[str, ...] = ("dalle", "rudalle")


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


def _exponential(
    shape: torch.Size | tuple[int, ...], device: torch.device, generator: Generators
) -> torch.Tensor:
    """Exponential(1) draws [B, V] on ``device``; per-row generators make each row independent of the
    batch."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        e = torch.empty(shape, device=gen_device).exponential_(generator=generator)
    else:
        rows = [torch.empty(shape[1:], device=g.device).exponential_(generator=g) for g in generator]
        e = torch.stack(rows)
    return e.to(device)


def _race(filtered: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The exponential race: argmax(log p - log E) per row of filtered logits [B, V] and draws ``e`` [B,
    V]."""
    return (filtered.log_softmax(-1) - e.clamp_min(torch.finfo(torch.float32).tiny).log()).argmax(-1)


def apply_filter(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    filter: str = "dalle",
) -> torch.Tensor:
    """Float32 filtered logits [B, V] (removed entries -inf) by the named rule: ``"dalle"``
    (:func:`filter_logits`) or ``"rudalle"`` (transformers' rule; ``top_k`` None or 0 and ``top_p`` None or 1
    switch a filter off; temperature must be > 0)."""
    if filter == "dalle":
        return filter_logits(logits, temperature, top_k, top_p)
    if filter == "rudalle":
        from dalle.rudalle import rudalle_filter_logits

        return rudalle_filter_logits(logits, temperature, top_k or 0, 1.0 if top_p is None else top_p)
    raise ConfigError(f"filter must be one of {', '.join(FILTERS)}, got {filter!r}")


def _multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One ``torch.multinomial`` draw per row of probs [B, V]; a list of generators draws row by row."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else probs.device
        return torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1).to(probs.device)
    rows = [
        torch.multinomial(p.unsqueeze(0).to(g.device), 1, generator=g).to(probs.device)
        for p, g in zip(probs, generator)
    ]
    return torch.cat(rows).squeeze(-1)


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
    *,
    sampler: str = "race",
    filter: str = "dalle",
) -> torch.Tensor:
    """Draw one token per row from float logits [B, V] after :func:`apply_filter`; returns [B] long.
    ``sampler``: ``"race"`` (exponential race) or ``"multinomial"`` (``torch.multinomial``)."""
    filtered = apply_filter(logits, temperature, top_k, top_p, filter)
    if sampler == "race":
        return _race(filtered, _exponential(filtered.shape, filtered.device, generator))
    if sampler == "multinomial":
        return _multinomial(filtered.softmax(-1), generator)
    raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def _fused_decoder(
    model: Any,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    filter: str,
    guidance_scale: float | None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """For a model whose decoding is compiled: one compiled function (the decode step, guidance, the filter
    and the race) from (previous tokens [B], position, exponential draws [B, V]) to the next tokens [B].

    Under CUDA graphs the whole step then replays as one graph; only the random draws (from the caller's
    generators, exactly as the eager loop draws them) stay outside. Compiled once per model and compile
    settings; other sampling settings recompile on first use (``dynamic=False``)."""
    cached = getattr(model, "_fused_decoder", None)
    if cached is None or cached[0] is not model._compiled_step:
        step = model._step

        def step_and_draw(
            token: torch.Tensor,
            position: torch.Tensor,
            e: torch.Tensor,
            temperature: float,
            top_k: int | None,
            top_p: float | None,
            filter: str,
            guidance_scale: float | None,
        ) -> torch.Tensor:
            if guidance_scale is not None:
                logits = step(torch.cat([token, token]), position)
                cond, unc = logits.chunk(2)
                logits = unc + guidance_scale * (cond - unc)
            else:
                logits = step(token, position)
            return _race(apply_filter(logits, temperature, top_k, top_p, filter), e)

        options = dict(getattr(model, "_compile_options", {}))
        cached = (model._compiled_step, torch.compile(step_and_draw, dynamic=False, **options))
        model._fused_decoder = cached
    fused = cached[1]
    return lambda token, position, e: fused(
        token, position, e, temperature, top_k, top_p, filter, guidance_scale
    )


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


def _forced_cells(
    model: Any,
    batch: int,
    prime: torch.Tensor | None,
    prompt_tokens: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, N] bool on the CPU, tokens [B, N] long on the model's device) of the cells kept as given:
    a raster ``prime`` prefix, or ``prompt_tokens`` where ``prompt_mask`` is True (other cells 0)."""
    c = model.config
    n, device = c.image_len, model.device
    mask = torch.zeros(batch, n, dtype=torch.bool)
    tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
    if prime is not None and (prompt_tokens is not None or prompt_mask is not None):
        raise ConfigError("give either prime (a raster prefix) or prompt_tokens + prompt_mask, not both")
    if prime is not None:
        prime = model._check_image(prime, "prime")
        if prime.shape[0] not in (1, batch):
            raise ConfigError(f"prime batch {prime.shape[0]} does not match text batch {batch}")
        tokens[:, : prime.shape[1]] = prime
        mask[:, : prime.shape[1]] = True
        return mask, tokens
    if prompt_tokens is None and prompt_mask is None:
        return mask, tokens
    if prompt_tokens is None or prompt_mask is None:
        raise ConfigError("give both prompt_tokens and prompt_mask (the cells to keep), or neither")
    given = model._check_image(prompt_tokens, "prompt_tokens")
    if given.shape[1] != n or given.shape[0] not in (1, batch):
        raise ConfigError(
            f"prompt_tokens must be [1 or {batch}, {n}] (or [1 or {batch}, {c.image_grid}, {c.image_grid}]): "
            "a token id for every cell, those outside prompt_mask ignored; "
            f"got shape {tuple(prompt_tokens.shape)}"
        )
    if not isinstance(prompt_mask, torch.Tensor) or prompt_mask.dtype != torch.bool:
        raise ConfigError(
            f"prompt_mask must be a bool tensor, got {getattr(prompt_mask, 'dtype', type(prompt_mask))}"
        )
    keep = prompt_mask.detach().cpu()
    if keep.shape in ((n,), (c.image_grid, c.image_grid)):
        keep = keep.reshape(1, n)
    elif keep.dim() in (2, 3) and keep.shape[0] in (1, batch) and keep[0].numel() == n:
        keep = keep.reshape(keep.shape[0], n)
    else:
        raise ConfigError(
            f"prompt_mask must be [{n}] or [{c.image_grid}, {c.image_grid}] (or one of those per row), got "
            f"shape {tuple(prompt_mask.shape)}"
        )
    mask[:] = keep
    tokens = torch.where(mask.to(device), given.expand(batch, n), tokens)
    return mask, tokens


@torch.no_grad()
def sample(
    model: DALLETransformer | RuDalleTransformer,
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
    prompt_tokens: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    sampler: str | None = None,
    filter: str | None = None,
) -> torch.Tensor:
    """Sample image token grids [B, grid, grid] (long, on the model's device) for text ids [B, t].

    ``model``: a :class:`~dalle.transformer.DALLETransformer` or :class:`~dalle.rudalle.RuDalleTransformer`.

    - ``temperature`` / ``top_k`` / ``top_p``: see :func:`apply_filter` (the paper uses plain t = 1);
      ``temperature=0`` is greedy decoding (the argmax at every cell; the generator is still drawn from).
    - ``generator``: a torch.Generator, or a list with one per row (batch-independent samples).
    - ``prime``: [B, n] (or [B, rows, grid]) image tokens in raster order; the first n cells are kept as given
      (image completion) and the rest are sampled. A batch of 1 is broadcast.
    - ``prompt_tokens`` [B or 1, N] (or [B or 1, grid, grid]) with a bool ``prompt_mask`` [N] / [grid, grid]
      (or one per row, [B, N]): image prompts on any set of cells (e.g. borders, as rudalle's
      ``ImagePrompts``). Masked cells keep the given token (fed to the model, never sampled, no random draw);
      the others are sampled. The leading cells masked in every row are fed at once, like ``prime``. Not
      together with ``prime``.
    - ``sampler``: ``"race"`` or ``"multinomial"``; ``filter``: ``"dalle"`` or ``"rudalle"`` (see the module
      docstring); None takes the model's defaults.
    - ``guidance_scale``: classifier-free guidance; each row also runs with an all-pad caption in the same
      batched cached decode and the logits become ``uncond + s * (cond - uncond)`` (s = 1 is plain sampling;
      only meaningful for models trained with caption dropout).
    - ``callback(step, tokens)``: called every ``callback_every`` filled cells and at the end, with
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
    sampler = getattr(model, "default_sampler", "race") if sampler is None else sampler
    filter = getattr(model, "default_filter", "dalle") if filter is None else filter
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if filter not in FILTERS:
        raise ConfigError(f"filter must be one of {', '.join(FILTERS)}, got {filter!r}")
    if temperature == 0:
        filter = "dalle"  # greedy: filter_logits keeps only the argmax (the same under either rule)
    forced, tokens = _forced_cells(model, batch, prime, prompt_tokens, prompt_mask)
    n_prime = int(forced.all(0).long().cumprod(0).sum())  # cells kept in every row from cell 0 on
    if n_prime == n_cells:
        return tokens.view(batch, c.image_grid, c.image_grid)
    partly_forced = forced.any(0).tolist()
    prime = tokens[:, :n_prime]

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
        assert guidance_scale is not None  # guided means it is set
        cond, unc = logits[:batch], logits[batch:]
        return unc + guidance_scale * (cond - unc)

    def full_logits(n: int) -> torch.Tensor:
        # no cache: teacher-forced pass over the text and cells 0..n (cell n's logits predict cell n)
        img = torch.cat([tokens[:, :n], tokens[:, :1]], 1)  # a dummy last token, never an input
        if guided:
            img = torch.cat([img, img])
        return model(text_in, img)[1][:, -1]

    def draw(logits: torch.Tensor, j: int) -> None:
        """Sample cell j in the rows where it is not kept; only those rows draw randomness."""
        rule = {"sampler": sampler, "filter": filter}
        if not partly_forced[j]:
            tokens[:, j] = sample_logits(combine(logits), temperature, top_k, top_p, generator, **rule)
            return
        free = (~forced[:, j]).nonzero().squeeze(1).tolist()
        if free:
            gens = [generator[i] for i in free] if isinstance(generator, list) else generator
            rows = torch.tensor(free, device=device)
            tokens[rows, j] = sample_logits(combine(logits)[rows], temperature, top_k, top_p, gens, **rule)

    # compiled decoding with the race sampler: the step and the draw as one compiled function (one CUDA graph)
    fused = None
    if use_cache and sampler == "race" and model.decoding_compiled and not any(partly_forced[n_prime:]):
        if filter == "rudalle":
            from dalle.rudalle import rudalle_filter_logits  # imported before tracing  # noqa: F401
        fused = _fused_decoder(model, temperature, top_k, top_p, filter, guidance_scale)

    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from dalle._progress import progress_bar

        bar = progress_bar(n_cells - n_prime, "sampling", "tok")  # a line every 10 s when not on a terminal
    # every slot's position as a device tensor made once, not one host-to-device copy per token
    positions = torch.arange(c.text_len + n_cells, device=device)
    try:
        with model._autocast(device):  # entered once: the steps inside find it active
            logits = model.prefill(text_in, prime_in) if use_cache else full_logits(n_prime)
            for j in range(n_prime, n_cells):
                if j > n_prime and fused is not None:
                    e = _exponential((batch, logits.shape[-1]), device, generator)
                    tokens[:, j] = fused(tokens[:, j - 1], positions[c.text_len + j], e)
                elif j > n_prime:
                    if use_cache:  # the step feeds cell j - 1 (sampled or kept) even when cell j is kept
                        step_in = tokens[:, j - 1]
                        step_in = torch.cat([step_in, step_in]) if guided else step_in
                        logits = model.decode_step(step_in, positions[c.text_len + j])
                    elif not bool(forced[:, j].all()):
                        logits = full_logits(j)
                if j == n_prime or fused is None:
                    draw(logits, j)
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

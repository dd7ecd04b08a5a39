# %% [markdown]
# # dalle quick start
# Text to image, image completion and dVAE reconstruction with the bundled `shapes` model, on CPU.
# Set the environment variable `DALLE_MODEL` to use another model directory.

# %%
import os
from pathlib import Path

from dalle import DALLE
from dalle.images import make_grid

model_name = os.environ.get("DALLE_MODEL", "shapes")
out_dir = Path(os.environ.get("DALLE_EXAMPLE_OUT", "outputs/examples"))
out_dir.mkdir(parents=True, exist_ok=True)
pipe = DALLE.from_pretrained(model_name, device="auto")
print(pipe.name, pipe.device, f"{pipe.image_size}px, {pipe.grid}x{pipe.grid} tokens")

# %% [markdown]
# ## Text to image
# Four samples of one prompt. Image k uses seed `seed + k`, so any single image can be regenerated alone.

# %%
prompt = "a large red circle"
images = pipe.generate(prompt, num_images=4, seed=0, progress=False)
grid = make_grid(images, ncols=4)
grid.save(out_dir / "text_to_image.png")
grid

# %% [markdown]
# ## Several prompts in one call, with partial results
# `callback(step, tokens)` is called while sampling; a notebook can decode `tokens` to show partial images.

# %%
steps = []
images = pipe.generate(
    ["a small blue square on the left", "a yellow triangle above a green square"],
    num_images=2,
    seed=1,
    progress=False,
    callback=lambda step, tokens: steps.append(step),
)
print(f"callback called {len(steps)} times")
make_grid(images, ncols=2)

# %% [markdown]
# ## Image completion
# Keep the top token rows of an image and let the model draw the rest from a new caption.

# %%
source = pipe.generate("a large blue square at the top", seed=3, progress=False)[0]
completed = pipe.complete(source, "a blue square above a red circle", num_images=3, seed=0, progress=False)
grid = make_grid([source, *completed], ncols=4)
grid.save(out_dir / "completion.png")
grid

# %% [markdown]
# ## dVAE reconstruction
# Encode an image to tokens and decode it back.

# %%
reconstruction = pipe.reconstruct(source)
grid = make_grid([source, reconstruction], ncols=2)
grid.save(out_dir / "reconstruction.png")
grid

"""Released ruDALL-E models end to end, offline: download (through a local HTTP server laid out like the
Hugging Face Hub), conversion, loading, generation, the CLI, and sampling equal to rudalle's own loop.

The "released" files are random-weight stand-ins laid out exactly like the real ones: a float16
``pytorch_model_v3.bin`` state dict with rudalle's key names (masks included), a Lightning-style VQGAN
``.ckpt`` and a youtokentome ``bpe.model``, for a tiny configuration passed as preset overrides.
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dalle.cli import main
from dalle.errors import DownloadError, ModelLoadError, OutOfMemoryError
from dalle.rudalle import (
    RUDALLE_BPE_FILE,
    RUDALLE_HUB,
    RUDALLE_VQGAN_FILE,
    RuDalleConfig,
    RuDalleTransformer,
    generate_codes,
    top_k_top_p_filtering,
)
from dalle.vqgan import VQGANDecoder, VQGANEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, TEXT_LEN, CODES = 4, 8, 32
#: RuDalleConfig fields replacing the Malevich preset's, as `dalle convert --set` takes them
TINY = {
    "depth": 2,
    "heads": 2,
    "head_dim": 16,
    "text_len": TEXT_LEN,
    "image_grid": GRID,
    "image_vocab_size": CODES,
}
VQGAN = dict(
    ch=32,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
    z_channels=32,
    embed_dim=32,
    n_embed=CODES,
    quantizer="gumbel",
)


def _jitter(module: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():  # move LayerNorms etc. away from the identity so every parameter matters
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """Files laid out like the released ones (names, formats, dtypes)."""
    yttm = pytest.importorskip("youtokentome")
    folder = tmp_path_factory.mktemp("released")
    corpus = folder / "corpus.txt"
    lines = [
        "котик сидит на окне и смотрит на улицу",
        "красная машина едет по дороге",
        "a red bird on a tree",
    ] * 20
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    yttm.BPE.train(data=str(corpus), vocab_size=60, model=str(folder / RUDALLE_BPE_FILE), n_threads=1)
    torch.manual_seed(0)
    config = RuDalleConfig.preset("malevich", **TINY, text_vocab_size=60 + TEXT_LEN)
    model = _jitter(RuDalleTransformer(config))
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
        folder / "pytorch_model_v3.bin",
    )
    encoder, decoder = _jitter(VQGANEncoder(**VQGAN), 0.05), _jitter(VQGANDecoder(**VQGAN), 0.05)
    state = {**encoder.state_dict(), **decoder.state_dict(), "loss.logvar": torch.zeros(())}
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "state_dict": collections.OrderedDict(state),
        "optimizer_states": [],
    }
    torch.save(ckpt, folder / RUDALLE_VQGAN_FILE)
    return {
        "transformer": folder / "pytorch_model_v3.bin",
        "vqgan": folder / RUDALLE_VQGAN_FILE,
        "bpe": folder / RUDALLE_BPE_FILE,
    }


def _overrides() -> dict:
    return {**TINY, "text_vocab_size": 60 + TEXT_LEN}


# ------------------------------------------------------------------------------------ a local "Hub"
class _Hub(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    cut_once: set[str]  # paths whose next full download stops halfway (the connection drops)
    log: list[tuple[str, str | None, int]]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Hub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        body = self.server.files.get(self.path)
        rng = self.headers.get("Range")
        if body is None:
            self.server.log.append((self.path, rng, 404))
            self.send_error(404, "Repository Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.server.log.append((self.path, rng, 416))
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.server.log.append((self.path, rng, 206 if match else 200))
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.server.cut_once and not match:
            self.server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def hub(released, tmp_path, monkeypatch) -> Iterator[_Hub]:
    """A threaded HTTP server on 127.0.0.1 serving {repo}/resolve/main/{file} (Malevich only under its new
    organisation name: the old one answers 404), with DALLE_HF_ENDPOINT and an empty cache pointing at it."""
    server = _Hub(("127.0.0.1", 0), _Handler)
    server.files = {
        "/ai-forever/rudalle-Malevich/resolve/main/pytorch_model_v3.bin": released[
            "transformer"
        ].read_bytes(),
        f"/shonenkov/rudalle-utils/resolve/main/{RUDALLE_VQGAN_FILE}": released["vqgan"].read_bytes(),
        f"/shonenkov/rudalle-utils/resolve/main/{RUDALLE_BPE_FILE}": released["bpe"].read_bytes(),
    }
    server.cut_once, server.log = set(), []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DALLE_HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("DALLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DALLE_OFFLINE", raising=False)
    monkeypatch.setitem(
        RUDALLE_HUB, "rudalle-malevich", {**RUDALLE_HUB["rudalle-malevich"], "overrides": _overrides()}
    )
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_download_falls_back_to_the_renamed_repo_and_resumes(hub, released, monkeypatch) -> None:
    from dalle.loading import download_hf_file

    repos = RUDALLE_HUB["rudalle-malevich"]["repos"]
    path = "/ai-forever/rudalle-Malevich/resolve/main/pytorch_model_v3.bin"
    hub.cut_once.add(path)
    with pytest.raises(DownloadError, match="resume"):
        download_hf_file(repos, "pytorch_model_v3.bin", progress=False)
    half = len(hub.files[path]) // 2
    part = (
        Path(os.environ["DALLE_CACHE"])
        / "huggingface"
        / "sberbank-ai--rudalle-Malevich"
        / "pytorch_model_v3.bin.part"
    )
    have = part.stat().st_size  # what arrived, in whole chunks
    assert 0 < have <= half
    got = download_hf_file(repos, "pytorch_model_v3.bin", progress=False)
    assert got.read_bytes() == released["transformer"].read_bytes() and not part.exists()
    old = "/sberbank-ai/rudalle-Malevich/resolve/main/pytorch_model_v3.bin"
    assert hub.log == [
        (old, None, 404),
        (path, None, 200),
        (old, f"bytes={have}-", 404),
        (path, f"bytes={have}-", 206),
    ]
    n = len(hub.log)
    assert download_hf_file(repos, "pytorch_model_v3.bin") == got and len(hub.log) == n  # cached: no request
    with pytest.raises(DownloadError, match="not found.*renamed"):
        download_hf_file(("nobody/none",), "pytorch_model.bin", progress=False)
    monkeypatch.setenv("DALLE_OFFLINE", "1")
    with pytest.raises(DownloadError, match="DALLE_OFFLINE"):
        download_hf_file(("nobody/none",), "x.bin")


def test_from_pretrained_downloads_converts_and_generates(hub) -> None:
    from safetensors import safe_open

    from dalle.pipeline import DALLE

    pipe = DALLE.from_pretrained("rudalle-malevich", device="cpu")
    assert (pipe.architecture, pipe.image_tokenizer, pipe.image_size) == ("rudalle", "vqgan", GRID * 8)
    assert pipe.sampling == {"top_k": 1024, "top_p": 0.99, "sampler": "multinomial", "filter": "rudalle"}
    assert pipe.transformer.text_embeddings.weight.dtype == torch.float32  # the CPU computes in float32
    assert pipe.weights_dtype == torch.float16
    model_dir = Path(os.environ["DALLE_CACHE"]) / "models" / "rudalle-malevich"
    with safe_open(str(model_dir / "transformer.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        assert not any(k.endswith("_mask") for k in f.keys())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["source"]["filename"] == "pytorch_model_v3.bin"
    out = pipe.generate("котик на окне", num_images=2, seed=3, progress=False, return_tokens=True)
    assert out.tokens.shape == (2, GRID, GRID) and out.images[0].size == (GRID * 8, GRID * 8)
    n = len(hub.log)
    DALLE.from_pretrained("rudalle-malevich", device="cpu")  # converted once: no download, no conversion
    assert len(hub.log) == n


def _convert(tmp_path: Path, released: dict[str, Path], *extra: str) -> tuple[int, Path]:
    out = tmp_path / "malevich-tiny"
    sets = [a for k, v in _overrides().items() for a in ("--set", f"{k}={v}")]
    rc = main(
        [
            "convert",
            str(out),
            "--transformer",
            str(released["transformer"]),
            "--preset",
            "malevich",
            "--vqgan",
            str(released["vqgan"]),
            "--bpe",
            str(released["bpe"]),
            *sets,
            *extra,
        ]
    )
    return rc, out


def test_convert_and_generate_cli(tmp_path, released, capsys) -> None:
    from safetensors import safe_open

    from dalle.images import read_png_metadata

    rc, out = _convert(tmp_path, released)
    assert rc == 0 and (out / "config.json").is_file()
    with safe_open(str(out / "transformer.safetensors"), "pt") as f:  # float16 stays float16
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    prompt = "Красная машина едет по дороге"
    grid, folder = tmp_path / "grid.png", tmp_path / "images"
    rc = main(
        [
            "generate",
            "--model",
            str(out),
            prompt,
            "-n",
            "2",
            "--seed",
            "5",
            "--output",
            str(grid),
            "--output-dir",
            str(folder),
            "--quiet",
            "--device",
            "cpu",
            "--rerank",
            "3",
        ]
    )
    assert rc == 0
    files = sorted(folder.iterdir())
    assert len(files) == 2 and files[0].name.startswith("000-красная-машина")
    meta = read_png_metadata(files[0])
    assert meta["prompt"] == prompt and json.loads(meta["settings"])["rerank"] == 3
    assert read_png_metadata(grid)["prompt"] == prompt
    rc = main(
        [
            "generate",
            "--model",
            str(out),
            "котик",
            "-n",
            "1",
            "--seed",
            "5",
            "--output",
            str(grid),
            "--quiet",
            "--device",
            "cpu",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--sampler",
            "race",
            "--filter",
            "dalle",
        ]
    )
    assert rc == 0


def test_convert_usage_errors(tmp_path, released, capsys) -> None:
    for argv, message in (
        (["convert", str(tmp_path / "x")], "--transformer, --vqgan, --bpe missing"),
        (["convert", "rudalle-nothing", str(tmp_path / "x")], "unknown SOURCE"),
        (["convert", "rudalle-malevich", str(tmp_path / "x"), "--bpe", str(released["bpe"])], "not both"),
        (
            ["convert", str(tmp_path / "x"), "--transformer", "nofile", "--vqgan", "a", "--bpe", "b"],
            "not a file",
        ),
        (["convert", str(tmp_path / "x"), "--transformer", "t", "--set", "depth"], "FIELD=VALUE"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "usage: dalle convert" in err
    # the wrong preset is a load error naming what differs
    out = tmp_path / "y"
    rc = main(
        [
            "convert",
            str(out),
            "--transformer",
            str(released["transformer"]),
            "--vqgan",
            str(released["vqgan"]),
            "--bpe",
            str(released["bpe"]),
            "--set",
            "depth=2",
        ]
    )
    assert rc == 1 and "does not hold a 'malevich' ruDALL-E transformer" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--transformer", "--preset", "--vqgan", "--bpe", "--set", "--name", "--quiet"):
        assert flag in help_text
    assert help_text.count("default") >= 7


@pytest.fixture(scope="module")
def converted(tmp_path_factory, released) -> Path:
    from dalle.pipeline import convert_rudalle

    return convert_rudalle(
        tmp_path_factory.mktemp("model") / "m",
        released["transformer"],
        released["vqgan"],
        released["bpe"],
        "malevich",
        overrides=_overrides(),
    )


def test_converted_model_equals_the_released_files(converted, released) -> None:
    from dalle.images import preprocess
    from dalle.pipeline import DALLE
    from dalle.vqgan import load_vqgan

    pipe = DALLE.from_pretrained(converted, device="cpu")
    reference = RuDalleTransformer.from_rudalle_checkpoint(
        released["transformer"], RuDalleConfig.preset("malevich", **_overrides())
    )
    text = pipe.encode_text(["котик на окне"])
    image = torch.randint(0, CODES, (1, GRID * GRID), generator=torch.Generator().manual_seed(0))
    ours, theirs = pipe.transformer.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    torch.testing.assert_close(
        pipe.transformer.joint_logits(text, image), reference.joint_logits(text, image), atol=1e-5, rtol=1e-5
    )
    encoder, decoder = load_vqgan(released["vqgan"])
    x = preprocess(torch.rand(3, GRID * 8, GRID * 8), size=GRID * 8)
    assert torch.equal(pipe.encoder.encode(x), encoder.encode(x))
    grid = image.view(1, GRID, GRID)
    torch.testing.assert_close(pipe.decoder.decode(grid), decoder.decode(grid), atol=0, rtol=0)
    # rudalle's caption rule: [2] + ids + [3], 0-padded; BOS/EOS carry no information for the empty-prompt
    # check
    short = pipe.encode_text(["Кот"])[0].tolist()
    assert short[0] == 2 and short[short.index(3) + 1 :] == [0] * (TEXT_LEN - 1 - short.index(3))
    with pytest.warns(UserWarning, match="is empty"):
        pipe.generate("", seed=0, progress=False)


def test_generation_draws_like_rudalle(converted) -> None:
    """The pipeline's default sampling (multinomial, transformers' top-k/top-p, rudalle's recommended
    settings) gives generate_codes' tokens for the same seed; the rerank keeps the lowest perplexity."""
    from dalle.pipeline import DALLE

    pipe = DALLE.from_pretrained(converted, device="cpu")
    out = pipe.generate(
        "котик", num_images=2, seed=11, top_k=5, top_p=0.9, progress=False, return_tokens=True
    )
    text = pipe.encode_text(["котик"])
    for k in range(2):
        codes = generate_codes(
            pipe.transformer, text, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(11 + k)
        )
        assert torch.equal(out.tokens[k].reshape(-1), codes[0])
    ranked = pipe.generate(
        "котик", num_images=1, rerank=3, seed=11, top_k=5, progress=False, return_tokens=True
    )
    all3 = pipe.generate("котик", num_images=3, seed=11, top_k=5, progress=False, return_tokens=True)
    scores = pipe.score(["котик"] * 3, all3.tokens)
    assert not pipe.higher_score_is_better and bool((scores > 1).all())  # perplexities
    assert torch.equal(ranked.tokens[0], all3.tokens[int(scores.argmin())])


def test_complete_keeps_borders(converted) -> None:
    from dalle.pipeline import DALLE, border_mask

    pipe = DALLE.from_pretrained(converted, device="cpu")
    keep = border_mask(GRID, top=1, left=1)
    image = torch.rand(3, GRID * 8, GRID * 8)
    source = pipe.encode_image(image)[0]
    out = pipe.complete(image, "машина", keep=keep, num_images=2, seed=0, progress=False, return_tokens=True)
    assert torch.equal(out.tokens[:, keep], source[keep].expand(2, -1))


def test_save_pretrained_keeps_float16_and_memory_is_checked(converted, tmp_path, monkeypatch) -> None:
    from safetensors import safe_open

    import dalle.pipeline as P

    pipe = P.DALLE.from_pretrained(converted, device="cpu")
    for dtype, expected in ((None, torch.float16), (torch.float32, torch.float32)):
        out = pipe.save_pretrained(tmp_path / str(expected), weights_dtype=dtype)
        with safe_open(str(out / "transformer.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}
    again = P.DALLE.from_pretrained(tmp_path / "torch.float16", device="cpu")
    text = pipe.encode_text(["a"])
    image = torch.zeros(1, GRID * GRID, dtype=torch.long)
    assert torch.equal(
        again.transformer.joint_logits(text, image), pipe.transformer.joint_logits(text, image)
    )
    monkeypatch.setattr(P, "_available_memory", lambda device: 1000)
    with pytest.raises(OutOfMemoryError, match="float32.*CUDA GPU"):
        P.DALLE.from_pretrained(converted, device="cpu")


def test_bad_model_directories(converted, tmp_path) -> None:
    import shutil

    from dalle.pipeline import DALLE

    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architecture": "gpt"}))
    with pytest.raises(ModelLoadError, match="architecture 'gpt'"):
        DALLE.from_pretrained(bad, device="cpu")
    (bad / "config.json").write_text(
        json.dumps({**config, "transformer": {**config["transformer"], "depth": 3}})
    )
    with pytest.raises(ModelLoadError, match="do not fit config.json"):
        DALLE.from_pretrained(bad, device="cpu")


# --------------------------------------------------------------------- rudalle's own loop, literally


def test_sample_equals_rudalles_loop_with_image_prompts() -> None:
    """rudalle's generate_images loop (pipelines.py, 1.1.3) on the reference model, with border prompts, gives
    the tokens of dalle.sampling.sample(sampler="multinomial", filter="rudalle") on the same weights and
    seed."""
    from dalle.sampling import sample
    from tests.test_rudalle import _inputs, _load_reference, _pair

    ref = _load_reference()
    theirs, ours = _pair(ref, "v3", seed=2, image_tokens_per_dim=4)
    c = ours.config
    text, image = _inputs(c, batch=2)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0] = keep[:, -1] = True  # top row and right column, as ImagePrompts(borders={'up': 1, 'right': 1})
    prompts_idx = set(keep.reshape(-1).nonzero().squeeze(1).tolist())
    top_k, top_p, vocab = 6, 0.9, c.text_vocab_size

    torch.manual_seed(123)
    out = text.clone()
    length = c.seq_len
    mask = torch.tril(torch.ones((2, 1, length, length)))
    cache = None
    with torch.no_grad():
        for idx in range(out.shape[1], length):  # their loop, as written there
            idx -= c.text_len
            if idx in prompts_idx:
                out = torch.cat((out, image[:1].repeat(2, 1)[:, idx].unsqueeze(1)), dim=-1)
            else:
                logits, cache = theirs(out, mask, use_cache=True, cache=cache, return_loss=False)
                logits = logits[:, -1, vocab:] / 1.0
                probs = torch.softmax(top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p), dim=-1)
                out = torch.cat((out, torch.multinomial(probs, 1)), dim=-1)
    expected = out[:, -c.image_len :]

    torch.manual_seed(123)
    got = sample(ours, text, top_k=top_k, top_p=top_p, prompt_tokens=image[:1], prompt_mask=keep)
    assert torch.equal(got.reshape(2, -1), expected)
    codes = generate_codes(
        ours,
        text,
        top_k=top_k,
        top_p=top_p,
        prompt=image[:1],
        prompt_mask=keep,
        generator=torch.Generator().manual_seed(123),
    )
    assert torch.equal(codes, expected)

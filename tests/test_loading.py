"""dalle.loading: OpenAI's pickles (both torch formats), safety, state dicts, safetensors, URLs and the
cache."""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import runpy
import socket
import sys
import threading
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle.dvae import Decoder, Encoder, map_pixels
from dalle.errors import ConfigError, DownloadError, ModelLoadError, UnsafePickleError
from dalle.loading import cache_dir, download, infer_config, load_model, save_model, sha256_file

dall_e = pytest.importorskip("dall_e")
attr = pytest.importorskip("attr")

SMALL_ENC = {"n_hid": 8, "n_blk_per_group": 1, "vocab_size": 16}
SMALL_DEC = {"n_init": 8, "n_hid": 8, "n_blk_per_group": 1, "vocab_size": 16}


def official(cls_name: str, **kwargs):
    with attr.validators.disabled():  # OpenAI's minimums (n_hid >= 64, vocab >= 512) are too big for tests
        return getattr(dall_e, cls_name)(**kwargs)


def save_official(module, path: Path, zip_format: bool) -> Path:
    torch.save(module, path, _use_new_zipfile_serialization=zip_format)
    return path


def same_weights(ours: torch.nn.Module, ref: torch.nn.Module) -> bool:
    a, b = ours.state_dict(), ref.state_dict()
    return list(a) == list(b) and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no proxies (the test server is on 127.0.0.1)."""
    monkeypatch.setenv("DALLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DALLE_OFFLINE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------- OpenAI's pickles
@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_official_pickle_small(tmp_path, zip_format, kind) -> None:
    torch.manual_seed(0)
    ref = official("Encoder", **SMALL_ENC) if kind == "encoder" else official("Decoder", **SMALL_DEC)
    path = save_official(ref, tmp_path / f"{kind}.pkl", zip_format)
    model = load_model(path)
    assert isinstance(model, Encoder if kind == "encoder" else Decoder)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert same_weights(model, ref)
    with torch.no_grad():
        if kind == "encoder":
            x = map_pixels(torch.rand(2, 3, 16, 24))
            assert torch.allclose(model(x), ref(x), rtol=1e-5, atol=1e-6)
        else:
            z = F.one_hot(torch.randint(0, 16, (2, 2, 3)), 16).permute(0, 3, 1, 2).float()
            assert torch.allclose(model(z), ref(z), rtol=1e-5, atol=1e-6)


def test_our_own_pickled_modules_load(tmp_path) -> None:
    """torch.save(dalle module) files (our class names) load through the same restricted reader."""
    for zip_format in (False, True):
        for m in (Encoder(**SMALL_ENC, dtype="float16"), Decoder(**SMALL_DEC)):
            path = save_official(m, tmp_path / "ours.pkl", zip_format)
            assert same_weights(load_model(path), m)


def test_state_dict_files(tmp_path) -> None:
    torch.manual_seed(0)
    ref = official("Decoder", **SMALL_DEC)
    # a plain state dict, read by torch.load(weights_only=True)
    torch.save(ref.state_dict(), tmp_path / "dec.pt")
    assert same_weights(load_model(tmp_path / "dec.pt"), ref)
    # a whole pickled module saved as .pt: torch's weights-only loader refuses it, the restricted reader reads
    # it
    torch.save(ref, tmp_path / "module.pt")
    assert same_weights(load_model(tmp_path / "module.pt"), ref)
    # a legacy-format state dict under .pkl, and a checkpoint wrapper {"state_dict": ...}
    torch.save(ref.state_dict(), tmp_path / "sd.pkl", _use_new_zipfile_serialization=False)
    assert same_weights(load_model(tmp_path / "sd.pkl"), ref)
    torch.save({"state_dict": ref.state_dict(), "step": 3}, tmp_path / "ckpt.pt")
    assert same_weights(load_model(str(tmp_path / "ckpt.pt")), ref)
    # half-precision weights are widened to float32
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, tmp_path / "half.pt")
    model = load_model(tmp_path / "half.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_infer_config_from_shapes() -> None:
    enc = Encoder(n_hid=12, n_blk_per_group=3, input_channels=1, vocab_size=40, device="meta")
    dec = Decoder(n_init=4, n_hid=8, n_blk_per_group=2, output_channels=1, vocab_size=24, device="meta")
    assert infer_config(enc.state_dict()) == (
        "encoder",
        {"n_hid": 12, "n_blk_per_group": 3, "input_channels": 1, "vocab_size": 40},
    )
    assert infer_config(dec.state_dict()) == (
        "decoder",
        {"n_init": 4, "n_hid": 8, "n_blk_per_group": 2, "output_channels": 1, "vocab_size": 24},
    )
    with pytest.raises(ModelLoadError, match="not a dVAE"):
        infer_config({"weight": torch.zeros(2)})


def test_safetensors_round_trip(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    enc = Encoder(n_hid=8, n_blk_per_group=2, input_channels=1, vocab_size=32, dtype="float16")
    path = save_model(enc, tmp_path / "enc")
    assert path == tmp_path / "enc.safetensors" and (tmp_path / "enc.json").is_file()
    meta = json.loads((tmp_path / "enc.json").read_text())
    assert meta == {"kind": "encoder", "config": enc.config()}
    loaded = load_model(path, dtype="bfloat16", requires_grad=True)
    assert same_weights(loaded, enc) and loaded.config()["dtype"] == "bfloat16"
    assert all(p.requires_grad for p in loaded.parameters())
    # without the JSON file the config comes from the safetensors metadata ...
    (tmp_path / "enc.json").unlink()
    assert load_model(path).config()["dtype"] == "float16"
    # ... and without either, from the shapes
    dec = Decoder(**SMALL_DEC)
    save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    assert same_weights(load_model(tmp_path / "plain.safetensors"), dec)
    # a JSON that contradicts the tensors is an error, not a silent mismatch
    (tmp_path / "plain.json").write_text(json.dumps({"kind": "encoder", "config": SMALL_ENC}))
    with pytest.raises(ModelLoadError, match="encoder"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(ModelLoadError, match="Encoder or Decoder"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x")


def test_sha256_of_local_file(tmp_path) -> None:
    dec = Decoder(**SMALL_DEC)
    path = save_model(dec, tmp_path / "d.safetensors")
    assert isinstance(load_model(path, sha256=sha256_file(path).upper()), Decoder)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        load_model(path, sha256="0" * 64)
    for bad in ("xyz", "0" * 63, "g" * 64, 5):
        with pytest.raises(ConfigError, match="64 hexadecimal digits"):
            load_model(path, sha256=bad)


# ------------------------------------------------------------------------------------------------- safety
class _Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /nonexistent-dir/x')",))


@pytest.mark.parametrize("how", ["legacy", "zip", "raw-pickle", "inside-state-dict", "as-.pt", "eval"])
def test_malicious_pickle_is_refused(tmp_path, how) -> None:
    marker = tmp_path / "PWNED"
    evil = _Evil(marker)
    path = tmp_path / ("evil.pt" if how == "as-.pt" else "evil.pkl")
    if how == "legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    elif how in ("zip", "as-.pt"):
        torch.save(evil, path)
    elif how == "raw-pickle":
        path.write_bytes(pickle.dumps(evil, protocol=2))
    elif how == "inside-state-dict":
        sd = Encoder(**SMALL_ENC).state_dict()
        sd["blocks.input.b"] = evil  # type: ignore[assignment]
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(_EvalEvil(), path)
    expected = "builtins.eval" if how == "eval" else f"{os.system.__module__}.system"
    with pytest.raises(UnsafePickleError, match=expected.replace(".", r"\.")) as info:
        load_model(path)
    assert "nothing from the file was executed" in str(info.value)
    assert not marker.exists()
    assert isinstance(info.value, ModelLoadError)  # callers may catch the broader class


def test_unknown_module_class_is_refused(tmp_path) -> None:
    """A torch module outside the dVAE's vocabulary (here nn.Linear) is not on the allow-list either."""
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pkl", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        load_model(tmp_path / "linear.pkl")


# ----------------------------------------------------------------------------------------- broken files
@pytest.mark.parametrize("zip_format", [False, True], ids=["legacy", "zip"])
def test_truncated_file(tmp_path, zip_format) -> None:
    path = save_official(official("Encoder", **SMALL_ENC), tmp_path / "enc.pkl", zip_format)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 40):
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match=r"enc\.pkl.*(truncated|corrupt)"):
            load_model(path)


def test_wrong_files(tmp_path) -> None:
    cases = {
        "image.pkl": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
        "text.pkl": b"hello, this is not a model\n",
        "empty.pkl": b"",
        "not_torch.zip": _zip_bytes({"readme.txt": b"hi"}),
        "ints.pkl": pickle.dumps({"a": 1}, protocol=2),
        "garbage.safetensors": b"\x10\0\0\0\0\0\0\0{not json}......",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
            load_model(tmp_path / name)
    # a tensor larger than its storage (zero strides) is refused rather than materialised
    sd = Encoder(**SMALL_ENC).state_dict()
    sd["blocks.input.b"] = torch.zeros(1).expand(8)
    torch.save(sd, tmp_path / "overlap.pkl", _use_new_zipfile_serialization=False)
    with pytest.raises(ModelLoadError, match="larger than its storage"):
        load_model(tmp_path / "overlap.pkl")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a dVAE"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.pkl")
    # what the file is, when it is something else a user may pass by mistake
    for name, data, what in [
        ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "a PNG image file"),
        ("photo.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 50, "a JPEG image file"),
        ("page.pkl", b"<!DOCTYPE html><html>Not found</html>", "a HTML or XML file"),
        ("text.pkl", b"hello", "not a PyTorch file"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(
            ModelLoadError, match=f"{name}: {what}, not dVAE weights; give OpenAI's encoder.pkl"
        ):
            load_model(tmp_path / name)
    with pytest.raises(ModelLoadError, match="is a directory; give the weight file in it"):
        load_model(tmp_path)
    with pytest.raises(DownloadError, match="only http:// and https:// URLs"):
        load_model("ftp://127.0.0.1/encoder.pkl")


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


# --------------------------------------------------------------------------------------- URLs and the cache
class _Server:
    """A tiny HTTP server on 127.0.0.1 in a thread, with a request log."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                outer.requests.append(self.path)
                if self.path.startswith("/drop/"):
                    body = outer.files[self.path[len("/drop/") :]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection dies midway
                    return
                body = outer.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    torch.manual_seed(0)
    ref = official("Encoder", **SMALL_ENC)
    data = save_official(ref, tmp_path / "srv.pkl", False).read_bytes()
    srv = _Server({"encoder.pkl": data, "big.bin": os.urandom(300_000)})
    srv.ref = ref  # type: ignore[attr-defined]
    srv.data = data  # type: ignore[attr-defined]
    yield srv
    srv.close()


def _cache_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def test_url_success_and_cache_hit(server, isolated_cache) -> None:
    url = f"{server.base}/encoder.pkl"
    model = load_model(url)
    assert same_weights(model, server.ref)
    assert server.requests == ["/encoder.pkl"]
    files = _cache_files(isolated_cache)
    assert len(files) == 1 and files[0].read_bytes() == server.data and files[0].name.endswith("encoder.pkl")
    assert same_weights(load_model(url), server.ref)
    assert server.requests == ["/encoder.pkl"]  # second call: from the cache, no request
    digest = sha256_file(files[0])
    assert download(url, sha256=digest) == files[0]
    assert len(server.requests) == 1


def test_url_checksum(server, isolated_cache) -> None:
    url = f"{server.base}/encoder.pkl"
    with pytest.raises(DownloadError, match="SHA-256"):
        load_model(url, sha256="ab" * 32)
    assert _cache_files(isolated_cache) == []  # the bad download was discarded, no partial file
    import hashlib

    good = hashlib.sha256(server.data).hexdigest()
    assert same_weights(load_model(url, sha256=good), server.ref)
    # a cached file that no longer matches is fetched again
    cached = _cache_files(isolated_cache)[0]
    cached.write_bytes(b"corrupted")
    assert same_weights(load_model(url, sha256=good), server.ref)
    assert server.requests.count("/encoder.pkl") == 3


def test_url_404(server, isolated_cache) -> None:
    with pytest.raises(DownloadError, match="404"):
        load_model(f"{server.base}/missing.pkl")
    assert _cache_files(isolated_cache) == []


def test_url_connection_dropped_midway(server, isolated_cache) -> None:
    with pytest.raises(DownloadError, match="big.bin"):
        download(f"{server.base}/drop/big.bin")
    assert server.requests == ["/drop/big.bin"]
    assert _cache_files(isolated_cache) == []  # nothing half-written is left behind


def test_url_unreachable(isolated_cache) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        DownloadError, match=f"could not download .*: cannot connect to 127.0.0.1:{port} .*pass its path"
    ):
        download(f"http://127.0.0.1:{port}/x.pkl", timeout=5)
    assert _cache_files(isolated_cache) == []


def test_offline_mode(server, isolated_cache, monkeypatch) -> None:
    url = f"{server.base}/encoder.pkl"
    monkeypatch.setenv("DALLE_OFFLINE", "1")
    with pytest.raises(DownloadError, match="DALLE_OFFLINE"):
        load_model(url)
    assert server.requests == []  # not even tried
    monkeypatch.delenv("DALLE_OFFLINE")
    load_model(url)
    monkeypatch.setenv("DALLE_OFFLINE", "1")
    assert same_weights(load_model(url), server.ref)  # cached files still work offline
    assert server.requests == ["/encoder.pkl"]


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DALLE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DALLE_CACHE")
    assert cache_dir() == tmp_path / "b" / "dalle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "dalle"


# -------------------------------------------------------------------------- full size and the notebook flow
# OpenAI's notebooks/usage.ipynb as one script. Changed: the import line (dall_e -> dalle), and - since tests
# never use the network - local paths for the two weight files and the image (download_image opens a file).
NOTEBOOK = """
import io
import os, sys
import requests
import PIL

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from dalle          import map_pixels, unmap_pixels, load_model
from IPython.display import display, display_markdown

target_image_size = 256

def download_image(url):
    return PIL.Image.open(url)

def preprocess(img):
    s = min(img.size)

    if s < target_image_size:
        raise ValueError(f'min dim for image {s} < {target_image_size}')

    r = target_image_size / s
    s = (round(r * img.size[1]), round(r * img.size[0]))
    img = TF.resize(img, s, interpolation=PIL.Image.LANCZOS)
    img = TF.center_crop(img, output_size=2 * [target_image_size])
    img = torch.unsqueeze(T.ToTensor()(img), 0)
    return map_pixels(img)

# This can be changed to a GPU, e.g. 'cuda:0'.
dev = torch.device('cpu')

# For faster load times, download these files locally and use the local paths instead.
enc = load_model(ENCODER_PATH, dev)
dec = load_model(DECODER_PATH, dev)

x = preprocess(download_image(IMAGE_PATH))
display_markdown('Original image:')
display(T.ToPILImage(mode='RGB')(x[0]))

import torch.nn.functional as F

z_logits = enc(x)
z = torch.argmax(z_logits, axis=1)
z = F.one_hot(z, num_classes=enc.vocab_size).permute(0, 3, 1, 2).float()

x_stats = dec(z).float()
x_rec = unmap_pixels(torch.sigmoid(x_stats[:, :3]))
x_rec = T.ToPILImage(mode='RGB')(x_rec[0])

display_markdown('Reconstructed image:')
display(x_rec)
"""


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """OpenAI's full-size encoder and decoder (seeded random weights) written by torch.save in both formats.

    The files are about 200 MB each, so they are written once for the whole module.
    """
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(2021)
    enc, dec = dall_e.Encoder(), dall_e.Decoder()
    enc.requires_grad_(False)
    dec.requires_grad_(False)
    files = {
        "legacy": (
            save_official(enc, root / "encoder.pkl", False),
            save_official(dec, root / "decoder.pkl", False),
        ),
        "zip": (
            save_official(enc, root / "encoder_zip.pkl", True),
            save_official(dec, root / "decoder_zip.pkl", True),
        ),
    }
    yield enc, dec, files
    for pair in files.values():
        for p in pair:
            p.unlink(missing_ok=True)


def test_full_size_zip_pickles(official_files) -> None:
    enc, dec, files = official_files
    enc_path, dec_path = files["zip"]
    assert same_weights(load_model(enc_path), enc)
    assert same_weights(load_model(dec_path), dec)


def test_openai_notebook_flow(official_files, monkeypatch) -> None:
    """The usage notebook, with `from dalle import ...`, reproduces OpenAI's tokens and reconstruction."""
    from dalle.images import sample_image_path

    try:
        import IPython.display  # noqa: F401
    except ImportError:  # the notebook's display calls only need to exist
        stub = types.ModuleType("IPython.display")
        stub.display = stub.display_markdown = lambda *a, **k: None  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
        monkeypatch.setitem(sys.modules, "IPython.display", stub)
    ref_enc, ref_dec, files = official_files
    enc_path, dec_path = files["legacy"]  # the format OpenAI's CDN files are read in
    out = runpy.run_path(
        str(_write_script(enc_path.parent / "usage.py")),
        init_globals={
            "ENCODER_PATH": str(enc_path),
            "DECODER_PATH": str(dec_path),
            "IMAGE_PATH": str(sample_image_path()),
        },
    )
    assert isinstance(out["enc"], Encoder) and isinstance(out["dec"], Decoder)
    assert same_weights(out["enc"], ref_enc) and same_weights(out["dec"], ref_dec)
    x = out["x"]
    with torch.no_grad():
        ref_logits = ref_enc(x)
        ref_z = torch.argmax(ref_logits, axis=1)
        ref_stats = ref_dec(F.one_hot(ref_z, 8192).permute(0, 3, 1, 2).float()).float()
    tokens = out["z"].argmax(1)
    assert torch.equal(tokens, ref_z), f"{int((tokens != ref_z).sum())} of 1024 tokens differ"
    assert ((out["z_logits"] - ref_logits).abs().max() / ref_logits.abs().max()).item() < 1e-5
    ref_rec = torch.clamp((torch.sigmoid(ref_stats[:, :3]) - 0.1) / 0.8, 0, 1)
    rec = torch.clamp((torch.sigmoid(out["x_stats"][:, :3]) - 0.1) / 0.8, 0, 1)
    assert (rec - ref_rec).abs().max().item() < 1e-5
    assert out["x_rec"].size == (256, 256)


def _write_script(path: Path) -> Path:
    path.write_text(NOTEBOOK)
    return path


def test_names_load_the_bundled_dvae_and_point_at_openai(tmp_path, monkeypatch) -> None:
    import dalle.loading as loading
    from dalle.pipeline import DALLE

    pipe = DALLE.from_pretrained("shapes", device="cpu")
    enc, dec = load_model("shapes/encoder"), load_model("shapes/decoder")
    assert isinstance(enc, Encoder) and isinstance(dec, Decoder) and dec.n_init == 64
    for a, b in ((enc, pipe.encoder), (dec, pipe.decoder)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    asked = []

    def fake_download(url, sha256=None, progress=None):
        asked.append(url)
        raise DownloadError(f"{url}: network access is off in this test")

    monkeypatch.setattr(loading, "download", fake_download)
    with pytest.raises(DownloadError):
        load_model("openai/decoder")
    assert asked == ["https://cdn.openai.com/dall-e/decoder.pkl"]
    with pytest.raises(ModelLoadError, match="openai/encoder"):  # the error lists the names
        load_model("openai/nothing")
    # an existing file wins over a name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    saved = save_model(Encoder(n_hid=8, n_blk_per_group=1, vocab_size=32), tmp_path / "shapes" / "encoder")
    saved.rename(tmp_path / "shapes" / "encoder")
    assert load_model("shapes/encoder").vocab_size == 32

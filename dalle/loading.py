"""Loading and saving dVAE weights safely: OpenAI's pickles, state dicts, safetensors, URLs with a cache.

:func:`load_model` accepts

* OpenAI's ``encoder.pkl`` / ``decoder.pkl``: whole pickled ``dall_e`` modules written by ``torch.save``, in
  the legacy (pre-1.6) or the zip format. They are read by a restricted unpickler: every class the pickle
  names (``dall_e.*``, ``torch.nn.*`` layers) becomes an inert stub that only records its attributes,
  tensors are rebuilt from the raw storage bytes, and any other global (``os.system``, ``builtins.eval``,
  ...) is refused with :class:`~dalle.errors.UnsafePickleError` before it can be called. No pickled
  object is ever run: the weights are copied into a fresh :class:`~dalle.dvae.Encoder` /
  :class:`~dalle.dvae.Decoder`, so the ``nn.Upsample`` breakage of torch >= 1.11 cannot occur either.
* state dicts saved with ``torch.save(module.state_dict(), "x.pt")`` (``.pt``, ``.pth``, ``.bin``,
  ``.ckpt``; read with ``torch.load(weights_only=True)``, falling back to the restricted unpickler);
* ``.safetensors`` files as written by :func:`save_model`; the architecture comes from the JSON file
  beside it, else from the file's metadata, else it is inferred from the tensor shapes;
* ``http(s)://`` URLs of any of the above, downloaded once into :func:`cache_dir`.

:func:`read_lightning_checkpoint` reads the weights of PyTorch Lightning ``.ckpt`` files (taming-transformers'
and ruDALL-E's VQGANs) with the same reader plus inert stand-ins for the configs, callbacks and numpy values
such files also hold; those stand-ins are never available to :func:`load_model`.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

import torch

from dalle._files import publish
from dalle.dvae import Decoder, Encoder
from dalle.errors import ConfigError, DownloadError, ModelLoadError, UnsafePickleError

__all__ = [
    "load_model",
    "save_model",
    "read_weights",
    "read_lightning_checkpoint",
    "model_from_state_dict",
    "infer_config",
    "cache_dir",
    "download",
    "download_hf_file",
    "hf_endpoint",
    "hf_url",
    "write_safetensors",
    "sha256_file",
    "resolve_device",
    "OPENAI_ENCODER_URL",
    "OPENAI_DECODER_URL",
]

OPENAI_ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
OPENAI_DECODER_URL = "https://cdn.openai.com/dall-e/decoder.pkl"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STATE_DICT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


# ----------------------------------------------------------------------------------- the restricted unpickler
class _ModuleStub:
    """Inert stand-in for a pickled ``nn.Module``: records its constructor args and ``__dict__`` only."""

    pickled_name: str = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD passes either a dict or a (dict, slots) pair.
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise ModelLoadError(f"unexpected pickled state for {self.pickled_name}: {type(state).__name__}")
        self.state = state


def _stub_class(qualname: str) -> type[_ModuleStub]:
    return type(qualname.rsplit(".", 1)[-1] + "Stub", (_ModuleStub,), {"pickled_name": qualname})


class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: just the element dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class _StorageRef:
    """A storage named by the pickle; its bytes are attached after the pickle has been read."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: torch.Tensor | None = None  # flat tensor of `numel` elements once read


class _TensorRef:
    """A tensor to rebuild from (storage, offset, size, stride) once the storage bytes are known."""

    def __init__(
        self, storage: _StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...]
    ) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self, where: str) -> torch.Tensor:
        flat = self.storage.data
        if flat is None:
            raise ModelLoadError(f"{where}: tensor data for storage {self.storage.key!r} is missing")
        numel = 1
        for s in self.size:
            numel *= s
        if numel > max(flat.numel(), 1):
            # Only tensors with overlapping (e.g. zero) strides are larger than their storage; weights never
            # are, and materialising one could exhaust memory.
            raise ModelLoadError(f"{where}: a tensor is larger than its storage; the file is corrupt")
        if numel:
            extent = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
            if extent >= flat.numel():
                raise ModelLoadError(
                    f"{where}: a tensor reaches past the end of its storage; the file is corrupt"
                )
        t = torch.as_strided(flat, self.size, self.stride, self.offset)
        # Copy unless the tensor is exactly its whole storage (avoids keeping unused bytes alive).
        if numel == flat.numel() and t.is_contiguous():
            return t
        return t.clone(memory_format=torch.contiguous_format)


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, tuple | list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ModelLoadError(f"malformed tensor {what} in pickle: {value!r}")
    return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorRef:
    # Stands in for torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
    # hooks[, meta]).
    if not isinstance(storage, _StorageRef):
        raise ModelLoadError("malformed pickle: a tensor is not backed by a storage record")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise ModelLoadError(f"malformed tensor offset in pickle: {storage_offset!r}")
    size_t, stride_t = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise ModelLoadError("malformed pickle: tensor size and stride differ in length")
    return _TensorRef(storage, storage_offset, size_t, stride_t)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    # Stands in for torch._utils._rebuild_parameter(_with_state): a parameter is just its data here.
    if not isinstance(data, _TensorRef):
        raise ModelLoadError("malformed pickle: a parameter does not wrap a tensor")
    return data


def _device(*args: Any) -> str:
    # Stands in for torch.device: the saved device is irrelevant (load_model places the weights itself).
    return ":".join(str(a) for a in args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("torch", "device"): _device,
        ("torch", "Size"): tuple,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for name in ("float32", "float16", "bfloat16", "float64"):
        allowed[("torch", name)] = getattr(torch, name)  # dtype constants (e.g. our modules' dtype setting)
    modules = {
        "dall_e.encoder": ["Encoder", "EncoderBlock"],
        "dall_e.decoder": ["Decoder", "DecoderBlock"],
        "dall_e.utils": ["Conv2d"],
        "dalle.dvae": ["Encoder", "EncoderBlock", "Decoder", "DecoderBlock", "Conv2d"],
        "torch.nn.modules.container": ["Sequential", "ModuleList", "ModuleDict"],
        "torch.nn.modules.activation": ["ReLU"],
        "torch.nn.modules.pooling": ["MaxPool2d"],
        "torch.nn.modules.linear": ["Identity"],
        "torch.nn.modules.upsampling": ["Upsample"],
        "torch.nn.modules.conv": ["Conv2d"],
    }
    for module, names in modules.items():
        for name in names:
            allowed[(module, name)] = _stub_class(f"{module}.{name}")
    return allowed


_ALLOWED = _allowed_globals()


def _py3_global(module: str, name: str) -> tuple[str, str]:
    # Protocol-2 pickles use Python 2 module names (``__builtin__``); report and match Python 3 names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals above; storages come from ``persistent_load`` records."""

    #: what the allow-list is for, in the refusal message
    allow_list_name = "dVAE weight files"

    def __init__(self, file: IO[bytes], source: str, storages: dict[str, _StorageRef]) -> None:
        super().__init__(file)
        self.source = source
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_global(module, name)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self.source}: refusing to load the global {module}.{name}, which is not on the "
                f"allow-list of {self.allow_list_name}; nothing from the file was executed. "
                "Only load files you trust with other tools, or convert them to safetensors."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] in ("module", b"module"):
            # Legacy files record each nn.Module class with its source code, which torch only compares
            # against the installed class; the source is never executed, here or by torch.
            if isinstance(pid[1], type) and issubclass(pid[1], _ModuleStub):
                return pid[1]
            raise ModelLoadError(f"{self.source}: malformed module record in pickle")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] not in ("storage", b"storage"):
            raise ModelLoadError(f"{self.source}: unsupported persistent record in pickle: {pid!r:.100}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise ModelLoadError(f"{self.source}: unknown storage type {storage_type!r:.60} in pickle")
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise ModelLoadError(f"{self.source}: malformed storage record {pid!r:.100}")
        ref = self.storages.get(key)
        if ref is None:
            ref = self.storages[key] = _StorageRef(key, storage_type.dtype, numel)
        elif ref.dtype != storage_type.dtype:
            raise ModelLoadError(f"{self.source}: storage {key!r} is used with two dtypes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return ref
        # Legacy storage views (torch < 1.0): a slice of another storage, in elements.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise ModelLoadError(f"{self.source}: malformed storage view record {view!r:.100}")
        view_key, offset, view_size = view
        view_ref = self.storages.get(str(view_key))
        if view_ref is None:
            view_ref = self.storages[str(view_key)] = _StorageRef(str(view_key), ref.dtype, int(view_size))
            view_ref.parent = (ref, int(offset))  # type: ignore[attr-defined]
        return view_ref


def _unpickle(
    f: IO[bytes],
    source: str,
    storages: dict[str, _StorageRef],
    unpickler: type[_RestrictedUnpickler] = _RestrictedUnpickler,
) -> Any:
    try:
        return unpickler(f, source, storages).load()
    except (UnsafePickleError, ModelLoadError):
        raise
    except EOFError:
        raise ModelLoadError(
            f"{source}: unexpected end of file; the file is truncated (re-download it)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise ModelLoadError(
            f"{source}: not a readable PyTorch file ({type(exc).__name__}: {exc}); expected OpenAI's "
            ".pkl, a torch state dict or a .safetensors file"
        ) from None


def _flat_from_bytes(buf: bytearray, ref: _StorageRef) -> torch.Tensor:
    if ref.dtype == torch.bool:
        return (
            torch.frombuffer(buf, dtype=torch.uint8).to(torch.bool)
            if buf
            else torch.empty(0, dtype=torch.bool)
        )
    if not buf:
        return torch.empty(0, dtype=ref.dtype)
    return torch.frombuffer(buf, dtype=ref.dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_exact(f: IO[bytes], n: int, source: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise ModelLoadError(
                f"{source}: unexpected end of file while reading tensor data ({got} of {n} bytes); "
                "the file is truncated (re-download it)"
            )
        got += k
    return buf


def _resolve_views(storages: dict[str, _StorageRef]) -> None:
    for ref in storages.values():
        parent = getattr(ref, "parent", None)
        if parent is not None and ref.data is None:
            base, offset = parent
            if base.data is None or offset + ref.numel > base.data.numel():
                raise ModelLoadError("a storage view lies outside its storage; the file is corrupt")
            ref.data = base.data[offset : offset + ref.numel]


def _read_legacy(
    f: IO[bytes], source: str, unpickler: type[_RestrictedUnpickler] = _RestrictedUnpickler
) -> tuple[Any, dict[str, _StorageRef]]:
    storages: dict[str, _StorageRef] = {}
    remaining = f.seek(0, os.SEEK_END)
    f.seek(0)
    magic = _unpickle(f, source, storages, unpickler)
    if magic != _LEGACY_MAGIC:
        raise ModelLoadError(
            f"{source}: not a PyTorch file (bad magic number); expected OpenAI's .pkl, a torch state dict "
            "or a .safetensors file"
        )
    protocol = _unpickle(f, source, storages, unpickler)
    if protocol != _LEGACY_PROTOCOL:
        raise ModelLoadError(f"{source}: unsupported legacy torch protocol version {protocol!r}")
    sys_info = _unpickle(f, source, storages, unpickler)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise ModelLoadError(f"{source}: big-endian torch files are not supported")
    obj = _unpickle(f, source, storages, unpickler)
    keys = _unpickle(f, source, storages, unpickler)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ModelLoadError(f"{source}: malformed storage key list")
    for key in keys:
        ref = storages.get(key)
        if ref is None:
            raise ModelLoadError(f"{source}: storage {key!r} is listed but never used; the file is corrupt")
        header = _read_exact(f, 8, source)
        numel = int.from_bytes(header, "little", signed=True)
        if numel != ref.numel:
            raise ModelLoadError(
                f"{source}: storage {key!r} holds {numel} elements but the pickle expects {ref.numel}; "
                "the file is corrupt"
            )
        nbytes = numel * _element_size(ref.dtype)
        if nbytes > remaining - f.tell():  # check before allocating: a corrupt count must not exhaust memory
            raise ModelLoadError(
                f"{source}: storage {key!r} needs {nbytes} bytes but the file ends sooner; "
                "the file is truncated (re-download it)"
            )
        ref.data = _flat_from_bytes(_read_exact(f, nbytes, source), ref)
    _resolve_views(storages)
    return obj, storages


def _read_zip(
    path: Path,
    source: str,
    unpickler: type[_RestrictedUnpickler] = _RestrictedUnpickler,
    select: Callable[[Any], Any] | None = None,
) -> tuple[Any, dict[str, _StorageRef]]:
    """(object, storages) of a zip-format torch file.

    With ``select``, the object is ``select(unpickled)`` and only the storages it reaches are read (a
    Lightning checkpoint's optimizer state can be twice the size of the weights it keeps).
    """
    storages: dict[str, _StorageRef] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise ModelLoadError(f"{source}: a zip file but not a PyTorch archive (no single data.pkl)")
            prefix = pkl[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (
                b"little",
                b"",
            ):
                raise ModelLoadError(f"{source}: big-endian torch files are not supported")
            with zf.open(pkl[0]) as fp:
                obj = _unpickle(io.BytesIO(fp.read()), source, storages, unpickler)
            wanted: set[str] | None = None
            if select is not None:
                obj = select(obj)
                wanted = {ref.storage.key for ref in _tensor_refs(obj)}
            for key, ref in storages.items():
                if getattr(ref, "parent", None) is not None or (wanted is not None and key not in wanted):
                    continue
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise ModelLoadError(f"{source}: tensor data {entry!r} is missing from the archive")
                nbytes = ref.numel * _element_size(ref.dtype)
                info = zf.getinfo(entry)
                if info.file_size != nbytes:
                    raise ModelLoadError(
                        f"{source}: tensor data {entry!r} has {info.file_size} bytes, expected {nbytes}; "
                        "the file is corrupt"
                    )
                with zf.open(entry) as fp:
                    ref.data = _flat_from_bytes(_read_exact(fp, nbytes, source), ref)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise ModelLoadError(f"{source}: corrupt or truncated zip archive ({exc}); re-download it") from None
    _resolve_views(storages)
    return obj, storages


def _tensor_refs(obj: Any, depth: int = 0) -> Iterator[_TensorRef]:
    """The _TensorRef leaves of a plain container tree (dicts, lists, tuples)."""
    if depth > 64:
        raise ModelLoadError("objects nested too deeply; the file is corrupt")
    if isinstance(obj, _TensorRef):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensor_refs(v, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensor_refs(v, depth + 1)


def _materialize(obj: Any, source: str) -> Any:
    """Replace every _TensorRef in a plain container tree (dicts, lists, stubs) with a real tensor."""
    if isinstance(obj, _TensorRef):
        return obj.materialize(source)
    if isinstance(obj, _ModuleStub):
        obj.state = _materialize(obj.state, source)
        return obj
    if isinstance(obj, dict):
        return (
            type(obj)((k, _materialize(v, source)) for k, v in obj.items())
            if isinstance(obj, OrderedDict)
            else {k: _materialize(v, source) for k, v in obj.items()}
        )
    if isinstance(obj, list):
        return [_materialize(v, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, source) for v in obj)
    return obj


def _module_tensors(
    stub: _ModuleStub, prefix: str, out: dict[str, torch.Tensor], source: str, depth: int = 0
) -> None:
    """Flatten a stub module tree into ``{"blocks.group_1...w": tensor}`` like ``state_dict()`` does."""
    if depth > 32:
        raise ModelLoadError(f"{source}: module tree nested too deeply; the file is corrupt")
    for attr_name in ("_parameters", "_buffers"):
        entries = stub.state.get(attr_name) or {}
        if not isinstance(entries, dict):
            raise ModelLoadError(f"{source}: malformed {attr_name} in {stub.pickled_name}")
        for name, tensor in entries.items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise ModelLoadError(f"{source}: {prefix}{name} in {stub.pickled_name} is not a tensor")
            out[f"{prefix}{name}"] = tensor
    children = stub.state.get("_modules") or {}
    if not isinstance(children, dict):
        raise ModelLoadError(f"{source}: malformed _modules in {stub.pickled_name}")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, _ModuleStub):
            raise ModelLoadError(f"{source}: submodule {prefix}{name} is not a module")
        _module_tensors(child, f"{prefix}{name}.", out, source, depth + 1)


def _state_dict_from_object(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(flat state dict, kind from the pickled class name or None) for a loaded pickle object."""
    if isinstance(obj, _ModuleStub):
        kind = {"Encoder": "encoder", "Decoder": "decoder"}.get(obj.pickled_name.rsplit(".", 1)[-1])
        if kind is None:
            raise ModelLoadError(
                f"{source}: holds a pickled {obj.pickled_name}, not a dVAE Encoder or Decoder"
            )
        tensors: dict[str, torch.Tensor] = {}
        _module_tensors(obj, "", tensors, source)
        return tensors, kind
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common checkpoint wrappers
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj), None
    raise ModelLoadError(
        f"{source}: does not hold a dVAE (expected a pickled Encoder/Decoder or a state dict of tensors, "
        f"got {type(obj).__name__})"
    )


# first bytes of files a user may pass by mistake, for a clearer error than the unpickler's
_OTHER_FORMATS = (
    (b"\x89PNG", "PNG image"),
    (b"\xff\xd8\xff", "JPEG image"),
    (b"GIF8", "GIF image"),
    (b"RIFF", "RIFF (WebP) image"),
    (b"{", "JSON"),
    (b"\x1f\x8b", "gzip"),
    (b"<", "HTML or XML"),
)


def _read_torch_file(path: Path, source: str) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        obj, _ = _read_zip(path, source)
    elif head == b"PK\x03\x04":
        raise ModelLoadError(f"{source}: corrupt or truncated zip archive; re-download it")
    elif not head.startswith(b"\x80"):  # every torch pickle starts with the PROTO opcode
        what = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
        raise ModelLoadError(
            f"{source}: {'a ' + what + ' file' if what else 'not a PyTorch file'}, not dVAE weights; "
            "give OpenAI's encoder.pkl / decoder.pkl, a state-dict file or a .safetensors file"
        )
    else:
        with open(path, "rb") as f:
            obj, _ = _read_legacy(f, source)
    try:
        return _materialize(obj, source)
    except RecursionError:
        raise ModelLoadError(f"{source}: objects nested too deeply; the file is corrupt") from None


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a weight file safely into (flat float tensors on CPU, config or None).

    The config is ``{"kind": "encoder" | "decoder", "config": {...}}`` when the file (or a JSON file beside
    it) says what it holds, else None. Pickles go through the restricted unpickler described in the module
    docstring; nothing in the file is executed.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelLoadError(f"{source}: no such file")
    meta: dict[str, Any] | None = None
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, meta = _read_safetensors(path, source)
    else:
        kind = None
        obj: Any = None
        if path.suffix in _STATE_DICT_SUFFIXES:
            obj = _torch_load_weights_only(path)
        if obj is None:
            obj = _read_torch_file(path, source)
        tensors, kind = _state_dict_from_object(obj, source)
        if kind is not None:
            meta = {"kind": kind, "config": None}
        side = _sidecar_config(path)
        if side is not None:
            meta = side
    return tensors, meta


def _torch_load_weights_only(path: Path) -> Any:
    # torch's own safe loader for plain state dicts; None lets the restricted unpickler take over (it also
    # understands OpenAI's whole-module pickles and names any refused global).
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure: fall back to our reader, which reports clearly
        return None


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _sidecar_path(path: Path) -> Path:
    return (
        path.with_name(path.name[: -len(path.suffix)] + ".json")
        if path.suffix
        else path.with_name(path.name + ".json")
    )


def _sidecar_config(path: Path) -> dict[str, Any] | None:
    side = _sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{side}: unreadable config JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in ("encoder", "decoder"):
        return None  # some other JSON file that happens to share the name; infer from shapes instead
    if not isinstance(meta.get("config"), dict):
        raise ModelLoadError(f"{side}: 'config' must be an object of Encoder/Decoder arguments")
    return meta


def _read_safetensors(path: Path, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header_meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"{source}: not a readable safetensors file ({exc}); it may be truncated"
        ) from None
    meta = _sidecar_config(path)
    if meta is None and "dalle_config" in header_meta:
        try:
            meta = json.loads(header_meta["dalle_config"])
        except ValueError:
            meta = None
    return tensors, meta


# ------------------------------------------------------------------------------ PyTorch Lightning checkpoints
class _Inert:
    """Stand-in for anything a Lightning checkpoint names besides tensors: OmegaConf configs, callbacks,
    numpy scalars and dtypes, ``typing.Any``, builtin types used as values. Calling the class, ``NEWOBJ``,
    ``BUILD``, ``SETITEMS`` and ``APPENDS`` only record their arguments; no method of the real class exists
    here, so nothing the file names can run.
    """

    pickled_name: str = "?"
    args: tuple[Any, ...]
    state: Any
    entries: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = super().__new__(cls)
        obj.args, obj.state, obj.entries = args, None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries.append((key, value))

    def append(self, value: Any) -> None:
        self.entries.append(value)

    def extend(self, values: Any) -> None:
        self.entries.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


_INERT_CLASSES: dict[str, type[_Inert]] = {}


def _inert_class(qualname: str) -> type[_Inert]:
    # One class per global, so a class used twice (e.g. as a dict key, as old Lightning stores callbacks)
    # is the same object both times.
    cls = _INERT_CLASSES.get(qualname)
    if cls is None:
        cls = _INERT_CLASSES[qualname] = type(
            qualname.rsplit(".", 1)[-1] + "Inert", (_Inert,), {"pickled_name": qualname}
        )
    return cls


def _defaultdict(*args: Any) -> dict[Any, Any]:
    # collections.defaultdict(factory): the factory is only ever called on a missing key, never here
    return {}


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # _codecs.encode(str, "latin1") is how protocol-2 pickles spell bytes (numpy scalars, arrays)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ModelLoadError(f"unexpected _codecs.encode call in pickle (encoding {encoding!r:.20})")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any = None) -> _Inert:
    # copyreg._reconstructor (protocol < 2 objects): only ever builds an inert stand-in
    if not (isinstance(cls, type) and issubclass(cls, _Inert)):
        raise ModelLoadError(f"unexpected copyreg._reconstructor call for {cls!r:.60} in pickle")
    return cls()


_TORCH_DTYPE_NAMES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
)
# Globals only Lightning checkpoints need. Everything is inert except the few builders of plain data above.
_LIGHTNING_EXACT: dict[tuple[str, str], Any] = {
    ("collections", "defaultdict"): _defaultdict,
    ("_codecs", "encode"): _latin1_encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    **{("torch", n): getattr(torch, n) for n in _TORCH_DTYPE_NAMES},
    **{
        key: _inert_class(".".join(key))
        for key in [
            *[
                (m, n)
                for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                for n in ("scalar", "_reconstruct")
            ],
            ("numpy", "dtype"),
            ("numpy", "ndarray"),
            ("argparse", "Namespace"),
            *[
                ("pathlib", n)
                for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")
            ],
            *[
                ("builtins", n)
                for n in (
                    "dict",
                    "list",
                    "tuple",
                    "int",
                    "float",
                    "str",
                    "bool",
                    "bytes",
                    "complex",
                    "object",
                    "NoneType",
                )
            ],
        ]
    },
}
# Whole packages whose classes may appear in a checkpoint's hyper-parameters, callbacks and configs. The
# names are only matched as text: the packages are never imported (they need not be installed).
_LIGHTNING_INERT_PREFIXES = (
    "omegaconf.",
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "typing.",
    "numpy.dtypes.",
    "taming.",
)
_LIGHTNING_INERT_MODULES = {"omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "typing"}


class _LightningUnpickler(_RestrictedUnpickler):
    """The restricted unpickler plus inert stand-ins for what PyTorch Lightning checkpoints hold besides
    weights.

    Used only by :func:`read_lightning_checkpoint`: :func:`load_model` keeps the strict dVAE allow-list.
    """

    allow_list_name = "PyTorch Lightning checkpoints"

    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3_global(module, name)
        found = _LIGHTNING_EXACT.get((module, name))
        if found is not None:
            return found
        if module in _LIGHTNING_INERT_MODULES or module.startswith(_LIGHTNING_INERT_PREFIXES):
            return _inert_class(f"{module}.{name}")
        return super().find_class(module, name)


def _lightning_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """The weights of an unpickled checkpoint: its ``state_dict`` (or the object, if a plain state dict),
    without ``loss.*`` entries (taming's discriminator and LPIPS network)."""
    sd = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        if (
            isinstance(obj, dict)
            and obj
            and all(isinstance(v, _TensorRef | torch.Tensor) for v in obj.values())
        ):
            sd = obj
        else:
            keys = sorted(str(k) for k in obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise ModelLoadError(
                f"{source}: not a Lightning checkpoint or state dict (no 'state_dict'; has {keys})"
            )
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise ModelLoadError(f"{source}: state_dict has a non-string key {key!r:.60}")
        if key.startswith("loss."):
            continue
        if not isinstance(value, _TensorRef | torch.Tensor):
            raise ModelLoadError(
                f"{source}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[key] = value
    if not out:
        raise ModelLoadError(f"{source}: the checkpoint's state_dict holds no weights besides loss.*")
    return out


def read_lightning_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The model weights of a PyTorch Lightning ``.ckpt`` (e.g. taming-transformers' or ruDALL-E's VQGANs),
    safely.

    Returns the checkpoint's ``state_dict`` (tensors on CPU, dtypes as stored) without the ``loss.*`` entries.
    The pickle is read by the restricted unpickler with inert stand-ins for what such checkpoints carry
    besides weights (OmegaConf configs, callback classes, numpy scalars, ``typing.Any``, ...): none of those
    packages is imported and nothing from the file runs; any other global (``os.system``, ``builtins.eval``,
    ...) raises :class:`~dalle.errors.UnsafePickleError`. Of a zip-format file only the kept tensors are
    read. Plain state-dict files and ``.safetensors`` files are accepted too.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list (nothing was executed).
        ModelLoadError: the file is missing, truncated, corrupt or holds no state dict.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelLoadError(f"{source}: no such file")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        tensors, _ = _read_safetensors(path, source)
        return {k: v for k, v in tensors.items() if not k.startswith("loss.")}

    def select(obj: Any) -> dict[str, Any]:
        return _lightning_state_dict(obj, source)

    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        obj, _ = _read_zip(path, source, _LightningUnpickler, select)
    elif head == b"PK\x03\x04":
        raise ModelLoadError(f"{source}: corrupt or truncated zip archive; re-download it")
    elif not head.startswith(b"\x80"):
        raise ModelLoadError(f"{source}: not a PyTorch checkpoint (it does not start with a pickle)")
    else:
        with open(path, "rb") as f:
            obj, _ = _read_legacy(f, source, _LightningUnpickler)
        obj = select(obj)
    return {k: v.materialize(source) if isinstance(v, _TensorRef) else v for k, v in obj.items()}


# ------------------------------------------------------------------------------------ from tensors to modules
_BLOCK_RE = re.compile(r"^blocks\.group_1\.block_(\d+)\.")


def infer_config(state_dict: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """("encoder" | "decoder", constructor arguments) read off the shapes of an OpenAI-style state dict."""
    try:
        w_in, w_out = state_dict["blocks.input.w"], state_dict["blocks.output.conv.w"]
    except KeyError as exc:
        raise ModelLoadError(
            f"not a dVAE state dict: missing {exc.args[0]!r} (keys look like {sorted(state_dict)[:3]})"
        ) from None
    if w_in.dim() != 4 or w_out.dim() != 4:
        raise ModelLoadError("not a dVAE state dict: blocks.input.w / blocks.output.conv.w are not 4-d")
    n_blk = len({m.group(1) for k in state_dict if (m := _BLOCK_RE.match(k))})
    if n_blk == 0:
        raise ModelLoadError("not a dVAE state dict: no blocks.group_1.block_* entries")
    if w_in.shape[-1] == 7:
        return "encoder", {
            "n_hid": int(w_in.shape[0]),
            "n_blk_per_group": n_blk,
            "input_channels": int(w_in.shape[1]),
            "vocab_size": int(w_out.shape[0]),
        }
    if w_in.shape[-1] == 1:
        return "decoder", {
            "n_init": int(w_in.shape[0]),
            "n_hid": int(w_out.shape[1]),
            "n_blk_per_group": n_blk,
            "output_channels": int(w_out.shape[0]) // 2,
            "vocab_size": int(w_in.shape[1]),
        }
    raise ModelLoadError(
        f"not a dVAE state dict: blocks.input.w has kernel size {w_in.shape[-1]} (expected 7 or 1)"
    )


def model_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    kind: str | None = None,
    config: dict[str, Any] | None = None,
    source: str = "state dict",
) -> Encoder | Decoder:
    """Build an Encoder or Decoder (float32, CPU) holding ``state_dict``; strict key and shape checks."""
    inferred_kind, inferred = infer_config(state_dict)
    if kind is not None and kind != inferred_kind:
        raise ModelLoadError(
            f"{source}: says it holds an {kind} but its tensors are those of an {inferred_kind}"
        )
    cfg = dict(inferred)
    if config:
        cfg.update(config)
    cls = Encoder if inferred_kind == "encoder" else Decoder
    try:
        # Build on the meta device and assign the loaded tensors: no time spent on a throwaway random init.
        model = cls(**cfg, device="meta")
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"{source}: weights do not fit a dVAE {inferred_kind} with config {cfg}: {exc}"
        ) from None
    return model


def resolve_device(device: torch.device | str | None = "auto") -> torch.device:
    """A torch.device from "auto"/None (CUDA when available, else CPU) or any torch device spec.

    Raises ConfigError for an unknown spec or a CUDA device on a machine without one. The one device rule of
    the library: the pipeline, the trainers and :func:`load_model` all use it.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but no CUDA GPU is available; use cpu")
    return dev


#: where the bundled models live inside the installed package
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
#: names :func:`load_model` accepts besides paths and URLs
MODEL_NAMES: dict[str, str | Path] = {
    "openai/encoder": "https://cdn.openai.com/dall-e/encoder.pkl",
    "openai/decoder": "https://cdn.openai.com/dall-e/decoder.pkl",
    "shapes/encoder": PRETRAINED_DIR / "shapes" / "encoder.safetensors",
    "shapes/decoder": PRETRAINED_DIR / "shapes" / "decoder.safetensors",
}


def load_model(
    path_or_url: str | os.PathLike[str],
    device: torch.device | str | None = None,
    *,
    sha256: str | None = None,
    dtype: torch.dtype | str | None = None,
    requires_grad: bool = False,
    progress: bool | None = None,
) -> Encoder | Decoder:
    """Load a dVAE encoder or decoder from a file or URL, safely (no code from the file is executed).

    Args:
        path_or_url: OpenAI's ``encoder.pkl`` / ``decoder.pkl`` (legacy or zip torch format), a state-dict
            file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), a ``.safetensors`` file, an ``http(s)://`` URL of
            any of these (downloaded once into :func:`cache_dir`), or a name of :data:`MODEL_NAMES`:
            ``openai/encoder`` / ``openai/decoder`` (OpenAI's released files, from their URLs) or
            ``shapes/encoder`` / ``shapes/decoder`` (the bundled model's dVAE). An existing file of the same
            name wins over a name.
        device: where to put the model; None means CPU, "auto" means CUDA when available.
        sha256: expected SHA-256 hex digest of the file; checked for local files and downloads.
        dtype: CUDA compute dtype (float32, float16 = OpenAI's behaviour, bfloat16; None = default policy).
        requires_grad: leave the parameters trainable (default: frozen, for inference).
        progress: show a download progress bar (None: only on a terminal).

    Returns:
        An :class:`~dalle.dvae.Encoder` or :class:`~dalle.dvae.Decoder` in eval mode.

    Raises:
        UnsafePickleError: the pickle names a global outside the allow-list (nothing was executed).
        ModelLoadError: the file is missing, truncated, corrupt or not a dVAE.
        DownloadError: the download failed or network access is disabled.
    """
    text = os.fspath(path_or_url)
    _check_digest(sha256)
    if text in MODEL_NAMES and not Path(text).exists():
        text = os.fspath(MODEL_NAMES[text])
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*)://", text)
    if scheme and scheme.group(1).lower() not in ("http", "https"):
        raise DownloadError(
            f"{text}: only http:// and https:// URLs can be downloaded; fetch the file yourself "
            "and pass its path"
        )
    if text.startswith(("http://", "https://")):
        path = download(text, sha256=sha256, progress=progress)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            raise ModelLoadError(
                f"{path} is a directory; give the weight file in it (e.g. encoder.pkl), or load a "
                "model directory with DALLE.from_pretrained"
            )
        if not path.is_file():
            names = ", ".join(MODEL_NAMES)
            raise ModelLoadError(
                f"{path}: no such file (expected a dVAE weight file, an http(s) URL or one of {names})"
            )
        if sha256 is not None:
            actual = sha256_file(path)
            if actual != sha256.lower():
                raise ModelLoadError(
                    f"{path}: SHA-256 is {actual}, expected {sha256.lower()}; the file differs"
                )
    tensors, meta = read_weights(path)
    kind = meta.get("kind") if meta else None
    config = meta.get("config") if meta else None
    model = model_from_state_dict(tensors, kind, config, source=str(path))
    if dtype is not None:
        model.set_dtype(dtype)
    model = model.to(resolve_device("cpu" if device is None else device))
    model.requires_grad_(requires_grad)
    return model.eval()


def save_model(module: Encoder | Decoder, path: str | os.PathLike[str]) -> Path:
    """Write ``module`` as ``<path>.safetensors`` plus ``<path>.json`` (its kind and config) beside it.

    ``path`` may already end in ``.safetensors``. The config is also stored in the safetensors metadata, so
    the weights file alone is enough for :func:`load_model`. Returns the safetensors path.
    """
    from safetensors.torch import save_file

    if not isinstance(module, Encoder | Decoder):
        raise ModelLoadError(f"save_model expects a dalle Encoder or Decoder, got {type(module).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": "encoder" if isinstance(module, Encoder) else "decoder", "config": module.config()}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"dalle_config": json.dumps(meta)})
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sidecar_path(path).write_text(json.dumps(meta, indent=2) + "\n")
    return path


# ------------------------------------------------------------------------------------------- download & cache
def cache_dir() -> Path:
    """Where downloads are cached: ``$DALLE_CACHE``, else ``$XDG_CACHE_HOME/dalle``, else
    ``~/.cache/dalle``."""
    if os.environ.get("DALLE_CACHE"):
        return Path(os.environ["DALLE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "dalle"
    return Path.home() / ".cache" / "dalle"


def _offline() -> bool:
    return os.environ.get("DALLE_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _check_digest(sha256: str | None) -> None:
    if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{64}", sha256)):
        raise ConfigError(f"sha256 must be the 64 hexadecimal digits of a SHA-256 digest, got {sha256!r}")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(url: str) -> Path:
    name = unquote(Path(urlparse(url).path).name) or "download"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-100:]
    tag = hashlib.sha256(url.encode()).hexdigest()[:16]
    return cache_dir() / "downloads" / f"{tag}-{name}"


def download(
    url: str, sha256: str | None = None, *, progress: bool | None = None, timeout: float = 60.0
) -> Path:
    """Download ``url`` into the cache (once) and return the local path.

    The body is streamed into a temporary file in the cache folder and renamed into place only when it is
    complete and (if ``sha256`` is given) its digest matches, so an interrupted or bad download never
    leaves a file that a later call would trust. A cached file is returned without network access; with
    ``DALLE_OFFLINE=1`` a missing file raises :class:`~dalle.errors.DownloadError` instead of downloading.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {url!r}")
    _check_digest(sha256)
    expected = sha256.lower() if sha256 else None
    target = _cache_path(url)
    if target.is_file():
        if expected is None or sha256_file(target) == expected:
            return target
        if _offline():
            raise DownloadError(
                f"cached {target} does not match the expected SHA-256 and DALLE_OFFLINE is set; "
                "unset DALLE_OFFLINE to download it again"
            )
        target.unlink(missing_ok=True)  # stale or corrupt: fetch a fresh copy
    if _offline():
        raise DownloadError(
            f"{url} is not in the cache ({target}) and DALLE_OFFLINE is set; unset DALLE_OFFLINE or put the "
            "file there"
        )
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, timeout, progress, requests)
        if expected is not None and digest != expected:
            raise DownloadError(
                f"{url}: SHA-256 is {digest}, expected {expected}; the download was discarded"
            )
        publish(tmp, target)
    except requests.ConnectionError as exc:
        host = urlparse(url).netloc
        raise DownloadError(
            f"could not download {url}: cannot connect to {host} (refused, unreachable or no such "
            f"host); check the URL and the network, or download the file yourself and pass its "
            f"path ({type(exc).__name__})"
        ) from None
    except requests.RequestException as exc:
        raise DownloadError(f"could not download {url}: {exc}") from None
    except DownloadError:
        raise
    except OSError as exc:  # e.g. a full disk or an unwritable cache folder
        raise DownloadError(f"could not save {url} into {target.parent}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _stream(url: str, out: IO[bytes], timeout: float, progress: bool | None, requests: Any) -> str:
    h = hashlib.sha256()
    with requests.get(url, stream=True, timeout=timeout) as resp:
        if resp.status_code >= 400:
            raise DownloadError(f"could not download {url}: HTTP {resp.status_code} {resp.reason}")
        total = resp.headers.get("Content-Length")
        expected_len = (
            int(total) if total and total.isdigit() and not resp.headers.get("Content-Encoding") else None
        )
        got = 0
        for chunk in _progress(resp.iter_content(chunk_size=1 << 20), expected_len, url, progress):
            out.write(chunk)
            h.update(chunk)
            got += len(chunk)
        if expected_len is not None and got != expected_len:
            raise DownloadError(
                f"could not download {url}: got {got} of {expected_len} bytes (connection lost)"
            )
    return h.hexdigest()


def _progress(
    chunks: Iterator[bytes], total: int | None, url: str, enabled: bool | None, initial: int = 0
) -> Iterator[bytes]:
    if enabled is False:
        yield from chunks
        return
    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    with tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        desc=Path(urlparse(url).path).name,
        disable=None if enabled is None else False,
    ) as bar:
        for chunk in chunks:
            bar.update(len(chunk))
            yield chunk


# ------------------------------------------------------------------------------ Hugging Face Hub files
HF_ENDPOINT = "https://huggingface.co"
#: statuses with which the Hub answers for a repository that does not exist (any more) under that name
_HF_MISSING = (401, 404)


def hf_endpoint() -> str:
    """The Hub's base URL: ``$DALLE_HF_ENDPOINT`` (e.g. a mirror, or a local test server), else
    https://huggingface.co."""
    return (os.environ.get("DALLE_HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")


def hf_url(repo: str, filename: str) -> str:
    """``{endpoint}/{repo}/resolve/main/{filename}``: the URL of a file of a Hub repository."""
    return f"{hf_endpoint()}/{repo}/resolve/main/{filename}"


def download_hf_file(
    repos: str | Sequence[str], filename: str, *, progress: bool | None = None, timeout: float = 60.0
) -> Path:
    """Download ``filename`` from the first of ``repos`` (Hub repository ids, e.g. an old name and its
    renamed successor) that has it, into ``cache_dir()/huggingface/{first repo}/{filename}``; return the path.

    A cached file is returned without network access. The body goes to ``{filename}.part`` beside the target
    and is renamed into place only when complete; an interrupted download keeps the ``.part`` file and the
    next call resumes it with an HTTP Range request. A repository that answers 401 or 404 (the Hub's answer
    for a repository that does not exist under that name) is skipped for the next one. With
    ``DALLE_OFFLINE=1`` a missing file raises :class:`~dalle.errors.DownloadError`. Two processes must not
    download the same file at once.
    """
    repo_list = [repos] if isinstance(repos, str) else list(repos)
    if not repo_list or not all(isinstance(r, str) and r.count("/") == 1 for r in repo_list):
        raise ConfigError(f"repos must be Hub repository ids like 'owner/name', got {repos!r}")
    if not filename or "/" in filename or filename.startswith("."):
        raise ConfigError(f"filename must be a plain file name, got {filename!r}")
    target = cache_dir() / "huggingface" / repo_list[0].replace("/", "--") / filename
    if target.is_file():
        return target
    if _offline():
        raise DownloadError(
            f"{filename} of {repo_list[0]} is not in the cache ({target}) and DALLE_OFFLINE is set; unset "
            "DALLE_OFFLINE or put the file there"
        )
    import requests

    part = target.with_name(target.name + ".part")
    tried = []
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for repo in repo_list:
            url = hf_url(repo, filename)
            status = _fetch_resumable(url, part, timeout, progress, requests)
            if status is None:
                publish(part, target)
                return target
            tried.append(f"{url} (HTTP {status})")
    except requests.ConnectionError as exc:
        raise DownloadError(
            f"could not download {filename}: cannot connect to {urlparse(hf_endpoint()).netloc} "
            f"({type(exc).__name__}); check the network (or $DALLE_HF_ENDPOINT), "
            "or download the file yourself and run `dalle convert` on it"
        ) from None
    except requests.RequestException as exc:
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"download of {filename} interrupted after {got} bytes ({exc}); run the same command again to "
            f"resume it ({part} is kept)"
        ) from None
    except OSError as exc:
        raise DownloadError(f"could not save {filename} into {target.parent}: {exc}") from None
    raise DownloadError(
        f"{filename} was not found: {'; '.join(tried)}. "
        "The repository may have been renamed, removed or made private; "
        "download the file yourself and run `dalle convert` on it"
    )


def _content_range_total(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a ``Content-Range: bytes a-b/total`` header."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(2) == "*" else int(match.group(2))


def _fetch_resumable(
    url: str, part: Path, timeout: float, progress: bool | None, requests: Any
) -> int | None:
    """Fetch ``url`` into ``part``, continuing what ``part`` already holds; None when complete, else the HTTP
    status meaning "no such repository" (401 / 404). Raises DownloadError on other HTTP errors and on a short
    body (``part`` is kept for the next try)."""
    for attempt in range(2):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as resp:
            if resp.status_code in _HF_MISSING:
                return resp.status_code
            if resp.status_code == 416 and attempt == 0:  # the partial file is not a prefix we can extend
                part.unlink(missing_ok=True)
                continue
            if resp.status_code >= 400:
                raise DownloadError(f"could not download {url}: HTTP {resp.status_code} {resp.reason}")
            content_range = _content_range_total(resp.headers.get("Content-Range"))
            if resp.status_code == 206 and content_range is not None and content_range[0] == have:
                start, total, mode = have, content_range[1], "ab"
            else:  # a full body (the server ignored the Range): start again
                length = resp.headers.get("Content-Length")
                start, mode = 0, "wb"
                total = (
                    int(length)
                    if length and length.isdigit() and not resp.headers.get("Content-Encoding")
                    else None
                )
            got = start
            with open(part, mode) as out:
                # small chunks: a dropped connection loses the unfinished chunk, resumed from the last
                # whole one
                for chunk in _progress(
                    resp.iter_content(chunk_size=1 << 14), total, url, progress, initial=start
                ):
                    out.write(chunk)
                    got += len(chunk)
            if total is not None and got != total:
                raise DownloadError(
                    f"download of {url} stopped after {got} of {total} bytes (connection lost); run the same "
                    f"command again to resume it ({part} is kept)"
                )
        return None
    raise DownloadError(
        f"could not download {url}: the server refused to resume or restart it"
    )  # pragma: no cover


# ------------------------------------------------------------------------------ streaming safetensors writer
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``tensors`` as a safetensors file one tensor at a time (memory stays at one tensor: a 21.5 GiB
    memory-mapped checkpoint converts without being read into memory at once), atomically. ``dtype``
    converts floating-point tensors; others are written as they are."""
    path = Path(path)
    entries, offset = {}, 0
    for name, t in tensors.items():
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in _SAFETENSORS_DTYPES:
            raise ConfigError(f"tensor {name!r} has dtype {out_dtype}, which safetensors cannot store")
        size = t.numel() * torch.empty((), dtype=out_dtype).element_size()
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[out_dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header: dict[str, Any] = dict(entries)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for t in tensors.values():
                t = t.detach()
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                data = t.contiguous().cpu().reshape(-1).view(torch.uint8)
                # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (mypy checks 3.10)
                out.write(memoryview(data.numpy()))  # type: ignore[arg-type]
        publish(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return path

"""BPE text tokenizer for captions, built on youtokentome.

DALL-E reads a caption as at most 256 lowercase BPE tokens (vocabulary 16,384, 10% BPE dropout while
training). :class:`BPETokenizer` trains such a vocabulary, saves and loads it, and turns captions into the
fixed-length ``LongTensor[B, text_len]`` the transformer reads: caption tokens first, then ``pad_id`` (always
0) in every remaining slot. No start or end token is inserted; the transformer adds whatever start token it
needs.

Rules (the same in training and encoding, so a caption is always cut up the way the vocabulary was learned):

* **Normalisation** (:func:`normalize`): Unicode NFKC, then lowercase (repeated until stable, so the result
  is a fixed point), U+2581 "▁" (youtokentome's word marker) becomes a space, lone surrogates become U+FFFD,
  every run of whitespace becomes one space, and leading/trailing whitespace is dropped.
* **Words**: text is split on spaces and merges are learned and applied inside words; a word's first piece
  carries the "▁" marker. As in the paper's tokenizer, only the letters a-z merge: every other character
  (digits, punctuation, accented letters) stays a token of its own, so ``42`` is ``4`` ``2`` and ``cat's`` is
  ``▁cat`` ``'`` ``s`` (``split_non_letters=False`` in :meth:`BPETokenizer.train` lifts this). Unlike the
  paper's, the word marker merges with a word's first letters (one token per word fewer). Training uses
  dalle's own deterministic BPE learner by default (youtokentome's trainer breaks ties by thread timing); the
  model file is youtokentome's format and encoding runs in youtokentome, or, where youtokentome is not
  installed, in dalle's pure-Python reader of that format (:mod:`dalle._pybpe`), which gives the same ids
  (tested against youtokentome) and, caching words, is about as fast on captions.
* **Unknown characters**: characters that were not in the training text have no id. Each maximal run of such
  characters inside a word becomes a single ``unk_id`` (1); :meth:`BPETokenizer.decode` shows it as ``<UNK>``.
* **Special ids**: ``pad_id`` 0, ``unk_id`` 1, ``bos_id`` 2, ``eos_id`` 3 (youtokentome's layout). BOS and EOS
  exist in the vocabulary but :meth:`BPETokenizer.encode` never emits them.
* **BPE dropout** only when ``encode(..., dropout=p)`` asks for it (training). With ``seeds=`` (one int per
  caption; the trainer derives them from the run seed and each sample's position) the draws are reproducible;
  without, they come from youtokentome's own generator (or an unseeded Python one), which nothing seeds.

youtokentome is optional: it is imported only when a tokenizer is loaded or trained, and without it everything
but ``BPETokenizer.train(..., deterministic=False)`` (youtokentome's own trainer) still works, through the
pure-Python reader. ``import dalle`` never needs it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import operator
import os
import random
import re
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle._files import publish
from dalle.errors import TokenizerError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
UNK_TEXT = "<UNK>"  # how decode() shows unk_id; normalised text is lowercase, so this cannot be caption text
WORD_MARK = "\u2581"  # youtokentome's word-start marker "▁"

INSTALL_HINT = "pip install cython setuptools wheel && pip install --no-build-isolation youtokentome"

_N_SPECIAL = 4
_MAX_CODEPOINT = 0x10FFFF
_SURROGATES = re.compile("[\ud800-\udfff]")
# A youtokentome model file holds only ASCII decimal integers separated by whitespace.
_MODEL_BYTES = frozenset(b"0123456789- \t\n\r\x0b\x0c")
_MODEL_HEADER = re.compile(rb"\s*\d+\s+\d+\s")


class TruncationWarning(UserWarning):
    """A caption had more tokens than ``text_len`` and was cut to fit."""


def _have_yttm() -> bool:
    """True when youtokentome can be imported (its C++ encoder is faster than the pure-Python one)."""
    try:
        import youtokentome  # noqa: F401
    except ImportError:
        return False
    return True


def _yttm() -> Any:
    """Import youtokentome, or raise a TokenizerError that says how to install it."""
    try:
        import youtokentome
    except ImportError as exc:
        raise TokenizerError(
            f"the BPE tokenizer needs the youtokentome package, which is not installed; install it with: "
            f"{INSTALL_HINT}"
        ) from exc
    return youtokentome


def normalize(text: str) -> str:
    """Return ``text`` as the tokenizer sees it, in training and in encoding alike.

    Steps: Unicode NFKC and lowercasing (repeated until the text no longer changes, so that
    ``normalize(normalize(t)) == normalize(t)``); U+2581 "▁" becomes a space (youtokentome treats it as one);
    lone surrogates become U+FFFD (they cannot be written as UTF-8); whitespace runs (any Unicode whitespace,
    newlines included) become one space; leading and trailing whitespace is removed.
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize() expects a str, got {type(text).__name__}")
    if text.isascii():  # the common case: NFKC is the identity on ASCII
        return " ".join(text.lower().split())
    if _SURROGATES.search(text):
        text = _SURROGATES.sub("\ufffd", text)
    for _ in range(8):  # a few rounds always suffice; the bound only guards against the unforeseen
        nxt = unicodedata.normalize("NFKC", text).lower()
        if nxt == text:
            break
        text = nxt
    return " ".join(text.replace(WORD_MARK, " ").split())


def _check_texts(texts: Any, what: str) -> list[str]:
    """Turn a str or an iterable of str into a list, naming the first non-str element's position."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"{what} takes a str or a list of str, got {type(texts).__name__}")
    items = list(texts)
    if not all(isinstance(t, str) for t in items):
        i, bad = next((i, t) for i, t in enumerate(items) if not isinstance(t, str))
        raise TypeError(
            f"{what}: caption at position {i} of the batch is {type(bad).__name__} ({bad!r:.40}), "
            "expected str"
        )
    return items


@contextlib.contextmanager
def _stderr_to_void(enabled: bool) -> Iterator[None]:
    """Silence file descriptor 2 (youtokentome's C++ code logs there, beyond sys.stderr's reach)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as void:
            os.dup2(void.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _ModelInfo:
    """What validation learned about a model file."""

    __slots__ = ("n_chars", "n_rules", "vocab_size", "unk_id", "pad_id", "bos_id", "eos_id")

    def __init__(self, n_chars: int, n_rules: int, specials: Sequence[int]) -> None:
        self.n_chars = n_chars
        self.n_rules = n_rules
        self.vocab_size = n_chars + n_rules + _N_SPECIAL
        self.unk_id, self.pad_id, self.bos_id, self.eos_id = specials


def _validate_model(data: bytes, source: str) -> _ModelInfo:
    """Check that ``data`` is a well-formed youtokentome BPE model before youtokentome sees it.

    youtokentome aborts the whole process (uncaught C++ exception) or loops for a very long time on a
    malformed file, and silently returns out-of-range ids for an inconsistent one, so everything it relies
    on is checked here: the layout ``n_chars n_rules``, ``n_chars`` lines ``codepoint id``, ``n_rules`` lines
    ``left right merged``, then ``unk pad bos eos``; ids covering exactly ``0 .. vocab_size-1`` once each;
    merges built only from ids defined above them; the "▁" word marker present; pad id 0.
    """

    def bad(reason: str) -> TokenizerError:
        return TokenizerError(
            f"{source} is not a valid youtokentome BPE model ({reason}); train a new one with "
            f"`dalle tokenizer train` or BPETokenizer.train()"
        )

    if not data.strip():
        raise bad("the file is empty")
    if not _MODEL_HEADER.match(data):
        raise bad("it does not start with the two counts of characters and merges")
    if not _MODEL_BYTES.issuperset(set(data)):
        raise bad("it holds something other than whitespace-separated integers")
    try:
        nums = [int(tok) for tok in data.split()]
    except ValueError:
        raise bad("a field is not an integer") from None
    n_chars, n_rules = nums[0], nums[1]
    expected = 2 + 2 * n_chars + 3 * n_rules + _N_SPECIAL
    if len(nums) != expected:
        raise bad(
            f"the header announces {n_chars} characters and {n_rules} merges, i.e. {expected} numbers, "
            f"but the file holds {len(nums)}: truncated or padded"
        )
    vocab_size = n_chars + n_rules + _N_SPECIAL
    specials = nums[-_N_SPECIAL:]  # unk pad bos eos
    unk_id, pad_id, _, _ = specials
    if pad_id != PAD_ID:
        raise bad(
            f"pad id is {pad_id}, but dalle needs it to be {PAD_ID} (the transformer treats 0 as padding)"
        )
    if len(set(specials)) != _N_SPECIAL or not all(0 <= s < vocab_size for s in specials):
        raise bad(f"special ids {specials} are not distinct ids below the vocabulary size {vocab_size}")

    seen: set[int] = set(specials)
    defined: set[int] = set()  # ids a merge may use: characters and earlier merges
    codepoints: set[int] = set()
    chars = nums[2 : 2 + 2 * n_chars]
    for cp, tid in zip(chars[0::2], chars[1::2]):
        if not 0 <= cp <= _MAX_CODEPOINT or 0xD800 <= cp <= 0xDFFF:
            raise bad(f"{cp} is not a Unicode code point")
        if cp in codepoints:
            raise bad(f"character {cp} is listed twice")
        if not 0 <= tid < vocab_size or tid in seen:
            raise bad(f"character id {tid} is out of range or used twice")
        codepoints.add(cp)
        seen.add(tid)
        defined.add(tid)
    if ord(WORD_MARK) not in codepoints:
        raise bad("the word marker U+2581 is missing")
    rules = nums[2 + 2 * n_chars : -_N_SPECIAL]
    for left, right, merged in zip(rules[0::3], rules[1::3], rules[2::3]):
        if left not in defined or right not in defined:
            raise bad(f"merge ({left}, {right}) uses an id that is not defined before it")
        if not 0 <= merged < vocab_size or merged in seen:
            raise bad(f"merged id {merged} is out of range or used twice")
        seen.add(merged)
        defined.add(merged)
    # len(seen) == vocab_size now follows: vocab_size distinct ids, each in range.
    return _ModelInfo(n_chars, n_rules, specials)


def _read_model_file(path: str | os.PathLike[str]) -> bytes:
    """Read a model file, turning every way it can be missing or unreadable into a TokenizerError."""
    p = Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer model file not found: {p}")
    if p.is_dir():
        raise TokenizerError(f"tokenizer model path is a directory, expected a file: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(64)
            if head.strip() and not _MODEL_HEADER.match(head):
                # refuse early, without reading a possibly huge unrelated file (a checkpoint, an image, ...)
                _validate_model(head, str(p))
            return head + f.read()
    except OSError as exc:
        raise TokenizerError(f"cannot read tokenizer model file {p}: {exc.strerror or exc}") from exc


def _as_id_rows(ids: Any) -> tuple[list[list[int]], bool]:
    """Return (rows of ids, whether the input was a single sequence) for tensors, arrays and lists."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"decode() expects integer token ids, got a {ids.dtype} tensor")
        if ids.dim() not in (1, 2):
            raise TokenizerError(f"decode() expects ids of shape [T] or [B, T], got {tuple(ids.shape)}")
        rows = ids.detach().cpu().tolist()
        return ([rows], True) if ids.dim() == 1 else (rows, False)
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"decode() expects integer token ids, got a {ids.dtype} array")
        if ids.ndim not in (1, 2):
            raise TokenizerError(f"decode() expects ids of shape [T] or [B, T], got {ids.shape}")
        rows = ids.tolist()
        return ([rows], True) if ids.ndim == 1 else (rows, False)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"decode() expects token ids (tensor, array or list), got {type(ids).__name__}")
    items = list(ids)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in items):
        return [[int(x) for x in items]], True
    rows = []
    for i, row in enumerate(items):
        if isinstance(row, torch.Tensor | np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise TypeError(f"decode(): element {i} is {type(row).__name__}, expected a sequence of int ids")
        row = list(row)
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in row):
            raise TypeError(f"decode(): sequence {i} holds something other than int ids")
        rows.append([int(x) for x in row])
    return rows, False


class BPETokenizer:
    """Byte-pair-encoding tokenizer for captions (youtokentome underneath).

    Make one with :meth:`train`, :meth:`load` or :meth:`from_bytes`. See the module docstring for the
    normalisation, unknown-character and special-id rules. Instances pickle (as their model bytes), so they
    can be handed to DataLoader workers.

    Example::

        tok = BPETokenizer.train(captions, vocab_size=512)
        tok.save("tokenizer.model")
        ids = BPETokenizer.load("tokenizer.model").encode(["a red circle"], text_len=256)  # [1, 256]
    """

    def __init__(self, model: bytes, *, n_threads: int = -1, source: str = "tokenizer model") -> None:
        """Wrap the bytes of a youtokentome BPE model (validated first; TokenizerError when malformed).

        ``n_threads`` is youtokentome's encoding thread count (-1: every core).
        """
        if not isinstance(model, (bytes, bytearray)):
            raise TypeError(f"BPETokenizer() expects the model file's bytes, got {type(model).__name__}")
        if (
            isinstance(n_threads, bool)
            or not isinstance(n_threads, int)
            or not (n_threads == -1 or n_threads >= 1)
        ):
            # youtokentome silently returns empty encodings for 0 threads
            raise TokenizerError(f"n_threads must be -1 (every core) or a positive int, got {n_threads!r}")
        model = bytes(model)
        self._info = _validate_model(model, source)
        self._model = model
        self._n_threads = int(n_threads)
        self._bpe = self._open(n_threads)
        self._bpe_dropout: Any = None  # single-threaded instance for BPE dropout, made on first use
        self._py_bpe: Any = None  # dalle's own encoder for seeded BPE dropout (self._bpe when it is one)

    def _python_bpe(self) -> Any:
        """dalle's own encoder of this model (the one in use when youtokentome is missing), made once."""
        from dalle._pybpe import PyBPE

        if isinstance(self._bpe, PyBPE):
            return self._bpe
        if self._py_bpe is None:
            self._py_bpe = PyBPE(self._model)
        return self._py_bpe

    def _open(self, n_threads: int) -> Any:
        """Load the (already validated) model bytes into a youtokentome BPE object, or the pure-Python reader
        of the same format when youtokentome is not installed."""
        if not _have_yttm():
            from dalle._pybpe import PyBPE

            return PyBPE(self._model)
        yttm = _yttm()
        with tempfile.TemporaryDirectory(prefix="dalle-bpe-") as tmp:
            path = os.path.join(tmp, "tokenizer.model")
            with open(path, "wb") as f:
                f.write(self._model)
            try:
                return yttm.BPE(path, n_threads=n_threads)
            except ValueError as exc:  # validation should have caught it; keep the error type anyway
                raise TokenizerError(f"youtokentome could not load the tokenizer model: {exc}") from exc

    # ----------------------------------------------------------------------------------------- creation
    @classmethod
    def train(
        cls,
        texts_or_path: str | os.PathLike[str] | Iterable[str],
        vocab_size: int = 16384,
        *,
        coverage: float = 1.0,
        strict: bool = False,
        deterministic: bool = True,
        split_non_letters: bool = True,
        n_threads: int = -1,
        verbose: bool = False,
    ) -> BPETokenizer:
        """Learn a BPE vocabulary of ``vocab_size`` ids (the 4 special ids included) from captions.

        ``texts_or_path``: an iterable of caption strings, or the path (str / PathLike) of a UTF-8 text file
        with one caption per line. Captions are normalised with :func:`normalize`, exactly as in encoding;
        empty ones are skipped. The caller never needs to write a file.

        ``vocab_size`` must be at least (distinct characters) + 5 (4 specials and the "▁" word marker), or
        TokenizerError. When the text supports fewer merges than asked for (every word already one token),
        the tokenizer comes out smaller: a UserWarning says so and :attr:`vocab_size` reports the real size;
        with ``strict=True`` that is a TokenizerError asking for a smaller ``vocab_size`` instead.

        ``coverage``: keep the most frequent characters covering this fraction of the text (as
        youtokentome does); rarer ones become unknown. ``deterministic`` (default): learn the merges with
        dalle's own trainer, which breaks ties between equally frequent pairs by id, so the same captions
        always give the same model file (in any order). ``deterministic=False`` uses youtokentome's
        multi-threaded C++ trainer instead: much faster on millions of captions, but its tie-breaking depends
        on thread timing, so two runs can differ. ``n_threads`` and ``verbose`` (show its log; otherwise file
        descriptor 2 is silenced while it runs, hiding other threads' stderr too) apply to that trainer only.
        Either way the model is youtokentome's file format; encoding runs in youtokentome where it is
        installed, else in dalle's pure-Python reader (same ids).

        ``split_non_letters`` (default, the paper's rule; dalle's trainer only): merges join only the letters
        a-z (and the word marker before them); digits, punctuation and other characters never merge.
        youtokentome's trainer (``deterministic=False``) has no such rule and merges whatever is frequent.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if not 0 < vocab_size < 2**31:
            raise TokenizerError(f"vocab_size must be a positive int below 2**31, got {vocab_size}")
        if not 0.0 < coverage <= 1.0:
            raise TokenizerError(f"coverage must be in (0, 1], got {coverage}")
        if not deterministic:
            _yttm()  # fail early, before reading the text, when youtokentome is missing
        texts = _iter_training_texts(texts_or_path)
        if deterministic:
            model, n_captions = _learn_bpe(texts, vocab_size, coverage, split_non_letters)
        else:
            model, n_captions = _learn_bpe_yttm(texts, vocab_size, coverage, n_threads, verbose)
        tok = cls(model, source="the freshly trained tokenizer model")
        if tok.vocab_size < vocab_size:
            msg = (
                f"the training text ({n_captions} captions) supports only {tok.vocab_size} tokens, "
                f"fewer than vocab_size={vocab_size}; pass vocab_size={tok.vocab_size} "
                f"(--vocab-size {tok.vocab_size}) or less, or train on more text"
            )
            if strict:
                raise TokenizerError(msg)
            warnings.warn(msg + f" (the tokenizer has {tok.vocab_size} tokens)", UserWarning, stacklevel=2)
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, n_threads: int = -1) -> BPETokenizer:
        """Load a youtokentome BPE model file (as written by :meth:`save` or youtokentome itself).

        Raises TokenizerError when the file is missing, unreadable, malformed or inconsistent, or when its
        pad id is not 0. ``n_threads``: youtokentome's encoding threads (-1: every core).
        """
        return cls(_read_model_file(path), n_threads=n_threads, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, *, n_threads: int = -1) -> BPETokenizer:
        """Build a tokenizer from the bytes of a model file (the inverse of :meth:`to_bytes`)."""
        return cls(data, n_threads=n_threads, source="tokenizer model bytes")

    def to_bytes(self) -> bytes:
        """Return the model file's bytes (youtokentome's text format)."""
        return self._model

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to ``path`` (youtokentome's format; parent folders are created) and return it.

        The file is written under a temporary name and renamed into place, so a reader never sees half of it.
        """
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self._model)
                publish(tmp, p)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise TokenizerError(f"cannot write tokenizer model to {p}: {exc.strerror or exc}") from exc
        return p

    # --------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, special ids included (ids are ``0 .. vocab_size-1``)."""
        return self._info.vocab_size

    @property
    def pad_id(self) -> int:
        """Id filling the slots after a caption; always 0."""
        return self._info.pad_id

    @property
    def unk_id(self) -> int:
        """Id of a run of characters the vocabulary does not know."""
        return self._info.unk_id

    @property
    def bos_id(self) -> int:
        """Id reserved for beginning-of-sequence (never emitted by :meth:`encode`)."""
        return self._info.bos_id

    @property
    def eos_id(self) -> int:
        """Id reserved for end-of-sequence (never emitted by :meth:`encode`)."""
        return self._info.eos_id

    @property
    def special_ids(self) -> frozenset[int]:
        """The pad, unk, bos and eos ids."""
        return frozenset((self.pad_id, self.unk_id, self.bos_id, self.eos_id))

    normalize = staticmethod(normalize)

    def vocab(self) -> list[str]:
        """The token strings by id (specials as ``<PAD>``, ``<UNK>``, ``<BOS>``, ``<EOS>``)."""
        return list(self._bpe.vocab())

    def id_to_token(self, token_id: int) -> str:
        """The string of one id."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return self._bpe.id_to_subword(int(token_id))

    def token_to_id(self, token: str) -> int:
        """The id of a token string (``unk_id`` when it is not in the vocabulary)."""
        return int(self._bpe.subword_to_id(token))

    # --------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str) -> list[str]:
        """The subword pieces of one caption, after normalisation (unknown runs appear as themselves)."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize() expects a str, got {type(text).__name__}")
        from dalle._pybpe import OutputType, PyBPE

        subword = OutputType.SUBWORD if isinstance(self._bpe, PyBPE) else _yttm().OutputType.SUBWORD
        return self._bpe.encode([normalize(text)], output_type=subword)[0]

    def encode_ids(
        self, text: str | Sequence[str], dropout: float = 0.0, seeds: Sequence[int] | None = None
    ) -> list[list[int]]:
        """Token ids of each caption, unpadded and untruncated (one list per caption).

        ``seeds`` (one int per caption) makes BPE dropout reproducible: caption ``i`` draws its dropout
        decisions from ``random.Random(seeds[i])`` (in dalle's own encoder), so the same seeds give the same
        ids.
        """
        texts = _check_texts(text, "encode()")
        if not 0.0 <= dropout <= 1.0:
            raise TokenizerError(f"dropout must be in [0, 1], got {dropout}")
        normalized = [normalize(t) for t in texts]
        if seeds is not None:
            given = list(seeds)
            try:
                if any(isinstance(x, bool) for x in given):
                    raise TypeError
                seeds = [operator.index(x) for x in given]  # ints, numpy ints, 0-d integer tensors
            except TypeError:
                seeds = None
            if seeds is None or len(seeds) != len(normalized):
                raise TokenizerError(
                    f"seeds must be {len(normalized)} ints, one per caption, got {given!r:.80}"
                )
        if dropout > 0.0 and seeds is not None:
            py = self._python_bpe()
            return [
                py.encode([t], dropout_prob=float(dropout), rng=random.Random(seed))[0]
                for t, seed in zip(normalized, seeds)
            ]
        if dropout > 0.0:
            # youtokentome draws dropout decisions from one global generator; a single-threaded instance
            # keeps encoding threads from racing on it.
            if self._bpe_dropout is None:
                self._bpe_dropout = self._open(1) if _have_yttm() else self._python_bpe()
            return self._bpe_dropout.encode(normalized, dropout_prob=float(dropout))
        return self._bpe.encode(normalized)

    def encode(
        self,
        text: str | Sequence[str],
        text_len: int = 256,
        truncate: bool = True,
        dropout: float = 0.0,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Encode captions into a ``LongTensor[B, text_len]``: caption tokens, then ``pad_id`` (0).

        A single str gives shape ``[1, text_len]``; no BOS/EOS is added. Captions are normalised first
        (:func:`normalize`). An empty caption is all pads. A caption with more than ``text_len`` tokens keeps
        its first ``text_len`` tokens with a :class:`TruncationWarning`, or raises TokenizerError when
        ``truncate=False``. A non-str caption raises TypeError naming its position in the batch.

        ``dropout``: BPE dropout probability (each merge is skipped with this probability, giving varied
        segmentations); use it only for training (the paper uses 0.1). The default 0 is deterministic. With
        ``seeds`` (one int per caption) the draws are reproducible (see :meth:`encode_ids`); without, they
        come from youtokentome's own generator, which nothing seeds.
        """
        if isinstance(text_len, bool) or not isinstance(text_len, int):
            raise TypeError(f"text_len must be an int, got {type(text_len).__name__}")
        if text_len < 1:
            raise TokenizerError(f"text_len must be at least 1, got {text_len}")
        rows = self.encode_ids(text, dropout=dropout, seeds=seeds)
        return self._pad(rows, text_len, truncate, single=isinstance(text, str))

    @staticmethod
    def _pad(rows: list[list[int]], text_len: int, truncate: bool, single: bool) -> torch.Tensor:
        """Pack id lists into a zero-padded int64 tensor with numpy (no per-row torch work)."""
        n = len(rows)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=n)
        long_rows = np.flatnonzero(lengths > text_len)
        if long_rows.size:
            first = int(long_rows[0])
            where = "the caption" if single else f"caption {first} of the batch"
            if not truncate:
                raise TokenizerError(
                    f"{where} has {lengths[first]} tokens, more than text_len={text_len}; shorten it, raise "
                    f"text_len or pass truncate=True"
                )
            others = "" if long_rows.size == 1 else f" and {long_rows.size - 1} more"
            warnings.warn(
                TruncationWarning(
                    f"{where}{others} had more than text_len={text_len} tokens ({lengths[first]}) and "
                    f"was truncated (in Python, truncate=False raises instead)"
                ),
                stacklevel=3,
            )
            for i in long_rows:
                rows[i] = rows[i][:text_len]
            np.minimum(lengths, text_len, out=lengths)
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
        # np.zeros gets zeroed pages from the OS, so pad slots (pad_id 0) cost nothing until read.
        out = np.zeros((n, text_len), dtype=np.int64)
        if total:
            # flat position of token j of row i is i*text_len + j; j = k - (row start in flat)
            starts = np.cumsum(lengths) - lengths
            index = np.repeat(np.arange(n, dtype=np.int64) * text_len - starts, lengths)
            index += np.arange(total, dtype=np.int64)
            out.reshape(-1)[index] = flat
        return torch.from_numpy(out)

    # --------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Any) -> str | list[str]:
        """Turn ids back into text: ``[T]`` (tensor, array or list of int) gives a str, ``[B, T]`` a list.

        Pad, BOS and EOS ids are skipped wherever they are; ``unk_id`` is shown as ``<UNK>``. For a caption
        made only of characters the tokenizer knows, ``decode(encode(t)) == normalize(t)``. Ids outside the
        vocabulary raise TokenizerError.
        """
        rows, single = _as_id_rows(ids)
        vocab_size = self.vocab_size
        for i, row in enumerate(rows):
            if row and not 0 <= min(row) <= max(row) < vocab_size:
                badid = next(x for x in row if not 0 <= x < vocab_size)
                where = "" if single else f" in sequence {i}"
                raise TokenizerError(f"token id {badid}{where} is outside the vocabulary [0, {vocab_size})")
        if not rows:
            return []
        texts = self._bpe.decode(rows, ignore_ids=[self.pad_id, self.bos_id, self.eos_id])
        return texts[0] if single else list(texts)

    # ------------------------------------------------------------------------------------------ dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BPETokenizer):
            return NotImplemented
        return self._model == other._model

    def __hash__(self) -> int:
        return hash(self._model)

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self._model, "n_threads": self._n_threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(
            self, state["model"], n_threads=state["n_threads"], source="unpickled tokenizer model"
        )

    def __repr__(self) -> str:
        info = self._info
        return f"BPETokenizer(vocab_size={info.vocab_size}, characters={info.n_chars}, merges={info.n_rules})"


def _iter_training_texts(texts_or_path: Any) -> Iterator[str]:
    """Yield training captions from a path (one per line) or an iterable of str (type-checked)."""
    if isinstance(texts_or_path, (str, os.PathLike)):
        path = Path(texts_or_path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "not found"
            raise TokenizerError(
                f"training text file {what}: {path} (expected UTF-8 text, one caption a line)"
            )
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as exc:
            raise TokenizerError(f"training text file {path} is not valid UTF-8: {exc}") from exc
        except OSError as exc:
            raise TokenizerError(f"cannot read training text file {path}: {exc.strerror or exc}") from exc
        return
    if isinstance(texts_or_path, (bytes, bytearray)) or not isinstance(texts_or_path, Iterable):
        raise TypeError(
            "train() expects captions (an iterable of str) or a file path, "
            f"got {type(texts_or_path).__name__}"
        )
    for i, text in enumerate(texts_or_path):
        if not isinstance(text, str):
            raise TypeError(f"train(): caption at position {i} is {type(text).__name__}, expected str")
        yield text


def _too_small(vocab_size: int, n_chars: int) -> TokenizerError | None:
    minimum = n_chars + _N_SPECIAL + 1  # + the "▁" word marker
    if vocab_size >= minimum:
        return None
    return TokenizerError(
        f"vocab_size={vocab_size} is too small: the training text has {n_chars} distinct characters, "
        f"which with the 4 special ids and the word marker need vocab_size >= {minimum}"
    )


def _model_file(alphabet: Sequence[str], rules: Sequence[tuple[int, int, int]]) -> bytes:
    """Write youtokentome's model format: counts, ``codepoint id`` lines, merge lines, special ids."""
    lines = [f"{len(alphabet) + 1} {len(rules)}", f"{ord(WORD_MARK)} {_N_SPECIAL}"]
    lines += [f"{ord(ch)} {_N_SPECIAL + 1 + i}" for i, ch in enumerate(alphabet)]
    lines += [f"{x} {y} {z}" for x, y, z in rules]
    lines.append(f"{UNK_ID} {PAD_ID} {BOS_ID} {EOS_ID}")
    return ("\n".join(lines) + "\n").encode("ascii")


def _merge_pair(seq: list[int], left: int, right: int, merged: int) -> list[int]:
    """Replace each non-overlapping (left, right) in ``seq``, scanning left to right (as encoding does)."""
    out: list[int] = []
    i, n = 0, len(seq)
    while i < n:
        if i + 1 < n and seq[i] == left and seq[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _learn_bpe(
    texts: Iterable[str], vocab_size: int, coverage: float, split_non_letters: bool = True
) -> tuple[bytes, int]:
    """Deterministic BPE training; returns (model file bytes, number of non-empty captions).

    Words are the space-separated parts of normalised captions, each starting with the "▁" marker (as in
    youtokentome). Each step merges the most frequent adjacent pair, ties going to the smallest (left, right)
    ids; character ids follow frequency (most frequent first), ties by code point. Only the pairs of words
    that contain the merged pair are recounted, so a step costs time in proportion to those words. With
    ``split_non_letters`` a pair counts only when both sides are made of the letters a-z (the left side may
    begin with the marker), so no other character ever merges.
    """
    word_counts: dict[str, int] = {}
    n_captions = total_chars = 0
    for caption in texts:
        caption = normalize(caption)
        if not caption:
            continue
        n_captions += 1
        total_chars += len(caption) + 1  # + the line break, as youtokentome counts its training file
        for word in caption.split(" "):
            word_counts[word] = word_counts.get(word, 0) + 1
    if n_captions == 0:
        raise TokenizerError("no training text: every caption is empty after normalisation")

    char_counts: dict[str, int] = {}
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] = char_counts.get(ch, 0) + count
    by_rarity = sorted(char_counts.items(), key=lambda kv: (kv[1], -ord(kv[0])))
    removed = 0
    kept_from = 0
    # drop the rarest characters while what is left still covers more than `coverage` of the text
    while (
        kept_from < len(by_rarity)
        and total_chars - removed - by_rarity[kept_from][1] > total_chars * coverage
    ):
        removed += by_rarity[kept_from][1]
        kept_from += 1
    alphabet = [ch for ch, _ in reversed(by_rarity[kept_from:])]
    error = _too_small(vocab_size, len(alphabet))
    if error is not None:
        raise error

    char_id = {ch: _N_SPECIAL + 1 + i for i, ch in enumerate(alphabet)}
    # ids that may take part in a merge: the marker (always a word's first piece), letters, and merged pieces
    mergeable = {_N_SPECIAL} | {i for ch, i in char_id.items() if not split_non_letters or "a" <= ch <= "z"}

    def countable(pair: tuple[int, int]) -> bool:
        return pair[0] in mergeable and pair[1] in mergeable

    seqs: list[list[int]] = []
    counts: list[int] = []
    for word, count in sorted(word_counts.items()):
        seqs.append([_N_SPECIAL] + [char_id[ch] for ch in word if ch in char_id])
        counts.append(count)
    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for idx, seq in enumerate(seqs):
        for pair in filter(countable, zip(seq, seq[1:])):
            pair_count[pair] = pair_count.get(pair, 0) + counts[idx]
            where.setdefault(pair, set()).add(idx)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)

    rules: list[tuple[int, int, int]] = []
    next_id = _N_SPECIAL + 1 + len(alphabet)
    while next_id < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:  # stale entry: the count changed after it was pushed
            continue
        left, right = pair
        rules.append((left, right, next_id))
        mergeable.add(next_id)
        changed: set[tuple[int, int]] = set()
        for idx in where.pop(pair):
            seq = seqs[idx]
            new = _merge_pair(seq, left, right, next_id)
            if len(new) == len(seq):  # the word lost this pair in an earlier merge
                continue
            count = counts[idx]
            for old_pair in filter(countable, zip(seq, seq[1:])):
                pair_count[old_pair] -= count
                changed.add(old_pair)
            for new_pair in filter(countable, zip(new, new[1:])):
                pair_count[new_pair] = pair_count.get(new_pair, 0) + count
                where.setdefault(new_pair, set()).add(idx)
                changed.add(new_pair)
            seqs[idx] = new
        for p in changed:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pair_count[p]
                where.pop(p, None)
        next_id += 1
    return _model_file(alphabet, rules), n_captions


def _learn_bpe_yttm(
    texts: Iterable[str], vocab_size: int, coverage: float, n_threads: int, verbose: bool
) -> tuple[bytes, int]:
    """youtokentome's (fast, multi-threaded, not reproducible) trainer on a private temporary file."""
    yttm = _yttm()
    chars: set[str] = set()
    n_captions = 0
    with tempfile.TemporaryDirectory(prefix="dalle-bpe-train-") as tmp:
        data_path = os.path.join(tmp, "captions.txt")
        model_path = os.path.join(tmp, "tokenizer.model")
        with open(data_path, "w", encoding="utf-8", newline="\n") as out:
            for caption in texts:
                caption = normalize(caption)
                if caption:
                    out.write(caption)
                    out.write("\n")
                    chars.update(caption)
                    n_captions += 1
        chars.discard(" ")
        if n_captions == 0:
            raise TokenizerError("no training text: every caption is empty after normalisation")
        error = _too_small(vocab_size, len(chars)) if coverage == 1.0 else None
        if error is not None:
            raise error
        try:
            with _stderr_to_void(not verbose):
                yttm.BPE.train(
                    data=data_path,
                    model=model_path,
                    vocab_size=vocab_size,
                    coverage=coverage,
                    n_threads=n_threads,
                    pad_id=PAD_ID,
                    unk_id=UNK_ID,
                    bos_id=BOS_ID,
                    eos_id=EOS_ID,
                )
        except ValueError as exc:
            raise TokenizerError(f"youtokentome refused to train: {exc}") from exc
        with open(model_path, "rb") as f:
            return f.read(), n_captions


__all__ = ["BPETokenizer", "TruncationWarning", "normalize", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID"]

"""Tests for dalle.tokenizer (BPE on youtokentome) and the `dalle tokenizer` CLI."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle.errors import TokenizerError
from dalle.tokenizer import BPETokenizer, TruncationWarning, normalize

pytest.importorskip("youtokentome")

REPO = Path(__file__).resolve().parents[1]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789,.'-"

_COLORS = "red green blue yellow purple orange black white gray pink".split()
_SHAPES = "circle square triangle star hexagon cross heart diamond".split()
_RELS = ["to the left of", "to the right of", "above", "below", "next to", "inside"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Shapes-world style captions, plus lines that put every ALPHABET character in the training text."""
    rng = random.Random(seed)
    caps = [
        f"a {rng.choice(_COLORS)} {rng.choice(_SHAPES)} {rng.choice(_RELS)} a {rng.choice(_COLORS)} "
        f"{rng.choice(_SHAPES)}"
        for _ in range(n)
    ]
    caps.append("the quick brown fox jumps over the lazy dog, 0123456789 times. it's well-known")
    return caps


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return make_captions(300)


@pytest.fixture(scope="module")
def tok(captions: list[str]) -> BPETokenizer:
    return BPETokenizer.train(captions, vocab_size=120)


@pytest.fixture(scope="module")
def model_file(tok: BPETokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.model")


# --------------------------------------------------------------------------------------------- import
def test_import_is_lazy_and_training_is_quiet() -> None:
    """`import dalle` must not import youtokentome; training must not spill youtokentome's log."""
    code = (
        "import sys, dalle, dalle.tokenizer, dalle.errors\n"
        "assert 'youtokentome' not in sys.modules, 'youtokentome imported at module level'\n"
        "dalle.BPETokenizer\n"
        "assert 'youtokentome' not in sys.modules\n"
        "caps = ['a red circle', 'a blue square'] * 20\n"
        "dalle.BPETokenizer.train(caps, vocab_size=30)\n"
        "dalle.BPETokenizer.train(caps, vocab_size=30, deterministic=False)\n"
        "print('done')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done" and proc.stderr == ""


def test_without_youtokentome_the_pure_python_reader_gives_the_same_results(
    monkeypatch: pytest.MonkeyPatch, tok: BPETokenizer, model_file: Path, captions: list[str]
) -> None:
    from dalle._pybpe import PyBPE

    texts = [*captions[:50], "a red circl\u00e9 ☃☃ zzz", "", "the the the"]
    expected_ids = tok.encode_ids(texts)
    expected_pieces = [tok.tokenize(t) for t in texts]
    expected_tensor = tok.encode(texts, text_len=32)
    expected_seeded = tok.encode_ids(texts, dropout=0.3, seeds=list(range(len(texts))))
    monkeypatch.setitem(sys.modules, "youtokentome", None)  # makes `import youtokentome` fail
    py = BPETokenizer.load(model_file)
    assert isinstance(py._bpe, PyBPE)
    assert py.encode_ids(texts, dropout=0.3, seeds=list(range(len(texts)))) == expected_seeded
    assert py._python_bpe() is py._bpe and py._py_bpe is None  # one encoder, not a second copy
    assert py.encode_ids(texts) == expected_ids
    assert [py.tokenize(t) for t in texts] == expected_pieces
    assert torch.equal(py.encode(texts, text_len=32), expected_tensor)
    assert py.decode(expected_tensor) == tok.decode(expected_tensor)
    assert py.vocab() == tok.vocab() and py.token_to_id("<UNK>") == tok.token_to_id("<UNK>")
    no_merges = py.encode_ids(texts[:5], dropout=1.0)  # dropout 1 skips every merge: one id per character
    assert [len(ids) for ids in no_merges] == [len(t.replace(" ", "")) + t.count(" ") + 1 for t in texts[:5]]
    assert BPETokenizer.train(captions, vocab_size=120) == tok  # dalle's own trainer needs no youtokentome
    with pytest.raises(TokenizerError, match="pip install .*youtokentome"):  # youtokentome's trainer does
        BPETokenizer.train(["a red circle"], vocab_size=30, deterministic=False)


def test_seeded_bpe_dropout_is_reproducible(tok: BPETokenizer, captions: list[str]) -> None:
    texts = captions[:40]
    plain = tok.encode_ids(texts)
    first = tok.encode_ids(texts, dropout=0.3, seeds=list(range(40)))
    assert tok.encode_ids(texts, dropout=0.3, seeds=list(range(40))) == first  # same seeds, same ids
    assert tok.encode_ids(texts, dropout=0.3, seeds=list(range(40, 80))) != first
    assert first != plain and all(
        len(a) >= len(b) for a, b in zip(first, plain)
    )  # skipped merges: more pieces
    assert tok.decode(tok.encode(texts, text_len=64, dropout=0.3, seeds=list(range(40)))) == tok.decode(
        tok.encode(texts, text_len=64)
    )  # any segmentation spells the same caption
    singles = tok.encode_ids(texts[:3], dropout=1.0, seeds=[1, 2, 3])
    assert [len(ids) for ids in singles] == [len(t.replace(" ", "")) + t.count(" ") + 1 for t in texts[:3]]
    assert tok.encode_ids(texts[:2], dropout=0.0, seeds=[5, 6]) == plain[:2]
    with pytest.raises(TokenizerError, match="seeds must be 2 ints"):
        tok.encode_ids(texts[:2], dropout=0.1, seeds=[1])
    with pytest.raises(TokenizerError, match="seeds must be 2 ints"):
        tok.encode_ids(texts[:2], dropout=0.1, seeds=[1, "2"])


def test_seeded_bpe_dropout_has_youtokentome_statistics(tok: BPETokenizer) -> None:
    """Same algorithm as youtokentome's dropout (skipped merges come back after the next merge): the mean
    number of pieces agrees at every rate."""
    texts = make_captions(1500, seed=9)
    for p in (0.1, 0.4):
        ours = sum(map(len, tok.encode_ids(texts, dropout=p, seeds=list(range(len(texts))))))
        theirs = sum(map(len, tok._bpe.encode([normalize(t) for t in texts], dropout_prob=p)))
        assert abs(ours / theirs - 1) < 0.03, (p, ours, theirs)


@pytest.mark.parametrize("alphabet", ["ab", "abcde"])
def test_pure_python_reader_matches_youtokentome_on_random_text(alphabet: str) -> None:
    """Many merges over a tiny alphabet: overlapping pairs, repeats, unknown runs, decoding arbitrary ids."""
    import youtokentome as yttm

    from dalle._pybpe import OutputType, PyBPE

    rng = random.Random(len(alphabet))

    def words(k: int) -> str:
        return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(k))

    tok = BPETokenizer.train([words(rng.randint(1, 6)) for _ in range(1500)], vocab_size=80)
    ref, py = tok._bpe, PyBPE(tok._model)
    assert py.vocab() == list(ref.vocab())
    texts = [
        normalize("".join(rng.choice(alphabet + "xy ☃") for _ in range(rng.randint(0, 40))))
        for _ in range(1500)
    ]
    assert py.encode(texts) == ref.encode(texts)
    assert py.encode(texts, output_type=OutputType.SUBWORD) == ref.encode(
        texts, output_type=yttm.OutputType.SUBWORD
    )
    rows = [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))] for _ in range(1000)]
    assert py.decode(rows, ignore_ids=[0, 2, 3]) == ref.decode(rows, ignore_ids=[0, 2, 3])
    assert [py.subword_to_id(p) for p in [*py.vocab(), "zz"]] == [
        ref.subword_to_id(p) for p in [*py.vocab(), "zz"]
    ]


# ---------------------------------------------------------------------------------------- normalize
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  A  Red\tCIRCLE\n", "a red circle"),
        ("ﬁne ＡＢＣ", "fine abc"),  # NFKC: ligature and full-width letters
        ("a\u00a0b\u3000c", "a b c"),  # no-break and ideographic spaces
        ("a\u2581b", "a b"),  # youtokentome's word marker is a space to it
        ("Ça\u0301", "\u00e7\u00e1"),  # lowercase keeps accents; NFKC composes a + combining acute
        ("a\ud800b", "a\ufffdb"),  # a lone surrogate cannot be UTF-8
        ("", ""),
        (" \n\t ", ""),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize(raw) == expected
    assert BPETokenizer.normalize(raw) == expected


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert once == once.strip() and "  " not in once and "\n" not in once


def test_normalize_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        normalize(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- basics
def test_special_ids_and_vocab(tok: BPETokenizer) -> None:
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 120 == len(tok.vocab())
    assert tok.vocab()[:4] == ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
    assert tok.token_to_id(tok.id_to_token(50)) == 50
    assert "vocab_size=120" in repr(tok)


def test_encode_shapes_and_padding(tok: BPETokenizer) -> None:
    single = tok.encode("a red circle", text_len=16)
    assert single.shape == (1, 16) and single.dtype == torch.long
    ids = tok.encode_ids("a red circle")[0]
    n = len(ids)
    assert 0 < n < 16
    assert single[0, :n].tolist() == ids
    assert (single[0, n:] == tok.pad_id).all()
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    batch = tok.encode(["a red circle", "a blue square above a green star", ""], text_len=32)
    assert batch.shape == (3, 32)
    assert torch.equal(batch[0], tok.encode("a red circle", text_len=32)[0])
    assert tok.encode([], text_len=8).shape == (0, 8)


def test_default_text_len_is_256(tok: BPETokenizer) -> None:
    assert tok.encode("a red circle").shape == (1, 256)


def test_batch_equals_one_by_one(tok: BPETokenizer, captions: list[str]) -> None:
    batch = tok.encode(captions, text_len=80)
    for i in range(0, len(captions), 37):
        assert torch.equal(batch[i], tok.encode(captions[i], text_len=80)[0])
    lengths = (batch != tok.pad_id).sum(1).tolist()
    assert lengths == [len(r) for r in tok.encode_ids(captions)]


def test_empty_caption_is_all_pads(tok: BPETokenizer) -> None:
    for caption in ["", "   ", "\n\t"]:
        out = tok.encode(caption, text_len=8)
        assert out.shape == (1, 8) and (out == tok.pad_id).all()


def test_normalisation_is_applied_when_encoding(tok: BPETokenizer) -> None:
    assert torch.equal(tok.encode("  A RED\tCircle "), tok.encode("a red circle"))


def test_truncation_warns_and_keeps_the_start(tok: BPETokenizer) -> None:
    caption = "a red circle above a blue square next to a green star below a pink heart"
    full = tok.encode_ids(caption)[0]
    assert len(full) > 5
    with pytest.warns(TruncationWarning, match="text_len=5"):
        out = tok.encode(["a red circle", caption], text_len=5)
    assert out[1].tolist() == full[:5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(caption, text_len=len(full))  # exactly fits: no warning
    with pytest.raises(TokenizerError, match="caption 1 of the batch has .* text_len=5"):
        tok.encode(["a red circle", caption], text_len=5, truncate=False)


@pytest.mark.parametrize("bad_len", [0, -3])
def test_bad_text_len(tok: BPETokenizer, bad_len: int) -> None:
    with pytest.raises(TokenizerError, match="text_len"):
        tok.encode("a red circle", text_len=bad_len)
    with pytest.raises(TypeError, match="text_len"):
        tok.encode("a red circle", text_len=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, 3, b"a red circle", ["ok"]])
def test_non_str_caption_names_its_position(tok: BPETokenizer, bad: object) -> None:
    with pytest.raises(TypeError, match="position 2"):
        tok.encode(["a red circle", "a blue square", bad, "fine"])  # type: ignore[list-item]


@pytest.mark.parametrize("bad", [None, 3, b"a red circle"])
def test_non_str_input_raises_type_error(tok: BPETokenizer, bad: object) -> None:
    with pytest.raises(TypeError):
        tok.encode(bad)  # type: ignore[arg-type]


def test_unknown_characters_map_to_unk(tok: BPETokenizer) -> None:
    ids = tok.encode_ids("a red ☃☃ circle")[0]
    assert ids.count(tok.unk_id) == 1  # one unk per run of unknown characters inside a word
    assert tok.decode(ids) == "a red <UNK> circle"
    mixed = tok.encode_ids("re☃d")[0]
    assert mixed.count(tok.unk_id) == 1 and len(mixed) >= 3


# ------------------------------------------------------------------------------------------ decode
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ALPHABET + "  \t\nABC", max_size=80))
def test_round_trip_property(tok: BPETokenizer, text: str) -> None:
    ids = tok.encode(text, text_len=256)
    assert tok.unk_id not in ids
    assert tok.decode(ids[0]) == normalize(text)
    assert tok.decode(tok.encode(text, text_len=256, dropout=0.3)[0]) == normalize(text)


def test_decode_forms(tok: BPETokenizer) -> None:
    batch = tok.encode(["a red circle", "a blue star", ""], text_len=12)
    assert tok.decode(batch) == ["a red circle", "a blue star", ""]
    assert tok.decode(batch[0]) == "a red circle"
    assert tok.decode(batch[0].numpy()) == "a red circle"
    assert tok.decode(batch[0].tolist()) == "a red circle"
    assert tok.decode(batch.tolist()) == ["a red circle", "a blue star", ""]
    assert tok.decode(torch.zeros(0, 5, dtype=torch.long)) == []
    ids = tok.encode_ids("a red circle")[0]
    spiced = [tok.bos_id] + ids[:2] + [tok.pad_id, tok.eos_id] + ids[2:] + [tok.pad_id]
    assert tok.decode(spiced) == "a red circle"  # pads and bos/eos are skipped wherever they are


def test_decode_rejects_bad_ids(tok: BPETokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="sequence 1"):
        tok.decode([[5], [-1]])
    with pytest.raises(TypeError):
        tok.decode(torch.zeros(3))
    with pytest.raises(TypeError):
        tok.decode("a red circle")
    with pytest.raises(TokenizerError, match="shape"):
        tok.decode(torch.zeros(1, 2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- determinism, dropout
def test_encoding_is_deterministic(tok: BPETokenizer, captions: list[str]) -> None:
    first = tok.encode(captions, text_len=80)
    for _ in range(3):
        assert torch.equal(tok.encode(captions, text_len=80), first)
        assert torch.equal(tok.encode(captions, text_len=80, dropout=0.0), first)


def test_training_is_deterministic(captions: list[str], tok: BPETokenizer) -> None:
    assert BPETokenizer.train(captions, vocab_size=120).to_bytes() == tok.to_bytes()
    assert BPETokenizer.train(captions[::-1], vocab_size=120) == tok  # caption order does not matter


def test_youtokentome_trainer(captions: list[str]) -> None:
    fast = BPETokenizer.train(captions, vocab_size=120, deterministic=False)
    assert fast.vocab_size == 120 and (fast.pad_id, fast.unk_id) == (0, 1)
    assert fast.decode(fast.encode(captions[:20])) == [normalize(c) for c in captions[:20]]
    with pytest.raises(TokenizerError, match=r"vocab_size >= "):
        BPETokenizer.train(captions, vocab_size=10, deterministic=False)
    with pytest.warns(UserWarning, match="supports only"):
        BPETokenizer.train(captions[:20], vocab_size=5000, deterministic=False)


def test_coverage_drops_rare_characters() -> None:
    caps = ["a red circle"] * 200 + ["a red circle @"]
    full = BPETokenizer.train(caps, vocab_size=16)
    assert full.unk_id not in full.encode_ids("@")[0]
    covered = BPETokenizer.train(caps, vocab_size=16, coverage=0.999)
    assert covered.encode_ids("a @")[0][-1] == covered.unk_id
    with pytest.raises(TokenizerError, match="coverage"):
        BPETokenizer.train(caps, vocab_size=30, coverage=0.0)


def test_dropout_changes_segmentation_only_when_asked(tok: BPETokenizer, captions: list[str]) -> None:
    plain = tok.encode(captions[:50], text_len=64)
    drawn = [tok.encode(captions[:50], text_len=64, dropout=0.5) for _ in range(3)]
    assert any(not torch.equal(d, plain) for d in drawn)
    assert any(not torch.equal(drawn[0], d) for d in drawn[1:])  # fresh draws on each call
    # dropout splits merges, never invents text
    assert tok.decode(drawn[0]) == tok.decode(plain)
    # and it never leaks into later plain calls
    assert torch.equal(tok.encode(captions[:50], text_len=64), plain)
    chars = tok.encode_ids("a red circle", dropout=1.0)[0]  # every merge dropped: one id per character
    assert [tok.id_to_token(i) for i in chars] == [
        "▁",
        "a",
        "▁",
        "r",
        "e",
        "d",
        "▁",
        "c",
        "i",
        "r",
        "c",
        "l",
        "e",
    ]
    with pytest.raises(TokenizerError, match="dropout"):
        tok.encode("a red circle", dropout=1.5)


# ---------------------------------------------------------------------------------------- training
def test_train_from_path_equals_train_from_list(
    tmp_path: Path, captions: list[str], tok: BPETokenizer
) -> None:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    assert BPETokenizer.train(path, vocab_size=120) == tok
    assert BPETokenizer.train(str(path), vocab_size=120) == tok
    assert BPETokenizer.train(iter(captions), vocab_size=120) == tok  # any iterable, even one-shot


def test_train_vocab_too_small(captions: list[str]) -> None:
    with pytest.raises(TokenizerError, match=r"vocab_size=10 is too small.*vocab_size >= "):
        BPETokenizer.train(captions, vocab_size=10)


def test_train_vocab_larger_than_the_data_supports(captions: list[str]) -> None:
    with pytest.warns(UserWarning, match="supports only"):
        small = BPETokenizer.train(captions[:20], vocab_size=5000)
    assert 30 < small.vocab_size < 5000
    assert small.decode(small.encode("a red circle")[0]) == "a red circle"
    with pytest.raises(TokenizerError, match=r"pass vocab_size=(\d+) \(--vocab-size \1\) or less"):
        BPETokenizer.train(captions[:20], vocab_size=5000, strict=True)


def test_small_vocabulary_model_like_the_bundled_one() -> None:
    caps = sorted(set(make_captions(600, seed=3)))
    assert len(caps) > 300
    small = BPETokenizer.train(caps, vocab_size=150)
    assert small.vocab_size == 150
    out = small.encode(caps, text_len=64)
    assert (out < 150).all() and small.decode(out) == [normalize(c) for c in caps]


@pytest.mark.parametrize("texts", [[], ["", "   "]])
def test_train_without_text(texts: list[str]) -> None:
    with pytest.raises(TokenizerError, match="no training text"):
        BPETokenizer.train(texts, vocab_size=50)


def test_train_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="position 1"):
        BPETokenizer.train(["a red circle", None], vocab_size=50)  # type: ignore[list-item]
    with pytest.raises(TokenizerError, match="not found"):
        BPETokenizer.train(tmp_path / "nope.txt", vocab_size=50)
    with pytest.raises(TokenizerError, match="directory"):
        BPETokenizer.train(tmp_path, vocab_size=50)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(TokenizerError, match="UTF-8"):
        BPETokenizer.train(bad, vocab_size=50)
    with pytest.raises(TokenizerError, match="vocab_size"):
        BPETokenizer.train(["a b"], vocab_size=0)
    with pytest.raises(TypeError):
        BPETokenizer.train(42, vocab_size=50)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- save and load
def test_save_load_round_trip(tok: BPETokenizer, captions: list[str], tmp_path: Path) -> None:
    path = tok.save(tmp_path / "sub" / "tok.model")  # parents are created
    assert path.read_bytes() == tok.to_bytes()
    loaded = BPETokenizer.load(path)
    assert loaded == tok and loaded.vocab_size == tok.vocab_size
    assert torch.equal(loaded.encode(captions, text_len=80), tok.encode(captions, text_len=80))
    assert loaded.vocab() == tok.vocab()
    assert not [p for p in path.parent.iterdir() if p.name != "tok.model"]  # no temporary left behind


def test_thread_counts(tok: BPETokenizer, captions: list[str]) -> None:
    expected = tok.encode(captions)
    for n in (1, 2):
        assert torch.equal(BPETokenizer.from_bytes(tok.to_bytes(), n_threads=n).encode(captions), expected)
    for bad in (0, -2):
        with pytest.raises(TokenizerError, match="n_threads"):
            BPETokenizer.from_bytes(tok.to_bytes(), n_threads=bad)


def test_pickle_and_bytes_round_trip(tok: BPETokenizer, captions: list[str]) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok and torch.equal(clone.encode(captions), tok.encode(captions))
    assert BPETokenizer.from_bytes(tok.to_bytes()) == tok


def test_load_plain_youtokentome_model(tmp_path: Path, captions: list[str]) -> None:
    import youtokentome as yttm

    data = tmp_path / "data.txt"
    data.write_text("\n".join(normalize(c) for c in captions), encoding="utf-8")
    yttm.BPE.train(data=str(data), model=str(tmp_path / "y.model"), vocab_size=100, n_threads=1)
    loaded = BPETokenizer.load(tmp_path / "y.model")
    expected = yttm.BPE(str(tmp_path / "y.model")).encode(["a red circle"])[0]
    assert loaded.encode_ids("a red circle")[0] == expected


def test_load_missing_or_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        BPETokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="directory"):
        BPETokenizer.load(tmp_path)


def _corruptions(good: bytes) -> dict[str, bytes]:
    lines = good.decode().splitlines()
    n_chars = int(lines[0].split()[0])
    char_line = 1  # first "codepoint id" line
    rule_line = 1 + n_chars

    def with_line(i: int, text: str) -> bytes:
        new = list(lines)
        new[i] = text
        return ("\n".join(new) + "\n").encode()

    return {
        "empty": b"",
        "whitespace": b" \n\n",
        "text": b"garbage\nmore garbage\n",
        "random": bytes(random.Random(0).randrange(256) for _ in range(200)),
        "pickle": pickle.dumps({"a": 1}),
        "zip": b"PK\x03\x04" + b"\x00" * 60,
        "truncated": ("\n".join(lines[:20]) + "\n").encode(),
        "extra": good + b"7 7 7\n",
        "header only": b"5 3\n",
        "huge header": b"999999999 99999999\n",
        "negative header": b"-1 0\n1 0 2 3\n",
        "float": good.replace(b"\n", b".0\n", 1),
        "pad not 0": ("\n".join(lines[:-1] + ["0 1 2 3"]) + "\n").encode(),
        "duplicate specials": ("\n".join(lines[:-1] + ["1 0 1 3"]) + "\n").encode(),
        "char id out of range": with_line(char_line, f"{lines[char_line].split()[0]} 99999"),
        "char id reused": with_line(char_line, f"{lines[char_line].split()[0]} 0"),
        "bad codepoint": with_line(char_line, f"1114112 {lines[char_line].split()[1]}"),
        "surrogate codepoint": with_line(char_line, f"55296 {lines[char_line].split()[1]}"),
        "rule uses undefined id": with_line(rule_line, "4 99999 " + lines[rule_line].split()[2]),
        "rule id out of range": with_line(rule_line, " ".join(lines[rule_line].split()[:2]) + " 999999"),
        "no word marker": good.replace(b"9601 ", b"9602 ", 1),
    }


def test_corrupt_model_files_raise(tok: BPETokenizer, tmp_path: Path) -> None:
    for name, data in _corruptions(tok.to_bytes()).items():
        path = tmp_path / "bad.model"
        path.write_bytes(data)
        with pytest.raises(TokenizerError, match="not a valid youtokentome BPE model") as info:
            BPETokenizer.load(path)
        assert str(path) in str(info.value), name
        with pytest.raises(TokenizerError):
            BPETokenizer.from_bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_models_never_crash(tok: BPETokenizer, data: st.DataObject) -> None:
    """Random edits to a valid model either load into a working tokenizer or raise TokenizerError.

    youtokentome itself aborts the process on many of these, so reaching the end of this test is the point.
    """
    fields = tok.to_bytes().split()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(fields) - 1))
        action = data.draw(st.sampled_from(["set", "delete", "insert"]))
        value = str(data.draw(st.integers(-2, 140))).encode()
        if action == "set":
            fields[i] = value
        elif action == "delete":
            del fields[i]
        else:
            fields.insert(i, value)
    try:
        loaded = BPETokenizer.from_bytes(b"\n".join(fields) + b"\n")
    except TokenizerError:
        return
    out = loaded.encode(["a red circle", "the quick brown fox"], text_len=32)
    assert ((out >= 0) & (out < loaded.vocab_size)).all()
    loaded.decode(out)


# -------------------------------------------------------------------------------------------- CLI
def test_cli_train_encode_decode(
    tmp_path: Path, captions: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from dalle.cli import main

    data = tmp_path / "captions.txt"
    data.write_text("\n".join(captions) + "\n", encoding="utf-8")
    model = tmp_path / "tokenizer.model"
    assert (
        main(["tokenizer", "train", "--input", str(data), "--vocab-size", "120", "--output", str(model)]) == 0
    )
    assert "120" in capsys.readouterr().out
    tok = BPETokenizer.load(model)
    assert tok == BPETokenizer.train(captions, vocab_size=120)

    assert main(["tokenizer", "encode", "--model", str(model), "a red circle", "a blue star"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [list(map(int, line.split())) for line in lines] == tok.encode_ids(["a red circle", "a blue star"])

    assert (
        main(["tokenizer", "encode", "--model", str(model), "--padded", "--text-len", "8", "a red circle"])
        == 0
    )
    assert (
        list(map(int, capsys.readouterr().out.split())) == tok.encode("a red circle", text_len=8)[0].tolist()
    )

    assert main(["tokenizer", "encode", "--model", str(model), "--pieces", "a red circle"]) == 0
    assert capsys.readouterr().out.split() == tok.tokenize("a red circle")  # all known: same pieces

    ids = [str(i) for i in tok.encode_ids("a red circle")[0]]
    assert main(["tokenizer", "decode", "--model", str(model), *ids]) == 0
    assert capsys.readouterr().out.strip() == "a red circle"


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dalle.cli import main

    assert main(["tokenizer", "encode", "--model", str(tmp_path / "missing.model"), "a red circle"]) == 1
    assert "not found" in capsys.readouterr().err
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "none.txt"),
                "--vocab-size",
                "50",
                "--output",
                str(tmp_path / "t.model"),
            ]
        )
        == 1
    )
    assert "not found" in capsys.readouterr().err


def test_cli_as_a_process(tmp_path: Path, tok: BPETokenizer) -> None:
    model = tok.save(tmp_path / "tokenizer.model")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "dalle", "tokenizer", "encode", "--model", str(model), "A red circle"],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert list(map(int, proc.stdout.split())) == tok.encode_ids("a red circle")[0]


def test_only_letters_merge_as_in_the_paper():
    caps = ["the cat's 42 toys, cats! caf\u00e9 2024", "cats and dogs 42", "it's 3.5 km"] * 50
    with pytest.warns(UserWarning, match="supports only"):
        tok = BPETokenizer.train(caps, vocab_size=200)
    for piece in tok.vocab()[4:]:
        word = piece.removeprefix("\u2581")
        assert len(word) <= 1 or word.isascii() and word.isalpha(), (
            piece
        )  # digits, punctuation, é stay single
    ids = tok.encode(["the cat's 42 toys"], text_len=16)[0].tolist()
    assert [tok.vocab()[i] for i in ids if i] == [
        "\u2581the",
        "\u2581cat",
        "'",
        "s",
        "\u2581",
        "4",
        "2",
        "\u2581toys",
    ]
    assert tok.decode(ids) == "the cat's 42 toys"
    with pytest.warns(UserWarning, match="supports only"):
        merged = BPETokenizer.train(caps, vocab_size=200, split_non_letters=False)
    assert "\u258142" in merged.vocab() and "\u258142" not in tok.vocab()

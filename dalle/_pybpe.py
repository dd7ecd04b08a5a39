"""A pure-Python reader of youtokentome BPE models, used where youtokentome is not installed.

It implements the part of ``youtokentome.BPE`` that :class:`dalle.tokenizer.BPETokenizer` uses (``encode`` to
ids or pieces, with optional BPE dropout, ``decode``, ``vocab``, ``id_to_subword``, ``subword_to_id``) and
gives the same ids as youtokentome (the tests compare the two on generated text wherever youtokentome is
present):

* a sentence is split on spaces; each word becomes "▁" followed by its characters;
* characters missing from the model are unknown; each maximal run of them is one ``unk`` piece that never
  merges;
* merges apply inside a word, the earliest-learned rule first (rules are numbered in the order they were
  learned, so a rule's merged id is its rank), and among equal rules the leftmost pair first;
* with dropout ``p`` (BPE-dropout, as youtokentome does it): each candidate merge, taken in the order above,
  is skipped with probability ``p``; skipped candidates return after the next merge that is made, and the word
  is finished when every remaining candidate has been skipped in a row.

The model file has been validated (:func:`dalle.tokenizer._validate_model`) before it reaches this class.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from typing import Any

WORD_MARK = "\u2581"
_SPECIAL_NAMES = ("<UNK>", "<PAD>", "<BOS>", "<EOS>")  # in the file's order: unk pad bos eos
_CACHE_WORDS = 100_000  # distinct words remembered before the cache starts over


class OutputType:
    """Stand-in for ``youtokentome.OutputType``."""

    ID = "id"
    SUBWORD = "subword"


class PyBPE:
    """youtokentome-compatible BPE encoder and decoder in plain Python (slower, no C++ extension needed)."""

    def __init__(self, model: bytes) -> None:
        nums = [int(tok) for tok in model.split()]
        n_chars, n_rules = nums[0], nums[1]
        chars = nums[2 : 2 + 2 * n_chars]
        rules = nums[2 + 2 * n_chars : 2 + 2 * n_chars + 3 * n_rules]
        specials = nums[2 + 2 * n_chars + 3 * n_rules :]
        self.unk_id, self.pad_id, self.bos_id, self.eos_id = specials
        vocab_size = n_chars + n_rules + len(specials)
        pieces: list[str] = [""] * vocab_size
        self.char_id: dict[str, int] = {}
        for cp, tid in zip(chars[0::2], chars[1::2]):
            self.char_id[chr(cp)] = tid
            pieces[tid] = chr(cp)
        self.merge: dict[tuple[int, int], int] = {}
        for left, right, merged in zip(rules[0::3], rules[1::3], rules[2::3]):
            self.merge[(left, right)] = merged
            pieces[merged] = pieces[left] + pieces[right]
        for name, tid in zip(_SPECIAL_NAMES, specials):
            pieces[tid] = name
        self.pieces = pieces
        self.piece_id = {p: i for i, p in enumerate(pieces)}
        self._cache: dict[str, list[tuple[int, str]]] = {}  # word -> pieces without dropout (captions repeat)

    # --------------------------------------------------------------------------------------- youtokentome API
    def vocab(self) -> list[str]:
        return list(self.pieces)

    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_subword(self, token_id: int) -> str:
        return self.pieces[token_id]

    def subword_to_id(self, piece: str) -> int:
        return self.piece_id.get(piece, self.unk_id)

    def encode(
        self,
        sentences: Sequence[str],
        output_type: Any = OutputType.ID,
        dropout_prob: float = 0.0,
        rng: random.Random | None = None,
    ) -> list[list[int]] | list[list[str]]:
        """Ids (or pieces, unknown runs shown as their text) of each sentence."""
        rng = rng or random.Random()
        want_ids = output_type == OutputType.ID or getattr(output_type, "name", None) == "ID"
        out: list[Any] = []
        for sentence in sentences:
            ids: list[int] = []
            texts: list[str] = []
            for word in sentence.split(" "):
                if word:
                    if dropout_prob > 0.0:
                        pieces = self._encode_word(word, dropout_prob, rng)
                    else:
                        cached = self._cache.get(word)
                        if cached is None:
                            if len(self._cache) >= _CACHE_WORDS:
                                self._cache.clear()
                            cached = self._cache[word] = self._encode_word(word, 0.0, rng)
                        pieces = cached
                    for tid, text in pieces:
                        ids.append(tid)
                        texts.append(text)
            out.append(ids if want_ids else texts)
        return out

    def decode(self, rows: Sequence[Sequence[int]], ignore_ids: Sequence[int] = ()) -> list[str]:
        skip = set(ignore_ids)
        texts = []
        for row in rows:
            text = "".join(self.pieces[i] for i in row if i not in skip).replace(WORD_MARK, " ")
            texts.append(text[1:] if text.startswith(" ") else text)
        return texts

    # ---------------------------------------------------------------------------------------------- internals
    def _encode_word(self, word: str, dropout: float, rng: random.Random) -> list[tuple[int, str]]:
        # symbols: [id, text]; an unknown run is one symbol that takes part in no merge
        symbols: list[list[Any]] = [[self.char_id[WORD_MARK], WORD_MARK]]
        for ch in word:
            tid = self.char_id.get(ch)
            if tid is None:
                if symbols[-1][0] == self.unk_id:
                    symbols[-1][1] += ch
                else:
                    symbols.append([self.unk_id, ch])
            else:
                symbols.append([tid, ch])
        n = len(symbols)
        if n == 1:
            return [(s[0], s[1]) for s in symbols]
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[int, int, int, int]] = []  # (rank = merged id, position, left id, right id)

        def push(i: int) -> None:
            j = nxt[i]
            if j < n:
                merged = self.merge.get((symbols[i][0], symbols[j][0]))
                if merged is not None:
                    heapq.heappush(heap, (merged, i, symbols[i][0], symbols[j][0]))

        for i in range(n - 1):
            push(i)
        skipped: list[tuple[int, int, int, int]] = []
        while heap:
            event = heapq.heappop(heap)
            if dropout > 0.0:
                if rng.random() < dropout:
                    skipped.append(event)  # dropped for now; back in the queue after the next merge
                    continue
                for e in skipped:
                    heapq.heappush(heap, e)
                skipped.clear()
            merged, i, left, right = event
            j = nxt[i] if alive[i] else n
            if j >= n or symbols[i][0] != left or symbols[j][0] != right:
                continue  # stale: one side has merged since
            symbols[i] = [merged, symbols[i][1] + symbols[j][1]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [(symbols[i][0], symbols[i][1]) for i in range(n) if alive[i]]


__all__ = ["OutputType", "PyBPE"]

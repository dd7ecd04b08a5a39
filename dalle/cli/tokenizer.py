"""``dalle tokenizer``: train a BPE tokenizer on a caption file; encode and decode with one.

dalle tokenizer train --input captions.txt --vocab-size 16384 --output tokenizer.model
dalle tokenizer encode --model tokenizer.model "a red circle" ["another caption" ...]
dalle tokenizer decode --model tokenizer.model 25 50 4 17
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

ORDER = 60


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` command and its ``train`` / ``encode`` / ``decode`` actions."""
    p = sub.add_parser(
        "tokenizer", help="train a BPE caption tokenizer, or encode / decode captions with one"
    )
    actions = p.add_subparsers(dest="tokenizer_action", metavar="ACTION")
    actions.required = True

    t = actions.add_parser("train", help="learn a BPE vocabulary from a caption file (one caption a line)")
    t.add_argument("--input", required=True, help="UTF-8 text file, one caption a line ('-' reads stdin)")
    t.add_argument("--vocab-size", type=int, default=16384, help="ids in the vocabulary, 4 specials included")
    t.add_argument("--output", required=True, help="where to write the model file")
    t.add_argument("--coverage", type=float, default=1.0, help="fraction of characters to keep (default 1)")
    t.add_argument(
        "--strict",
        action="store_true",
        help="fail, instead of warning, when the text supports fewer tokens than --vocab-size",
    )
    t.add_argument(
        "--fast",
        action="store_true",
        help="use youtokentome's multi-threaded trainer: faster on large corpora, not reproducible",
    )
    t.add_argument("--verbose", action="store_true", help="show youtokentome's training log (with --fast)")
    t.add_argument(
        "--merge-non-letters",
        action="store_true",
        help="let digits and punctuation merge too (by default only the letters a-z merge, as in the "
        "paper; --fast always merges everything)",
    )
    t.set_defaults(func=run)

    e = actions.add_parser("encode", help="print the token ids of captions (one line each)")
    e.add_argument("--model", required=True, help="tokenizer model file")
    e.add_argument("captions", nargs="+", metavar="CAPTION", help="captions to encode (quote each one)")
    e.add_argument("--text-len", type=int, default=256, help="text positions (default 256; used by --padded)")
    e.add_argument("--padded", action="store_true", help="print all --text-len ids, pads included")
    e.add_argument(
        "--pieces", action="store_true", help="print subword pieces instead of ids (unknown runs as <UNK>)"
    )
    e.add_argument("--dropout", type=float, default=0.0, help="BPE dropout probability (default 0)")
    e.add_argument("--json", action="store_true", help="print one JSON object a caption")
    e.set_defaults(func=run)

    d = actions.add_parser("decode", help="turn token ids back into text")
    d.add_argument("--model", required=True, help="tokenizer model file")
    d.add_argument("ids", nargs="+", type=int, metavar="ID", help="token ids to decode")
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action; returns the exit code."""
    return {"train": _train, "encode": _encode, "decode": _decode}[args.tokenizer_action](args)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from dalle.tokenizer import BPETokenizer

    source = sys.stdin if args.input == "-" else args.input
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = BPETokenizer.train(
            source,
            vocab_size=args.vocab_size,
            coverage=args.coverage,
            strict=args.strict,
            deterministic=not args.fast,
            verbose=args.verbose,
            split_non_letters=not args.merge_non_letters,
        )
    _print_warnings(caught)
    path = tok.save(args.output)
    print(f"wrote {path}: vocab_size={tok.vocab_size} (pad 0, unk 1, bos 2, eos 3)")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from dalle.tokenizer import BPETokenizer, normalize

    tok = BPETokenizer.load(args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.padded:
            rows = tok.encode(args.captions, text_len=args.text_len, dropout=args.dropout).tolist()
        else:
            rows = tok.encode_ids(args.captions, dropout=args.dropout)
    _print_warnings(caught)
    for caption, ids in zip(args.captions, rows):
        pieces = [tok.id_to_token(i) for i in ids]
        if args.json:
            record = {"caption": caption, "normalized": normalize(caption), "ids": ids, "pieces": pieces}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(" ".join(pieces if args.pieces else map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from dalle.tokenizer import BPETokenizer

    print(BPETokenizer.load(args.model).decode(args.ids))
    return 0

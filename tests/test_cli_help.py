"""Every flag of every command documents itself (issue 22): what it does; the thread count's caveat."""

from __future__ import annotations

import argparse

from dalle.cli import build_parser


def _subparsers(
    parser: argparse.ArgumentParser, prefix: str = "dalle"
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subparsers(sub, f"{prefix} {name}")
    return found


def test_every_flag_has_help() -> None:
    missing = []
    for name, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_threads_help_says_what_a_busy_machine_needs() -> None:
    for name, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if "--threads" in action.option_strings:
                assert "busy" in action.help and "idle cores" in action.help, name


def test_temperature_zero_is_accepted_and_negative_refused() -> None:
    """`--temperature 0` (greedy decoding) parses; a negative temperature is a usage error (exit 2)."""
    import pytest

    from dalle.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "a red circle", "--temperature", "0"]).temperature == 0.0
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["generate", "a red circle", "--temperature", "-0.5"])
    assert exc.value.code == 2

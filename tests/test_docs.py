"""A build check for the Markdown documentation (README.md, BENCHMARKS.md, docs/*.md, recipes/*/README.md).

Fast and offline: relative links and images point at existing files (and ``#anchors`` at existing headings),
every document under docs/ and recipes/ is reachable from the README, ```python blocks compile and their
``dalle`` imports resolve, shell blocks name only existing ``dalle`` subcommands and flags (checked against
the argparse parser of :mod:`dalle.cli`, no subprocess) and existing ``make`` targets, and the README stays
short with an image on its first screen.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_BYTES = 12288
README_IMAGE_WITHIN_LINES = 40


def doc_files() -> list[Path]:
    files = [README, ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "recipes").glob("*/README.md"))
    return [f for f in files if f.is_file()]


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


# ------------------------------------------------------------------------------------------------ parsing
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    file: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str


def split_markdown(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """(prose lines as (line number, text), fenced blocks as (first code line number, info word, code))."""
    prose: list[tuple[int, str]] = []
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]
        ):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence (or the end of the file)
        blocks.append((start + 1, info.split()[0].lower() if info else "", "\n".join(body)))
    return prose, blocks


@cache
def parsed(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    return split_markdown(path.read_text(encoding="utf-8"))


def code_blocks(*langs: str) -> list[Block]:
    return [
        Block(f, line, lang, code) for f in doc_files() for line, lang, code in parsed(f)[1] if lang in langs
    ]


INLINE_CODE = re.compile(r"(`+).*?\1")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_SRC = re.compile(r"""<(?:img|a)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link, image and HTML src/href outside code."""
    found = []
    for number, line in parsed(path)[0]:
        text = INLINE_CODE.sub("", line)
        for pattern in (INLINE_LINK, HTML_SRC):
            found += [(number, m.group(1)) for m in pattern.finditer(text)]
        m = REF_DEF.match(text)
        if m:
            found.append((number, m.group(1)))
    return found


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup removed, lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFC", text).strip().lower()
    text = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in parsed(path)[0]:
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f"{base}-{n}")
    result |= {
        m.group(1)
        for _, line in parsed(path)[0]
        for m in re.finditer(r"""<a\s+(?:name|id)=["']([^"']+)""", line)
    }
    return frozenset(result)


def link_problem(source: Path, target: str) -> str | None:
    """Why a relative link from ``source`` is broken, or None."""
    path_part, _, anchor = target.partition("#")
    dest = source if not path_part else (source.parent / path_part.split("?")[0]).resolve()
    if not dest.exists():
        return "no such file"
    if path_part and not dest.is_relative_to(ROOT):
        return "outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"#{anchor}: no such heading in {rel(dest)}"
    return None


# ------------------------------------------------------------------------------------------------ links
def test_the_documents_exist() -> None:
    names = {rel(f) for f in doc_files()}
    for name in (
        "README.md",
        "BENCHMARKS.md",
        "docs/api.md",
        "docs/cli.md",
        "docs/training.md",
        "docs/openai-dvae.md",
        "docs/models.md",
        "docs/gpu.md",
        "recipes/shapes/README.md",
    ):
        assert name in names


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_relative_links_resolve(doc: Path) -> None:
    problems = [
        f"{rel(doc)}:{line}: {target}: {why}"
        for line, target in links(doc)
        if not is_external(target)
        if (why := link_problem(doc, target)) is not None
    ]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_document_is_reachable_from_the_readme() -> None:
    reached, todo = {README}, [README]
    while todo:
        doc = todo.pop()
        for _, target in links(doc):
            path_part = target.partition("#")[0]
            if is_external(target) or not path_part:
                continue
            dest = (doc.parent / path_part).resolve()
            if dest.suffix == ".md" and dest.is_file() and dest not in reached:
                reached.add(dest)
                todo.append(dest)
    missing = [rel(f) for f in doc_files() if f not in reached]
    assert not missing, f"not linked from README.md (directly or through another document): {missing}"


def test_the_link_checker_catches_broken_links(tmp_path: Path) -> None:
    """The checks above would fail on a missing file, a missing heading, or a link hidden in HTML."""
    doc = ROOT / "docs" / "api.md"
    assert link_problem(doc, "cli.md") is None
    assert link_problem(doc, "cli.md#generate") is None
    assert link_problem(doc, "no-such-page.md") is not None
    assert link_problem(doc, "cli.md#no-such-heading") is not None
    assert link_problem(doc, "../../outside.md") is not None
    page = tmp_path / "page.md"
    page.write_text(
        "# A `code` heading: *yes*\n[x](#a-code-heading-yes) ![i](gone.png)\n"
        '```\n[not a link](nowhere.md)\n```\n<img src="also-gone.png">\n',
        encoding="utf-8",
    )
    targets = [t for _, t in links(page)]
    assert targets == ["#a-code-heading-yes", "gone.png", "also-gone.png"]
    assert [t for t in targets if link_problem(page, t)] == ["gone.png", "also-gone.png"]


# ------------------------------------------------------------------------------------------------ README
def test_readme_is_short() -> None:
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes; keep it under {README_MAX_BYTES} (details go to docs/)"
    )


def test_readme_shows_an_image_on_its_first_screen() -> None:
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:README_IMAGE_WITHIN_LINES])
    images = [m.group(1) for m in re.finditer(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", head)]
    images += HTML_SRC.findall(head)
    local = [
        i
        for i in images
        if not is_external(i) and Path(i).suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".webp", ".svg"}
    ]
    assert local, f"no image in the first {README_IMAGE_WITHIN_LINES} lines of README.md"
    assert all((ROOT / i).is_file() for i in local), local


def test_readme_quick_start_is_make_demo_and_make_test() -> None:
    prose, blocks = parsed(README)
    heading = next(n for n, line in prose if re.match(r"^##\s+Quick start", line))
    first = next(code for line, _, code in blocks if line > heading)
    assert first.split() == ["make", "demo", "make", "test"]


# ------------------------------------------------------------------------------------------------ Python
PYTHON_BLOCKS = code_blocks("python", "py", "pycon")


def block_id(block: Block) -> str:
    return f"{rel(block.file)}:{block.line}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=block_id)
def test_python_block_compiles_and_its_dalle_imports_resolve(block: Block) -> None:
    code = "\n".join(
        line[4:] if line.startswith((">>> ", "... ")) else line for line in block.code.splitlines()
    )
    tree = compile(code, block_id(block), "exec", flags=ast.PyCF_ONLY_AST)
    compile(tree, block_id(block), "exec")
    problems = []
    modules = {}  # local name -> module object, for `dalle.NAME` attribute uses
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dalle" or alias.name.startswith("dalle."):
                    try:
                        module = importlib.import_module(alias.name)
                    except ImportError as exc:
                        problems.append(f"import {alias.name}: {exc}")
                        continue
                    if alias.asname:
                        modules[alias.asname] = module
                    else:
                        modules["dalle"] = importlib.import_module("dalle")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "dalle" and not node.module.startswith("dalle."):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError as exc:
                problems.append(f"from {node.module}: {exc}")
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        problems.append(f"from {node.module} import {alias.name}: no such name")
    for node in ast.walk(tree):  # dalle.generate(...), dalle.images.preprocess(...)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if not hasattr(modules[node.value.id], node.attr):
                try:
                    importlib.import_module(f"{modules[node.value.id].__name__}.{node.attr}")
                except ImportError:
                    problems.append(f"{node.value.id}.{node.attr}: no such name")
    assert not problems, f"{block_id(block)}: " + "; ".join(problems)


def test_python_blocks_exist() -> None:
    assert any(b.file == README for b in PYTHON_BLOCKS), "README.md should show the Python API"


# ------------------------------------------------------------------------------------------------ shell
SHELL_BLOCKS = code_blocks("sh", "bash", "shell", "console", "zsh")


@cache
def cli_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``dalle`` parser and its subcommand parsers by path ("generate", "tokenizer train", ...)."""
    from dalle.cli import build_parser

    root = build_parser()
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    path = f"{prefix} {name}".strip()
                    found[path] = sub
                    walk(sub, path)

    walk(root, "")
    return root, found


def shell_commands(code: str) -> list[list[str]]:
    """Each simple command of a shell block as a token list (continuations joined, prompts and comments
    dropped, split at ``;``, ``&&``, ``||`` and ``|``)."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line)
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError:  # an unbalanced quote: not a command line (output, a heredoc)
            continue
        current: list[str] = []
        for token in tokens:
            if token and set(token) <= set(";&|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def dalle_invocation(tokens: list[str]) -> list[str] | None:
    """The arguments after ``dalle`` in ``dalle ...``, ``python -m dalle ...`` or
    ``torchrun ... -m dalle ...``."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if not tokens:
        return None
    if Path(tokens[0]).name == "dalle":
        return tokens[1:]
    if re.match(r"^(python[0-9.]*|torchrun)$", Path(tokens[0]).name):
        for i, token in enumerate(tokens[:-1]):
            if token == "-m" and tokens[i + 1] == "dalle":
                return tokens[i + 2 :]
    return None


def check_dalle_command(args: list[str]) -> list[str]:
    """Problems with one ``dalle`` command line: unknown subcommand or flag, or (when the line has no
    placeholders) arguments argparse rejects."""
    root, subs = cli_parsers()
    while args and args[0] == "--debug":
        args = args[1:]
    if not args or args[0].startswith("-"):
        return [] if not args or args[0] in ("-h", "--help") else [f"dalle {args[0]}: expected a subcommand"]
    path = args[0]
    if path not in subs:
        return [
            f"dalle {path}: no such subcommand (known: {', '.join(sorted(s for s in subs if ' ' not in s))})"
        ]
    rest = args[1:]
    if rest and f"{path} {rest[0]}" in subs:
        path, rest = f"{path} {rest[0]}", rest[1:]
    parser = subs[path]
    known = set(parser._option_string_actions)
    problems = []
    for token in rest:
        if token == "--":
            break
        if token.startswith("-") and not re.match(r"^-\d", token) and token != "-":
            flag = token.split("=", 1)[0]
            if flag not in known:
                problems.append(f"dalle {path}: unknown flag {flag}")
    if not problems and not any("..." in t or "$" in t for t in args):
        try:
            root.parse_args(args)
        except SystemExit as exc:
            if exc.code:
                problems.append(f"dalle {' '.join(args)}: argparse rejects it")
    return problems


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return frozenset(
        t for m in re.finditer(r"^([A-Za-z0-9_.\- ]+):(?!=)", text, re.MULTILINE) for t in m.group(1).split()
    )


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=block_id)
def test_shell_block_uses_real_subcommands_and_flags(
    block: Block, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = []
    for tokens in shell_commands(block.code):
        args = dalle_invocation(tokens)
        if args is not None:
            problems += check_dalle_command(args)
        elif tokens[0] == "make":
            problems += [
                f"make {t}: no such target"
                for t in tokens[1:]
                if "=" not in t and not t.startswith("-") and t not in make_targets()
            ]
    capsys.readouterr()  # argparse's usage messages
    assert not problems, f"{block_id(block)}:\n" + "\n".join(problems)


def test_the_command_checker_catches_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    assert shell_commands("dalle generate 'a b' \\\n  -n 2  # note\nmake demo && make test") == [
        ["dalle", "generate", "a b", "-n", "2"],
        ["make", "demo"],
        ["make", "test"],
    ]
    assert dalle_invocation(["torchrun", "--nproc_per_node=8", "-m", "dalle", "train", "--fsdp"]) == [
        "train",
        "--fsdp",
    ]
    assert dalle_invocation([".venv/bin/python", "-m", "dalle", "info"]) == ["info"]
    assert dalle_invocation(["python", "-m", "dalle.train.remap", "a"]) is None
    assert check_dalle_command(["generate", "a red circle", "-n", "4", "--seed=0"]) == []
    assert check_dalle_command(["tokenizer", "encode", "--model", "t.model", "a red circle"]) == []
    assert check_dalle_command(["no-such-command"])
    assert check_dalle_command(["generate", "a red circle", "--no-such-flag"])
    assert check_dalle_command(
        ["tokenizer", "encode", "--vocab-size", "3", "x"]
    )  # a flag of `tokenizer train`
    assert check_dalle_command(["generate", "a red circle", "--sampler", "greedy"])  # not a choice
    capsys.readouterr()
    assert {"demo", "test"} <= make_targets()


def test_shell_blocks_exist() -> None:
    assert any(dalle_invocation(t) for b in SHELL_BLOCKS for t in shell_commands(b.code))

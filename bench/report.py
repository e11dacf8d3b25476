"""Every measured table of README.md and docs/*.md, rendered from the result files under
bench/results/ through one renderer.

    .venv/bin/python -m bench.report            # rewrite every table block of README.md and docs/*.md
    .venv/bin/python -m bench.report --check    # exit 1 naming each block that differs, stray table, unknown name
    .venv/bin/python -m bench.report --list     # every table and the page holding it

A measured table sits between ``<!-- table: NAME -->`` and ``<!-- /table -->`` in README.md or in
any docs/*.md (found by glob: a new page needs no registration); ``TABLES[NAME]`` renders it
from its files: the table, then one line naming each file with the command that made it, its
date and the machine's load where the file has them. Prose around a block is written by hand and
quotes the block's numbers. ``check`` also fails on a Markdown table outside every block (a table
nobody can trace to a file), on a block with an unknown name, on a table placed twice and on a
registered table no page places. ``tests/test_readme_tables.py`` runs the check.

The renderers live in ``bench/blocks/``, one module per page (``bench/blocks/results.py`` for
docs/results.md, ``readme.py`` for README.md), all imported here. A new table: in the module of
its page (a new page: a new module there, found by itself), a function that returns the Markdown
with ``@block("my-table")`` above it (``table(...)`` and ``source_line(...)`` do most of it); put
``<!-- table: my-table -->`` and ``<!-- /table -->`` on two lines of the page; run
``python -m bench.report``.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import re
import sys
from pathlib import Path

from bench import blocks
from bench.blocks import TABLES, ReportError, block  # noqa: F401 - the registry, re-exported

BLOCK = re.compile(r"<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


# -- documents ---------------------------------------------------------------------------------
def documents(root: Path | None = None) -> list[Path]:
    """README.md and every docs/*.md (sorted): the pages whose blocks this module renders."""
    root = blocks.ROOT if root is None else root
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def _name(path: Path) -> str:
    try:
        return path.resolve().relative_to(blocks.ROOT.resolve()).as_posix()
    except ValueError:
        return path.name


def render(text: str, where: str = "README.md") -> str:
    """``text`` with every table block re-rendered from its files; ``where`` names the page in errors."""
    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise ReportError(f"{where} block '{name}': unknown table; allowed: {', '.join(sorted(TABLES))}")
        try:
            body = TABLES[name]()
        except (ReportError, KeyError, StopIteration) as exc:
            raise ReportError(f"{where} block '{name}': {exc}") from exc
        return f"<!-- table: {name} -->\n{body}\n<!-- /table -->"
    return BLOCK.sub(one, text)


def stray_tables(text: str) -> list[int]:
    """Line numbers of Markdown tables outside every block (and outside code fences)."""
    inside = [(m.start(), m.end()) for m in BLOCK.finditer(text)]
    out, fence, pos, prev_table = [], False, 0, False
    for number, line in enumerate(text.split("\n"), start=1):
        if line.startswith("```"):
            fence = not fence
        is_table = line.startswith("|") and not fence
        if is_table and not prev_table and not any(a <= pos < b for a, b in inside):
            out.append(number)
        prev_table = is_table
        pos += len(line) + 1
    return out


def check(paths: list[Path] | None = None) -> list[str]:
    """Problems of ``paths`` (default: every document): a block whose text differs from its files,
    a block with an unknown name, a table outside every block, a table placed twice; with the
    default, also a registered table that no document places."""
    problems, placed = [], {}
    for path in documents() if paths is None else paths:
        text, where = path.read_text(), _name(path)
        for m in BLOCK.finditer(text):
            name = m.group("name")
            line = text.count("\n", 0, m.start()) + 1
            if name in placed:
                problems.append(f"{where}:{line}: table '{name}' is placed twice (also {placed[name]}); "
                                "place it once and link to it")
            placed.setdefault(name, f"{where}:{line}")
            if name not in TABLES:
                problems.append(f"{where}:{line}: block '{name}': unknown table; allowed: {', '.join(sorted(TABLES))}")
                continue
            try:
                body = render(m.group(0), where)
            except ReportError as exc:
                problems.append(f"{where}:{line}: {exc}")
                continue
            if body != m.group(0):
                problems.append(f"{where}:{line}: table '{name}' differs from its files (run python -m bench.report)")
        problems += [f"{where}:{n}: a table outside every <!-- table: NAME --> block" for n in stray_tables(text)]
    if paths is None:
        problems += [f"table '{n}' is registered but no page places it (README.md or docs/*.md)"
                     for n in TABLES if n not in placed]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write; exit 1 on any problem")
    parser.add_argument("--list", action="store_true", help="print every table with its page")
    parser.add_argument("pages", nargs="*", type=Path, help="only these pages (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    pages = args.pages or None
    if args.list:
        where = {m.group("name"): _name(p) for p in documents() for m in BLOCK.finditer(p.read_text())}
        print("\n".join(f"{n:24s} {where.get(n, '(no page)')}" for n in TABLES))
        return 0
    if args.check:
        problems = check(pages)
        print("\n".join(problems) or f"{len(pages or documents())} pages: every table matches its files")
        return 1 if problems else 0
    try:
        count = 0
        for path in pages or documents():
            text = path.read_text()
            rendered = render(text, _name(path))
            if rendered != text:
                path.write_text(rendered)
            count += len(BLOCK.findall(rendered))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(pages or documents())} pages: {count} tables rendered")
    return 0


def _import_blocks() -> None:
    """Import every module of bench/blocks/: each registers the tables of its page with ``@block``."""
    for info in pkgutil.iter_modules(blocks.__path__):
        importlib.import_module(f"bench.blocks.{info.name}")


_import_blocks()

if __name__ == "__main__":
    raise SystemExit(main())

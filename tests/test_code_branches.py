"""No branch on a code's name outside lowbit/codes: everyone else asks the Code (lowbit.codes.base).

    .venv/bin/python -m pytest tests/test_code_branches.py -q

The source of every package (lowbit, kernels, launch, pages, bench, app.py; lowbit/codes and the
tests excepted) is parsed and every comparison is checked: one side mentions a code (``code``,
``spec.code``, ``quant.code.name``, ``code_name``, ...), the other names a registered code
(``"int"``, ``'nf'``, ``("nf", "lm")``, ``"fp8e4m3"``, ...), in any spelling (``==``, ``!=``,
``in``, ``not in``, either side first). A lookup table keyed by code names and indexed by a code
is a branch too. The detector is itself tested on each spelling, so the test can fail.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lowbit.codes import CODES

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["lowbit", "kernels", "launch", "pages", "bench", "app.py"]
EXEMPT = REPO / "lowbit" / "codes"
_MENTIONS_CODE = re.compile(r"\bcode\b|\bcode_name\b|\bcode_text\b|\.code\b")


def _code_name(value) -> bool:
    """Is ``value`` a string naming a registered code (``int``, ``nf4``, ``fp8e4m3``, ...)?"""
    if not isinstance(value, str):
        return False
    return any(re.fullmatch(rf"{re.escape(name)}(\d.*)?", value) for name in CODES.names())


def _names_codes(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return _code_name(node.value)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_codes(e) for e in node.elts)
    return False


def _mentions_code(node: ast.AST) -> bool:
    return bool(_MENTIONS_CODE.search(ast.unparse(node)))


def branches_on_code_names(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comparison or keyed lookup in ``source`` that branches on a code's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_codes(o) for o in operands) and any(_mentions_code(o) for o in operands
                                                               if not _names_codes(o)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict):
            if any(k is not None and _names_codes(k) for k in node.value.keys) and _mentions_code(node.slice):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and isinstance(node.func.value, ast.Dict) and node.args and _mentions_code(node.args[0]) \
                and any(k is not None and _names_codes(k) for k in node.func.value.keys):
            found.append((node.lineno, ast.unparse(node)))
    return found


@pytest.mark.parametrize("snippet", [
    'if code == "int":\n    pass',
    "if code != 'nf':\n    pass",
    'ok = quant.code in ("nf", "lm")',
    'ok = spec.code not in ["fp"]',
    'if "lm" == spec.code.name:\n    pass',
    'if quant.code.kind == "fp8e4m3":\n    pass',
    'if code_name == "int4":\n    pass',
    'width = {"int": 1, "nf": 2}[spec.code.name]',
    'width = {"int": 1, "nf": 2}.get(code, 0)',
])
def test_the_detector_finds_every_spelling(snippet):
    assert branches_on_code_names(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "if quant.code.kernel_key is None:\n    pass",
    'if scheme.algo == "two_shot":\n    pass',
    'if code.name in names:\n    pass',
    'if mode == "int":\n    pass',  # not a code: a name that merely looks like one
    'x = f"code {kind!r}"',
])
def test_the_detector_leaves_other_comparisons_alone(snippet):
    assert branches_on_code_names(snippet) == [], snippet


def test_no_source_outside_lowbit_codes_branches_on_a_code_name():
    files = [p for s in SOURCES for p in ((REPO / s).rglob("*.py") if (REPO / s).is_dir() else [REPO / s])]
    assert len(files) > 50 and any(p.name == "quant.py" for p in files)
    hits = [f"{p.relative_to(REPO)}:{line}: {text}" for p in files if EXEMPT not in p.parents
            for line, text in branches_on_code_names(p.read_text())]
    assert hits == [], "ask the Code (lowbit.codes.base) instead:\n" + "\n".join(hits)

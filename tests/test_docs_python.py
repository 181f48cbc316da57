"""Every ```python block in README.md, docs/ and examples/ markdown is valid Python: a user copies
these into a file or a REPL, and signature notation (``f(a, *, b)`` in a call, ``-> result`` after
an expression) is a SyntaxError there. Whether each block runs was checked by hand (session 12: every
block ran, or needs a GPU, a Ray cluster or a listener); this keeps them at least parseable."""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path
from typing import List, Tuple

import pytest

from conftest import SDK_HOME

OPEN = re.compile(r"^(\s*)```python\s*$")
CLOSE = re.compile(r"^\s*```\s*$")


def _blocks() -> List[Tuple[str, str]]:
    """(``file:line``, code) of each fenced python block, indentation of the fence removed."""
    root = Path(SDK_HOME)
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "examples").rglob("*.md"))]
    out: List[Tuple[str, str]] = []
    for md in pages:
        lines = md.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = OPEN.match(lines[i])
            if not m:
                i += 1
                continue
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not CLOSE.match(lines[i]):
                body.append(lines[i])
                i += 1
            out.append((f"{md.relative_to(root)}:{start}", textwrap.dedent("\n".join(body))))
            i += 1
    return out


BLOCKS = _blocks()


def test_the_docs_have_python_blocks() -> None:
    assert len(BLOCKS) >= 10, [b[0] for b in BLOCKS]  # the collector finds them (README's quick start among them)
    assert any(where.startswith("README.md:") for where, _ in BLOCKS)


@pytest.mark.parametrize("where, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_parses(where: str, code: str) -> None:
    try:
        ast.parse(code, filename=where)
    except SyntaxError as exc:
        pytest.fail(f"{where} (+{exc.lineno} lines): {exc.msg}: {exc.text!r}")

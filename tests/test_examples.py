"""Every script in examples/ answers ``--help``: it imports against today's package (no removed
private name, no moved module) and parses its arguments before doing any work.

The docs quote these scripts as the commands behind their numbers, so one that no longer starts is
a broken reproduction recipe. A script skips only where a package it imports is not installed.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import pytest

from conftest import SDK_HOME

EXAMPLES_DIR = SDK_HOME / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")


def _help(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--help"], cwd=SDK_HOME, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def helps() -> Dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((p.name for p in EXAMPLES), pool.map(_help, EXAMPLES)))


def test_there_are_examples() -> None:
    if not EXAMPLES_DIR.is_dir():
        pytest.skip(f"no examples/ beside the package under test ({SDK_HOME}): an installed copy, not a checkout")
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES])
def test_example_answers_help(helps: Dict[str, subprocess.CompletedProcess], name: str) -> None:
    r = helps[name]
    missing = MISSING.search(r.stderr)
    if r.returncode != 0 and missing and importlib.util.find_spec(missing.group(1).split(".")[0]) is None:
        pytest.skip(f"{name} needs {missing.group(1)}, which is not installed")
    assert r.returncode == 0, f"{name} --help exited {r.returncode}:\n{r.stderr[-2000:]}"
    assert "usage:" in r.stdout.lower(), f"{name} --help printed no usage line (did it run instead?):\n{r.stdout[-1000:]}"

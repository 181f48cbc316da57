"""Every script in examples/, and every ``python -m sdk....`` command module of the package, answers
``--help``: it imports against today's package (no removed private name, no moved module) and
parses its arguments before doing any work.

The docs quote these as the commands behind their numbers, so one that no longer starts is a
broken reproduction recipe. One skips only where a package it imports is not installed.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import SDK_HOME

EXAMPLES_DIR = SDK_HOME / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
MISSING = re.compile(r"ModuleNotFoundError: No module named '([\w.]+)'")
MAIN_GUARD = re.compile(r'^if __name__ == "__main__":', re.M)


def _command_modules() -> List[str]:
    """Modules of the installed package with a ``__main__`` guard (``python -m`` commands)."""
    out = set()
    for pkg in ("sdk", "sdk.export", "sdk.kernels", "sdk.calibration"):
        root = Path(importlib.import_module(pkg).__file__).parent
        for f in root.rglob("*.py"):
            if MAIN_GUARD.search(f.read_text(errors="replace")):
                out.add(".".join([pkg, *f.relative_to(root).with_suffix("").parts]))
    return sorted(out)


MODULES = _command_modules()


def _help(argv: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv, "--help"], cwd=SDK_HOME, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def helps() -> Dict[str, subprocess.CompletedProcess]:
    commands = {p.name: [str(p)] for p in EXAMPLES}
    commands.update({m: ["-m", m] for m in MODULES})
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(_help, commands.values())))


def test_there_are_examples() -> None:
    if not EXAMPLES_DIR.is_dir():
        pytest.skip(f"no examples/ beside the package under test ({SDK_HOME}): an installed copy, not a checkout")
    assert len(EXAMPLES) >= 10


def test_there_are_command_modules() -> None:
    assert {"sdk.lungs.evaluate", "sdk.train.classifier", "sdk.bench.gpu_report", "sdk.kernels.build"} <= set(MODULES)


@pytest.mark.parametrize("name", [p.name for p in EXAMPLES] + MODULES)
def test_answers_help(helps: Dict[str, subprocess.CompletedProcess], name: str) -> None:
    r = helps[name]
    missing = MISSING.search(r.stderr)
    if r.returncode != 0 and missing and importlib.util.find_spec(missing.group(1).split(".")[0]) is None:
        pytest.skip(f"{name} needs {missing.group(1)}, which is not installed")
    assert r.returncode == 0, f"{name} --help exited {r.returncode}:\n{r.stderr[-2000:]}"
    assert "usage:" in r.stdout.lower(), f"{name} --help printed no usage line (did it run instead?):\n{r.stdout[-1000:]}"

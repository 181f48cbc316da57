"""Shared fixtures. Real data lives in ../shared/data beside the clone; tests that need it skip,
saying why, when it is absent (a fresh clone must still pass)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

import sdk

# test modules say `from conftest import ...` (and a few import helpers from other test modules):
# under --import-mode=importlib (pytest run from outside the checkout against an installed ctsdk)
# neither works unless this module registers itself and the tests folder is importable
sys.modules.setdefault("conftest", sys.modules[__name__])
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTSDK_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()
# the tests know where the data is (beside this checkout); say so to the ctsdk under test, which may
# be an installed copy that cannot find it itself (sdk.paths), and to its subprocesses
os.environ.setdefault("CTSDK_SHARED_DATA", str(SHARED_DATA))
#: the folder holding the `sdk` package under test: the checkout for an editable install, the
#: target folder for `pip install --target DIR .`. Subprocesses run here (cwd comes first on a
#: `python -c` / `-m` sys.path), so they import the same ctsdk as the tests - never the source tree
#: of a checkout next to a non-editable install, which lacks sdk.kernels / sdk.export / sdk.calibration.
SDK_HOME = Path(sdk.__file__).resolve().parents[1]


def ctsdk_in_process(*args: Any) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of the console script ``ctsdk ARGS``, run in this process."""
    from click.testing import CliRunner

    from sdk.cli import main

    runner = CliRunner()
    with runner.isolation() as streams:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        return code, streams[0].getvalue().decode(), streams[1].getvalue().decode()


def ctsdk_error(*args: Any) -> str:
    """The one ``ctsdk: error:`` line of a command that must exit 2 (nothing else on stderr, no traceback)."""
    code, out, err = ctsdk_in_process(*args)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ctsdk: error: "), (code, err)
    return lines[0]


def subprocess_env(**extra: str) -> Dict[str, str]:
    """``os.environ`` with :data:`SDK_HOME` first on PYTHONPATH (plus ``extra``), for child processes."""
    old = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SDK_HOME), old) if p), **extra)


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set CTSDK_SHARED_DATA or place ../shared/data beside the repo)")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_path()


@pytest.fixture(scope="session")
def covid_p001() -> Path:
    return shared_path("dicom", "covid-ct-md", "covid-P001")


#: IR version for the ONNX models tests build with onnx.helper: the installed onnx writes its newest IR
#: by default (IR 14 with onnx 1.23), which older ONNX Runtime builds refuse ("max supported IR version:
#: 13" with onnxruntime-gpu 1.31); IR 10 is read by every ONNX Runtime ctsdk supports (>= 1.18).
PORTABLE_IR = 10


#: the test files that take longest (``pytest --durations=60``, 2-core box, 2026-12-05), longest
#: first. ``pytest -n 2`` (README) hands out whole files (``--dist loadfile``, pyproject) in
#: collection order (``--no-loadscope-reorder``), so these start first and the two workers end
#: together instead of one waiting for a long file handed out last. Order only: every test runs.
LONG_FILES = ("test_cluster.py", "test_device_path.py", "test_listener.py", "test_bench_cli.py", "test_triage.py",
              "test_listener_state.py", "test_models.py", "test_io_real.py", "test_calibration.py",
              "test_examples.py", "test_export.py", "test_kernels_build.py")


@pytest.fixture()
def a_file(tmp_path: Path) -> Path:
    """A regular file: a folder "under" it can be neither created nor written (root included), and
    an option that wants a folder gets a file."""
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    """Long files first (:data:`LONG_FILES`); a stable sort, so each file keeps its own order."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

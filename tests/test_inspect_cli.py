"""`ctsdk inspect` through click's CliRunner and one real subprocess of the console script."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk.cli import cli
from sdk.phantom import write_phantom_series


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inspect")
    write_phantom_series(d, n_slices=24, size=64, spacing=(2.0, 0.8, 0.8), transfer_syntax="rle")
    (d / "junk.dcm").write_text("not dicom")
    return d


def test_inspect_json(phantom_dir):
    res = CliRunner().invoke(cli, ["inspect", str(phantom_dir), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["shape"] == [24, 64, 64]
    assert out["spacing_mm"] == [2.0, 0.8, 0.8]
    assert out["eligible"] is True and out["orientation"] == "axial"
    assert out["transfer_syntaxes"][0].startswith("1.2.840.10008.1.2.5 ")
    assert out["hu_range"] == [-1000.0, 400.0]
    assert len(out["series"]) == 1 and out["series"][0]["chosen"]
    assert any("junk.dcm" in w for w in out["warnings"])


def test_inspect_human_and_series_uid(phantom_dir):
    res = CliRunner().invoke(cli, ["inspect", str(phantom_dir)])
    assert res.exit_code == 0
    assert "eligible: yes" in res.stdout and "shape (z, y, x): (24, 64, 64)" in res.stdout
    bad = CliRunner().invoke(cli, ["inspect", str(phantom_dir), "--series-uid", "1.2.3.4"])
    assert bad.exit_code == 2 and "no series '1.2.3.4'" in bad.stderr


def test_inspect_error_is_one_line_exit_2(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_text("hello")
    res = CliRunner().invoke(cli, ["inspect", str(f), "--json"])
    assert res.exit_code == 2
    assert json.loads(res.stdout)["error"]["type"] == "NotDicomError"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctsdk: error: ") and "x.dcm" in lines[0]


def test_inspect_tie_lists_series_then_fails(tmp_path):
    write_phantom_series(tmp_path / "a", n_slices=4, size=16, series_uid="1.2.9.1")
    write_phantom_series(tmp_path / "b", n_slices=4, size=16, series_uid="1.2.9.2")
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"])
    assert res.exit_code == 2
    out = json.loads(res.stdout)
    assert out["chosen"] is None and out["eligible"] is False and len(out["series"]) == 2
    ok = CliRunner().invoke(cli, ["inspect", str(tmp_path), "--series-uid", "1.2.9.2", "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["chosen"] == "1.2.9.2"


def test_console_script_subprocess(phantom_dir):
    exe = Path(sys.executable).with_name("ctsdk")
    if not exe.exists():
        pytest.skip(f"console script not installed beside {sys.executable} (pip install -e .)")
    proc = subprocess.run([str(exe), "inspect", str(phantom_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"shape", "spacing_mm", "eligible"} <= set(out)
    assert out["shape"] == [24, 64, 64]

"""nvcc compiles every kernel to PTX and cubin for sm_80, sm_87, sm_89 and sm_90 (skipped without nvcc)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from sdk.kernels.build import ARCHS, build, find_nvcc
from sdk.kernels.sources import KERNEL_FILES, KERNEL_FUNCTIONS

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def _cubin_arch(data: bytes) -> int:
    """SM version from a CUDA ELF header (e_flags bits 8-15, e.g. 0x5a -> 90)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF cubin"
    e_flags = struct.unpack_from("<I", data, 0x30)[0]
    return (e_flags >> 8) & 0xFF


@needs_nvcc
def test_every_kernel_compiles_for_all_four_archs(tmp_path):
    assert ARCHS == ("sm_80", "sm_87", "sm_89", "sm_90")
    r = build(tmp_path, jobs=2)
    assert len(r.files) == len(KERNEL_FILES) * len(ARCHS) * 2
    for unit in KERNEL_FILES:
        stem = unit[:-3]
        for arch in ARCHS:
            ptx = (tmp_path / f"{stem}.{arch}.ptx").read_text()
            assert f".target {arch}" in ptx
            cubin = (tmp_path / f"{stem}.{arch}.cubin").read_bytes()
            assert _cubin_arch(cubin) == int(arch[3:])
            for fn in KERNEL_FUNCTIONS[unit]:
                assert f".entry {fn}(" in ptx, f"{fn} missing from {stem}.{arch}.ptx"
                assert fn.encode() in cubin
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["archs"] == list(ARCHS) and "release" in manifest["nvcc_version"]


@needs_nvcc
def test_cli_reports_nvcc_errors_with_exit_2(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "sdk.kernels.build", "--out", str(tmp_path), "--arch", "sm_x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "sm_90" in bad.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_sources_compile_with_nvrtc(arch):
    """The run-time fallback: NVRTC (no nvcc, no GPU) builds every unit, with every entry point."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings not installed (pip install 'ctsdk[gpu]')")
    from sdk.errors import MissingDependencyError
    from sdk.kernels.nvrtc import compile_cubin, nvrtc_version
    from sdk.kernels.sources import read_source

    try:
        nvrtc_version()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    for unit in KERNEL_FILES:
        cubin = compile_cubin(read_source(unit), arch, unit)
        assert _cubin_arch(cubin) == int(arch[3:])
        for fn in KERNEL_FUNCTIONS[unit]:
            assert fn.encode() in cubin

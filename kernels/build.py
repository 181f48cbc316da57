"""nvcc build of every kernel to PTX and cubin for the supported GPU architectures.

    python -m sdk.kernels.build                      # PTX + cubin, sm_80 sm_87 sm_89 sm_90, in the cache
    python -m sdk.kernels.build --out dist/kernels --arch sm_87 --kind cubin --json

Targets: sm_80 (A100), sm_87 (Jetson Orin), sm_89 (L4, RTX 40xx), sm_90 (H100). Compiles run in
parallel (one nvcc per file × arch × kind). Nothing here runs at import or needs a GPU.

Deployment note: PTX from nvcc 13 is ISA 9.x and needs a CUDA 13 driver to JIT, and a cubin built
by a newer toolkit may not load on an older driver (Jetson on JetPack 6 is CUDA 12.x). So the
package ships sources only; :class:`sdk.kernels.GpuKernels` compiles them for the device at first
use (NVRTC via CuPy, or pycuda SourceModule) and caches the result per device and driver, and a
directory built by this command can be handed to it (``cubin_dir=``) as the fast path when the
target's driver is at least the toolkit's version.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import KernelError, MissingDependencyError
from . import sources as S

__all__ = ["ARCHS", "NVCC_FLAGS", "find_nvcc", "nvcc_version", "BuildResult", "build", "main"]

ARCHS = ("sm_80", "sm_87", "sm_89", "sm_90")
KINDS = ("ptx", "cubin")
NVCC_FLAGS = ("-O3", "-std=c++17")


def find_nvcc() -> Optional[str]:
    """``$CUDA_HOME/bin/nvcc``, then ``nvcc`` on PATH, then ``/usr/local/cuda/bin/nvcc``; None if absent."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(str(Path(os.environ[env]) / "bin" / "nvcc"))
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_version(nvcc: str) -> str:
    """Last 'release' line of ``nvcc --version`` (e.g. 'Cuda compilation tools, release 13.0, V13.0.88')."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1]


@dataclass
class BuildResult:
    """What :func:`build` produced: files by name, their sha256, the toolchain and the time."""

    out_dir: str
    nvcc: str
    nvcc_version: str
    archs: List[str]
    kinds: List[str]
    files: Dict[str, str] = field(default_factory=dict)  # file name -> sha256
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _compile(nvcc: str, src: Path, arch: str, kind: str, out: Path) -> None:
    target = f"compute_{arch[3:]}" if kind == "ptx" else arch
    cmd = [nvcc, *NVCC_FLAGS, f"--{kind}", f"-arch={target}", "-I", str(S.KERNEL_DIR), str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise KernelError(f"{src}: nvcc failed for {arch} {kind} (exit {proc.returncode}):\n"
                          f"{' '.join(cmd)}\n{proc.stderr.strip()[-4000:]}")


def build(
    out_dir: Optional[Path] = None,
    archs: Sequence[str] = ARCHS,
    kinds: Sequence[str] = KINDS,
    jobs: Optional[int] = None,
    nvcc: Optional[str] = None,
) -> BuildResult:
    """Compile every ``kernels/*.cu`` for each arch and kind into ``out_dir``.

    Output names: ``<stem>.<arch>.ptx`` and ``<stem>.<arch>.cubin`` plus ``manifest.json``. The
    default ``out_dir`` is ``<cache>/nvcc-<key>`` with key = sha256(sources, nvcc version, flags).

    Raises:
        MissingDependencyError: no nvcc found.
        KernelError: a compile failed (the message holds nvcc's command line and stderr).
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise MissingDependencyError("the CUDA toolkit (nvcc)", "building the ctsdk CUDA kernels")
    bad = [a for a in archs if not (a.startswith("sm_") and a[3:].isdigit())]
    if bad or not archs:
        raise KernelError(f"architectures must look like 'sm_90', got {list(archs)}")
    bad_k = [k for k in kinds if k not in KINDS]
    if bad_k or not kinds:
        raise KernelError(f"kinds must be among {KINDS}, got {list(kinds)}")
    version = nvcc_version(nvcc)
    if out_dir is None:
        out_dir = S.cache_dir() / f"nvcc-{S.sources_hash(version, ' '.join(NVCC_FLAGS))[:16]}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(S.KERNEL_DIR / f, a, k, out_dir / f"{Path(f).stem}.{a}.{k}") for f in S.KERNEL_FILES for a in archs for k in kinds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs or max(1, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_compile, nvcc, *t) for t in tasks]
        errors = [str(e) for e in (f.exception() for f in futures) if e is not None]
    if errors:
        raise KernelError(f"{len(errors)} of {len(tasks)} kernel compiles failed; first:\n{errors[0]}")
    result = BuildResult(str(out_dir), nvcc, version, list(archs), list(kinds), seconds=time.perf_counter() - t0)
    for *_, out in tasks:
        result.files[out.name] = hashlib.sha256(out.read_bytes()).hexdigest()
    (out_dir / "manifest.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdk.kernels.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the user kernel cache)")
    p.add_argument("--arch", nargs="+", default=list(ARCHS), help=f"default: {' '.join(ARCHS)}")
    p.add_argument("--kind", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the build manifest as one JSON object")
    a = p.parse_args(argv)
    try:
        r = build(a.out, a.arch, a.kind, a.jobs)
    except (KernelError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r.to_dict()))
    else:
        print(f"{len(r.files)} files in {r.out_dir} ({r.nvcc_version}; {r.seconds:.1f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

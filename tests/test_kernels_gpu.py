"""GPU bindings: device results vs the NumPy references (marker `gpu`; skipped without a GPU and
pycuda/CuPy), and the import contract (no CUDA package imported by `import sdk.kernels`)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sdk.pooling import mask_weights, masked_gap
from sdk.volume.resample import classifier_inputs, resample_volume

RNG = np.random.default_rng(5)


def test_import_is_lazy():
    code = ("import sys, sdk.kernels as k; k.GpuKernels; k.CpuHarness; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('pycuda', 'cupy', 'torch', 'cuda')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_backend_is_a_typed_error():
    from sdk.errors import ConfigError, MissingDependencyError
    from sdk.kernels.gpu import GpuKernels, gpu_backends

    with pytest.raises(ConfigError, match="backend"):
        GpuKernels(backend="opencl")
    if all(gpu_backends().values()):  # neither installed
        with pytest.raises(MissingDependencyError, match="pycuda or cupy"):
            GpuKernels()


def _gpu_or_skip(backend: str):
    """GpuKernels on ``backend``; skips only when the backend is not installed or no NVIDIA GPU is
    visible. Anything else (a kernel that does not compile, a driver error) fails the test."""
    from sdk.kernels.gpu import GpuKernels, gpu_backends
    from sdk.runtime.gpu import gpu_info

    why = gpu_backends().get(backend)
    if why:
        pytest.skip(f"{backend}: {why}")
    if gpu_info() is None:
        pytest.skip("no NVIDIA GPU visible (cuda-python found no device and nvidia-smi lists none)")
    return GpuKernels(backend=backend)


@pytest.fixture(scope="module", params=["cupy", "pycuda"])
def gpu(request):
    return _gpu_or_skip(request.param)


def test_auto_prefers_cupy_and_launch_format(monkeypatch):
    from sdk.errors import ConfigError
    from sdk.kernels.gpu import _BACKENDS, GpuKernels, launch_format

    assert list(_BACKENDS) == ["cupy", "pycuda"]
    monkeypatch.setenv("CTSDK_GPU_BACKEND", "opencl")
    with pytest.raises(ConfigError, match="CTSDK_GPU_BACKEND"):
        GpuKernels()
    assert launch_format([np.uint64(1), np.int32(2), np.float32(3), np.float64(4), np.int64(5)]) == "Qifdq"
    with pytest.raises(ConfigError, match="argument 1"):
        launch_format([np.uint64(1), 2])


@pytest.mark.gpu
def test_pycuda_process_exits_cleanly(tmp_path):
    """A process that launched kernels through pycuda, from the main thread and a worker thread,
    exits 0 (no "context stack was not empty" abort) and leaves nothing pushed."""
    _gpu_or_skip("pycuda")
    code = (
        "import threading, numpy as np\n"
        "from sdk.kernels.gpu import GpuKernels\n"
        "import pycuda.driver as drv\n"
        "k = GpuKernels(backend='pycuda')\n"
        "hu = np.zeros((4, 64, 64), np.int16); m = np.ones_like(hu, np.uint8)\n"
        "def work():\n"
        "    for _ in range(3):\n"
        "        x = k.to_host(k.classifier_inputs(k.to_device(hu), k.to_device(m), [0, 3], 32))\n"
        "    assert x.shape == (2, 3, 32, 32)\n"
        "work(); t = threading.Thread(target=work); t.start(); t.join()\n"
        "k.synchronize()\n"
        "keep = k.to_device(hu)  # alive at exit: collected after the atexit hook pops (the H200 abort)\n"
        "held = k._b.pctx.pool.held_blocks\n"
        "print('held', held, 'active', k._b.pctx.pool.active_blocks)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "PyCUDA ERROR" not in r.stderr, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "held" in r.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["linear", "area"])
@pytest.mark.parametrize("iso", [False, True])
def test_gpu_resample(gpu, mode, iso):
    hu = RNG.integers(-1024, 1800, size=(23, 513, 511)).astype(np.int16)
    z = np.cumsum(np.r_[0.0, RNG.uniform(0.5, 2.0, 22)])
    kw = dict(out_shape=(16, 64, 48), mode=mode, isotropic=iso, pixel_spacing_mm=(0.7, 0.8), window=(-1000, 400))
    ref = resample_volume(hu, z, **kw)
    d = gpu.resample(gpu.to_device(hu), z, **kw)
    np.testing.assert_allclose(gpu.to_host(d), ref, atol=1e-5)
    d16 = gpu.resample(gpu.to_device(hu), z, out_dtype="float16", **kw)
    np.testing.assert_allclose(gpu.to_host(d16).astype(np.float32), ref, rtol=2.0 ** -11, atol=1e-5)


@pytest.mark.gpu
def test_gpu_classifier_weights_gap_chain(gpu):
    hu = RNG.integers(-1024, 1800, size=(6, 512, 512)).astype(np.int16)
    lung = RNG.random(hu.shape) > 0.5
    lung[2] = False
    idx = [0, 2, 5]
    d_x = gpu.classifier_inputs(gpu.to_device(hu), gpu.to_device(lung.astype(np.uint8)), idx, 224)
    x = gpu.to_host(d_x)
    ref = classifier_inputs(hu, lung, idx, 224)
    np.testing.assert_allclose(x, ref, atol=1e-5)
    d_w = gpu.mask_weights(d_x, (7, 7), channel=1)
    np.testing.assert_allclose(gpu.to_host(d_w), mask_weights(ref[:, 1:2]), atol=1e-5)
    f = RNG.normal(size=(3, 1280, 7, 7)).astype(np.float32)
    for dt in (np.float32, np.float16):
        got = gpu.to_host(gpu.masked_gap(gpu.to_device(f.astype(dt)), d_w))
        np.testing.assert_allclose(got, masked_gap(f.astype(dt), gpu.to_host(d_w)), atol=1e-5)


# --- launch ABI without a GPU: the arguments GpuKernels passes vs the kernels' PTX signatures ----------
class _Dev:
    """A host array posing as a device buffer, for the recording backend below."""

    def __init__(self, a):
        self.a = np.ascontiguousarray(a)
        self.shape, self.dtype, self.flags = self.a.shape, self.a.dtype, self.a.flags


class _RecordingBackend:
    """Stands in for the CUDA driver only: records launches so their argument lists can be checked
    against the PTX entry signatures nvcc produced from the same sources."""

    name = "recording"

    def __init__(self):
        self.launches = []

    def to_device(self, a):
        return _Dev(a)

    def empty(self, shape, dtype):
        return _Dev(np.empty(shape, dtype))

    def to_host(self, d):
        return d.a

    def is_device(self, a):
        return isinstance(a, _Dev)

    def ptr(self, d):
        return d.a.ctypes.data

    def launch(self, fn, grid, block, args, shared):
        self.launches.append((fn, grid, block, list(args), shared))


@pytest.fixture(scope="module")
def ptx_signatures(tmp_path_factory):
    import re

    from sdk.kernels.build import build, find_nvcc

    if find_nvcc() is None:
        pytest.skip("nvcc not found: cannot produce PTX signatures")
    out = tmp_path_factory.mktemp("ptx")
    build(out, archs=("sm_90",), kinds=("ptx",), jobs=2)
    sigs = {}
    for p in out.glob("*.ptx"):
        for name, params in re.findall(r"\.entry (\w+)\(\s*(.*?)\)", p.read_text(), re.S):
            sigs[name] = re.findall(r"\.param \.(\w+)", params)
    return sigs


def test_launch_arguments_match_ptx_signatures(ptx_signatures):
    from sdk.kernels.gpu import GpuKernels
    from sdk.kernels.sources import KERNEL_FUNCTIONS

    rec = _RecordingBackend()
    k = GpuKernels.__new__(GpuKernels)
    k._b, k.backend, k.arch, k.load_log = rec, rec.name, "sm_90", []
    k._fns = {fn: fn for fns in KERNEL_FUNCTIONS.values() for fn in fns}
    hu = RNG.integers(-1000, 1000, size=(5, 20, 30)).astype(np.int16)
    for dt in (np.int16, np.float32):
        for out_dtype in ("float32", "float16"):
            k.resample(_Dev(hu.astype(dt)), np.arange(5.0), (4, 8, 8), out_dtype=out_dtype)
        k.classifier_inputs(_Dev(hu.astype(dt)), _Dev((hu > 0).astype(np.uint8)), [0, 4], 16)
    x = k.classifier_inputs(_Dev(hu), _Dev((hu > 0).astype(np.uint8)), [1, 2], 14)
    w = k.mask_weights(x, (7, 7), channel=1)
    for dt in (np.float32, np.float16):
        k.masked_gap(_Dev(np.ones((2, 40, 7, 7), dt)), w)
    launched = {fn for fn, *_ in rec.launches}
    assert launched == set(k._fns), f"not launched: {set(k._fns) - launched}"
    ptx_type = {"u64": (8, "iu"), "u32": (4, "iu"), "f32": (4, "f"), "f64": (8, "f")}
    for fn, grid, block, args, shared in rec.launches:
        sig = ptx_signatures[fn]
        assert len(args) == len(sig), f"{fn}: {len(args)} args for {len(sig)} parameters"
        for i, (a, t) in enumerate(zip(args, sig)):
            size, kinds = ptx_type[t]
            assert isinstance(a, np.generic) and a.dtype.itemsize == size and a.dtype.kind in kinds, \
                f"{fn} parameter {i}: {type(a).__name__} for .{t}"
        assert block == (256, 1, 1) and all(g >= 1 for g in grid)
    # mask weights read channel 1 in place: base pointer = x + 1 plane, stride = 3 planes
    fn, grid, _, args, shared = next(r for r in rec.launches if r[0] == "ct_mask_weights")
    assert int(args[0]) == x.a.ctypes.data + 14 * 14 * 4 and int(args[1]) == 3 * 14 * 14
    assert grid == (2, 1, 1) and shared == 2 * 49 * 4

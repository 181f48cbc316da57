"""The device-resident path on a GPU (marker ``gpu``): CUDA kernel set vs the NumPy references,
``Triage(device="cuda")`` on covid-P001 vs the CPU path, and its host <-> device copies.

Skipped, with the reason, only when CuPy, a CUDA device or ONNX Runtime's CUDA provider is absent
(explicit checks); on a GPU machine a kernel that does not compile or a Triage that does not
construct fails.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import shared_path

pytestmark = pytest.mark.gpu
RNG = np.random.default_rng(13)


def _why_no_gpu() -> str:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    import cupy

    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:  # no driver / no device: a stated resource
        return f"no CUDA device ({exc})"
    if n < 1:
        return "no CUDA device"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()}); install onnxruntime-gpu"
    return ""


_WHY = _why_no_gpu()
needs_gpu = pytest.mark.skipif(bool(_WHY), reason=_WHY or "GPU present")


@pytest.fixture(scope="module")
def cuda_set():
    from sdk.kernel_ops import open_kernel_set

    return open_kernel_set("cuda")


@needs_gpu
def test_cuda_kernel_set_matches_numpy_reference(cuda_set) -> None:
    from sdk.kernel_ops import NumpyKernels, Transfers

    ref, io = NumpyKernels(), Transfers()
    hu = RNG.integers(-1024, 1800, size=(37, 300, 290)).astype(np.int16)
    z = np.cumsum(np.r_[0.0, RNG.uniform(0.6, 1.8, 36)])
    d_hu = cuda_set.upload(hu, io, "volume")
    for kw in (dict(out_shape=(32, 32, 32), mode="area", isotropic=True, pixel_spacing_mm=(0.7, 0.8), window=(-1000.0, 400.0)),
               dict(out_shape=(37, 64, 64), mode="area", isotropic=False, pixel_spacing_mm=None, window=None)):
        got = cuda_set.download(cuda_set.resample(d_hu, z, **kw), io, "cube")
        want = ref.resample(hu, z, **kw)
        tol = 1e-5 if kw["window"] else 1e-5 * 2048
        np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    mask = np.zeros(hu.shape, np.uint8)
    mask[:, 60:240, 40:250] = 1
    idx = np.array([0, 5, 17, 36])
    x = cuda_set.classifier_inputs(d_hu, cuda_set.upload(mask, io, "mask"), idx, 224, (-1350.0, 150.0))
    xr = ref.classifier_inputs(hu, mask, idx, 224, (-1350.0, 150.0))
    np.testing.assert_allclose(cuda_set.download(x, io, "x"), xr, atol=1e-5, rtol=0)
    w = cuda_set.mask_weights(x, (7, 7), channel=1)
    np.testing.assert_allclose(cuda_set.download(w, io, "w"), ref.mask_weights(xr, (7, 7), channel=1), atol=1e-6, rtol=0)
    f = RNG.normal(size=(4, 1280, 7, 7)).astype(np.float32)
    p = cuda_set.masked_gap(cuda_set.upload(f, io, "f"), w)
    np.testing.assert_allclose(cuda_set.download(p, io, "p"), ref.masked_gap(f, ref.mask_weights(xr, (7, 7), channel=1)),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def p001_volume():
    from sdk.io import load_series

    return load_series(shared_path("dicom", "covid-ct-md", "covid-P001"))


@pytest.fixture(scope="module")
def cpu_result(p001_volume):
    import sdk

    return sdk.Triage(device="cpu", precision="fp32", kernels="numpy").run(p001_volume)


def _slice_probs(r):
    return np.array([[s.probabilities[c] for c in sorted(r.probabilities)] for s in r.slice_scores])


def _check_transfers(r, volume) -> None:
    t = r.transfers
    vol_bytes = int(np.asarray(volume.hu).nbytes)
    ups = [c for c in t["copies"] if c["dir"] == "h2d"]
    downs = [c for c in t["copies"] if c["dir"] == "d2h"]
    vol_ups = [c for c in ups if c["what"] == "volume (HU)"]
    assert len(vol_ups) == 1 and vol_ups[0]["bytes"] == vol_bytes, ups
    # the only other large upload allowed is the host segmenter's mask (no 3D U-Net in the bundle)
    small = {"resample: slice centres (GpuKernels)", "classifier_inputs: slice indices (GpuKernels)",
             "cube -> volume taps and interpolation matrices (unet3d.cube_to_volume)"}
    for c in ups:
        if c["what"] in ("volume (HU)", "lung mask (host segmenter)"):
            continue
        assert c["what"] in small and c["bytes"] < 1024 * 1024, c
    assert not [c for c in t["copies"] if "round trip" in c["what"]], "a session without run_device copied through the host"
    # back to the host: per-slice areas, probabilities, CAMs - and, with the 3D U-Net, its 128^3
    # uint8 cube mask for the host's HU opacity measurement; never a volume-sized array
    cube = [c for c in downs if c["what"].startswith("3D U-Net cube mask")]
    assert all(c["bytes"] == 128 ** 3 for c in cube), cube
    assert max((c["bytes"] for c in downs if c not in cube), default=0) < vol_bytes // 100, downs
    assert t["h2d_calls"] == len(ups) and t["d2h_calls"] == len(downs)


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_device_triage_matches_cpu_path(p001_volume, cpu_result, precision) -> None:
    """Same segmenter as the CPU path (the hybrid, on the host): the device kernels, the features
    graph at a fixed batch and the kernel pooling give the CPU path's label and probabilities."""
    import sdk

    eng = sdk.Triage(device="cuda", precision=precision, lung_method="hybrid")
    assert eng.runtime["path"] == "kernel" and eng.runtime["kernels"] == "cuda"
    st = eng.runtime["stages"]
    assert st["classifier_inputs"] == "cuda-kernel" and st["classifier"].startswith(f"ort-cuda-{precision}")
    r = eng.run(p001_volume)
    assert r.label == cpu_result.label
    for c in r.probabilities:
        assert abs(r.probabilities[c] - cpu_result.probabilities[c]) <= 0.02
    assert st["lungs"] == "hybrid-unet2d-ort-cpu-fp32"  # the GPU classifier never takes the INT8 lung U-Net
    assert [s.index for s in r.slice_scores] == [s.index for s in cpu_result.slice_scores]
    assert np.abs(_slice_probs(r) - _slice_probs(cpu_result)).max() <= 0.02
    _check_transfers(r, p001_volume)
    h = r.heatmap(0)  # one mask slice comes back, lazily
    assert h.shape == p001_volume.hu.shape[1:]


@needs_gpu
def test_device_unet3d_matches_cpu_unet3d(p001_volume) -> None:
    """The 3D U-Net on the device (resample kernel -> ORT CUDA -> cube mask -> volume grid on the
    device) against the same segmenter on the CPU kernel path (g++-compiled kernels, ORT CPU)."""
    import shutil

    import sdk
    from sdk.bundle import load_bundle

    if not any(n.startswith("lungs3d") for n in load_bundle().files):
        pytest.skip("the default bundle has no lungs3d_*.onnx")
    if shutil.which("g++") is None:
        pytest.skip("no g++: the CPU reference of this comparison runs the kernel harness")
    cpu = sdk.Triage(device="cpu", precision="fp32", kernels="cpu-harness", lung_method="unet3d").run(p001_volume)
    eng = sdk.Triage(device="cuda", precision="fp16")
    assert eng.runtime["stages"]["lungs"].startswith("unet3d-ort-cuda") and eng.runtime["stages"]["resample"] == "cuda-kernel"
    r = eng.run(p001_volume)
    assert r.label == cpu.label
    for c in r.probabilities:
        assert abs(r.probabilities[c] - cpu.probabilities[c]) <= 0.02
    _check_transfers(r, p001_volume)
    assert not [c for c in r.transfers["copies"] if c["what"] == "lung mask (host segmenter)"]


@needs_gpu
def test_device_pooling_kernel_equals_graph(p001_volume) -> None:
    import sdk

    a = sdk.Triage(device="cuda", precision="fp32", pooling="kernel", lung_method="hybrid").run(p001_volume)
    b = sdk.Triage(device="cuda", precision="fp32", pooling="graph", lung_method="hybrid").run(p001_volume)
    assert a.runtime["stages"]["pooling"] == "cuda-kernel" and b.runtime["stages"]["pooling"] == "graph"
    assert np.abs(_slice_probs(a) - _slice_probs(b)).max() <= 1e-4


@needs_gpu
def test_device_triage_from_files(cpu_result) -> None:
    import sdk

    r = sdk.Triage(device="cuda", precision="fp16", lung_method="hybrid").run(shared_path("dicom", "covid-ct-md", "covid-P001"))
    assert r.label == cpu_result.label and r.transfers["h2d_calls"] >= 1

"""sdk.runtime: ORT sessions on real small ONNX models, input validation, runtime registry and
selection with the fallback reasons of a machine without CUDA / TensorRT."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sdk.errors import ConfigError, MissingDependencyError, ModelNotFoundError, RuntimeUnavailableError  # noqa: E402
from sdk.runtime import (  # noqa: E402
    OrtSession, OrtSessionFromOnnx, RuntimeInfo, available_runtimes, describe_runtimes, get_runtime, select_runtime,
)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
from conftest import PORTABLE_IR, SDK_HOME  # noqa: E402 - where subprocesses import the same sdk


def _conv_softmax_model(path: Path, w: np.ndarray, b: np.ndarray, precision: str = "", gap: bool = False) -> Path:
    """x (N, 2, 5, 5) -> Conv 3x3 (pad 1) -> mean over H, W -> Softmax: `probs` (N, K), and `feat`.
    The mean is ReduceMean, or with ``gap`` GlobalAveragePool + Flatten (ops every CUDA EP build
    has, so a CUDA graph can capture the whole model)."""
    from onnx import TensorProto, helper, numpy_helper

    k = w.shape[0]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, 5, 5])
    feat = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["batch", k, 5, 5])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", k])
    pool = ([helper.make_node("GlobalAveragePool", ["feat"], ["gap"]), helper.make_node("Flatten", ["gap"], ["pooled"])]
            if gap else [helper.make_node("ReduceMean", ["feat", "axes"], ["pooled"], keepdims=0)])
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["feat"], pads=[1, 1, 1, 1]), *pool,
             helper.make_node("Softmax", ["pooled"], ["probs"], axis=1)]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if not gap:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], [probs, feat], inits),
                          opset_imports=[helper.make_opsetid("", 18)], ir_version=PORTABLE_IR)
    if precision:
        m.metadata_props.add(key="ctsdk.precision", value=precision)
    onnx.checker.check_model(m)
    onnx.save_model(m, str(path))
    return path


def _reference(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """Independent NumPy/SciPy reference of the tiny model."""
    from scipy.signal import correlate

    n, k = x.shape[0], w.shape[0]
    feat = np.zeros((n, k, 5, 5), np.float64)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(n):
        for j in range(k):
            feat[i, j] = sum(correlate(xp[i, c], w[j, c], mode="valid") for c in range(x.shape[1])) + b[j]
    pooled = feat.mean((2, 3))
    e = np.exp(pooled - pooled.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True), feat


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    path = _conv_softmax_model(tmp_path_factory.mktemp("rt") / "tiny_fp32.onnx", w, b)
    return path, w, b


def test_ort_session_matches_reference_and_reports(tiny):
    path, w, b = tiny
    x = np.random.default_rng(1).random((4, 2, 5, 5), dtype=np.float32)
    with OrtSession(path, threads=1) as s:
        out = s.infer({"image": x})
        assert s.last_ms > 0
        assert s.info == RuntimeInfo("onnxruntime", "CPUExecutionProvider", "fp32", "cpu")
        assert [t.name for t in s.inputs] == ["image"] and s.inputs[0].dtype == "float32"
        assert [t.name for t in s.outputs] == ["probs", "feat"]
        only = s.infer({"image": x[:1]}, outputs=["probs"])
    probs, feat = _reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out["probs"], probs, atol=1e-5)
    np.testing.assert_allclose(out["feat"], feat, atol=1e-4)
    assert set(only) == {"probs"} and only["probs"].shape == (1, 3)


@pytest.mark.parametrize("feed, match", [
    ({}, "missing"),
    ({"image": np.zeros((1, 2, 5, 5), np.float32), "mask": np.zeros(1, np.float32)}, "unexpected"),
    ({"image": np.zeros((1, 2, 5, 5), np.float64)}, "dtype"),
    ({"image": np.zeros((2, 5, 5), np.float32)}, "rank"),
    ({"image": np.zeros((1, 3, 5, 5), np.float32)}, "shape"),
])
def test_input_validation(tiny, feed, match):
    with OrtSession(tiny[0]) as s:
        with pytest.raises(ConfigError, match=match):
            s.infer(feed)


def test_unknown_output_and_missing_file(tiny, tmp_path):
    with OrtSession(tiny[0]) as s, pytest.raises(ConfigError, match="unknown outputs"):
        s.infer({"image": np.zeros((1, 2, 5, 5), np.float32)}, outputs=["nope"])
    with pytest.raises(ConfigError, match="not found"):
        OrtSession(tmp_path / "missing.onnx")


def test_precision_from_metadata(tmp_path, tiny):
    _, w, b = tiny
    p = _conv_softmax_model(tmp_path / "model.onnx", w, b, precision="int8")
    with OrtSession(p) as s:
        assert s.info.precision == "int8"


def test_loader_builds_nothing_until_called(tmp_path):
    loader = OrtSessionFromOnnx(tmp_path / "later.onnx", device="cpu")   # no file yet: no error
    assert "later.onnx" in repr(loader)
    with pytest.raises(ConfigError):
        loader()


def _cuda_usable() -> bool:
    return get_runtime("ort-cuda").is_available()


@pytest.mark.skipif("_cuda_usable()", reason="a usable CUDA EP is present: the fallback path cannot be exercised")
def test_cuda_request_falls_back_openly(tiny):
    with OrtSession(tiny[0], device="cuda") as s:
        assert s.info.provider == "CPUExecutionProvider"
        assert s.fallback_reasons and "CUDA" in s.fallback_reasons[0]
    with pytest.raises(RuntimeUnavailableError, match="CUDA"):
        OrtSession(tiny[0], device="cuda", strict=True)


def test_registry_names_and_requirements():
    assert get_runtime("trt") is get_runtime("tensorrt")
    assert get_runtime("cpu").name == "ort-cpu"
    with pytest.raises(ModelNotFoundError, match="ort-cpu"):
        get_runtime("npu")
    desc = describe_runtimes()
    assert set(desc) == {"tensorrt", "ort-cuda", "ort-cpu"}
    assert desc["tensorrt"]["requires"] == ["tensorrt", "polygraphy", "cuda-python"]
    assert desc["ort-cpu"]["available"] is True
    assert "ort-cpu" in available_runtimes()
    for name, d in desc.items():
        assert d["available"] == (name in available_runtimes())
        if not d["available"]:
            assert d["reason"]  # every unavailable backend says why


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_auto_selection_falls_back_with_reasons(tiny):
    files = {"fp32": tiny[0]}
    loader, info, reasons = select_runtime("auto", "auto", files)
    want = "CUDAExecutionProvider" if _cuda_usable() else "CPUExecutionProvider"
    assert info.backend == "onnxruntime" and info.provider == want and info.precision == "fp32"
    assert any(r.startswith("tensorrt skipped") and "install ctsdk[gpu] (TensorRT)" in r for r in reasons)
    if not _cuda_usable():
        assert any(r.startswith("ort-cuda skipped") for r in reasons)
    with loader() as s:
        assert s.info == info
    with pytest.raises(RuntimeUnavailableError, match="tensorrt"):
        select_runtime("tensorrt", "fp16", files)


@pytest.mark.skipif("_cuda_usable()", reason="CUDA EP usable here")
def test_explicit_cuda_unavailable_raises(tiny):
    with pytest.raises(RuntimeUnavailableError, match="ort-cuda"):
        select_runtime("cuda", "auto", {"fp32": tiny[0]})


@pytest.mark.parametrize("passed, speedup, want", [
    (True, 1.6, "int8"), (False, 1.6, "fp32"), (True, None, "fp32"), (True, 0.9, "fp32"),
])
def test_cpu_precision_auto_rule(tmp_path, tiny, passed, speedup, want):
    _, w, b = tiny
    files = {"fp32": tiny[0], "int8": _conv_softmax_model(tmp_path / "m_int8.onnx", w, b, "int8")}
    loader, info, reasons = select_runtime("cpu", "auto", files, calibration_passed=passed, int8_speedup=speedup)
    assert info.precision == want
    assert any(r.startswith(f"precision auto -> {want} on CPU") for r in reasons)
    with loader() as s:
        assert s.info.precision == want


@pytest.mark.parametrize("passed", [True, False])
def test_explicit_int8_runs_and_says_when_its_bar_failed(tmp_path, tiny, passed):
    """precision="int8" runs the INT8 file either way; a failed calibration bar is named in the reasons."""
    _, w, b = tiny
    files = {"fp32": tiny[0], "int8": _conv_softmax_model(tmp_path / "m_int8.onnx", w, b, "int8")}
    _, info, reasons = select_runtime("cpu", "int8", files, calibration_passed=passed)
    assert info.precision == "int8"
    assert any("did NOT pass its calibration bar" in r for r in reasons) is (not passed)


def test_selection_argument_errors(tiny):
    with pytest.raises(ConfigError, match="device"):
        select_runtime("gpu", "auto", {"fp32": tiny[0]})
    with pytest.raises(ConfigError, match="precision"):
        select_runtime("cpu", "bf16", {"fp32": tiny[0]})
    with pytest.raises(ConfigError, match="bundle_files"):
        select_runtime("cpu", "auto", {})
    with pytest.raises(RuntimeUnavailableError, match="no int8 model"):
        select_runtime("cpu", "int8", {"fp32": tiny[0]})


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_trt_session_without_tensorrt(tmp_path):
    from sdk.runtime import TrtSession

    with pytest.raises(MissingDependencyError, match=r"install ctsdk\[gpu\] \(TensorRT\)"):
        TrtSession(tmp_path / "x.engine")


def test_import_sdk_stays_light():
    code = ("import sys, sdk, sdk.runtime, sdk.export, sdk.calibration, sdk.runtime.registry, sdk.export.tensorrt;"
            "heavy = [m for m in ('torch', 'onnxruntime', 'tensorrt', 'onnx', 'polygraphy') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=SDK_HOME)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_package_version_has_one_value():
    """sdk.__version__ (in the DICOM objects' SoftwareVersions, ctsdk --version) is pyproject's."""
    import re

    import sdk

    text = (Path(SDK_HOME) / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == sdk.__version__


def test_submodules_are_reachable_after_import_sdk():
    """``import sdk`` then ``sdk.io.load_series`` / ``sdk.models.create_model`` etc. as the README
    writes them (they raised AttributeError until something else imported the submodule)."""
    code = ("import sys, sdk;"
            "names = [sdk.io.list_series, sdk.io.load_series, sdk.models.create_model, sdk.prior.compare,"
            " sdk.integration.discover_series, sdk.eligibility, sdk.runtime.OrtSession.__name__];"
            "missing = hasattr(sdk, 'no_such_module') or hasattr(sdk.io, 'no_such_module');"
            "print(len(names), missing, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=SDK_HOME)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["7", "False", "False"]


def test_infer_batched_equals_one_call_with_and_without_prefetch(tiny):
    """Session.infer_batched: batches of 3 (last one short) from an array or a builder, with or
    without the prefetch thread, give the single full-batch call's outputs; timings are filled."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 2, 5, 5)).astype(np.float32)
    with OrtSession(tiny[0], threads=1) as s:
        ref = s.infer({"image": x})
        built = []

        def make(i0, i1):
            built.append((i0, i1))
            return x[i0:i1]

        for source, prefetch in ((x, True), (make, True), (make, False)):
            t = {}
            got = s.infer_batched(source, 10, batch=3, prefetch=prefetch, timings=t)
            assert set(got) == {"probs", "feat"} and got["probs"].shape == (10, 3)
            np.testing.assert_allclose(got["probs"], ref["probs"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["feat"], ref["feat"], rtol=1e-5, atol=1e-5)
            assert t["infer_ms"] > 0 and t["prepare_ms"] >= 0
        assert sorted(set(built)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
        assert s.infer_batched(x, batch=4, outputs=["probs"]).keys() == {"probs"}
        with pytest.raises(ConfigError, match="batch must be >= 1"):
            s.infer_batched(x, batch=0)


def test_infer_batched_in_lanes_keeps_sample_order_and_runs_batches_side_by_side(tiny):
    """lanes > 1: every batch is built and run on a lane thread, at most ``lanes`` at once; the
    outputs equal the single full-batch call's, in sample order, whatever order the lanes end in."""
    import threading
    import time as _time

    rng = np.random.default_rng(5)
    x = rng.normal(size=(11, 2, 5, 5)).astype(np.float32)
    with OrtSession(tiny[0], threads=1, lanes=3) as s:
        assert s.lanes == 3
        ref = s.infer({"image": x})
        lock = threading.Lock()
        state = {"now": 0, "peak": 0}
        threads_seen = set()

        def make(i0, i1):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
                threads_seen.add(threading.current_thread().name)
            _time.sleep(0.02 * (3 - i0 % 3))  # later batches finish first
            with lock:
                state["now"] -= 1
            return x[i0:i1]

        t = {}
        got = s.infer_batched(make, 11, batch=2, timings=t)
        np.testing.assert_allclose(got["probs"], ref["probs"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["feat"], ref["feat"], rtol=1e-5, atol=1e-5)
        assert 2 <= state["peak"] <= 3                       # side by side, never more than the lanes
        assert all(n.startswith("ctsdk-lanes") for n in threads_seen)
        assert t["prepare_ms"] > 0 and t["infer_ms"] >= 0
        one = s.infer_batched(make, 11, batch=2, lanes=1)  # per-call override: one batch at a time
        np.testing.assert_array_equal(one["probs"], got["probs"])
        with pytest.raises(ConfigError, match="lanes must be >= 1"):
            s.infer_batched(x, batch=2, lanes=0)
    with pytest.raises(ConfigError, match="lanes must be >= 1"):
        OrtSession(tiny[0], lanes=0)


def test_cpu_lanes_policy(monkeypatch):
    """One lane per core (at most MAX_AUTO_LANES) unless the caller chose threads; the lanes share
    the cores' intra-op threads."""
    from sdk.runtime.ort import MAX_AUTO_LANES, cpu_lanes, lane_threads

    monkeypatch.setenv("CTSDK_THREADS", "2")
    assert cpu_lanes() == 2 and lane_threads(None, 2) == 1
    assert cpu_lanes(threads=2) == 1 and cpu_lanes(threads=1, lanes=3) == 3
    assert lane_threads(3, 2) == 3
    monkeypatch.setenv("CTSDK_THREADS", "16")
    assert cpu_lanes() == MAX_AUTO_LANES and lane_threads(None, MAX_AUTO_LANES) == 16 // MAX_AUTO_LANES
    with pytest.raises(ConfigError, match="lanes must be >= 1"):
        cpu_lanes(lanes=0)


def test_select_runtime_cpu_lanes(tiny):
    """select_runtime passes lanes to the ORT CPU session: one intra-op thread per lane by default."""
    from sdk.runtime.ort import default_threads

    loader, info, _ = select_runtime("cpu", "fp32", {"fp32": tiny[0]}, lanes=2)
    s = loader()
    assert s.lanes == 2 and s.threads == max(1, default_threads() // 2)
    s1 = select_runtime("cpu", "fp32", {"fp32": tiny[0]}, threads=3)[0]()
    assert s1.lanes == 1 and s1.threads == 3


# --- CUDA session configuration, batch padding, device buffers ----------------------------------------
def test_cuda_provider_options_are_explicit(monkeypatch):
    from sdk.runtime.ort import cuda_provider_options, providers_for

    monkeypatch.delenv("CTSDK_CUDNN_SEARCH", raising=False)
    opts = cuda_provider_options()
    assert opts == {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1",
                    "arena_extend_strategy": "kSameAsRequested"}  # no device_id for GPU 0 (plugin-EP lookup)
    assert cuda_provider_options(1)["device_id"] == "1"
    assert "device_id" not in cuda_provider_options(0, extra={"device_id": 0})
    assert cuda_provider_options(cuda_graph=True)["enable_cuda_graph"] == "1"
    assert cuda_provider_options(extra={"use_tf32": False, "gpu_mem_limit": 1 << 30}) == {
        **opts, "use_tf32": "0", "gpu_mem_limit": str(1 << 30)}
    assert cuda_provider_options(cudnn_conv_algo_search="exhaustive")["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    monkeypatch.setenv("CTSDK_CUDNN_SEARCH", "DEFAULT")
    assert cuda_provider_options()["cudnn_conv_algo_search"] == "DEFAULT"
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search"):
        cuda_provider_options(cudnn_conv_algo_search="fastest")
    assert providers_for("cuda") == [("CUDAExecutionProvider", cuda_provider_options()), "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_session_threads(monkeypatch):
    from sdk.runtime.ort import default_threads, session_threads

    monkeypatch.delenv("CTSDK_CUDA_THREADS", raising=False)
    assert session_threads("cuda") == 1
    assert session_threads("cpu") == default_threads()
    assert session_threads("cuda", 3) == 3 == session_threads("cpu", 3)
    monkeypatch.setenv("CTSDK_CUDA_THREADS", "2")
    assert session_threads("cuda") == 2
    with pytest.raises(ConfigError, match="threads"):
        session_threads("cpu", 0)


def test_pad_batch_and_chunks():
    from sdk.runtime.ort import batch_chunks, pad_batch

    assert batch_chunks(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert batch_chunks(0, 32) == [] and batch_chunks(32, 32) == [(0, 32)]
    x = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    p = pad_batch(x, 4)
    assert p.shape == (4, 3) and p.dtype == x.dtype
    np.testing.assert_array_equal(p[:2], x)
    assert not p[2:].any()
    assert pad_batch(x, 2) is x
    with pytest.raises(ConfigError, match="do not fit"):
        pad_batch(x, 1)


def test_resolve_output_shapes():
    from sdk.runtime.base import TensorSpec
    from sdk.runtime.ort import resolve_output_shapes

    ins = [TensorSpec("image", ("batch", 3, 224, 224), "float32")]
    outs = [TensorSpec("probs", ("batch", 2), "float32"), TensorSpec("cam", ("batch", 2, 7, 7), "float32"),
            TensorSpec("boxes", ("n_boxes", 4), "float32"), TensorSpec("scale", (), "float32")]
    got = resolve_output_shapes(ins, outs, {"image": (5, 3, 224, 224)})
    assert got == {"probs": (5, 2), "cam": (5, 2, 7, 7), "boxes": None, "scale": ()}


def test_cuda_array_interface_helpers():
    from sdk.runtime.ort import cai_dtype, cai_streams

    class Dev:  # what a CuPy / torch / pycuda device array exposes
        def __init__(self, typestr, stream):
            self.__cuda_array_interface__ = {"shape": (2,), "typestr": typestr, "data": (1, False), "version": 3,
                                             "stream": stream}

    assert cai_dtype(Dev("<f4", None)) == np.float32 and cai_dtype(Dev("<f2", 1)) == np.float16
    assert cai_streams([Dev("<f4", 7), Dev("<f4", None), Dev("<f4", 7), Dev("<f4", 2)]) == [7, 2]
    with pytest.raises(ConfigError, match="not a CUDA device array"):
        cai_dtype(np.zeros(2))


@pytest.mark.parametrize("gap", [False, True])
def test_fixed_batch_pads_and_splits_on_any_provider(tiny, tmp_path, gap):
    _, w, b = tiny
    path = _conv_softmax_model(tmp_path / "m.onnx", w, b, gap=gap)
    x = np.random.default_rng(3).random((7, 2, 5, 5), dtype=np.float32)
    ref_probs, ref_feat = _reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    with OrtSession(path, threads=1, fixed_batch=3) as s:
        assert s.fixed_batch == 3 and s.options()["fixed_batch"] == 3
        out = s.infer({"image": x})
        two = s.infer({"image": x[:2]}, outputs=["probs"])
    assert out["probs"].shape == (7, 3) and out["feat"].shape == (7, 3, 5, 5)
    np.testing.assert_allclose(out["probs"], ref_probs, atol=1e-5)
    np.testing.assert_allclose(out["feat"], ref_feat, atol=1e-4)
    np.testing.assert_allclose(two["probs"], ref_probs[:2], atol=1e-5)
    with pytest.raises(ConfigError, match="fixed_batch"):
        OrtSession(path, fixed_batch=0)
    with pytest.raises(ConfigError, match="cuda_graph"):
        OrtSession(path, device="cpu", fixed_batch=4, cuda_graph=True)


def test_run_device_needs_the_cuda_ep(tiny):
    with OrtSession(tiny[0], device="cpu") as s:
        assert not s.on_gpu and s.threads >= 1
        with pytest.raises(RuntimeUnavailableError, match="CUDA EP"):
            s.run_device({"image": None}, ["probs"])


def _cuda_session_or_skip():
    """Skip (with the reason) only when there is no usable CUDA EP or no CuPy."""
    from sdk.runtime.ort import CUDA_EP, probe_provider

    ok, why = probe_provider(CUDA_EP)
    if not ok:
        pytest.skip(f"no usable ONNX Runtime CUDA EP here: {why}")
    return pytest.importorskip("cupy", reason="CuPy is not installed (device buffers need it)")


@pytest.mark.gpu
def test_cuda_session_options_and_device_buffers(tiny):
    cp = _cuda_session_or_skip()
    path, w, b = tiny
    x = np.random.default_rng(4).random((5, 2, 5, 5), dtype=np.float32)
    ref_probs, ref_feat = _reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    with OrtSession(path, device="cuda", strict=True) as s:
        assert s.on_gpu and s.threads == 1
        granted = s.session.get_provider_options()["CUDAExecutionProvider"]
        assert granted["cudnn_conv_algo_search"] == "HEURISTIC" and granted["do_copy_in_default_stream"] == "1"
        host = s.infer({"image": x})
        assert s.transfer_bytes["h2d"] == x.nbytes
        dev = s.run_device({"image": cp.asarray(x)}, ["probs", "feat"])
        assert isinstance(dev["probs"], cp.ndarray) and dev["probs"].shape == (5, 3)
        assert s.transfer_bytes["h2d"] == x.nbytes  # run_device copied nothing from the host
        np.testing.assert_allclose(cp.asnumpy(dev["probs"]), ref_probs, atol=1e-5)
        np.testing.assert_allclose(cp.asnumpy(dev["feat"]), ref_feat, atol=1e-4)
        np.testing.assert_allclose(host["probs"], ref_probs, atol=1e-5)
        with pytest.raises(ConfigError, match="dtype"):
            s.run_device({"image": cp.asarray(x, dtype=cp.float16)})


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_fixed_batch_and_graph_on_device(tiny, tmp_path, graph):
    cp = _cuda_session_or_skip()
    _, w, b = tiny
    path = _conv_softmax_model(tmp_path / "gap.onnx", w, b, gap=True)
    x = np.random.default_rng(6).random((7, 2, 5, 5), dtype=np.float32)
    ref_probs, _ = _reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    with OrtSession(path, device="cuda", strict=True, fixed_batch=4, cuda_graph=graph) as s:
        assert s.session.get_provider_options()["CUDAExecutionProvider"].get("enable_cuda_graph", "0") == str(int(graph))
        for rows in (7, 3, 4, 7):  # same buffers replayed with different fills
            got = s.run_device({"image": cp.asarray(x[:rows])}, ["probs"])["probs"]
            assert got.shape == (rows, 3)
            np.testing.assert_allclose(cp.asnumpy(got), ref_probs[:rows], atol=1e-5)
        np.testing.assert_allclose(s.infer({"image": x})["probs"], ref_probs, atol=1e-5)


@pytest.mark.gpu
def test_run_device_takes_torch_and_pycuda_arrays(tiny):
    cp = _cuda_session_or_skip()
    path, w, b = tiny
    x = np.random.default_rng(8).random((2, 2, 5, 5), dtype=np.float32)
    ref_probs, _ = _reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64))
    tried = []
    with OrtSession(path, device="cuda", strict=True) as s:
        if importlib.util.find_spec("torch") is not None:
            import torch

            if torch.cuda.is_available():
                got = s.run_device({"image": torch.from_numpy(x).cuda()}, ["probs"])["probs"]
                np.testing.assert_allclose(cp.asnumpy(got), ref_probs, atol=1e-5)
                tried.append("torch")
        if importlib.util.find_spec("pycuda") is not None:
            from sdk.runtime.gpu import pycuda_primary_context

            import pycuda.gpuarray as gpuarray

            ctx = pycuda_primary_context(0)
            with ctx.active():
                d = gpuarray.to_gpu(x, allocator=ctx.pool.allocate)
            got = s.run_device({"image": d}, ["probs"])["probs"]
            np.testing.assert_allclose(cp.asnumpy(got), ref_probs, atol=1e-5)
            tried.append("pycuda")
    if not tried:
        pytest.skip("neither torch with CUDA nor pycuda is installed")


def test_external_inference_session_runs_through_the_session_interface(tiny):
    """A caller's own onnxruntime.InferenceSession, wrapped, checks inputs and batches like OrtSession."""
    import onnxruntime as ort

    from sdk.runtime.base import ExternalOrtSession

    x = np.random.default_rng(4).random((5, 2, 5, 5), dtype=np.float32)
    ext = ExternalOrtSession(ort.InferenceSession(str(tiny[0]), providers=["CPUExecutionProvider"]))
    assert [t.name for t in ext.inputs] == ["image"] and ext.inputs[0].dtype == "float32"
    with OrtSession(tiny[0], threads=1) as s:
        ref = s.infer({"image": x})
    got = ext.infer_batched(x, batch=2)
    np.testing.assert_allclose(got["probs"], ref["probs"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="dtype"):
        ext.infer({"image": x.astype(np.float64)})

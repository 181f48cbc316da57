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
REPO = Path(__file__).resolve().parents[1]


def _conv_softmax_model(path: Path, w: np.ndarray, b: np.ndarray, precision: str = "") -> Path:
    """x (N, 2, 5, 5) -> Conv 3x3 (pad 1) -> ReduceMean over H, W -> Softmax: `probs` (N, K), and `feat`."""
    from onnx import TensorProto, helper, numpy_helper

    k = w.shape[0]
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, 5, 5])
    feat = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["batch", k, 5, 5])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", k])
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["feat"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["feat", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Softmax", ["pooled"], ["probs"], axis=1),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    m = helper.make_model(helper.make_graph(nodes, "tiny", [x], [probs, feat], inits),
                          opset_imports=[helper.make_opsetid("", 18)])
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
def test_auto_selection_falls_back_to_cpu_with_reasons(tiny):
    files = {"fp32": tiny[0]}
    loader, info, reasons = select_runtime("auto", "auto", files)
    assert info.backend == "onnxruntime" and info.provider == "CPUExecutionProvider" and info.precision == "fp32"
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


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

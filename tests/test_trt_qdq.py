"""TensorRT-ready INT8: the Q/DQ checker (sdk.export.qdq_check), the `--target tensorrt` calibration
recipe, and `ctsdk build-engine --precision int8` refusing a CPU INT8 file before TensorRT loads.

TensorRT is not installed here: everything is graph logic and ONNX Runtime on the CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import pytest

from conftest import PORTABLE_IR
from sdk.errors import ConfigError, MissingDependencyError

onnx = pytest.importorskip("onnx", reason="onnx (ctsdk[train] / ctsdk[gpu]) is needed to read Q/DQ graphs")
pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization is needed to quantise")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sdk.export.qdq_check import check_qdq_for_tensorrt, require_tensorrt_qdq  # noqa: E402

BUNDLE_INT8 = Path(__file__).resolve().parents[1] / "sdk" / "bundles" / "default" / "classifier_int8.onnx"


# --- helpers ------------------------------------------------------------------------------------
def _init(name: str, a: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(a), name)


def _model(nodes: Sequence, inits: Sequence, x_shape=("batch", 3, 8, 8), y_shape=None, y_name: str = "y") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, list(x_shape))
    y = helper.make_tensor_value_info(y_name, TensorProto.FLOAT, y_shape)
    g = helper.make_graph(list(nodes), "g", [x], [y], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR)


def _tiny_convnet(path: Path) -> Path:
    """Three convolutions (3x3, 3x3 stride 2, 1x1) with ReLUs, global pooling and a Gemm head:
    'logits' (batch, 2) from 'image' (batch, 3, 32, 32)."""
    rng = np.random.default_rng(0)

    def conv_w(o: int, i: int, k: int) -> np.ndarray:
        return (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(np.float32)

    inits = [_init("w1", conv_w(8, 3, 3)), _init("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
             _init("w2", conv_w(16, 8, 3)), _init("b2", rng.normal(0, 0.1, 16).astype(np.float32)),
             _init("w3", conv_w(16, 16, 1)), _init("b3", rng.normal(0, 0.1, 16).astype(np.float32)),
             _init("wf", rng.normal(0, 0.5, (2, 16)).astype(np.float32)), _init("bf", np.zeros(2, np.float32))]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3"),
             helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
             helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="head", transB=1)]
    m = _model(nodes, inits, ("batch", 3, 32, 32), ["batch", 2], "logits")
    onnx.checker.check_model(m)
    onnx.save_model(m, str(path))
    return path


def _inputs(n: int = 32) -> np.ndarray:
    """Smooth images in [0, 1] (a CT slice is mostly smooth): random low-resolution noise upsampled."""
    rng = np.random.default_rng(1)
    low = rng.random((n, 3, 8, 8)).astype(np.float32)
    return np.ascontiguousarray(low.repeat(4, axis=2).repeat(4, axis=3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fp32 path, prepared path, head node names, calibration inputs, work folder)."""
    from sdk.calibration.quantize import prepare

    work = tmp_path_factory.mktemp("trtqdq")
    fp32 = _tiny_convnet(work / "tiny_fp32.onnx")
    prepped, head = prepare(fp32, work / "prepped.onnx")
    return fp32, prepped, head, _inputs(), work


def _quantize(tiny, target: str) -> Path:
    """The product's path: calibrate_ranges + quantize (as calibrate() runs them) for ``target``."""
    from sdk.calibration.quantize import calibrate_ranges, quantize

    _, prepped, head, x, work = tiny
    ranges = calibrate_ranges(prepped, x[:16], "minmax", work / f"ranges_{target}.json", target=target)
    return quantize(prepped, work / f"int8_{target}.onnx", "minmax", head, ranges, target=target)


def _zero_points(model: onnx.ModelProto) -> List[np.ndarray]:
    init = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(init[n.input[2]]) for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


# --- (a) the shipped CPU INT8 file --------------------------------------------------------------
def test_shipped_cpu_int8_file_is_not_tensorrt_int8():
    if not BUNDLE_INT8.is_file():
        pytest.skip(f"{BUNDLE_INT8} not in this checkout")
    problems = check_qdq_for_tensorrt(BUNDLE_INT8)
    assert any(p.rule == "zero_point_type" and "uint8" in p.detail for p in problems)
    assert all(p.node and p.tensor for p in problems)          # each problem names node and tensor
    with pytest.raises(ConfigError) as e:
        require_tensorrt_qdq(BUNDLE_INT8)
    msg = str(e.value)
    assert str(BUNDLE_INT8) in msg and "ctsdk calibrate" in msg and "--target tensorrt" in msg
    assert "QuantizeLinear/DequantizeLinear nodes are not TensorRT INT8" in msg


def test_build_engine_int8_refuses_cpu_file_before_tensorrt(monkeypatch):
    """`ctsdk build-engine --model classifier --precision int8` (the bundle's CPU INT8 file): exit 2
    with the Q/DQ message and the fix, and TensorRT is never imported."""
    from click.testing import CliRunner

    import sdk.runtime.trt as trt_mod
    from sdk.cli import cli

    if not BUNDLE_INT8.is_file():
        pytest.skip(f"{BUNDLE_INT8} not in this checkout")

    def no_trt(*a, **k):
        raise AssertionError("import_tensorrt called before the Q/DQ check")

    monkeypatch.setattr(trt_mod, "import_tensorrt", no_trt)
    r = CliRunner().invoke(cli, ["build-engine", "--model", "classifier", "--precision", "int8"])
    assert r.exit_code == 2, r.output
    assert "not TensorRT INT8" in r.stderr and "--target tensorrt" in r.stderr and "classifier_int8.onnx" in r.stderr
    assert "install ctsdk[gpu] (TensorRT)" not in r.stderr


def test_build_engine_without_onnx_says_the_check_did_not_run(monkeypatch, tmp_path):
    """No onnx package: the pre-check says so on stderr (never skipped silently), then the build goes
    on to TensorRT (not installed here: the usual one-line TensorRT error)."""
    from click.testing import CliRunner

    import sdk.export.qdq_check as qc
    import sdk.runtime.trt as trt_mod
    from sdk.cli import cli

    def no_onnx(module, feature):
        raise MissingDependencyError("onnx", feature, "gpu")

    def trt_missing(*a, **k):
        raise MissingDependencyError("tensorrt", "ctsdk build-engine", "gpu")

    monkeypatch.setattr(qc, "require", no_onnx)
    monkeypatch.setattr(trt_mod, "import_tensorrt", trt_missing)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not read")
    r = CliRunner().invoke(cli, ["build-engine", "--model", str(path), "--precision", "int8"])
    assert r.exit_code == 2
    assert "pre-check for TensorRT NOT run" in r.stderr and "onnx" in r.stderr
    assert "tensorrt" in r.stderr.splitlines()[-1]


# --- (b) the tensorrt target through the product's quantisation code ---------------------------
def test_tensorrt_target_is_clean_symmetric_int8_and_close_to_fp32(tiny):
    from sdk.calibration.quantize import predict
    from sdk.export.onnx import read_metadata

    fp32, _, head, x, _ = tiny
    out = _quantize(tiny, "tensorrt")
    assert check_qdq_for_tensorrt(out) == []
    m = onnx.load(str(out))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") >= 6 and ops.count("DequantizeLinear") >= 6
    zps = _zero_points(m)
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    init = {t.name: t for t in m.graph.initializer}
    assert not any(t.data_type == TensorProto.INT32 for t in init.values())            # float biases
    producer = {o: n for n in m.graph.node for o in n.output}
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        dq = producer[conv.input[1]]                                                  # weight: Q -> DQ pair
        assert dq.op_type == "DequantizeLinear" and producer[dq.input[0]].op_type == "QuantizeLinear"
        assert conv.input[2] in init and init[conv.input[2]].data_type == TensorProto.FLOAT
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    assert gemm.name in head and all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear"
                                     for i in gemm.input)                             # head stays FP32
    assert read_metadata(out).get("quant_target") == "tensorrt"
    # ORT CPU runs the S8S8 graph. Tolerance: three 8-bit convolutions with symmetric ranges (step =
    # max|x| / 127, half of U8's on the non-negative ReLU outputs) give logit errors of a few
    # percent of the logit range; 0.05 x that range (measured here: 0.006 x, as for U8) flags a broken
    # graph (wrong axis or zero point: errors of the order of the range) without flaking.
    a, b = predict(fp32, x)["logits"], predict(out, x)["logits"]
    span = float(np.ptp(a))
    assert span > 0 and np.max(np.abs(a - b)) < 0.05 * span
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.9


# --- (c) the cpu target: flagged, and unchanged ---------------------------------------------------
def test_cpu_target_is_flagged_and_unchanged(tiny):
    """target "cpu" is today's recipe (the graph equals quantize_static with the pre-target options)
    and the checker flags its uint8 activations and int32 biases."""
    from onnxruntime import quantization as q

    _, prepped, head, _, work = tiny
    out = _quantize(tiny, "cpu")
    rules = {p.rule for p in check_qdq_for_tensorrt(out)}
    assert {"zero_point_type", "int32_bias"} <= rules
    ref = work / "ref_cpu.onnx"
    q.quantize_static(str(prepped), str(ref), None, quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8, nodes_to_exclude=list(head),
                      calibrate_method=q.CalibrationMethod.MinMax,
                      extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                      calibration_cache_path=str(work / "ranges_cpu.json"))
    assert onnx.load(str(out)).graph.SerializeToString() == onnx.load(str(ref)).graph.SerializeToString()
    from sdk.export.onnx import read_metadata

    assert "quant_target" not in read_metadata(out)


def test_unknown_target_is_a_config_error(tmp_path):
    from sdk.calibration.quantize import CalibrationOptions, calibrate, quant_target

    with pytest.raises(ConfigError, match="--target"):
        quant_target("tpu")
    with pytest.raises(ConfigError, match="--target"):
        calibrate(tmp_path / "none.onnx", tmp_path / "none.csv", tmp_path / "o.onnx", CalibrationOptions(target="gpu"))


# --- (d) one hand-made graph per rule -----------------------------------------------------------
def _qdq_act(zp: np.ndarray, scale=np.float32(0.02)) -> onnx.ModelProto:
    """image -> Q -> DQ -> y with the given zero point (per tensor)."""
    nodes = [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"], name="q_act"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_act")]
    return _model(nodes, [_init("s", np.asarray(scale, np.float32)), _init("z", zp)])


def _conv_weight_dq(axis: int, n_scales: int) -> onnx.ModelProto:
    """int8 weight (4, 3, 1, 1) -> per-channel DQ(axis) -> Conv(image)."""
    w = np.arange(-6, 6, dtype=np.int8).reshape(4, 3, 1, 1)
    inits = [_init("w_q", w), _init("w_s", np.full(n_scales, 0.01, np.float32)), _init("w_z", np.zeros(n_scales, np.int8))]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", axis=axis),
             helper.make_node("Conv", ["image", "w"], ["y"], name="conv")]
    return _model(nodes, inits)


def test_clean_hand_made_graphs_pass():
    assert check_qdq_for_tensorrt(_qdq_act(np.int8(0))) == []
    assert check_qdq_for_tensorrt(_conv_weight_dq(axis=0, n_scales=4)) == []


def test_rule_nonzero_int8_zero_point():
    (p,) = [p for p in check_qdq_for_tensorrt(_qdq_act(np.int8(3))) if p.node == "q_act"]
    assert p.rule == "zero_point_value" and p.tensor == "z" and "3" in p.detail
    assert {p.node for p in check_qdq_for_tensorrt(_qdq_act(np.int8(3)))} == {"q_act", "dq_act"}


def test_rule_per_channel_axis_1_on_conv_weight():
    (p,) = check_qdq_for_tensorrt(_conv_weight_dq(axis=1, n_scales=3))
    assert p.rule == "per_channel_axis" and p.node == "dq_w" and p.tensor == "w_q"
    assert "axis 1" in p.detail and "axis 0" in p.detail and "'conv'" in p.detail


def test_rule_missing_scale():
    nodes = [helper.make_node("QuantizeLinear", ["image", "", "z"], ["q"], name="q_noscale"),
             helper.make_node("DequantizeLinear", ["q", "s_nowhere", "z"], ["y"], name="dq_undefined_scale")]
    problems = check_qdq_for_tensorrt(_model(nodes, [_init("z", np.int8(0))]))
    assert [(p.node, p.rule) for p in problems] == [("q_noscale", "missing_scale"), ("dq_undefined_scale", "missing_scale")]
    assert "s_nowhere" in problems[1].detail


@pytest.mark.parametrize("zp, rule, word", [(np.uint8(128), "zero_point_type", "uint8"),
                                            (np.int16(0), "bit_width", "16-bit"),
                                            (np.uint16(0), "bit_width", "16-bit")])
def test_rule_zero_point_types(zp, rule, word):
    problems = check_qdq_for_tensorrt(_qdq_act(zp))
    assert [p.rule for p in problems] == [rule, rule] and word in problems[0].detail


def test_rule_default_zero_point_is_uint8_and_per_channel_activation():
    """A QuantizeLinear without a zero point outputs uint8 (ONNX default); a vector scale on an
    activation is per-channel activation quantisation, which TensorRT does not do."""
    nodes = [helper.make_node("QuantizeLinear", ["image", "s"], ["q"], name="q_default"),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq_default")]
    (p,) = check_qdq_for_tensorrt(_model(nodes, [_init("s", np.float32(0.02))]))
    assert p.node == "q_default" and p.rule == "zero_point_type"
    pc = _model([helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"], name="q_pc", axis=1),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_pc", axis=1)],
                [_init("s", np.full(3, 0.02, np.float32)), _init("z", np.zeros(3, np.int8))])
    assert {p.rule for p in check_qdq_for_tensorrt(pc)} == {"per_channel_activation"}


def test_require_tensorrt_qdq_message_and_onnx_missing(tmp_path, monkeypatch):
    import sdk.export.qdq_check as qc

    path = tmp_path / "classifier_int8.onnx"
    onnx.save_model(_qdq_act(np.int8(5)), str(path))
    (tmp_path / "classifier_fp32.onnx").write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        require_tensorrt_qdq(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 of 2 QuantizeLinear/DequantizeLinear") and "'q_act'" in msg
    assert f"ctsdk calibrate --onnx {tmp_path / 'classifier_fp32.onnx'}" in msg and "--target tensorrt" in msg
    onnx.save_model(_qdq_act(np.int8(0)), str(path))
    assert require_tensorrt_qdq(path) == []

    def no_onnx(module, feature):
        raise MissingDependencyError("onnx", feature, "gpu")

    monkeypatch.setattr(qc, "require", no_onnx)
    (w,) = require_tensorrt_qdq(path)
    assert "NOT run" in w and "onnx" in w

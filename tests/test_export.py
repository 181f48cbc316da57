"""ONNX export and FP16 conversion: parity against PyTorch eager on real slices, graph contracts.

The exporter runs on the real EfficientNet-Lite0 mask-GAP classifier from the registry (once per
module) and on the registry's 2D lung U-Net; references are torch eager and the FP32 graph.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from sdk._lazy import available as _available  # noqa: E402

needs_onnxslim = pytest.mark.skipif(not _available("onnxslim"), reason="onnxslim is not installed (the `train` extra)")

from sdk.export.onnx import (  # noqa: E402
    CLASSIFIER_OUTPUTS, classifier_metadata, export_fp16, export_onnx, fold_cast_roundtrips, fp32_head_nodes,
    read_metadata, toposort,
)
from sdk.export.samples import parity_inputs  # noqa: E402
from conftest import PORTABLE_IR  # noqa: E402


def _ort_run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, {s.get_inputs()[0].name: x})))


@pytest.fixture(scope="module")
def real_inputs():
    from conftest import shared_path

    shared_path("images_index.csv")
    x, source = parity_inputs(6, 3, (224, 224))
    assert "random" not in source
    return x


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory, real_inputs):
    from sdk.models import create_model

    torch.manual_seed(0)
    model = create_model("effnet_lite0_mgap", pretrained=True).eval()
    out = tmp_path_factory.mktemp("exp") / "classifier_fp32.onnx"
    report = export_onnx(model, out, metadata=classifier_metadata(model, name="effnet_lite0_mgap", bundle_version="9.9.9"),
                         parity_inputs=real_inputs, parity_source="test")
    return model, out, report


def test_classifier_export_contract_and_parity(classifier_export, real_inputs):
    model, out, report = classifier_export
    # one file, no external weights
    assert out.is_file() and not out.with_name(out.name + ".data").exists()
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == list(CLASSIFIER_OUTPUTS)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    # independent reference: torch eager vs ORT at two batch sizes (dynamic batch really works)
    with torch.no_grad():
        ref = model(torch.from_numpy(real_inputs))
    for sl in (slice(0, 1), slice(0, 5)):
        got = _ort_run(out, real_inputs[sl])
        np.testing.assert_allclose(got["logits"], ref[0][sl].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["probs"], ref[1][sl].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["cam"], ref[2][sl].numpy(), atol=1e-3, rtol=1e-4)
    assert report.parity.passed and report.parity.max_abs_logit_diff <= 1e-4
    assert report.parity.top1_agreement == 1.0


def test_classifier_metadata_and_pooling_ops(classifier_export):
    model, out, _ = classifier_export
    meta = read_metadata(out)
    assert meta["bundle_version"] == "9.9.9"
    assert meta["classes"] == list(model.cfg.classes)
    assert meta["preprocessing"]["window_hu"] == list(model.cfg.window)
    assert meta["preprocessing"]["mean"] == pytest.approx(list(model.cfg.mean))
    assert meta["preprocessing"]["size"] == 224
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    # the mask-weighted GAP is expressed as Mul + ReduceSum (fusable by ORT / TensorRT)
    assert "Mul" in ops and "ReduceSum" in ops and "Softmax" in ops


def test_fp16_keeps_head_fp32_and_matches_fp32(classifier_export, real_inputs, tmp_path):
    _, fp32, _ = classifier_export
    out = tmp_path / "classifier_fp16.onnx"
    report = export_fp16(fp32, out, parity_inputs=real_inputs, parity_source="test")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    # FP32 I/O
    for v in list(proto.graph.input) + list(proto.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # conv weights are FP16
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    assert sum(inits[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs) >= len(convs) - 1
    # softmax and both ReduceSums (mask-weight sum, weighted pooling) compute in FP32
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for n in proto.graph.node:
        if n.op_type in ("Softmax", "ReduceSum"):
            assert types.get(n.output[0]) == onnx.TensorProto.FLOAT, n.name
    # no FP32 -> FP16 -> FP32 round trips left
    producer = {o: n for n in proto.graph.node for o in n.output}
    for n in proto.graph.node:
        if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT:
            p = producer.get(n.input[0])
            assert not (p is not None and p.op_type == "Cast" and p.attribute[0].i == onnx.TensorProto.FLOAT16)
    # numerically close to the FP32 graph (independent run)
    a, b = _ort_run(fp32, real_inputs), _ort_run(out, real_inputs)
    assert np.max(np.abs(a["logits"] - b["logits"])) < 5e-2
    assert np.array_equal(a["logits"].argmax(1), b["logits"].argmax(1))
    assert np.max(np.abs(a["probs"] - b["probs"])) < 1e-2
    assert report.parity.passed
    assert out.stat().st_size < 0.6 * fp32.stat().st_size


@needs_onnxslim
def test_unet_exports_with_generic_names(tmp_path):
    from sdk.models import create_model

    torch.manual_seed(0)
    unet = create_model("unet2d_lung", base=4, levels=3).eval()
    x = np.random.default_rng(1).random((3, 1, 64, 64), dtype=np.float32)
    report = export_onnx(unet, tmp_path / "unet.onnx", input_size=64, metadata={"model": "unet2d_lung"},
                         parity_inputs=x, parity_source="test")
    proto = onnx.load(str(tmp_path / "unet.onnx"))
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    with torch.no_grad():
        ref = unet(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort_run(tmp_path / "unet.onnx", x)["logits"], ref, atol=1e-4)
    assert report.parity.top1_agreement is None  # not a classifier
    assert report.metadata["ctsdk.model"] == "unet2d_lung"
    assert read_metadata(tmp_path / "unet.onnx")["model"] == "unet2d_lung"


def test_export_rejects_old_opset(tmp_path):
    from sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="opset"):
        export_onnx(torch.nn.Conv2d(1, 1, 1), tmp_path / "x.onnx", opset=13)


def _graph(nodes, inputs, outputs, inits=()):
    from onnx import helper

    return helper.make_graph(nodes, "g", inputs, outputs, list(inits))


def test_fold_cast_roundtrips_and_toposort():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Relu", ["c2"], ["y"], name="relu"),             # out of order on purpose
        helper.make_node("Cast", ["a"], ["c1"], to=TensorProto.FLOAT16, name="c1"),
        helper.make_node("Cast", ["c1"], ["c2"], to=TensorProto.FLOAT, name="c2"),
        helper.make_node("Abs", ["x"], ["a"], name="abs"),
    ]
    g = _graph(nodes, [x], [y])
    assert fold_cast_roundtrips(g) == 1
    toposort(g)
    assert [n.name for n in g.node] == ["abs", "relu"]
    assert list(g.node[1].input) == ["a"]
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR)
    onnx.checker.check_model(m)
    xv = np.array([-1.0009765625, 2.0001], np.float32)  # not representable in FP16: must survive exactly
    np.testing.assert_array_equal(_ort_run_model(m, xv)["y"], np.abs(xv))


def _ort_run_model(m, x):
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"x": x})))


def test_fp32_head_nodes_excludes_backbone():
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w1 = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w1")
    g1 = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "g")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["f"], pads=[1, 1, 1, 1], name="backbone_conv"),
        helper.make_node("Slice", ["x", "s0", "s1", "s2"], ["m"], name="mask_slice"),
        helper.make_node("Conv", ["m", "g"], ["mg"], pads=[1, 1, 1, 1], name="gauss"),
        helper.make_node("Mul", ["f", "mg"], ["fw"], name="weight"),
        helper.make_node("ReduceSum", ["fw", "ax"], ["y"], keepdims=0, name="pool"),
    ]
    inits = [w1, g1] + [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                        (("s0", [1]), ("s1", [2]), ("s2", [1]), ("ax", [2, 3]))]
    m = helper.make_model(_graph(nodes, [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR)
    head = fp32_head_nodes(m)
    assert head == {"mask_slice", "gauss", "weight", "pool"}


def test_metadata_size_is_the_exports_not_the_trainings() -> None:
    """A network trained at 224 and exported at 256 runs on 256 inputs: the metadata says 256 (it
    said the model's 224, so the bundle check compared the manifest with the wrong number)."""
    class Cfg:
        input_size = 224
        window = (-1000.0, 400.0)

    class Net:
        cfg = Cfg()

    assert classifier_metadata(Net(), size=256)["preprocessing"]["size"] == 256
    assert classifier_metadata(Net())["preprocessing"]["size"] == 224      # no export size: the model's
    assert classifier_metadata(None)["preprocessing"]["size"] == 224       # neither: the default

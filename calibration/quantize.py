"""INT8 QDQ static quantisation with ONNX Runtime, method comparison, sensitivity and report.

    from sdk.calibration import calibrate
    report = calibrate("classifier_fp32.onnx", "../shared/data/images_index.csv",
                       "classifier_int8.onnx", n=256, method="all")
    report.passed, report.chosen["auc_delta"], report.speed

Recipe (FIELD_NOTES: only unsigned activations + signed weights pay on this CPU):
1. ``quant_pre_process`` (symbolic + ONNX shape inference, ORT graph optimisation), nodes named;
2. ``quantize_static`` in QDQ format, per-channel, activations QUInt8, weights QInt8, calibration
   data from the TRAIN split in strided chunks (``CalibStridedMinMax``) so Entropy/Percentile
   histograms do not hold every activation of 256 slices in memory;
3. the head - mask-weight normalisation, weighted pooling (Mul + ReduceSum), classifier, softmax,
   CAM - stays FP32 (``nodes_to_exclude`` = :func:`sdk.export.onnx.fp32_head_nodes`);
4. MinMax, Entropy and Percentile are compared on the TEST split (AUC / accuracy delta vs FP32,
   top-1 agreement); the most faithful (highest agreement, then smallest |AUC delta|) is kept;
5. if its AUC drops by more than ``max_auc_drop`` (0.01) or agreement is below 99 %, per-layer
   sensitivity (the SQNR each node loses, from ``qdq_loss_debug``) is reported, and the first
   backbone convolutions are kept FP32, two more per step, until the bar is met (or the step
   budget ends; the report says so). Quantisation error born in the high-resolution early layers
   compounds through the network; on the trained classifier that prefix, not the layers with the
   largest local SQNR drop, is what restores agreement (docs/benchmarks/int8.md).
   Only a PREFIX is really FP32: a convolution excluded between quantised layers (input from a
   DequantizeLinear) has its FP32 weights re-quantised PER-TENSOR by ONNX Runtime's
   ``WeightBiasQuantization`` graph transformer when the session loads (ORT 1.32), which is worse
   than quantising it here per-channel.
6. optional (``bias_correction``): each quantised convolution's bias absorbs the mean output shift
   of its INT8 weights, ``sum (Q(W) - W) * E[x]`` with ``E[x]`` the per-channel input means on the
   calibration slices (:func:`weight_bias_shift`).

Targets (``CalibrationOptions.target``, ``ctsdk calibrate --target``; :func:`quant_target`): "cpu"
(default, the recipe above: U8 activations, S8 weights, INT32 biases) or "tensorrt": symmetric signed
INT8 everywhere (S8 activations and S8 per-channel weights, all zero points 0, float biases), the
only Q/DQ TensorRT builds (:func:`sdk.export.qdq_check.check_qdq_for_tensorrt`). ONNX Runtime's
CPU EP runs that S8S8 graph too, so steps 4-6 judge it the same way.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, CtsdkError
from ..tables import json_safe
from .dataset import Preprocessor, Row, composition, load_rows, preprocess_batched, preprocessor, resolve_splits, stratified_sample
from .metrics import binary_summary

log = logging.getLogger("sdk.calibration")

PathLike = Union[str, os.PathLike]
METHODS: Tuple[str, ...] = ("minmax", "entropy", "percentile")
MAX_AUC_DROP = 0.01
MIN_AGREEMENT = 0.99
CALIB_BATCH = 8
#: calibration sets smaller than this get a warning (the run goes on): the activation ranges are
#: maxima / histograms over the calibration slices' activations, so a few slices miss the tails
#: other images reach (MinMax then clips them; Entropy / Percentile histograms are sparse), and a
#: stratified sample that small cannot hold several slices of each source/class stratum (6 in
#: images_index.csv). 64 = 8 calibration batches, about 10 slices per stratum; the default is 256.
MIN_CALIBRATION_SLICES = 64


class CalibrationError(CtsdkError):
    """INT8 calibration or its evaluation failed."""


# --- targets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantTarget:
    """What ``quantize_static`` is asked for on one deployment target.

    Attributes:
        name: "cpu" | "tensorrt".
        activation_type: ``onnxruntime.quantization.QuantType`` member for activations.
        activation_symmetric: symmetric activation ranges (zero point 0); also makes the
            calibrator collect symmetric ranges (ORT's ``CalibTensorRangeSymmetric``).
        extra: ``quantize_static`` extra options beyond the two symmetry flags.
    """

    name: str
    activation_type: str
    activation_symmetric: bool
    extra: Tuple[Tuple[str, Any], ...] = ()

    def extra_options(self) -> Dict[str, Any]:
        """``quantize_static(extra_options=...)`` (weights always symmetric: zero point 0)."""
        return {"ActivationSymmetric": self.activation_symmetric, "WeightSymmetric": True, **dict(self.extra)}


#: "cpu": U8 activations / S8 weights - the only mix that pays on this CPU (module docstring).
#: "tensorrt": TensorRT builds only symmetric signed INT8 Q/DQ (int8 zero points, all 0: the
#: onnx-tensorrt parser asserts "TRT only supports symmetric quantization - zeroPt must be all
#: zeros"). ONNX Runtime's quantize_static options for it (its docstring, and the PRs that added
#: them for the TensorRT EP, microsoft/onnxruntime#9616 and #9720, used together with
#: ActivationSymmetric in onnxruntime-inference-examples' TensorRT BERT example):
#: - AddQDQPairToWeight: weights stay float with a Q->DQ pair ("In some cases, for example QDQ BERT
#:   model for TensorRT, QDQ should always appear as a pair"); TensorRT quantises them with the Q
#:   scale. TensorRT 8.x rejects a DequantizeLinear fed by an INT8 initializer ("only activation
#:   types allowed as input to this layer", microsoft/onnxruntime#14229); TensorRT 10 takes both.
#: - DedicatedQDQPair: one Q/DQ pair per consumer ("In TRT, QDQ pair can't be shared between nodes").
#: - QuantizeBias=False: biases stay float; an INT32 bias DequantizeLinear (ORT's default) fails the
#:   TensorRT parse (onnx/onnx-tensorrt#850, NVIDIA/TensorRT#3360).
#: Per-channel weight axes are ORT's defaults (Conv: 0, the output channel); the classifier's head
#: (Gemm/MatMul) stays FP32, so no QDQOpTypePerChannelSupportToAxis entry is needed.
TARGETS: Dict[str, QuantTarget] = {
    "cpu": QuantTarget("cpu", "QUInt8", False),
    "tensorrt": QuantTarget("tensorrt", "QInt8", True,
                            (("AddQDQPairToWeight", True), ("DedicatedQDQPair", True), ("QuantizeBias", False))),
}


def quant_target(name: str) -> QuantTarget:
    """The :class:`QuantTarget` called ``name`` ("cpu" | "tensorrt"); ConfigError otherwise."""
    if name not in TARGETS:
        raise ConfigError(f"--target must be one of {tuple(TARGETS)}, got {name!r}")
    return TARGETS[name]


# --- data reader --------------------------------------------------------------------------------
def _reader_class() -> Any:
    q = require("onnxruntime.quantization", "INT8 calibration (onnxruntime.quantization)")

    class ArrayReader(q.CalibrationDataReader):
        """Feeds ``x`` in batches; supports ``set_range`` so ORT collects in strided chunks."""

        def __init__(self, input_name: str, x: np.ndarray, batch: int = CALIB_BATCH) -> None:
            self.name, self.batches = input_name, [x[i:i + batch] for i in range(0, len(x), batch)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(self.batches[start_index:end_index])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            b = next(self._it, None)
            return None if b is None else {self.name: np.ascontiguousarray(b, dtype=np.float32)}

        def rewind(self) -> None:
            self.set_range(0, len(self.batches))

    return ArrayReader


# --- steps --------------------------------------------------------------------------------------
def prepare(fp32_onnx: PathLike, out: PathLike) -> Tuple[Path, List[str]]:
    """Run ORT's quantisation pre-processing and name every node; returns (path, head node names)."""
    onnx = require("onnx", "INT8 calibration")
    q = require("onnxruntime.quantization", "INT8 calibration")
    from ..export.onnx import fp32_head_nodes

    out = Path(out)
    try:
        q.quant_pre_process(str(fp32_onnx), str(out), skip_symbolic_shape=False)
    except Exception as exc:  # symbolic shape inference can fail on exotic graphs: ONNX-only then
        log.warning("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
        q.quant_pre_process(str(fp32_onnx), str(out), skip_symbolic_shape=True)
    proto = onnx.load(str(out))
    head = sorted(fp32_head_nodes(proto))  # also names unnamed nodes
    onnx.save_model(proto, str(out))
    return out, head


def _method(method: str) -> Any:
    q = require("onnxruntime.quantization", "INT8 calibration")
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {METHODS + ('all',)}, got {method!r}")
    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]


def calibrate_ranges(prepped: PathLike, x_calib: np.ndarray, method: str, cache: PathLike, *,
                     percentile: float = 99.999, num_bins: int = 2048, num_quantized_bins: int = 128,
                     chunk: int = 32, target: str = "cpu") -> Path:
    """Activation ranges of ``prepped`` on ``x_calib`` with ``method``, saved as ORT's range cache.

    Data is collected in chunks of ``chunk`` slices (histograms merge across chunks), so memory
    holds one chunk's activations. Entropy uses 2048 histogram bins folded to 128 (TensorRT's
    choice); ``quantize_static`` does not forward ``num_bins`` and its default of 128/128 makes
    Entropy equal to MinMax, hence this function. ``target`` "tensorrt" collects symmetric ranges
    (Percentile: the percentile of |x|, ORT's own default for that method), as its symmetric
    activations use only max |range|.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    require("onnxruntime", "INT8 calibration")
    cm = _method(method)
    name = _input_name(prepped)
    cache = Path(cache)
    extra: Dict[str, Any] = {"symmetric": quant_target(target).activation_symmetric}
    if method == "entropy":
        extra.update(num_bins=num_bins, num_quantized_bins=num_quantized_bins)
    elif method == "percentile":
        extra.update(num_bins=num_bins, percentile=percentile)
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    with contextlib.redirect_stdout(sys.stderr):
        cal = create_calibrator(Path(prepped), ops, augmented_model_path=str(cache.with_suffix(".aug.onnx")),
                                calibrate_method=cm, extra_options=extra)
        reader = _reader_class()(name, x_calib)
        per = max(1, chunk // CALIB_BATCH)
        for start in range(0, len(reader), per):
            reader.set_range(start, start + per)
            cal.collect_data(reader)
        ranges = cal.compute_data()
    save_tensors_data(ranges, cache)
    aug = cache.with_suffix(".aug.onnx")
    if aug.exists():
        aug.unlink()
    return cache


def conv_input_means(prepped: PathLike, x: np.ndarray, convs: Sequence[str], batch: int = 16) -> Dict[str, np.ndarray]:
    """Per-channel mean of each named convolution's input over ``x`` (FP32 graph), keyed by conv
    name. The means are reduced inside the graph (one ``ReduceMean`` output per input tensor), so
    memory holds one batch's activations."""
    onnx = require("onnx", "INT8 bias correction")
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(prepped))
    nodes = {n.name: n for n in m.graph.node}
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 17)
    tensors = sorted({nodes[c].input[0] for c in convs})
    outs = []
    for t in tensors:
        o = f"{t}__ctsdk_chmean"
        if opset >= 18:  # axes became an input
            m.graph.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], np.int64), f"{o}_axes"))
            m.graph.node.append(helper.make_node("ReduceMean", [t, f"{o}_axes"], [o], keepdims=0))
        else:
            m.graph.node.append(helper.make_node("ReduceMean", [t], [o], axes=[0, 2, 3], keepdims=0))
        m.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
        outs.append(o)
    with tempfile.TemporaryDirectory(prefix="ctsdk-means-") as tmp:
        path = Path(tmp) / "means.onnx"
        onnx.save_model(m, str(path))
        sess = _session(path, 2)
        name = sess.inputs[0].name
        acc: List[Any] = [0.0] * len(outs)  # sums of batch means x batch size, per tensor
        k = 0
        for i in range(0, len(x), batch):
            xb = np.ascontiguousarray(x[i:i + batch], dtype=np.float32)
            res = sess.infer({name: xb}, outputs=outs)
            acc = [a + res[o].astype(np.float64) * len(xb) for a, o in zip(acc, outs)]
            k += len(xb)
    means = {t: a / max(k, 1) for t, a in zip(tensors, acc)}
    return {c: means[nodes[c].input[0]] for c in convs}


def weight_bias_shift(prepped: PathLike, x: np.ndarray, convs: Sequence[str]) -> Dict[str, np.ndarray]:
    """Bias correction for weight quantisation (Nagel et al. 2019, "Data-free quantization", with
    calibration data instead of BatchNorm statistics): for each convolution, the mean output shift
    its INT8 weights cause, ``sum (Q(W) - W) * E[x]`` per output channel, where ``Q`` is the
    quantiser :func:`quantize` applies (symmetric per-channel QInt8, scale = max|W| / 127) and
    ``E[x]`` the per-channel input mean over ``x``. Subtracting it from the bias removes the
    systematic part of the weight error (post-ReLU6 inputs have large means); padding borders are
    ignored."""
    onnx = require("onnx", "INT8 bias correction")
    from onnx import numpy_helper

    m = onnx.load(str(prepped), load_external_data=False)
    nodes = {n.name: n for n in m.graph.node}
    init = {t.name: t for t in m.graph.initializer}
    means = conv_input_means(prepped, x, convs)
    out: Dict[str, np.ndarray] = {}
    for c in convs:
        n = nodes[c]
        if len(n.input) < 3 or n.input[1] not in init or n.input[2] not in init:
            continue  # no constant weight or no bias initialiser: nothing to correct
        w = numpy_helper.to_array(init[n.input[1]]).astype(np.float64)
        amax = np.abs(w).reshape(w.shape[0], -1).max(1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).reshape(-1, *([1] * (w.ndim - 1)))
        dw = (np.clip(np.round(w / scale), -127, 127) * scale - w).reshape(w.shape[0], w.shape[1], -1).sum(-1)
        mu = means[c]
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if group == 1:
            shift = dw @ mu
        else:  # grouped: output channel o reads input channels (o // per_out_group) * cin_g ...
            cin_g, per = w.shape[1], w.shape[0] // group
            idx = (np.arange(w.shape[0]) // per)[:, None] * cin_g + np.arange(cin_g)[None, :]
            shift = (dw * mu[idx]).sum(1)
        out[c] = shift
    return out


def apply_bias_shift(prepped: PathLike, out: PathLike, shifts: Dict[str, np.ndarray], convs: Sequence[str]) -> Path:
    """Copy of ``prepped`` whose ``convs`` (those that will be quantised) have ``bias - shift``."""
    onnx = require("onnx", "INT8 bias correction")
    from onnx import numpy_helper

    m = onnx.load(str(prepped))
    nodes = {n.name: n for n in m.graph.node}
    init = {t.name: t for t in m.graph.initializer}
    for c in convs:
        if c not in shifts:
            continue
        bias = nodes[c].input[2]
        b = numpy_helper.to_array(init[bias]).astype(np.float64)
        init[bias].CopyFrom(numpy_helper.from_array((b - shifts[c]).astype(np.float32), bias))
    onnx.save_model(m, str(out))
    return Path(out)


def quantize(prepped: PathLike, out: PathLike, method: str, exclude: Sequence[str], ranges: PathLike, *,
             metadata: Optional[Dict[str, Any]] = None, bias_shift: Optional[Dict[str, np.ndarray]] = None,
             target: str = "cpu") -> Path:
    """QDQ static quantisation of ``prepped`` with precomputed ``ranges`` (see
    :func:`calibrate_ranges`): per-channel QInt8 weights, activations as ``target`` says (cpu:
    QUInt8; tensorrt: symmetric QInt8, float biases; :data:`TARGETS`); ``exclude`` nodes stay FP32.
    ``bias_shift`` (from :func:`weight_bias_shift`): the quantised convolutions' biases are
    corrected first (the excluded ones keep theirs)."""
    q = require("onnxruntime.quantization", "INT8 calibration")
    onnx = require("onnx", "INT8 calibration")
    qt = quant_target(target)
    out = Path(out)
    if bias_shift:
        skip = set(exclude)
        corrected = out.with_name(out.stem + ".bias_corrected.onnx")
        apply_bias_shift(prepped, corrected, bias_shift, [c for c in bias_shift if c not in skip])
        try:
            return quantize(corrected, out, method, exclude, ranges,
                            metadata={"bias_correction": "weights", **(metadata or {})}, target=target)
        finally:
            corrected.unlink(missing_ok=True)
    with contextlib.redirect_stdout(sys.stderr):
        q.quantize_static(str(prepped), str(out), None, quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=getattr(q.QuantType, qt.activation_type), weight_type=q.QuantType.QInt8,
                          nodes_to_exclude=list(exclude), calibrate_method=_method(method),
                          extra_options=qt.extra_options(), calibration_cache_path=str(ranges))
    proto = onnx.load(str(out))
    from ..export.onnx import set_metadata

    src = onnx.load(str(prepped), load_external_data=False)
    meta = {p.key[len("ctsdk."):]: p.value for p in src.metadata_props if p.key.startswith("ctsdk.")}
    meta.update({"precision": "int8", "calibration_method": method, "activation_type": qt.activation_type,
                 "weight_type": "QInt8 per-channel", "fp32_nodes": len(exclude)})
    if qt.name != "cpu":  # the default target's file stays byte for byte what it was before targets existed
        meta.update({"quant_target": qt.name, "activation_symmetric": "true", "bias": "float"})
    meta.update(metadata or {})
    set_metadata(proto, meta)
    onnx.save_model(proto, str(out))
    return out


def _input_name(path: PathLike) -> str:
    """The graph's first input name, from the ONNX file (no inference session needed)."""
    onnx = require("onnx", "INT8 calibration")
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in init)


def _session(path: PathLike, threads: int) -> Any:
    from ..export.onnx import ort_cpu_session

    return ort_cpu_session(path, threads)


def predict(path: PathLike, x: np.ndarray, threads: int = 2, batch: int = 32) -> Dict[str, np.ndarray]:
    """``logits`` and ``probs`` of an ONNX classifier over ``x`` (ORT CPU)."""
    sess = _session(path, threads)
    outs = [o.name for o in sess.outputs if o.name in ("logits", "probs")] or [sess.outputs[0].name]
    out = sess.infer_batched(np.asarray(x, dtype=np.float32), batch=batch, outputs=outs)
    if "probs" not in out:
        z = out[outs[0]] - out[outs[0]].max(1, keepdims=True)
        out["probs"] = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return out


def evaluate(pred: Dict[str, np.ndarray], y: np.ndarray, pos_index: int) -> Dict[str, float]:
    return binary_summary(y, pred["probs"][:, pos_index])


def compare(fp32: Dict[str, np.ndarray], int8: Dict[str, np.ndarray], y: np.ndarray, pos_index: int) -> Dict[str, Any]:
    a, b = evaluate(fp32, y, pos_index), evaluate(int8, y, pos_index)
    return {
        "auc": b["auc"], "accuracy": b["accuracy"], "sensitivity": b["sensitivity"], "specificity": b["specificity"],
        "auc_delta": b["auc"] - a["auc"], "accuracy_delta": b["accuracy"] - a["accuracy"],
        "top1_agreement": float(np.mean(fp32["probs"].argmax(1) == int8["probs"].argmax(1))),
        "max_abs_prob_diff": float(np.max(np.abs(fp32["probs"] - int8["probs"]))),
    }


def benchmark(fp32: PathLike, int8: PathLike, x: np.ndarray, *, batches: Sequence[int] = (1, 32), threads: int = 2,
              repeats: Optional[Dict[int, int]] = None, warmup: int = 2) -> Dict[str, Any]:
    """FP32 vs INT8 latency on ORT CPU in one process, interleaved run by run (same thermal and
    load conditions for both). Median ms per call and per image, and the FP32/INT8 ratio."""
    repeats = repeats or {1: 40, 32: 6}
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    name = sessions["fp32"].inputs[0].name
    out: Dict[str, Any] = {"threads": threads, "provider": "CPUExecutionProvider", "cpu": _cpu_name(),
                           "load_avg_1m_before": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    for b in batches:
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])).astype(np.float32))
        times: Dict[str, List[float]] = {"fp32": [], "int8": []}
        for _ in range(warmup):
            for s in sessions.values():
                s.infer({name: xb})
        for _ in range(repeats.get(b, 5)):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.infer({name: xb})
                times[k].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"batch{b}"] = {"fp32_ms": round(med["fp32"], 3), "int8_ms": round(med["int8"], 3),
                            "fp32_ms_per_image": round(med["fp32"] / b, 3), "int8_ms_per_image": round(med["int8"] / b, 3),
                            "speedup": round(med["fp32"] / med["int8"], 3), "repeats": len(times["fp32"])}
    if hasattr(os, "getloadavg"):
        out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def sensitivity(prepped: PathLike, int8: PathLike, x: np.ndarray, work: Path, top: int = 20) -> List[Dict[str, Any]]:
    """Per-layer sensitivity: how much SQNR (dB) each node loses between its input and output.

    ``qdq_loss_debug`` gives, for every activation, the SQNR of the INT8 model's value against the
    FP32 model's (``xmodel_err``, cumulative along the graph). A node's own damage is the SQNR
    drop from its (worst) input to its output; nodes are returned worst first - the candidates
    for ``nodes_to_exclude``.
    """
    dbg = require("onnxruntime.quantization.qdq_loss_debug", "INT8 sensitivity analysis")
    onnx = require("onnx", "INT8 sensitivity analysis")
    require("onnxruntime", "INT8 sensitivity analysis")
    f_aug, q_aug = work / "float_aug.onnx", work / "qdq_aug.onnx"
    with contextlib.redirect_stdout(sys.stderr):
        dbg.modify_model_output_intermediate_tensors(str(prepped), str(f_aug))
        dbg.modify_model_output_intermediate_tensors(str(int8), str(q_aug))
        name = _input_name(prepped)
        reader_cls = _reader_class()
        f_act = dbg.collect_activations(str(f_aug), reader_cls(name, x, 4))
        q_act = dbg.collect_activations(str(q_aug), reader_cls(name, x, 4))
        errs = dbg.compute_activation_error(dbg.create_activation_matching(q_act, f_act))
    sqnr = {t: float(e["xmodel_err"]) for t, e in errs.items() if "xmodel_err" in e and np.isfinite(e["xmodel_err"])}
    proto = onnx.load(str(prepped), load_external_data=False)
    graph_inputs = {i.name for i in proto.graph.input}
    rows = []
    for n in proto.graph.node:
        outs = [o for o in n.output if o in sqnr]
        if not outs:
            continue
        ins = [sqnr[i] for i in n.input if i in sqnr]
        if not ins and not any(i in graph_inputs for i in n.input):
            continue
        before = min(ins) if ins else 99.0  # the graph input itself is exact
        after = min(sqnr[o] for o in outs)
        rows.append({"node": n.name, "op": n.op_type, "sqnr_in_db": round(before, 3), "sqnr_out_db": round(after, 3),
                     "sqnr_drop_db": round(before - after, 3)})
    rows.sort(key=lambda r: -r["sqnr_drop_db"])
    return rows[:top]


# --- orchestration ------------------------------------------------------------------------------
@dataclass
class CalibrationReport:
    fp32_onnx: str
    int8_onnx: str
    passed: bool
    criteria: Dict[str, float]
    split_source: str
    calibration: Dict[str, Any]
    test: Dict[str, Any]
    fp32: Dict[str, float]
    methods: Dict[str, Dict[str, Any]]
    chosen: Dict[str, Any]
    excluded_nodes: List[str]
    sensitivity_steps: List[Dict[str, Any]] = field(default_factory=list)
    sensitivity: List[Dict[str, Any]] = field(default_factory=list)
    speed: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    versions: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return json_safe(asdict(self))

    def save(self, path: PathLike) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1))
        return p


def _positive_index(fp32_onnx: PathLike, n_classes: int) -> int:
    from ..export.onnx import read_metadata

    try:
        classes = read_metadata(fp32_onnx).get("classes") or []
    except Exception:
        classes = []
    if "covid" in classes:
        return list(classes).index("covid")
    return n_classes - 1


@dataclass
class CalibrationOptions:
    """How :func:`calibrate` samples, quantises, judges and reports (every field has a default).

    Attributes:
        n: calibration slices from the TRAIN split (stratified by source and class).
        method: "minmax" | "entropy" | "percentile", a comma list of them, or "all" (compare all,
            keep the best).
        splits_csv: ``path,split`` file; "auto" (default) = ``runs/classifier/splits.csv`` under the
            working directory when present, else the hash split with a warning
            (:func:`dataset.resolve_splits`); None = the images CSV's own split column.
        max_auc_drop / min_agreement: pass criteria on the TEST split.
        max_test: cap on test slices (stratified), None = all.
        sensitivity_steps / exclude_per_step: the exclusion loop keeps the first
            ``step * exclude_per_step`` backbone convolutions FP32, step = 1..sensitivity_steps,
            until the bar is met.
        bias_correction: correct each quantised convolution's bias for the mean output shift of
            its INT8 weights on the calibration slices (:func:`weight_bias_shift`); halves the
            probability error of the 0.2.0 classifier (docs/benchmarks/int8.md, 2026-12-04).
        percentile: the Percentile method's upper percentile of |activation| (ORT's default
            99.999; 99.99 clips more outliers).
        target: "cpu" (U8 activations, INT32 biases: ORT CPU's fast path) or "tensorrt"
            (symmetric S8 activations and weights, zero points 0, float biases: what
            ``ctsdk build-engine --precision int8`` accepts); see :data:`TARGETS`.
        bench: measure FP32 vs INT8 speed (batch 1 and 32, ``threads`` threads).
        threads: ORT CPU threads for evaluation and timing.
        seed: sampling seed.
        preprocess: rows -> (N, 3, S, S); default training's (see :func:`dataset.preprocessor`).
        report_path: also write the report as JSON there.
        progress: progress bars on stderr.
        masks_dir: the classifier's lung-mask cache (``<dir>/masks.npz``); None =
            :data:`dataset.DEFAULT_MASKS` under the working directory (only the default
            preprocessing uses it; a ``preprocess`` brings its own).
        on_warning: called with each warning (one line) as soon as it is known - the split
            fallback of "auto", a small calibration set, a coarse test AUC (:func:`data_warnings`);
            default: logged. Every warning is also in ``CalibrationReport.warnings``.
    """

    n: int = 256
    method: str = "all"
    splits_csv: Optional[Any] = "auto"
    max_auc_drop: float = MAX_AUC_DROP
    min_agreement: float = MIN_AGREEMENT
    max_test: Optional[int] = None
    sensitivity_steps: int = 6
    exclude_per_step: int = 2
    bias_correction: bool = False
    percentile: float = 99.999
    target: str = "cpu"
    bench: bool = True
    threads: int = 2
    seed: int = 0
    preprocess: Optional[Preprocessor] = None
    report_path: Optional[PathLike] = None
    progress: bool = True
    on_warning: Optional[Callable[[str], None]] = None
    masks_dir: Optional[PathLike] = None


def check_test_classes(test_rows: Sequence[Row], max_test: Optional[int], how: str) -> None:
    """ConfigError unless the test rows hold at least one slice of each class: the AUC (and so the
    accuracy bar) cannot be computed from one class."""
    n_pos = sum(r.y for r in test_rows)
    n_neg = len(test_rows) - n_pos
    if n_pos and n_neg:
        return
    missing = "covid" if not n_pos else "non-covid"
    cap = f"raise --max-test (now {max_test}) or " if max_test else ""
    raise ConfigError(f"the test set ({len(test_rows)} slice{'' if len(test_rows) == 1 else 's'}, split from {how}) has no {missing} slice, so its AUC "
                      f"cannot be computed and the INT8 model cannot be judged; {cap}pass --images / --splits with "
                      "test rows of both classes (nothing was calibrated)")


def data_warnings(calib_rows: Sequence[Row], train_rows: Sequence[Row], test_rows: Sequence[Row],
                  max_auc_drop: float = MAX_AUC_DROP) -> List[str]:
    """One-line warnings about sizes that make the verdict weak (the run goes on):

    - fewer than :data:`MIN_CALIBRATION_SLICES` calibration slices, or source/class strata of the
      train split missing from them;
    - a test set whose AUC moves in steps of ``1 / (n_pos * n_neg)`` larger than ``max_auc_drop``
      (one swapped pair can decide PASS / FAIL).
    """
    out: List[str] = []
    strata, seen = set(composition(train_rows)), set(composition(calib_rows))
    if len(calib_rows) < MIN_CALIBRATION_SLICES or strata - seen:
        what = f"only {len(calib_rows)} calibration slices" if len(calib_rows) < MIN_CALIBRATION_SLICES else \
            f"{len(calib_rows)} calibration slices"
        out.append(f"{what} covering {len(seen)} of the train split's {len(strata)} source/class strata: activation "
                   f"ranges from so few slices miss what other images reach (INT8 clips it); use --n "
                   f"{MIN_CALIBRATION_SLICES} or more (default 256)")
    n_pos = sum(r.y for r in test_rows)
    n_neg = len(test_rows) - n_pos
    if n_pos and n_neg and 1.0 / (n_pos * n_neg) > max_auc_drop:
        out.append(f"the test set has {n_pos} covid and {n_neg} non-covid slices: its AUC moves in steps of "
                   f"{1.0 / (n_pos * n_neg):.3g}, coarser than the {max_auc_drop} bar, so PASS / FAIL rests on single "
                   "slices; raise --max-test (or leave it out: the whole test split)")
    return out


def calibrate(fp32_onnx: PathLike, images_csv: PathLike, out: PathLike,
              options: Optional[CalibrationOptions] = None) -> CalibrationReport:
    """Calibrate ``fp32_onnx`` to an INT8 QDQ ONNX at ``out`` and report the accuracy delta.

    Args:
        fp32_onnx: the FP32 classifier (``ctsdk export``).
        images_csv: labelled slices (format of ../shared/data/images_index.csv).
        out: INT8 QDQ ONNX to write.
        options: :class:`CalibrationOptions` (default: all defaults).
    """
    o = options or CalibrationOptions()
    n, method, splits_csv, max_auc_drop, min_agreement = o.n, o.method, o.splits_csv, o.max_auc_drop, o.min_agreement
    max_test, sensitivity_steps, exclude_per_step, bench = o.max_test, o.sensitivity_steps, o.exclude_per_step, o.bench
    threads, seed, preprocess, report_path, progress = o.threads, o.seed, o.preprocess, o.report_path, o.progress
    warnings: List[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        (o.on_warning or (lambda m: log.warning("%s", m)))(message)

    t0 = time.perf_counter()
    qt = quant_target(o.target)  # ConfigError before any work
    src, out = Path(fp32_onnx), Path(out)
    if not src.is_file():
        raise ConfigError(f"{src}: FP32 ONNX not found (export it with `ctsdk export`)")
    methods = list(METHODS) if method == "all" else [m.strip() for m in method.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise ConfigError(f"--method must be one of {METHODS + ('all',)}, got {method!r}")
    if not 0 < o.percentile <= 100:   # "not 0 < x" also refuses NaN
        raise ConfigError(f"--percentile {o.percentile}: the Percentile method's upper percentile must be in (0, 100]")
    if o.max_test is not None and o.max_test < 1:
        raise ConfigError(f"--max-test {o.max_test}: give at least 1 test slice (None: all)")
    # the data is checked before any model work: a test set of one class is refused, weak sizes warned
    choice = resolve_splits(splits_csv)
    if choice.warning:
        warn(choice.warning)
    rows, _ = load_rows(images_csv, choice.path)
    split_how = choice.how
    train = [r for r in rows if r.split == "train"]
    test = [r for r in rows if r.split == "test"]
    if not train or not test:
        raise ConfigError(f"{images_csv}: need train and test rows (found {len(train)} train, {len(test)} test; split from {split_how})")
    calib_rows = stratified_sample(train, n, seed)
    test_rows = stratified_sample(test, max_test, seed) if max_test else test
    check_test_classes(test_rows, max_test, split_how)
    for message in data_warnings(calib_rows, train, test_rows, max_auc_drop):
        warn(message)
    require("onnxruntime", "INT8 calibration")  # fail early, naming the feature
    sess = _session(src, threads)
    shape = sess.inputs[0].shape
    size = int(shape[-1]) if isinstance(shape[-1], int) else 224
    pre = preprocess or preprocessor(size, o.masks_dir)
    x_cal = preprocess_batched(pre, calib_rows, progress=progress)
    x_test = preprocess_batched(pre, test_rows, progress=progress)
    y_test = np.array([r.y for r in test_rows])
    notes: List[str] = []
    mask_sources = getattr(pre, "mask_sources", None)
    if mask_sources:
        notes.append(f"lung masks: {mask_sources}")

    fp32_pred = predict(src, x_test, threads)
    pos = _positive_index(src, fp32_pred["probs"].shape[1])
    fp32_metrics = evaluate(fp32_pred, y_test, pos)
    results: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ctsdk-calib-") as tmp:
        work = Path(tmp)
        prepped, head = prepare(src, work / "prepped.onnx")
        # weight bias correction: shifts of every backbone conv, from the FP32 graph's input means on
        # the calibration slices; each quantize() call corrects only the convs it quantises
        shifts = weight_bias_shift(prepped, x_cal, backbone_convs(prepped, head)) if o.bias_correction else None
        best: Optional[Tuple[str, Path]] = None
        ranges: Dict[str, Path] = {}
        for m in methods:
            tm = time.perf_counter()
            ranges[m] = calibrate_ranges(prepped, x_cal, m, work / f"ranges_{m}.json", percentile=o.percentile,
                                         target=qt.name)
            path = quantize(prepped, work / f"int8_{m}.onnx", m, head, ranges[m], bias_shift=shifts, target=qt.name)
            cmp = compare(fp32_pred, predict(path, x_test, threads), y_test, pos)
            cmp["seconds"] = round(time.perf_counter() - tm, 2)
            results[m] = cmp
            log.info("INT8 %s: AUC delta %+.4f, agreement %.4f", m, cmp["auc_delta"], cmp["top1_agreement"])
            if best is None or _rank(cmp) > _rank(results[best[0]]):
                best = (m, path)
        assert best is not None
        chosen_m, chosen_path = best
        chosen = dict(results[chosen_m], method=chosen_m)
        exclude = list(head)
        steps: List[Dict[str, Any]] = []
        sens: List[Dict[str, Any]] = []
        if not _passes(chosen, max_auc_drop, min_agreement):
            try:
                sens = sensitivity(prepped, chosen_path, x_cal[:32], work)
            except Exception as exc:
                notes.append(f"sensitivity analysis failed: {exc}")
            # Exclusion loop: keep the first k backbone convolutions (graph order) in FP32, k growing
            # by `exclude_per_step`. Measured on the EfficientNet-Lite0 classifier: the error that
            # breaks agreement is born in the high-resolution early layers and compounds (the
            # per-node SQNR ranking in `sensitivity` points at middle layers, and excluding those
            # did not help - see docs/benchmarks/int8.md).
            convs = backbone_convs(prepped, head)
            for step in range(1, sensitivity_steps + 1):
                add = convs[:step * exclude_per_step]
                if not add or (steps and len(add) == len(steps[-1]["excluded"])):
                    break
                excl = list(head) + add
                path = quantize(prepped, work / f"int8_{chosen_m}_x{step}.onnx", chosen_m, excl, ranges[chosen_m],
                                bias_shift=shifts, target=qt.name)
                cmp = compare(fp32_pred, predict(path, x_test, threads), y_test, pos)
                steps.append({"step": step, "excluded": add, **cmp})
                ok = _passes(cmp, max_auc_drop, min_agreement)
                if ok or _rank(cmp) > _rank(chosen):
                    chosen, chosen_path, exclude = dict(cmp, method=chosen_m, extra_excluded=len(add)), path, excl
                if ok:
                    break
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chosen_path, out)
        if qt.name == "tensorrt":
            notes += _tensorrt_verdict(out)
        speed = benchmark(src, out, x_test[:32] if len(x_test) >= 1 else x_cal[:32], threads=threads) if bench else {}
    passed = _passes(chosen, max_auc_drop, min_agreement)
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__}
    try:
        import onnx

        versions["onnx"] = onnx.__version__
    except ImportError:
        pass
    report = CalibrationReport(
        fp32_onnx=str(src), int8_onnx=str(out), passed=passed,
        criteria={"max_auc_drop": max_auc_drop, "min_top1_agreement": min_agreement},
        split_source=split_how,
        calibration={"n": len(calib_rows), "split": "train", "composition": composition(calib_rows), "seed": seed,
                     "target": qt.name, "activation_type": qt.activation_type,
                     "activation_symmetric": qt.activation_symmetric, "weight_type": "QInt8 per-channel", "format": "QDQ",
                     "bias_correction": o.bias_correction, "percentile": o.percentile},
        test={"n": len(test_rows), "composition": composition(test_rows), "positive_class_index": pos},
        fp32=fp32_metrics, methods=results, chosen=chosen, excluded_nodes=exclude, sensitivity_steps=steps,
        sensitivity=sens[:10], speed=speed, seconds=round(time.perf_counter() - t0, 1), versions=versions, notes=notes,
        warnings=warnings,
    )
    if report_path:
        report.save(report_path)
    return report


def _tensorrt_verdict(path: PathLike) -> List[str]:
    """The report note for a "tensorrt" file: what :func:`check_qdq_for_tensorrt` says of it."""
    from ..export.qdq_check import check_qdq_for_tensorrt

    problems = check_qdq_for_tensorrt(path)
    if not problems:
        return ["TensorRT Q/DQ check: clean (symmetric signed INT8, all zero points 0; not built on a GPU here)"]
    log.warning("TensorRT Q/DQ check of %s: %d problems, first: %s", path, len(problems), problems[0])
    return [f"TensorRT Q/DQ check: {len(problems)} problems, first: {problems[0]}"]


def runtime_hints(report: Union[PathLike, Dict[str, Any]]) -> Dict[str, Any]:
    """``select_runtime`` keyword arguments from a calibration report (path or dict):
    ``calibration_passed`` and ``int8_speedup`` (the smaller of the batch-1 and batch-32 ratios,
    None when speed was not measured).

        loader, info, reasons = select_runtime("auto", "auto", files, **runtime_hints("calibration_report.json"))
    """
    d = json.loads(Path(report).read_text()) if not isinstance(report, dict) else report
    ratios = [v["speedup"] for k, v in (d.get("speed") or {}).items() if k.startswith("batch") and isinstance(v, dict)]
    return {"calibration_passed": bool(d.get("passed")), "int8_speedup": min(ratios) if ratios else None}


def _passes(c: Dict[str, Any], max_auc_drop: float, min_agreement: float) -> bool:
    """The accuracy bar; never met by an AUC delta that could not be computed (None / NaN)."""
    d = c.get("auc_delta")
    if d is None or not np.isfinite(d):
        return False
    return bool(-d <= max_auc_drop and c["top1_agreement"] >= min_agreement)


def backbone_convs(prepped: PathLike, head: Sequence[str]) -> List[str]:
    """Names of the quantised convolutions in graph (topological) order, head excluded."""
    onnx = require("onnx", "INT8 calibration")
    m = onnx.load(str(prepped), load_external_data=False)
    skip = set(head)
    return [n.name for n in m.graph.node if n.op_type == "Conv" and n.name not in skip]


def _rank(c: Dict[str, Any]) -> Tuple[float, float]:
    """Higher is better: fidelity to FP32 first (top-1 agreement), then the smallest |AUC delta|.
    Ranking by the AUC itself would reward noise that happens to help on the test split."""
    d = c["auc_delta"]
    return (round(c["top1_agreement"], 6), -abs(d) if d == d else -1.0)


__all__ = ["CalibrationError", "CalibrationOptions", "CalibrationReport", "METHODS", "MIN_CALIBRATION_SLICES", "QuantTarget",
           "TARGETS", "apply_bias_shift", "benchmark", "calibrate", "calibrate_ranges", "check_test_classes", "compare",
           "conv_input_means", "data_warnings", "predict", "prepare", "quant_target", "quantize", "runtime_hints", "sensitivity",
           "weight_bias_shift"]

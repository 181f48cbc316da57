"""PyTorch -> ONNX export with a parity check, and FP16 conversion.

    from sdk.models import create_model
    from sdk.export import export_onnx, export_fp16, classifier_metadata

    model = create_model("effnet_lite0_mgap")
    report = export_onnx(model, "classifier_fp32.onnx", metadata=classifier_metadata(model))
    print(report.parity.max_abs_logit_diff, report.parity.top1_agreement)
    fp16 = export_fp16("classifier_fp32.onnx", "classifier_fp16.onnx")

Contract (docs/conventions.md "Classifier ONNX interface"): one input ``image`` float32
``(N, 3, S, S)`` in ``[0, 1]``; outputs ``logits``, ``probs`` (softmax) and ``cam``; dynamic batch.
Other models (the 2D lung U-Net) go through the same exporter with generic names: input ``image``
and one output per returned tensor (``logits`` for a single tensor).

The model is exported with torch's dynamo exporter (needs onnxscript), checked with
``onnx.checker``, simplified with onnxslim, given ``metadata_props`` and saved as ONE file (no
``.onnx.data`` beside it). torch, onnx and onnxslim are imported inside the functions.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, CtsdkError, whole_number
from ..preprocessing import CLASSIFIER_MEAN, CLASSIFIER_STD, CLASSIFIER_WINDOW

log = logging.getLogger("sdk.export")

PathLike = Union[str, Path]

CLASSIFIER_OUTPUTS: Tuple[str, str, str] = ("logits", "probs", "cam")
CLASSIFIER_INPUT = "image"
#: Lung window (lo, hi) HU and mean/std: owned by sdk.preprocessing (the ImageNet mean/std that
#: stood here disagreed with the models' own (0.5, 0.5, 0.5) normalisation).
DEFAULT_WINDOW: Tuple[float, float] = CLASSIFIER_WINDOW
DEFAULT_MEAN: Tuple[float, ...] = CLASSIFIER_MEAN
DEFAULT_STD: Tuple[float, ...] = CLASSIFIER_STD
DEFAULT_CLASSES: Tuple[str, str] = ("non_covid", "covid")
#: metadata_props keys are namespaced so they never clash with other tools' keys.
META_PREFIX = "ctsdk."
#: FP32 parity bar of issue 5: max |logit(onnx) - logit(torch)|.
PARITY_TOL = 1e-4


class ExportError(CtsdkError):
    """Exporting, checking or converting an ONNX model failed."""


# --- reports ------------------------------------------------------------------------------------
@dataclass
class ParityReport:
    """ONNX Runtime (CPU) against a reference on the same inputs.

    ``max_abs_diff`` holds the max absolute difference of every output; for classifiers
    ``top1_agreement`` is the share of inputs whose argmax logit agrees.
    """

    n: int
    source: str
    reference: str
    max_abs_diff: Dict[str, float]
    max_abs_logit_diff: float
    top1_agreement: Optional[float]
    tolerance: float
    passed: bool

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What :func:`export_onnx` / :func:`export_fp16` wrote and how it compares."""

    path: str
    opset: int
    precision: str
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    metadata: Dict[str, str]
    nodes_exported: int
    nodes_final: int
    op_counts: Dict[str, int]
    size_bytes: int
    sha256: str
    seconds: float
    parity: Optional[ParityReport] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["parity"] = None if self.parity is None else self.parity.to_dict()
        return d


# --- helpers ------------------------------------------------------------------------------------
from ..bundle import sha256_file  # noqa: E402  (one streamed-hash helper for bundles, exports, engine keys)


def classifier_metadata(
    model: Any = None,
    *,
    bundle_version: Optional[str] = None,
    name: str = "",
    window: Sequence[float] = DEFAULT_WINDOW,
    size: Optional[int] = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
) -> Dict[str, Any]:
    """Metadata for a classifier export: bundle version and preprocessing.

    ``bundle_version`` is written only when given (None: no ``bundle_version`` key - an export
    does not know which bundle it will ship in; nothing in ctsdk reads the key back).
    Values found on the model (``model.cfg`` / ``model.pretrained_cfg`` attributes or dict keys
    ``window``, ``input_size``, ``classes``, ``mean``, ``std``) override the defaults, so the ONNX
    carries what the network was trained with - except ``size``: given, it is the export's input
    size (the graph's), which wins over the training size on the model (a 224-trained network
    exported at 256 runs on 256 inputs); None = the model's, else 224.
    """
    cfg = _model_cfg(model)
    win = cfg.get("window", cfg.get("hu_window", window))
    size_v = size if size is not None else cfg.get("input_size", cfg.get("size", 224))
    if isinstance(size_v, (list, tuple)):
        size_v = size_v[-1]
    meta: Dict[str, Any] = {} if bundle_version is None else {"bundle_version": str(bundle_version)}
    return {
        **meta,
        "model": name or cfg.get("name", type(model).__name__ if model is not None else ""),
        "preprocessing": {
            "window_hu": [float(v) for v in win],
            "size": int(size_v),
            "channels": ["grey", "lung_mask", "grey*mask"],
            "input_range": [0.0, 1.0],
            "normalisation": "mean/std inside the graph",
            "mean": [float(v) for v in cfg.get("mean", mean)],
            "std": [float(v) for v in cfg.get("std", std)],
        },
        "classes": [str(c) for c in cfg.get("classes", classes)],
    }


def _model_cfg(model: Any) -> Dict[str, Any]:
    for attr in ("cfg", "pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if cfg is None:
            continue
        if isinstance(cfg, Mapping):
            return dict(cfg)
        if hasattr(cfg, "__dataclass_fields__"):
            return asdict(cfg)
        if hasattr(cfg, "__dict__"):
            return dict(vars(cfg))
    return {}


def read_metadata(onnx_path: PathLike) -> Dict[str, Any]:
    """The ``ctsdk.*`` metadata_props of an ONNX file (JSON values decoded), prefix stripped."""
    onnx = require("onnx", "reading ONNX metadata")
    m = onnx.load(str(onnx_path), load_external_data=False)
    out: Dict[str, Any] = {}
    for p in m.metadata_props:
        if p.key.startswith(META_PREFIX):
            key = p.key[len(META_PREFIX):]
            try:
                out[key] = json.loads(p.value)
            except ValueError:
                out[key] = p.value
    return out


def _first_conv(model: Any) -> Tuple[int, int]:
    """(in_channels, spatial dims) of the first convolution: how big an example input must be."""
    torch = require("torch", "ONNX export")
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)):
            return int(mod.in_channels), 2 if isinstance(mod, torch.nn.Conv2d) else 3
    raise ConfigError(f"{type(model).__name__}: no Conv2d/Conv3d found; pass in_channels= and a 2D/3D input_size to export_onnx")


def input_shape(model: Any, input_size: Any, *, option: str = "input_size") -> Tuple[int, int, List[int]]:
    """(in_channels, spatial dims, spatial shape) of the example input ``input_size`` gives ``model``:
    S for a square / cube at the first convolution's dims, or the full spatial shape. ConfigError
    naming ``option`` unless it is one whole number >= 1 or one per spatial dim."""
    cin, dims = _first_conv(model)
    listed = isinstance(input_size, Sequence) and not isinstance(input_size, str)
    sizes = list(input_size) if listed else [input_size] * dims
    if len(sizes) != dims:
        raise ConfigError(f"{option} {input_size!r} has {len(sizes)} dims, the model's first conv is {dims}-D")
    spatial = [int(whole_number(option, s, allow_none=False, what="input side in pixels"))  # type: ignore[arg-type]
               for s in sizes]
    return cin, dims, spatial


def forward_or_refuse(model: Any, example: Any, input_size: Any, *, name: str = "", option: str = "input_size") -> Any:
    """``model``'s output on ``example`` (no grad; ``forward_onnx`` when it has one), or a
    ConfigError naming ``option``, its value and the model when the model cannot run on an input of
    that size (a U-Net needs a side its poolings halve evenly: 33 or 7 fail; an input too large to
    allocate) - the one check of an export's input size (:func:`export_onnx`, :func:`check_input_size`)."""
    torch = require("torch", "ONNX export")
    forward = model.forward_onnx if callable(getattr(model, "forward_onnx", None)) else model
    try:
        with torch.no_grad():
            return forward(example)
    except RuntimeError as exc:  # shapes that do not fit, or an input too large to allocate
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shape = "x".join(str(int(d)) for d in example.shape[2:])
        raise ConfigError(f"{option} {input_size}: model {name or type(model).__name__!r} cannot run on {shape} inputs "
                          f"({first}); give a side its layers divide evenly, e.g. 128 or 224") from None


def check_input_size(model: Any, input_size: Any, *, name: str = "", option: str = "input_size") -> List[int]:
    """The spatial shape of ``input_size`` once ``model`` (put in eval mode) ran on one zero input of it:
    :func:`input_shape` and :func:`forward_or_refuse` before any export work (``ctsdk export
    --input-size`` calls it with ``option="--input-size"``; :func:`export_onnx` checks the same way)."""
    torch = require("torch", "ONNX export")
    model = model.eval()
    cin, _, spatial = input_shape(model, input_size, option=option)
    forward_or_refuse(model, torch.zeros(1, cin, *spatial), input_size, name=name, option=option)
    return spatial


def _adapter(model: Any) -> Any:
    """Wrap ``model`` so forward returns a tuple (dict outputs keep their key order)."""
    torch = require("torch", "ONNX export")

    class IOAdapter(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            fn = getattr(self.inner, "forward_onnx", None)
            out = fn(x) if callable(fn) else self.inner(x)
            if isinstance(out, Mapping):
                return tuple(out.values())
            if isinstance(out, (list, tuple)):
                return tuple(out)
            return (out,)

    return IOAdapter(model).eval()


def _output_names(model: Any, example_out: Any, given: Optional[Sequence[str]]) -> List[str]:
    if given:
        return list(given)
    if isinstance(example_out, Mapping):
        return [str(k) for k in example_out]
    n = len(example_out) if isinstance(example_out, (list, tuple)) else 1
    if n == 3 and (getattr(model, "num_classes", None) is not None or _model_cfg(model).get("classes")):
        return list(CLASSIFIER_OUTPUTS)
    if n == 1:
        return ["logits"]
    return [f"output_{i}" for i in range(n)]


def _is_classifier(output_names: Sequence[str]) -> bool:
    return tuple(output_names[:3]) == CLASSIFIER_OUTPUTS


def _tensor_specs(values: Sequence[Any]) -> List[Dict[str, Any]]:
    onnx = require("onnx", "ONNX export")
    specs = []
    for v in values:
        tt = v.type.tensor_type
        dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None) for d in tt.shape.dim]
        specs.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": dims})
    return specs


def set_metadata(model_proto: Any, metadata: Mapping[str, Any]) -> Dict[str, str]:
    written: Dict[str, str] = {}
    keep = [p for p in model_proto.metadata_props if not p.key.startswith(META_PREFIX)]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + str(key), text
        written[META_PREFIX + str(key)] = text
    return written


def _save_single_file(model_proto: Any, out: Path) -> None:
    onnx = require("onnx", "ONNX export")
    out.parent.mkdir(parents=True, exist_ok=True)
    if model_proto.ByteSize() > 1_900_000_000:
        raise ExportError(f"{out}: model is {model_proto.ByteSize() / 1e9:.1f} GB, too big for one ONNX file; ctsdk ships single-file models only")
    onnx.save_model(model_proto, str(out), save_as_external_data=False)
    stale = out.with_name(out.name + ".data")
    if stale.exists():
        stale.unlink()


# --- export -------------------------------------------------------------------------------------
def export_onnx(
    model: Any,
    out_path: PathLike,
    *,
    opset: int = 17,
    input_size: Union[int, Sequence[int]] = 224,
    metadata: Optional[Mapping[str, Any]] = None,
    simplify: bool = True,
    in_channels: Optional[int] = None,
    input_name: str = CLASSIFIER_INPUT,
    output_names: Optional[Sequence[str]] = None,
    parity_inputs: Optional[np.ndarray] = None,
    parity_source: str = "",
    n_parity: int = 16,
    tolerance: float = PARITY_TOL,
) -> ExportReport:
    """Export a torch model to one ONNX file with a dynamic batch axis and check it.

    Args:
        model: a ``torch.nn.Module`` (e.g. from :func:`sdk.models.create_model`). Its forward may
            return a tensor, a tuple or a dict; a ``forward_onnx`` method is preferred if present.
        out_path: the ``.onnx`` file to write (one file, weights inside).
        opset: ONNX opset (>= 17).
        input_size: spatial size S (square / cube) or the full spatial shape; one the model cannot
            run on (e.g. 33 for a U-Net that halves it three times) is a ConfigError before any export
            work (:func:`check_input_size`).
        metadata: written as ``ctsdk.<key>`` metadata_props (non-strings as JSON); see
            :func:`classifier_metadata`.
        simplify: run onnxslim on the exported graph.
        in_channels: input channels (default: the first convolution's).
        input_name / output_names: graph I/O names (default ``image`` and, for a classifier
            returning 3 tensors or a dict, ``logits, probs, cam``).
        parity_inputs: float32 array for the parity check; default: real slices from
            ../shared/data (see :mod:`sdk.export.samples`), random only if none exist.
        tolerance: max |logit| difference for ``parity.passed``.

    Returns:
        ExportReport (``parity`` compares ONNX Runtime CPU with torch eager on the inputs).

    Raises:
        ConfigError for bad arguments, ExportError when export/checking fails,
        MissingDependencyError without torch/onnx/onnxscript/onnxslim.
    """
    if opset < 17:
        raise ConfigError(f"opset must be >= 17 (LayerNorm/ReduceSum-axes-as-input era), got {opset}")
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch dynamo exporter)")
    out = Path(out_path)
    t0 = time.perf_counter()
    model = model.eval()
    cin, dims, spatial = input_shape(model, input_size)
    cin = in_channels or cin
    example = torch.rand(2, cin, *spatial)
    wrapped = _adapter(model)
    raw = forward_or_refuse(model, example, input_size, name=str((metadata or {}).get("model") or ""))
    names = _output_names(model, raw, output_names)
    n_out = len(wrapped(example))
    if len(names) != n_out:
        raise ConfigError(f"output_names {names} has {len(names)} names, the model returns {n_out} tensors")

    tmp = out.with_name(out.stem + ".export.tmp.onnx")
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        # the dynamo exporter prints progress on stdout (keep it clean for --json) and logs a
        # traceback when its own opset down-conversion fails (handled below): quiet both
        with contextlib.redirect_stdout(sys.stderr), _quiet_loggers("onnxscript", "torch.onnx"), torch.no_grad():
            torch.onnx.export(
                wrapped, (example,), str(tmp), dynamo=True, opset_version=opset, input_names=[input_name],
                output_names=names, dynamic_shapes=({0: batch},), external_data=False, verbose=False,
            )
        proto = onnx.load(str(tmp))
    except CtsdkError:
        raise
    except Exception as exc:  # torch raises many types here; keep the cause
        raise ExportError(f"{out}: torch.onnx.export (dynamo, opset {opset}) failed for {type(model).__name__}: {exc}") from exc
    finally:
        for p in (tmp, tmp.with_name(tmp.name + ".data")):
            if p.exists():
                p.unlink()
    nodes_exported = len(proto.graph.node)
    notes: List[str] = []
    actual_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if actual_opset != opset:
        notes.append(f"exporter produced opset {actual_opset} (requested {opset})")
    if simplify:
        proto = _simplify(proto, notes)
    if actual_opset > opset:
        proto, actual_opset = _downgrade(proto, opset, actual_opset, notes)
    set_metadata(proto, {"opset": actual_opset, **(dict(metadata or {}))})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"{out}: onnx.checker rejected the exported graph: {exc}") from exc
    _check_dynamic_batch(proto, out)
    _save_single_file(proto, out)
    report = ExportReport(
        path=str(out), opset=actual_opset, precision="fp32",
        inputs=_tensor_specs(proto.graph.input), outputs=_tensor_specs(proto.graph.output),
        metadata={p.key: p.value for p in proto.metadata_props}, nodes_exported=nodes_exported,
        nodes_final=len(proto.graph.node), op_counts=dict(Counter(n.op_type for n in proto.graph.node)),
        size_bytes=out.stat().st_size, sha256=sha256_file(out), seconds=0.0, notes=notes,
    )
    if parity_inputs is None:
        from .samples import parity_inputs as _real

        parity_inputs, parity_source = _real(n_parity, cin, spatial)
    report.parity = torch_parity(model, out, parity_inputs, source=parity_source or "given", tolerance=tolerance)
    report.seconds = round(time.perf_counter() - t0, 3)
    log.info("exported %s: %d nodes, parity max|dlogit| %.2e", out, report.nodes_final, report.parity.max_abs_logit_diff)
    return report


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Any:
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _simplify(proto: Any, notes: List[str]) -> Any:
    onnxslim = require("onnxslim", "ONNX graph simplification")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            slim = onnxslim.slim(proto)
    except Exception as exc:  # onnxslim is best effort: keep the exporter's graph, say so
        notes.append(f"onnxslim failed, graph kept unsimplified: {exc}")
        log.warning("onnxslim failed (%s); keeping the exported graph", exc)
        return proto
    if slim is None:
        notes.append("onnxslim returned nothing; graph kept unsimplified")
        return proto
    notes.append(f"onnxslim: {len(proto.graph.node)} -> {len(slim.graph.node)} nodes")
    return slim


def _downgrade(proto: Any, opset: int, current: int, notes: List[str]) -> Tuple[Any, int]:
    """Convert to the requested opset after simplification (e.g. once onnxslim has folded the
    "same" Pad into Conv, the Pad-18 -> 17 adapter that onnx lacks is no longer needed)."""
    onnx = require("onnx", "ONNX export")
    try:
        conv = onnx.version_converter.convert_version(proto, opset)
        onnx.checker.check_model(conv)
    except Exception as exc:
        notes.append(f"kept opset {current}: conversion to {opset} failed ({str(exc).splitlines()[-1][:160]})")
        return proto, current
    notes.append(f"converted opset {current} -> {opset} after simplification")
    return conv, opset


def toposort(graph: Any) -> None:
    """Sort ``graph.node`` topologically in place (converters may append nodes out of order)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph {graph.name!r} has a cycle or undefined inputs at nodes {[n.name for n in rest[:5]]}")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _check_dynamic_batch(proto: Any, out: Path) -> None:
    for v in list(proto.graph.input) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_param"):
            raise ExportError(f"{out}: {v.name!r} has a fixed batch axis after export; expected a dynamic 'batch' dimension")


def ort_cpu_session(path: PathLike, threads: int = 2) -> Any:
    """A CPU :class:`sdk.runtime.ort.OrtSession` (quiet, ``threads`` intra-op, 1 inter-op) for any
    ONNX graph - exports, parity checks and calibration: the same Session interface (and batching,
    ``infer_batched``) as the product."""
    require("onnxruntime", "ONNX Runtime inference")
    from ..runtime.ort import OrtSession

    return OrtSession(path, device="cpu", threads=threads)


def run_onnx(path: PathLike, x: np.ndarray, batch: int = 32, threads: int = 2) -> Dict[str, np.ndarray]:
    """Run an ONNX model on ORT CPU over ``x`` in batches; outputs concatenated by name."""
    out = ort_cpu_session(path, threads).infer_batched(np.asarray(x, dtype=np.float32), batch=batch)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def compare_outputs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], *, n: int, source: str,
                    reference: str, tolerance: float, relative: bool = False) -> ParityReport:
    """Max abs difference per shared output and argmax agreement of classifier ``logits``.

    ``passed``: max |dlogit| <= ``tolerance`` (times ``max(1, max |ref logit|)`` when
    ``relative``, for FP16 graphs whose logits - e.g. a segmenter's - are large).
    """
    diffs = {k: float(np.max(np.abs(np.asarray(ref[k], np.float64) - np.asarray(got[k], np.float64)))) for k in ref if k in got}
    key = "logits" if "logits" in diffs else next(iter(diffs))
    top1 = None
    if "logits" in ref and np.asarray(ref["logits"]).ndim == 2:
        top1 = float(np.mean(np.argmax(ref["logits"], 1) == np.argmax(got["logits"], 1)))
    tol = tolerance * max(1.0, float(np.max(np.abs(ref[key])))) if relative else tolerance
    return ParityReport(n=n, source=source, reference=reference, max_abs_diff=diffs, max_abs_logit_diff=diffs[key],
                        top1_agreement=top1, tolerance=round(tol, 6), passed=bool(diffs[key] <= tol))


def torch_parity(model: Any, onnx_path: PathLike, x: np.ndarray, *, source: str = "given", tolerance: float = PARITY_TOL,
                 batch: int = 16) -> ParityReport:
    """Compare ORT CPU outputs of ``onnx_path`` with torch eager ``model`` on ``x``."""
    torch = require("torch", "parity check against PyTorch")
    wrapped = _adapter(model)
    names = [o.name for o in ort_cpu_session(onnx_path).outputs]
    ref: Dict[str, List[np.ndarray]] = {k: [] for k in names}
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs = wrapped(torch.from_numpy(np.ascontiguousarray(x[i:i + batch], dtype=np.float32)))
            for k, t in zip(names, outs):
                ref[k].append(t.float().numpy())
    got = run_onnx(onnx_path, x, batch)
    return compare_outputs({k: np.concatenate(v) for k, v in ref.items()}, got, n=len(x), source=source,
                           reference=f"torch {torch.__version__} eager", tolerance=tolerance)


# --- FP16 ---------------------------------------------------------------------------------------
#: Ops that always stay FP32 in the FP16 graph.
FP32_OPS: Tuple[str, ...] = ("Softmax", "LogSoftmax", "Sigmoid", "ReduceSum", "ReduceMean", "Einsum")


def fp32_head_nodes(proto: Any) -> Set[str]:
    """Names of nodes that must stay FP32: everything that is not an ancestor of the backbone.

    The backbone is everything up to (and including) the last convolution whose weight is not a
    single-channel fixed filter (``(1, 1, k, k)``, the Gaussian smoothing of the mask weights).
    What is left - the mask-weight path (slice of channel 1, area pooling, smoothing, sum,
    normalisation), the weighted pooling (Mul + ReduceSum), the classifier, softmax and CAM -
    stays FP32. Nodes without names are named here (``ctsdk_fp32_<i>``) so they can be listed.
    """
    graph = proto.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"ctsdk_node_{i}"
    init_shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    last_conv = None
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            shape = init_shapes.get(node.input[1])
            if shape is not None and not (len(shape) >= 2 and shape[0] == 1 and shape[1] == 1):
                last_conv = node
    if last_conv is None:
        return {n.name for n in graph.node}
    backbone: Set[str] = set()
    stack = [last_conv]
    while stack:
        node = stack.pop()
        if node.name in backbone:
            continue
        backbone.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return {n.name for n in graph.node if n.name not in backbone}


def _cast_to(node: Any) -> Optional[int]:
    for a in node.attribute:
        if a.name == "to":
            return int(a.i)
    return None


def fold_cast_roundtrips(graph: Any) -> int:
    """Remove ``Cast(to=float16) -> Cast(to=float)`` pairs; returns how many were folded.

    The float16 converter casts every blocked node's output to FP16 and back before the next
    blocked node, which would round the FP32 head (mask weights, pooling) through FP16 at each
    step. The second Cast is rewired to the first Cast's FP32 input (an Identity when its output
    is a graph output); Casts left without consumers are dropped.
    """
    FLOAT, FLOAT16 = 1, 10
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: Dict[str, str] = {}
    folded = 0
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != FLOAT:
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != FLOAT16:
            continue
        src = first.input[0]
        src_node = producer.get(src)
        if src_node is not None and src_node.op_type == "Cast" and _cast_to(src_node) not in (FLOAT, None):
            continue  # the FP16 value did not come from FP32: keep the cast
        folded += 1
        if node.output[0] in outputs:
            node.op_type = "Identity"
            del node.attribute[:]
            node.input[0] = src
        else:
            rename[node.output[0]] = src
    if rename:
        keep = [n for n in graph.node if not (n.op_type == "Cast" and n.output[0] in rename)]
        for n in keep:
            for i, name in enumerate(n.input):
                while name in rename:
                    name = rename[name]
                n.input[i] = name
        del graph.node[:]
        graph.node.extend(keep)
    # drop casts nobody reads any more
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    return folded


def export_fp16(
    onnx_path: PathLike,
    out_path: PathLike,
    *,
    parity_inputs: Optional[np.ndarray] = None,
    parity_source: str = "",
    n_parity: int = 16,
    tolerance: float = 5e-2,
    extra_fp32_ops: Sequence[str] = (),
) -> ExportReport:
    """Convert an FP32 ONNX to FP16 weights and compute with FP32 I/O, checked on ORT CPU.

    The backbone (see :func:`fp32_head_nodes`) runs FP16; the mask-weight normalisation, the
    weighted pooling, softmax and CAM stay FP32, with Cast nodes at the boundaries and at the
    graph's inputs/outputs (``keep_io_types``), so callers still feed and read float32.
    Uses ONNX Runtime's float16 converter (``onnxruntime.transformers.float16``, the
    onnxconverter-common code shipped with onnxruntime) with an op and a node block list.

    ``parity`` compares the FP16 graph with the FP32 graph on ORT CPU: passed when max |dlogit|
    <= ``tolerance`` x max(1, max |FP32 logit|) (FP16 keeps ~3 significant digits).
    """
    onnx = require("onnx", "FP16 conversion")
    f16 = require("onnxruntime.transformers.float16", "FP16 conversion (onnxruntime's float16 converter)")
    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise ConfigError(f"{src}: no such ONNX file (export one first with `ctsdk export`)")
    t0 = time.perf_counter()
    proto = onnx.load(str(src))
    n_in = len(proto.graph.node)
    block_nodes = sorted(fp32_head_nodes(proto))
    block_ops = sorted(set(FP32_OPS) | set(extra_fp32_ops))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            half = f16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=block_ops, node_block_list=block_nodes)
        folded = fold_cast_roundtrips(half.graph)
        toposort(half.graph)
        onnx.checker.check_model(half)
    except Exception as exc:
        raise ExportError(f"{src}: FP16 conversion failed: {exc}") from exc
    meta = {p.key: p.value for p in half.metadata_props}
    meta_new = {k[len(META_PREFIX):]: v for k, v in meta.items() if k.startswith(META_PREFIX)}
    meta_new.update({"precision": "fp16", "fp32_nodes": json.dumps(len(block_nodes)), "source_sha256": sha256_file(src)})
    set_metadata(half, meta_new)
    _save_single_file(half, out)
    init_types = Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in half.graph.initializer)
    report = ExportReport(
        path=str(out), opset=max((o.version for o in half.opset_import if o.domain in ("", "ai.onnx")), default=0),
        precision="fp16", inputs=_tensor_specs(half.graph.input), outputs=_tensor_specs(half.graph.output),
        metadata={p.key: p.value for p in half.metadata_props}, nodes_exported=n_in, nodes_final=len(half.graph.node),
        op_counts=dict(Counter(n.op_type for n in half.graph.node)), size_bytes=out.stat().st_size,
        sha256=sha256_file(out), seconds=0.0,
        notes=[f"{len(block_nodes)} nodes kept FP32 (head/mask path) + ops {block_ops}",
               f"{folded} FP32->FP16->FP32 Cast round trips between FP32 nodes removed",
               f"initializer dtypes: {dict(init_types)}"],
    )
    if parity_inputs is None:
        from .samples import parity_inputs as _real

        spec = report.inputs[0]
        parity_inputs, parity_source = _real(n_parity, int(spec["shape"][1]), [int(s) for s in spec["shape"][2:]])
    ref = run_onnx(src, parity_inputs)
    got = run_onnx(out, parity_inputs)
    report.parity = compare_outputs(ref, got, n=len(parity_inputs), source=parity_source or "given",
                                    reference=f"FP32 ONNX {src.name} on ORT CPU", tolerance=tolerance, relative=True)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


__all__ = [
    "CLASSIFIER_OUTPUTS", "ExportError", "ExportReport", "ParityReport", "check_input_size", "classifier_metadata",
    "compare_outputs", "export_fp16", "export_onnx", "fp32_head_nodes", "ort_cpu_session", "read_metadata", "run_onnx",
    "set_metadata", "sha256_file",
    "torch_parity",
]

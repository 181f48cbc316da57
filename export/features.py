"""Derive the classifier's "features" variant and its head weights from a classifier ONNX.

The kernel path (:mod:`sdk.device_path`) pools the backbone's feature map with ctsdk's own
mask-weights and masked-GAP kernels and applies the head outside the graph. It needs:

- ``classifier_features_<prec>.onnx``: the classifier graph cut before the pooling head, one
  input ``image`` (N, 3, S, S) and one output ``features`` (N, C, S/32, S/32);
- ``classifier_head_<prec>.npz``: the head's ``fc_weight`` (K, C) and ``fc_bias`` (K,) as float32
  (``logits = pooled @ W.T + b``; ``cam = W · (f · w) · h·w``, :func:`sdk.pooling.cam`).

Both are derived from the shipped classifier ONNX (so a retrained classifier is re-derived by the
same command), checked against it with ONNX Runtime on CPU (features -> NumPy pooling -> head must
reproduce the classifier's logits / probs / cam), and written into the bundle through
:func:`sdk.bundle.write_bundle` (new sha256s in the manifest)::

    python -m sdk.export.features --bundle sdk/bundles/default      # fp32 + fp16, in place

Weights are not duplicated: every large initializer of the features graph is stored as ONNX
external data pointing at the *same bytes inside the source classifier file* (``location`` =
``classifier_<prec>.onnx``, with offset and length), so each features file is ~100 kB and the
bundle stays under its size limit. The features file records the classifier's sha256
(``ctsdk.source_sha256``); the kernel path refuses a features file whose classifier changed (re-run
the command), and it must live beside its classifier (it does in a bundle). ``--standalone`` embeds the
weights instead.

Needs the ``onnx`` package (train extra) - at bundle-build time only; the runtime reads the
derived files with ONNX Runtime and NumPy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import BundleError, ConfigError, CtsdkError

PathLike = Union[str, Path]

FEATURES_OUTPUT = "features"
FEATURES_ROLE = "classifier_features"
HEAD_ROLE = "classifier_head"
#: initializers at least this large are shared with the source file (smaller ones stay inline)
SHARE_MIN_BYTES = 1024
#: parity of the derived path against the source classifier (max |diff| of probs / logits)
PARITY_TOL = {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-4}

__all__ = ["FeaturesReport", "derive_features", "add_features_to_bundle", "FEATURES_OUTPUT", "FEATURES_ROLE", "HEAD_ROLE"]


class FeaturesError(CtsdkError):
    """The classifier graph does not have the pooling head the features cut expects."""


@dataclass
class FeaturesReport:
    source: str
    features_path: str
    head_path: str
    features_tensor: str
    features_shape: List[Any]
    features_dtype: str
    shared_bytes: int
    inline_bytes: int
    parity: Dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    passed: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- graph surgery ---------------------------------------------------------------------------------
def _producers(graph: Any) -> Dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def _skip_identity(name: str, prod: Dict[str, Any]) -> Any:
    node = prod.get(name)
    while node is not None and node.op_type == "Identity":
        node = prod.get(node.input[0])
    return node


def _shapes(model: Any) -> Dict[str, Tuple[List[Any], int]]:
    onnx = require("onnx", "deriving the classifier features graph")
    inferred = onnx.shape_inference.infer_shapes(model)
    out: Dict[str, Tuple[List[Any], int]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out[v.name] = (dims, tt.elem_type)
    return out


def _head(model: Any, path: str) -> Tuple[np.ndarray, np.ndarray, str]:
    """(fc_weight (K, C), fc_bias (K,), pooled tensor name) from the Gemm that makes ``logits``."""
    from onnx import numpy_helper

    g = model.graph
    prod = _producers(g)
    inits = {i.name: i for i in g.initializer}
    gemm = _skip_identity("logits", prod)
    if gemm is None or gemm.op_type != "Gemm":
        raise FeaturesError(f"{path}: 'logits' is not produced by a Gemm (found {gemm.op_type if gemm else None}); "
                            "the features cut expects pooled -> Linear -> logits")
    attrs = {a.name: a for a in gemm.attribute}
    if gemm.input[1] not in inits or len(gemm.input) < 3 or gemm.input[2] not in inits:
        raise FeaturesError(f"{path}: the logits Gemm's weight and bias are not constants")
    w = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float32)
    b = numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float32).reshape(-1)
    if attrs.get("transA") is not None and attrs["transA"].i:
        raise FeaturesError(f"{path}: logits Gemm with transA=1 is not the classifier head")
    if not (attrs.get("transB") is not None and attrs["transB"].i):
        w = w.T
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    beta = attrs["beta"].f if "beta" in attrs else 1.0
    return np.ascontiguousarray(w * alpha, np.float32), (b * beta).astype(np.float32), gemm.input[0]


def _features_tensor(model: Any, pooled: str, channels: int, path: str) -> str:
    """The backbone feature map: the C-channel input of the Mul whose ReduceSum is ``pooled``."""
    prod = _producers(model.graph)
    red = _skip_identity(pooled, prod)
    if red is None or red.op_type != "ReduceSum":
        raise FeaturesError(f"{path}: the pooled vector is not a ReduceSum (found {red.op_type if red else None})")
    mul = _skip_identity(red.input[0], prod)
    if mul is None or mul.op_type != "Mul":
        raise FeaturesError(f"{path}: the pooled ReduceSum does not sum a Mul(features, weights)")
    shapes = _shapes(model)
    for name in mul.input:
        dims = shapes.get(name, ([], 0))[0]
        if len(dims) == 4 and dims[1] == channels:
            return name
    raise FeaturesError(f"{path}: neither input of the pooling Mul has {channels} channels "
                        f"({[(n, shapes.get(n, ([], 0))[0]) for n in mul.input]})")


def _rename(graph: Any, old: str, new: str) -> None:
    for n in graph.node:
        for i, v in enumerate(n.input):
            if v == old:
                n.input[i] = new
        for i, v in enumerate(n.output):
            if v == old:
                n.output[i] = new
    for v in list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new


def _share_weights(model: Any, source_bytes: bytes, source_name: str) -> Tuple[int, int]:
    """Point large initializers at their bytes inside the source file; returns (shared, inline) bytes."""
    from onnx import TensorProto

    shared = inline = 0
    for t in model.graph.initializer:
        raw = t.raw_data
        if len(raw) < SHARE_MIN_BYTES:
            inline += len(raw)
            continue
        off = source_bytes.find(raw)
        if off < 0:
            inline += len(raw)
            continue
        del t.external_data[:]
        for k, v in (("location", source_name), ("offset", str(off)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        shared += len(raw)
    return shared, inline


# --- parity ----------------------------------------------------------------------------------
def _samples(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Classifier-like inputs: grey noise, an elliptical 'lung' mask (one sample empty), grey*mask."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, size, size), np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    for i in range(n):
        x[i, 0] = np.clip(rng.normal(0.45, 0.2, (size, size)), 0, 1)
        if i < n - 1:
            cy, cx, r = 0.5 + 0.1 * rng.uniform(-1, 1), 0.5 + 0.1 * rng.uniform(-1, 1), 0.2 + 0.1 * i
            x[i, 1] = ((yy - cy) ** 2 + ((xx - cx) / 1.4) ** 2 < r * r)
        x[i, 2] = x[i, 0] * x[i, 1]
    return x


def parity(classifier: PathLike, features: PathLike, head: PathLike, size: int = 224) -> Dict[str, float]:
    """Max |diff| of logits / probs / cam: classifier ONNX vs features ONNX + NumPy pooling + head."""
    from ..pooling import cam, mask_weights, masked_gap
    from .onnx import ort_cpu_session

    x = _samples(size)
    out = ort_cpu_session(classifier).infer({"image": x}, outputs=["logits", "probs", "cam"])
    logits, probs, cams = (np.asarray(out[k]) for k in ("logits", "probs", "cam"))
    f = np.asarray(ort_cpu_session(features).infer({"image": x}, outputs=[FEATURES_OUTPUT])[FEATURES_OUTPUT])
    hd = np.load(head)
    w = mask_weights(x[:, 1:2], f.shape[-2:])
    pooled = masked_gap(f.astype(np.float32), w).astype(np.float64)
    lg = pooled @ hd["fc_weight"].astype(np.float64).T + hd["fc_bias"]
    e = np.exp(lg - lg.max(1, keepdims=True))
    pr = e / e.sum(1, keepdims=True)
    cm = cam(f.astype(np.float32), w, hd["fc_weight"])
    return {"logits": float(np.abs(lg - logits).max()), "probs": float(np.abs(pr - probs).max()),
            "cam": float(np.abs(cm - cams).max() / max(1.0, float(np.abs(cams).max())))}


# --- public ----------------------------------------------------------------------------------
def derive_features(classifier: PathLike, out_dir: PathLike, precision: str = "fp32", *,
                    standalone: bool = False, check: bool = True) -> FeaturesReport:
    """Write ``classifier_features_<precision>.onnx`` and ``classifier_head_<precision>.npz`` to
    ``out_dir`` (beside a copy of the classifier when weights are shared) and check parity."""
    onnx = require("onnx", "deriving the classifier features graph")
    from onnx import utils as onnx_utils

    src = Path(classifier)
    if not src.is_file():
        raise ConfigError(f"{src}: classifier ONNX not found")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    w, b, pooled = _head(model, str(src))
    feat = _features_tensor(model, pooled, int(w.shape[1]), str(src))
    inferred = onnx.shape_inference.infer_shapes(model)
    sub = onnx_utils.Extractor(inferred).extract_model(["image"], [feat])
    _rename(sub.graph, feat, FEATURES_OUTPUT)
    dims, elem = _shapes(sub).get(FEATURES_OUTPUT, ([], 0))
    from ..bundle import sha256_file

    ours = {"ctsdk.role": FEATURES_ROLE, "ctsdk.features_of": src.name, "ctsdk.precision": precision,
            "ctsdk.source_sha256": sha256_file(src)}
    del sub.metadata_props[:]
    for k, v in [(p.key, p.value) for p in model.metadata_props if p.key not in ours] + list(ours.items()):
        e = sub.metadata_props.add()
        e.key, e.value = k, v
    del sub.opset_import[:]
    sub.opset_import.extend(model.opset_import)
    sub.ir_version = model.ir_version
    fpath = out / f"classifier_features_{precision}.onnx"
    hpath = out / f"classifier_head_{precision}.npz"
    shared = inline = 0
    if not standalone:
        if src.resolve().parent != out.resolve():
            shutil.copyfile(src, out / src.name)
        shared, inline = _share_weights(sub, (out / src.name).read_bytes(), src.name)
    onnx.save(sub, str(fpath))
    onnx.checker.check_model(str(fpath))
    np.savez(hpath, fc_weight=w, fc_bias=b)
    rep = FeaturesReport(source=str(src), features_path=str(fpath), head_path=str(hpath), features_tensor=feat,
                         features_shape=list(dims), features_dtype=onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "",
                         shared_bytes=shared, inline_bytes=inline, tolerance=PARITY_TOL.get(precision, 1e-4))
    if check:
        size = int(model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value or 224)
        rep.parity = parity(out / src.name if not standalone else src, fpath, hpath, size)
        rep.passed = max(rep.parity["logits"], rep.parity["probs"]) <= rep.tolerance
        if not rep.passed:
            raise FeaturesError(f"{fpath}: features + NumPy head differ from {src.name} by {rep.parity} (> {rep.tolerance})")
    return rep


def add_features_to_bundle(bundle_dir: Optional[PathLike] = None, precisions: Sequence[str] = ("fp32", "fp16"),
                           standalone: bool = False) -> List[FeaturesReport]:
    """Derive the features variants of the bundle's classifiers and rewrite the bundle with them
    (every other file and the manifest fields kept; new sha256s). Returns the reports."""
    from ..bundle import load_bundle, write_bundle

    bundle = load_bundle(bundle_dir)
    clf = bundle.classifier_paths()
    missing = [p for p in precisions if p not in clf]
    if missing:
        raise BundleError(f"{bundle.root}: no classifier for {missing} (has {sorted(clf)})")
    reports: List[FeaturesReport] = []
    with tempfile.TemporaryDirectory(prefix="ctsdk-features-") as tmp:
        stage = Path(tmp)
        files: Dict[str, Tuple[str, str, str]] = {}
        for name, bf in bundle.files.items():
            if bf.role in (FEATURES_ROLE, HEAD_ROLE):
                continue  # re-derived below
            shutil.copyfile(bundle.root / bf.path, stage / Path(bf.path).name)
            files[name] = (str(stage / Path(bf.path).name), bf.role, bf.precision)
        for prec in precisions:
            rep = derive_features(stage / Path(clf[prec]).name, stage, prec, standalone=standalone)
            reports.append(rep)
            files[f"classifier_features_{prec}"] = (rep.features_path, FEATURES_ROLE, prec)
            files[f"classifier_head_{prec}"] = (rep.head_path, HEAD_ROLE, prec)
        meta = dict(bundle.manifest)
        meta["classifier_features"] = {
            "command": "python -m sdk.export.features --bundle <bundle>",
            "output": FEATURES_OUTPUT,
            "weights": "standalone" if standalone else "shared with classifier_<prec>.onnx (external data, offsets)",
            "parity": {r.features_path.rsplit("_", 1)[-1].split(".")[0]: r.parity for r in reports},
        }
        write_bundle(bundle.root, files, meta, overwrite=True)
    return reports


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdk.export.features", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the packaged default bundle)")
    ap.add_argument("--precisions", default="fp32,fp16", help="comma-separated classifier precisions")
    ap.add_argument("--standalone", action="store_true", help="embed the weights instead of sharing the classifier's bytes")
    args = ap.parse_args(argv)
    try:
        reps = add_features_to_bundle(args.bundle, [p for p in args.precisions.split(",") if p], args.standalone)
    except CtsdkError as exc:
        print(f"ctsdk: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([r.to_dict() for r in reps], indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

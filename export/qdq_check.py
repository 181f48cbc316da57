"""Does a Q/DQ ONNX fit TensorRT's explicit INT8 quantisation? A pure graph check (no TensorRT).

TensorRT builds a Q/DQ network only from *symmetric signed INT8*: every QuantizeLinear /
DequantizeLinear has an int8 zero point equal to 0 (the ONNX parser asserts "TRT only supports
symmetric quantization - zeroPt must be all zeros"; TensorRT docs, "Explicit Quantization"),
activations are quantised per tensor, and per-channel scales are allowed only on constant weights
along their output-channel axis (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB else 1, MatMul: the
last). An INT32 DequantizeLinear (ONNX Runtime's quantised Conv bias) is rejected by the parser
(onnx/onnx-tensorrt#850, NVIDIA/TensorRT#3360). ``ctsdk build-engine --precision int8`` runs this
check before it imports TensorRT, so a wrong file fails in a second on any machine.

    from sdk.export.qdq_check import check_qdq_for_tensorrt
    for p in check_qdq_for_tensorrt("classifier_int8.onnx"):
        print(p)
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

from .._lazy import require
from ..errors import ConfigError, MissingDependencyError

log = logging.getLogger("sdk.export")

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: how many offending nodes the error message names
SHOWN = 3

# ONNX TensorProto data types (numbers fixed by the ONNX spec; no onnx import needed for them)
_INT8, _UINT8, _INT16, _UINT16, _INT32 = 3, 2, 5, 4, 6
_UINT4, _INT4 = 21, 22
_TYPE_NAMES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 10: "float16", 16: "bfloat16",
               17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4",
               22: "int4", 23: "float4e2m1"}


@dataclass(frozen=True)
class QdqProblem:
    """One reason a Q/DQ node is not TensorRT INT8: ``rule`` is one of "zero_point_type",
    "zero_point_value", "bit_width", "int32_bias", "per_channel_axis", "per_channel_activation",
    "missing_scale", "zero_point_not_constant"."""

    node: str
    op: str
    tensor: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.op} {self.node!r} on {self.tensor!r}: {self.detail}"


@dataclass
class _Graph:
    """The lookups the rules need: constants (initializers and Constant nodes), producers, consumers."""

    constants: Dict[str, Any]
    producer: Dict[str, Any]
    consumers: Dict[str, List[Any]]
    defined: Set[str]


def _index(graph: Any) -> _Graph:
    constants: Dict[str, Any] = {t.name: t for t in graph.initializer}
    producer: Dict[str, Any] = {}
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                constants[n.output[0]] = value
    defined = set(constants) | set(producer) | {i.name for i in graph.input}
    return _Graph(constants, producer, consumers, defined)


def _attr(node: Any, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _type_name(dtype: int) -> str:
    return _TYPE_NAMES.get(dtype, f"type {dtype}")


def _quant_type(node: Any, g: _Graph) -> Optional[int]:
    """The quantised data type of a Q/DQ node: its zero point's type; without one, QuantizeLinear's
    ``output_dtype`` (ONNX default uint8) or DequantizeLinear's constant input type. None: unknown
    (a DequantizeLinear fed by another node, whose own check covers it)."""
    if len(node.input) > 2 and node.input[2] and node.input[2] in g.constants:
        return int(g.constants[node.input[2]].data_type)
    if node.op_type == "QuantizeLinear":
        return _attr(node, "output_dtype", 0) or _UINT8
    x = g.constants.get(node.input[0])
    return int(x.data_type) if x is not None else None


def _type_problem(node: Any, dtype: Optional[int]) -> Optional[Tuple[str, str]]:
    """Why ``dtype`` is not TensorRT INT8 (rule, detail), or None when it is int8 / unknown."""
    if dtype is None or dtype == _INT8:
        return None
    if dtype == _UINT8:
        return "zero_point_type", "uint8 (asymmetric unsigned); TensorRT takes only int8 Q/DQ"
    if dtype in (_INT16, _UINT16):
        return "bit_width", f"16-bit {_type_name(dtype)}; TensorRT has no 16-bit integer Q/DQ"
    if dtype in (_INT4, _UINT4):
        return "bit_width", f"4-bit {_type_name(dtype)} (weight-only blocked INT4 is not an INT8 engine)"
    if dtype == _INT32 and node.op_type == "DequantizeLinear":
        return "int32_bias", "int32 (a quantised bias); TensorRT rejects INT32 DequantizeLinear: keep biases float"
    return "zero_point_type", f"{_type_name(dtype)}; TensorRT INT8 needs int8"


def _weight_of(node: Any, g: _Graph) -> Optional[str]:
    """The constant weight a Q/DQ node quantises: its own constant input, or (DequantizeLinear) the
    constant behind the QuantizeLinear that feeds it. None for an activation."""
    x = node.input[0]
    if x in g.constants:
        return x
    q = g.producer.get(x)
    if node.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear" and q.input[0] in g.constants:
        return q.input[0]
    return None


def _dequantized(node: Any, g: _Graph) -> List[str]:
    """The float tensors a Q/DQ node's weight reaches its users as: a DequantizeLinear's output, or
    the outputs of the DequantizeLinear nodes after a QuantizeLinear."""
    if node.op_type == "DequantizeLinear":
        return [node.output[0]]
    return [dq.output[0] for dq in g.consumers.get(node.output[0], []) if dq.op_type == "DequantizeLinear"]


def _expected_axis(user: Any, rank: int) -> Optional[int]:
    """The output-channel axis of a weight of ``user`` (input 1), or None for an op TensorRT has no
    per-channel weights for."""
    if user.op_type == "Conv":
        return 0
    if user.op_type == "ConvTranspose":
        return 1
    if user.op_type == "Gemm":
        return 0 if _attr(user, "transB", 0) else 1
    if user.op_type == "MatMul":
        return rank - 1
    return None


def _axis_problem(node: Any, g: _Graph) -> Optional[QdqProblem]:
    """Per-channel (vector scale) Q/DQ: only on a constant weight, along its output-channel axis."""
    scale = g.constants.get(node.input[1])
    if scale is None or _numel(scale.dims) <= 1:
        return None
    weight = _weight_of(node, g)
    if weight is None:
        return QdqProblem(node.name, node.op_type, node.input[0], "per_channel_activation",
                          f"per-channel scale ({_numel(scale.dims)} values) on an activation; TensorRT quantises "
                          "activations per tensor")
    dims = list(g.constants[weight].dims)
    axis = _attr(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    names = _dequantized(node, g)
    for user in (u for t in names for u in g.consumers.get(t, [])):
        if user.op_type in ("Conv", "ConvTranspose", "Gemm") and len(user.input) > 2 and user.input[2] in names:
            continue  # a quantised bias: its int32 type is the problem (``_type_problem``), not its axis
        want = _expected_axis(user, len(dims)) if len(user.input) > 1 and user.input[1] in names else None
        if want is None:
            return QdqProblem(node.name, node.op_type, weight, "per_channel_axis",
                              f"per-channel weight used by {user.op_type} {user.name!r}; TensorRT has per-channel "
                              "weights only as input 1 of Conv / ConvTranspose / Gemm / MatMul")
        if axis != want:
            return QdqProblem(node.name, node.op_type, weight, "per_channel_axis",
                              f"per-channel axis {axis} on the weight of {user.op_type} {user.name!r}; TensorRT needs "
                              f"the output-channel axis {want}")
    if axis < len(dims) and dims[axis] != _numel(scale.dims):
        return QdqProblem(node.name, node.op_type, weight, "per_channel_axis",
                          f"{_numel(scale.dims)} scales for {dims[axis]} channels on axis {axis}")
    return None


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _node_problems(node: Any, g: _Graph) -> List[QdqProblem]:
    """Every rule one Q/DQ node breaks."""
    from onnx import numpy_helper

    x = node.input[0] if node.input else ""
    if len(node.input) < 2 or not node.input[1] or node.input[1] not in g.defined:
        what = f"scale {node.input[1]!r} is defined nowhere in the graph" if len(node.input) > 1 and node.input[1] else "no scale input"
        return [QdqProblem(node.name, node.op_type, x, "missing_scale", what)]
    out: List[QdqProblem] = []
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    bad_type = _type_problem(node, _quant_type(node, g))
    if zp and zp not in g.constants:
        out.append(QdqProblem(node.name, node.op_type, zp, "zero_point_not_constant",
                              "zero point is not a constant; TensorRT needs a constant int8 0"))
    elif bad_type is not None:
        rule, detail = bad_type
        out.append(QdqProblem(node.name, node.op_type, zp or x, rule, f"quantised type {detail}"))
    elif zp:
        values = numpy_helper.to_array(g.constants[zp])
        if values.size and (values != 0).any():
            nz = sorted({int(v) for v in values.ravel() if v != 0})
            out.append(QdqProblem(node.name, node.op_type, zp, "zero_point_value",
                                  f"non-zero int8 zero point {nz[:4]}{' ...' if len(nz) > 4 else ''}; TensorRT needs 0 "
                                  "(symmetric quantisation)"))
    if _attr(node, "block_size", 0):
        out.append(QdqProblem(node.name, node.op_type, x, "bit_width", "blocked quantisation (block_size); not INT8"))
    axis = _axis_problem(node, g)
    if axis is not None:
        out.append(axis)
    return out


def _load(onnx_path_or_model: Union[str, os.PathLike, Any]) -> Any:
    onnx = require("onnx", "checking a Q/DQ ONNX for TensorRT")
    if isinstance(onnx_path_or_model, (str, os.PathLike)):
        return onnx.load(str(onnx_path_or_model), load_external_data=False)
    return onnx_path_or_model


def qdq_nodes(model: Any) -> List[Any]:
    """The QuantizeLinear / DequantizeLinear nodes of a ModelProto's main graph, in graph order."""
    return [n for n in model.graph.node if n.op_type in QDQ_OPS]


def check_qdq_for_tensorrt(onnx_path_or_model: Union[str, os.PathLike, Any]) -> List[QdqProblem]:
    """Every way the Q/DQ nodes of an ONNX (path or ``onnx.ModelProto``) break TensorRT's INT8
    rules, in graph order; empty = TensorRT-ready (or no Q/DQ at all).

    Checked per QuantizeLinear / DequantizeLinear: a scale input that exists; a constant zero point
    (absent = the ONNX default: uint8 for QuantizeLinear); quantised type int8 (not uint8, 16-bit,
    4-bit, float8, nor an int32 bias DequantizeLinear); zero point all 0; per-channel scales only on
    constant weights and along the consumer's output-channel axis (Conv 0, ConvTranspose 1).
    Needs the ``onnx`` package (MissingDependencyError without it).
    """
    model = _load(onnx_path_or_model)
    g = _index(model.graph)
    problems: List[QdqProblem] = []
    for i, node in enumerate(qdq_nodes(model)):
        if not node.name:
            node.name = f"{node.op_type}#{i}"
        problems += _node_problems(node, g)
    return problems


def fp32_sibling(onnx_path: Union[str, os.PathLike]) -> str:
    """The FP32 ONNX beside an INT8 one (``<name>_int8.onnx`` -> ``<name>_fp32.onnx``) when it
    exists, else the placeholder ``FP32_ONNX`` (for the message's calibrate command)."""
    p = Path(onnx_path)
    for tag in ("_int8", "_qdq"):
        if tag in p.stem:
            cand = p.with_name(p.stem.replace(tag, "_fp32") + p.suffix)
            if cand.is_file():
                return str(cand)
    return "FP32_ONNX"


def fix_command(onnx_path: Union[str, os.PathLike]) -> str:
    """The ``ctsdk calibrate --target tensorrt`` command that writes a TensorRT-ready file (in the
    working folder: never into a bundle, whose manifest would not list it)."""
    out = Path(onnx_path).stem + "_trt.onnx"
    return (f"ctsdk calibrate --onnx {fp32_sibling(onnx_path)} --images IMAGES_CSV --target tensorrt --out {out} "
            f"(options as in docs/deployment.md), then ctsdk build-engine --model {out} --precision int8")


def _examples(problems: Sequence[QdqProblem]) -> List[QdqProblem]:
    """The first problem of each rule (graph order), then the next ones, up to :data:`SHOWN`."""
    firsts = list({p.rule: p for p in reversed(problems)}.values())[::-1]
    firsts.sort(key=problems.index)
    rest = [p for p in problems if p not in firsts]
    return (firsts + rest)[:SHOWN]


def describe_problems(onnx_path: Union[str, os.PathLike], problems: Sequence[QdqProblem], n_qdq: int) -> str:
    """One line: the file, how many Q/DQ nodes are wrong, the first few, and the fix."""
    nodes = list(dict.fromkeys(p.node for p in problems))
    rules = sorted({p.rule for p in problems})
    shown = "; ".join(str(p) for p in _examples(problems))
    more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
    return (f"{onnx_path}: {len(nodes)} of {n_qdq} QuantizeLinear/DequantizeLinear nodes are not TensorRT INT8 "
            f"(symmetric signed int8, zero point 0; rules broken: {', '.join(rules)}): {shown}{more}. "
            f"TensorRT would reject it; make a TensorRT-ready file with: {fix_command(onnx_path)}")


def require_tensorrt_qdq(onnx_path: Union[str, os.PathLike]) -> List[str]:
    """Pre-flight of ``ctsdk build-engine --precision int8``: raise ConfigError (one line, naming
    the file, the offending nodes and the ``ctsdk calibrate --target tensorrt`` command) when the
    ONNX's Q/DQ nodes break TensorRT's rules. Returns warnings: the check could not run because
    ``onnx`` is not installed (said, never skipped silently)."""
    try:
        model = _load(onnx_path)
    except MissingDependencyError as exc:
        msg = (f"{onnx_path}: Q/DQ pre-check for TensorRT NOT run: {exc} (onnx>=1.16 is in ctsdk[gpu]); "
               "an asymmetric (uint8) INT8 file will fail inside the TensorRT build")
        log.warning(msg)
        return [msg]
    problems = check_qdq_for_tensorrt(model)
    if problems:
        raise ConfigError(describe_problems(onnx_path, problems, len(qdq_nodes(model))))
    return []


__all__ = ["QDQ_OPS", "QdqProblem", "check_qdq_for_tensorrt", "describe_problems", "fix_command", "qdq_nodes",
           "require_tensorrt_qdq"]

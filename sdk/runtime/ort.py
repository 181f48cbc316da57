"""ONNX Runtime sessions (CPU and CUDA execution providers) behind the common Session interface.

    with OrtSession("classifier_int8.onnx", device="cpu", threads=2) as s:
        out = s.infer({"image": x})
        s.info            # RuntimeInfo(backend="onnxruntime", provider="CPUExecutionProvider", ...)

    with OrtSession("classifier_fp16.onnx", device="cuda", fixed_batch=32) as s:
        out = s.infer({"image": x})                 # host in, host out; padded to 32 slices
        dev = s.run_device({"image": d_x}, ["probs", "cam"])   # device in, CuPy arrays out

``onnxruntime`` and ``onnxruntime-gpu`` install the same module; with the GPU build on a machine
without a usable GPU, ORT lists the CUDA provider and then *silently* runs on CPU. OrtSession
therefore checks ``session.get_providers()`` after creation: if CUDA was requested but not
granted it records why in ``fallback_reasons`` and logs a warning, or raises
:class:`~sdk.errors.RuntimeUnavailableError` with ``strict=True``.

CUDA sessions are configured explicitly (:func:`cuda_provider_options`, :func:`session_threads`):

- ``cudnn_conv_algo_search`` HEURISTIC (ORT's default is EXHAUSTIVE, which benchmarks every
  convolution algorithm again for every new input shape; ``$CTSDK_CUDNN_SEARCH`` overrides);
- ``do_copy_in_default_stream`` 1 (copies on the compute stream: no cross-stream races);
- ``arena_extend_strategy`` kSameAsRequested (the arena grows by what is asked, not powers of two);
- ``device_id`` only when it is not 0: since ORT 1.26 an explicit ``device_id`` makes ORT look for
  a plugin EP first ("No registered plugin EP device found"), 0 is the default anyway;
- one intra-op thread (``$CTSDK_CUDA_THREADS``): the GPU does the work, a pool of spinning CPU
  threads only competes with the rest of the pipeline;
- ``fixed_batch``: every call runs at that batch (the last, shorter batch is zero-padded and the
  outputs cut back), so cuDNN and the arena only ever see one shape;
- ``cuda_graph``: ORT's CUDA graph capture (``enable_cuda_graph``) on fixed device buffers bound
  once through IOBinding; needs ``fixed_batch`` and CuPy.

Device buffers (:meth:`OrtSession.run_device`): inputs are any objects with
``__cuda_array_interface__`` (CuPy, pycuda GPUArray, torch CUDA tensors), bound with IOBinding
without a copy; outputs are CuPy arrays preallocated from CuPy's memory pool and bound as ORT's
output buffers. Stream order: before the run, the stream each input names in its interface
(CAI v3 ``stream``) and CuPy's current stream are synchronized, so the producer's writes are done
before ORT's compute stream reads; ORT synchronizes its own compute stream at the end of ``Run``
(its default) and :meth:`IOBinding.synchronize_outputs` is called, so the returned arrays are
complete for any stream. All of ctsdk (ORT, CuPy, the pycuda backend of :mod:`sdk.kernels`) uses
the device's primary CUDA context, so these pointers are valid in ORT's context.
"""
from __future__ import annotations

import base64
import functools
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, RuntimeUnavailableError
from .base import RuntimeInfo, Session, TensorSpec

log = logging.getLogger("sdk.runtime")

PathLike = Union[str, os.PathLike]
CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
_DEVICES = ("cpu", "cuda")
#: ORT type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
#: cuDNN convolution algorithm search modes of the CUDA EP
CUDNN_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
#: ctsdk's choice (see the module docstring); ``$CTSDK_CUDNN_SEARCH`` overrides
DEFAULT_CUDNN_SEARCH = "HEURISTIC"
#: intra-op threads of a CUDA session; ``$CTSDK_CUDA_THREADS`` overrides
DEFAULT_CUDA_THREADS = 1
#: a 1-node ONNX model (y = x + x, opset 17): probes whether a provider is really granted
_PROBE_ONNX = base64.b64decode("CAg6OQoOCgF4CgF4EgF5IgNBZGQSBXByb2JlWg8KAXgSCgoICAESBAoCCAFiDwoBeRIKCggIARIECgIIAUIECgAQEQ==")


def _ort() -> Any:
    return require("onnxruntime", "ONNX Runtime inference")


def default_threads() -> int:
    """Intra-op threads of a CPU session: ``$CTSDK_THREADS`` or the number of usable cores."""
    env = os.environ.get("CTSDK_THREADS")
    if env:
        return max(1, int(env))
    from ..pools import usable_cores

    return usable_cores()


def session_threads(device: str, threads: Optional[int] = None) -> int:
    """Intra-op threads for a session on ``device``: ``threads`` when given; else
    :func:`default_threads` on the CPU and ``$CTSDK_CUDA_THREADS`` or 1 for CUDA."""
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        return int(threads)
    if device == "cuda":
        return max(1, int(os.environ.get("CTSDK_CUDA_THREADS") or DEFAULT_CUDA_THREADS))
    return default_threads()


#: most lanes the CPU default opens (each in-flight batch holds its own activations in ORT's arena)
MAX_AUTO_LANES = 4


def cpu_lanes(threads: Optional[int] = None, lanes: Optional[int] = None) -> int:
    """Batches a CPU pipeline runs side by side: ``lanes`` when given; else one per core (at most
    :data:`MAX_AUTO_LANES`) when ``threads`` is not given, and 1 when it is (the caller chose
    intra-op threads, so batches run one after the other as before).

    On 2 cores, two lanes of one intra-op thread each against one session of two threads:
    INT8 classifier on 133 slices 455 -> 412 ms, the whole INT8 triage 1.66 -> 1.36 s (the
    serial parts of the networks and the input building fill the other core;
    docs/benchmarks/cpu.md)."""
    if lanes is not None:
        if int(lanes) < 1:
            raise ConfigError(f"lanes must be >= 1, got {lanes}")
        return int(lanes)
    if threads is not None:
        return 1
    return max(1, min(default_threads(), MAX_AUTO_LANES))


def lane_threads(threads: Optional[int], lanes: int) -> int:
    """Intra-op threads of a CPU session run in ``lanes`` lanes: ``threads`` when given, else the
    usable cores shared out between the lanes (at least 1)."""
    if threads is not None:
        return session_threads("cpu", threads)
    return max(1, default_threads() // max(1, int(lanes)))


def cuda_provider_options(
    device_id: int = 0,
    *,
    cudnn_conv_algo_search: Optional[str] = None,
    cuda_graph: bool = False,
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, str]:
    """The CUDA EP options ctsdk passes (all values as strings, as ORT's Python API takes them).

    ``device_id`` is included only when it is not 0 (see the module docstring); ``extra`` entries
    (any CUDA EP option, e.g. ``{"gpu_mem_limit": 8 << 30}``) override the defaults.
    """
    search = (cudnn_conv_algo_search or os.environ.get("CTSDK_CUDNN_SEARCH") or DEFAULT_CUDNN_SEARCH).upper()
    if search not in CUDNN_SEARCH:
        raise ConfigError(f"cudnn_conv_algo_search must be one of {CUDNN_SEARCH}, got {search!r}")
    if int(device_id) < 0:
        raise ConfigError(f"device_id must be >= 0, got {device_id}")
    opts: Dict[str, str] = {
        "cudnn_conv_algo_search": search,
        "do_copy_in_default_stream": "1",
        "arena_extend_strategy": "kSameAsRequested",
    }
    if int(device_id) != 0:
        opts["device_id"] = str(int(device_id))
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    for k, v in dict(extra or {}).items():
        opts[str(k)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    if opts.get("device_id") == "0":
        del opts["device_id"]
    return opts


def providers_for(device: str, provider_options: Optional[Mapping[str, Any]] = None) -> List[Any]:
    """The provider list ORT gets for ``device`` ("cpu" | "cuda"; CUDA always falls back to CPU).

    For CUDA, ``provider_options`` are the *complete* CUDA EP options (build them with
    :func:`cuda_provider_options`); None means ``cuda_provider_options()``.
    """
    if device not in _DEVICES:
        raise ConfigError(f"ORT device must be one of {_DEVICES}, got {device!r}")
    if device == "cpu":
        return [CPU_EP]
    opts = dict(provider_options) if provider_options is not None else cuda_provider_options()
    return [(CUDA_EP, {k: str(v) for k, v in opts.items()}), CPU_EP]


@functools.lru_cache(maxsize=4)
def probe_provider(provider: str) -> Tuple[bool, str]:
    """``(granted, reason)``: whether ORT really grants ``provider`` for a one-node session."""
    try:
        ort = _ort()
    except Exception as exc:
        return False, str(exc)
    listed = ort.get_available_providers()
    if provider not in listed:
        pkg = "onnxruntime-gpu" if provider == CUDA_EP else "an ONNX Runtime build with it"
        return False, f"{provider} is not in this onnxruntime build ({', '.join(listed)}); install {pkg}"
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(_PROBE_ONNX, so, providers=[provider] if provider == CPU_EP else [provider, CPU_EP])
    except Exception as exc:
        return False, f"{provider} failed to start: {str(exc).splitlines()[0][:200]}"
    granted = sess.get_providers()
    if provider not in granted:
        return False, (f"{provider} is listed but ORT fell back to {granted} (no usable GPU, driver, CUDA or cuDNN "
                       "libraries; run with -vv and ORT log level 0 to see why)")
    return True, f"{provider} granted"


def _precision_from_meta(meta: Mapping[str, str], path: str) -> str:
    p = meta.get("ctsdk.precision")
    if p in ("fp32", "fp16", "int8"):
        return p
    low = path.lower()
    for tag in ("int8", "fp16"):
        if tag in low:
            return tag
    return "fp32"


# --- batch padding and shapes (pure; used by infer, run_device and the facade) ------------------------
def batch_chunks(n: int, batch: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in pieces of at most ``batch``."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    return [(i, min(i + batch, n)) for i in range(0, max(0, int(n)), batch)]


def pad_batch(x: np.ndarray, batch: int) -> np.ndarray:
    """``x`` (n, ...) with n <= batch, zero-padded along axis 0 to (batch, ...); ``x`` itself when full."""
    n = int(x.shape[0])
    if n > batch:
        raise ConfigError(f"pad_batch: {n} rows do not fit a batch of {batch} (split with batch_chunks first)")
    if n == batch:
        return x
    out = np.zeros((batch, *x.shape[1:]), dtype=x.dtype)
    out[:n] = x
    return out


def batch_symbol(spec: TensorSpec) -> Optional[object]:
    """The symbolic (dynamic) first dimension of ``spec`` ("batch", None, ...), or None when fixed."""
    if not spec.shape:
        return None
    d0 = spec.shape[0]
    return None if isinstance(d0, int) and d0 > 0 else (d0 if d0 is not None else "?")


def resolve_output_shapes(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                          shapes: Mapping[str, Sequence[int]]) -> Dict[str, Optional[Tuple[int, ...]]]:
    """Concrete output shapes from the model's specs and the fed input shapes: a symbolic output
    dimension takes the value of the same-named input dimension; an output with a dimension that no
    input names maps to None (ORT then allocates it)."""
    known: Dict[object, int] = {}
    for spec in inputs:
        if spec.name not in shapes:
            continue
        for want, got in zip(spec.shape, shapes[spec.name]):
            if not (isinstance(want, int) and want > 0) and want not in (None, "?", ""):
                known.setdefault(want, int(got))
    out: Dict[str, Optional[Tuple[int, ...]]] = {}
    for spec in outputs:
        dims: List[int] = []
        for d in spec.shape:
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif d in known:
                dims.append(known[d])
            else:
                dims = []
                break
        out[spec.name] = tuple(dims) if dims or not spec.shape else None
    return out


def cai_dtype(obj: Any) -> np.dtype:
    """NumPy dtype of an object with ``__cuda_array_interface__`` (from its ``typestr``)."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if not isinstance(cai, Mapping) or "typestr" not in cai:
        raise ConfigError(f"{type(obj).__name__} is not a CUDA device array (no __cuda_array_interface__)")
    return np.dtype(cai["typestr"])


def cai_streams(objs: Sequence[Any]) -> List[int]:
    """The producer streams named by the inputs' ``__cuda_array_interface__`` (v3 ``stream``;
    None = no synchronization needed), deduplicated, in order."""
    seen: List[int] = []
    for o in objs:
        s = getattr(o, "__cuda_array_interface__", {}).get("stream")
        if s is not None and int(s) not in seen:
            seen.append(int(s))
    return seen


class OrtSession(Session):
    """An ONNX Runtime inference session.

    Args:
        model: ONNX path or serialized bytes.
        device: "cpu" or "cuda" (CUDA EP, falling back to CPU - see ``fallback_reasons``).
        threads: intra-op threads (default :func:`session_threads`: all cores on the CPU, 1 for CUDA).
        provider_options: extra CUDA EP options merged over :func:`cuda_provider_options`
            (``{"device_id": 1}``, ``{"cudnn_conv_algo_search": "EXHAUSTIVE"}``, ...).
        precision: what the graph computes in ("fp32" | "fp16" | "int8"); default from the
            ``ctsdk.precision`` metadata or the file name.
        strict: raise RuntimeUnavailableError instead of falling back to CPU.
        graph_optimization: ORT graph optimisation level ("all" | "extended" | "basic" | "disable").
        spinning: let idle intra-op threads spin-wait (ORT's default). Off by default: the product
            builds the next batch in a helper thread while a batch runs, and spinning workers take
            the CPU from it (on 2 cores: pipelined classification 2.7 s -> 1.9 s wall, 1.30 ->
            0.91 s CPU, ``examples/ort_spinning_check.py``, docs/benchmarks/cpu.md).
        fixed_batch: run every call at this batch (pad the last, split larger ones); None = as fed.
        lanes: CPU only: batches :meth:`infer_batched` runs side by side (default 1). Without
            ``threads`` each lane gets its share of the cores as intra-op threads
            (:func:`lane_threads`); :func:`cpu_lanes` is the product's choice. Ignored (1) on CUDA.
        cuda_graph: capture a CUDA graph (CUDA only; needs ``fixed_batch`` and CuPy).
        profile: file prefix for ORT's profiler JSON (``end_profiling()`` returns the file).
    """

    #: IOBinding device type of the buffers run_device binds
    _io_device = "cuda"

    def __init__(
        self,
        model: Union[PathLike, bytes],
        *,
        device: str = "cpu",
        threads: Optional[int] = None,
        provider_options: Optional[Mapping[str, Any]] = None,
        precision: Optional[str] = None,
        strict: bool = False,
        graph_optimization: str = "all",
        fixed_batch: Optional[int] = None,
        cuda_graph: bool = False,
        profile: Optional[str] = None,
        spinning: bool = False,
        lanes: Optional[int] = None,
    ) -> None:
        super().__init__()
        ort = _ort()
        self.path = "<bytes>" if isinstance(model, (bytes, bytearray)) else str(model)
        if not isinstance(model, (bytes, bytearray)) and not Path(model).is_file():
            raise ConfigError(f"{model}: ONNX model not found (export one with `ctsdk export`, or check the bundle)")
        if device not in _DEVICES:
            raise ConfigError(f"ORT device must be one of {_DEVICES}, got {device!r}")
        if fixed_batch is not None and int(fixed_batch) < 1:
            raise ConfigError(f"fixed_batch must be >= 1 or None, got {fixed_batch}")
        if cuda_graph and (device != "cuda" or fixed_batch is None):
            raise ConfigError("cuda_graph=True needs device='cuda' and a fixed_batch (a CUDA graph replays fixed shapes)")
        if lanes is not None and int(lanes) < 1:
            raise ConfigError(f"lanes must be >= 1 or None, got {lanes}")
        self.lanes = int(lanes or 1) if device == "cpu" else 1
        self.fixed_batch = int(fixed_batch) if fixed_batch is not None else None
        self.cuda_graph = bool(cuda_graph)
        user = dict(provider_options or {})
        self.device_id = int(user.pop("device_id", 0))
        search = user.pop("cudnn_conv_algo_search", None)
        self.cuda_options = cuda_provider_options(self.device_id, cudnn_conv_algo_search=search,
                                                  cuda_graph=self.cuda_graph, extra=user) if device == "cuda" else {}
        so = ort.SessionOptions()
        self.threads = lane_threads(threads, self.lanes) if self.lanes > 1 else session_threads(device, threads)
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # idle intra-op threads sleep instead of spin-waiting (CUDA: the CPU threads only launch
        # work; CPU: the next batch is built in a helper thread while a batch runs)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile)
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if graph_optimization not in levels:
            raise ConfigError(f"graph_optimization must be one of {sorted(levels)}, got {graph_optimization!r}")
        so.graph_optimization_level = levels[graph_optimization]
        self.requested_device = device
        self.fallback_reasons: List[str] = []
        providers = providers_for(device, self.cuda_options)
        if device == "cuda" and CUDA_EP not in ort.get_available_providers():
            reason = f"CUDA requested but this onnxruntime build has no {CUDA_EP} (pip uninstall -y onnxruntime && pip install onnxruntime-gpu)"
            if strict or self.cuda_graph:
                raise RuntimeUnavailableError(f"{self.path}: {reason}")
            self.fallback_reasons.append(reason)
            providers = [CPU_EP]
        try:
            self._sess = ort.InferenceSession(model if isinstance(model, (bytes, bytearray)) else str(model), so, providers=providers)
        except Exception as exc:
            raise RuntimeUnavailableError(f"{self.path}: ONNX Runtime could not load the model with {providers}: {exc}") from exc
        granted = self._sess.get_providers()
        if device == "cuda" and CUDA_EP not in granted and not self.fallback_reasons:
            reason = f"CUDA requested but ORT granted only {granted} (no usable GPU / CUDA / cuDNN here)"
            if strict or self.cuda_graph:
                raise RuntimeUnavailableError(f"{self.path}: {reason}")
            self.fallback_reasons.append(reason)
        for r in self.fallback_reasons:
            log.warning("%s: %s; running on CPU", self.path, r)
        self.provider = granted[0]
        meta = dict(self._sess.get_modelmeta().custom_metadata_map)
        self.metadata: Dict[str, str] = meta
        self.precision = precision or _precision_from_meta(meta, self.path)
        dev = "cpu"
        if self.on_gpu:
            from .gpu import gpu_info

            g = gpu_info(self.device_id)
            dev = g.name if g else "cuda"
        self.info = RuntimeInfo(backend="onnxruntime", provider=self.provider, precision=self.precision, device=dev)
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self._sess.get_inputs()]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self._sess.get_outputs()]
        self._out_names = [o.name for o in self.outputs]
        self._batched_in = {t.name for t in self.inputs if batch_symbol(t) is not None}
        syms = {batch_symbol(t) for t in self.inputs if batch_symbol(t) is not None}
        self._batched_out = {t.name for t in self.outputs if batch_symbol(t) in syms}
        if self.fixed_batch is not None and not self._batched_in:
            raise ConfigError(f"{self.path}: fixed_batch needs an input with a dynamic first dimension; inputs are "
                              f"{[(t.name, t.shape) for t in self.inputs]}")
        #: bytes this session copied host->device / device->host (infer() feeds and results on CUDA)
        self.transfer_bytes = {"h2d": 0, "d2h": 0}
        self._lock = threading.Lock()
        self._graph: Optional[Dict[str, Any]] = None   # CUDA graph: fixed buffers + their IOBinding

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._sess

    @property
    def on_gpu(self) -> bool:
        """True when ORT granted the CUDA EP."""
        return self.provider == CUDA_EP

    def options(self) -> Dict[str, Any]:
        """What this session was built with (JSON-safe): provider, CUDA EP options, threads, batch."""
        return {"provider": self.provider, "cuda_options": dict(self.cuda_options), "threads": self.threads,
                "fixed_batch": self.fixed_batch, "cuda_graph": self.cuda_graph,
                "granted": list(self._sess.get_providers()) if self._sess is not None else []}

    def end_profiling(self) -> str:
        """Stop ORT's profiler (``profile=`` prefix) and return the JSON file it wrote."""
        return str(self._sess.end_profiling())

    # --- host arrays --------------------------------------------------------------------------------
    def _check_outputs(self, outputs: Optional[Sequence[str]]) -> List[str]:
        names = list(outputs) if outputs else list(self._out_names)
        unknown = sorted(set(names) - set(self._out_names))
        if unknown:
            raise ConfigError(f"{self.path}: unknown outputs {unknown}; the model has {self._out_names}")
        return names

    def _feed_rows(self, feed: Mapping[str, Any]) -> int:
        rows = {int(v.shape[0]) for k, v in feed.items() if k in self._batched_in}
        if len(rows) > 1:
            raise ConfigError(f"{self.path}: batched inputs disagree on the batch size: "
                              f"{ {k: tuple(v.shape) for k, v in feed.items()} }")
        return rows.pop() if rows else 0

    def _infer_impl(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
        names = self._check_outputs(outputs)
        feed = {k: np.ascontiguousarray(v) for k, v in feed.items()}
        if self.cuda_graph:
            return self._infer_via_device(feed, names)
        if self.fixed_batch is None:
            return self._run_host(feed, names)
        n = self._feed_rows(feed)
        parts: List[Dict[str, np.ndarray]] = []
        for a, b in batch_chunks(n, self.fixed_batch) or [(0, 0)]:
            piece = {k: pad_batch(v[a:b], self.fixed_batch) if k in self._batched_in else v for k, v in feed.items()}
            res = self._run_host(piece, names)
            parts.append({k: (v[: b - a] if k in self._batched_out else v) for k, v in res.items()})
        return {k: (np.concatenate([p[k] for p in parts]) if k in self._batched_out and len(parts) > 1 else parts[0][k])
                for k in names}

    def _run_host(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
        res = self._sess.run(list(names), dict(feed))
        if self.on_gpu:
            self.transfer_bytes["h2d"] += sum(int(v.nbytes) for v in feed.values())
            self.transfer_bytes["d2h"] += sum(int(np.asarray(v).nbytes) for v in res)
        return dict(zip(names, res))

    def _infer_via_device(self, feed: Mapping[str, np.ndarray], names: Sequence[str]) -> Dict[str, np.ndarray]:
        cp = _cupy()
        with cp.cuda.Device(self.device_id):
            dev = {k: cp.asarray(v) for k, v in feed.items()}
            self.transfer_bytes["h2d"] += sum(int(v.nbytes) for v in feed.values())
            out = self.run_device(dev, names)
            host = {k: cp.asnumpy(v) for k, v in out.items()}
        self.transfer_bytes["d2h"] += sum(int(v.nbytes) for v in host.values())
        return host

    # --- device arrays ------------------------------------------------------------------------------
    def run_device(self, inputs: Mapping[str, Any], outputs: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Run on device buffers: ``inputs`` are objects with ``__cuda_array_interface__`` (CuPy,
        pycuda GPUArray, torch CUDA tensors; C-contiguous, the model's dtypes); returns CuPy arrays
        on this session's GPU (see the module docstring for the stream order). With
        ``fixed_batch`` the batch is padded/split as in :meth:`infer`; with ``cuda_graph`` the
        inputs are copied into the graph's fixed buffers and the outputs are fresh copies.

        Raises:
            RuntimeUnavailableError: the session does not run on the CUDA EP, or CuPy is missing.
            ConfigError: unknown/missing inputs or outputs, wrong dtype/rank/shape, not contiguous.
        """
        if not self.on_gpu:
            raise RuntimeUnavailableError(f"{self.path}: run_device needs the CUDA EP; this session runs on {self.provider}"
                                          + (f" ({'; '.join(self.fallback_reasons)})" if self.fallback_reasons else ""))
        names = self._check_outputs(outputs)
        cp = _cupy()
        with cp.cuda.Device(self.device_id):
            arrays = self._device_inputs(cp, inputs)
            for s in cai_streams(list(inputs.values())):
                cp.cuda.runtime.streamSynchronize(s)
            cp.cuda.get_current_stream().synchronize()
            t0 = _now()
            if self.cuda_graph:
                out = self._run_graph(cp, arrays, names)
            elif self.fixed_batch is None:
                out = self._run_bound(cp, arrays, names)
            else:
                out = self._run_fixed(cp, arrays, names)
            self.last_ms = (_now() - t0) * 1000.0
        return out

    def _device_inputs(self, cp: Any, inputs: Mapping[str, Any]) -> Dict[str, Any]:
        expected = {t.name: t for t in self.inputs}
        if set(inputs) != set(expected):
            raise ConfigError(f"{self.path}: inputs: expected {sorted(expected)}, got {sorted(inputs)}")
        arrays: Dict[str, Any] = {}
        for name, obj in inputs.items():
            spec = expected[name]
            dt = cai_dtype(obj)
            if dt.name != spec.dtype:
                raise ConfigError(f"input {name!r}: expected dtype {spec.dtype}, got {dt.name} (cast on the device first)")
            a = cp.asarray(obj)  # zero-copy view of the producer's buffer
            if a.ndim != len(spec.shape):
                raise ConfigError(f"input {name!r}: expected rank {len(spec.shape)} {spec.shape}, got shape {a.shape}")
            for want, got in zip(spec.shape, a.shape):
                if isinstance(want, int) and want > 0 and want != got:
                    raise ConfigError(f"input {name!r}: expected shape {spec.shape}, got {a.shape}")
            if not a.flags.c_contiguous:
                raise ConfigError(f"input {name!r}: device array must be C-contiguous (use cupy.ascontiguousarray)")
            if a.device.id != self.device_id:
                raise ConfigError(f"input {name!r} lives on GPU {a.device.id}, the session on GPU {self.device_id}")
            arrays[name] = a
        self._feed_rows(arrays)
        return arrays

    def _bind_run(self, cp: Any, arrays: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
        """One IOBinding run: inputs bound in place, outputs into fresh CuPy buffers (or ORT's own
        allocation when a shape cannot be computed, then copied into CuPy)."""
        shapes = resolve_output_shapes(self.inputs, self.outputs, {k: tuple(v.shape) for k, v in arrays.items()})
        specs = {t.name: t for t in self.outputs}
        io = self._sess.io_binding()
        for name, a in arrays.items():
            io.bind_input(name, self._io_device, self.device_id, np.dtype(a.dtype).type, tuple(int(d) for d in a.shape), int(a.data.ptr))
        out: Dict[str, Any] = {}
        for name in names:
            shape = shapes.get(name)
            if shape is None:
                io.bind_output(name, self._io_device, self.device_id)
                continue
            buf = cp.empty(shape, dtype=np.dtype(specs[name].dtype))
            io.bind_output(name, self._io_device, self.device_id, np.dtype(buf.dtype).type, shape, int(buf.data.ptr))
            out[name] = buf
        self._sess.run_with_iobinding(io)
        io.synchronize_outputs()
        if len(out) < len(names):
            for name, val in zip(names, io.get_outputs()):
                if name not in out:
                    out[name] = _ortvalue_to_cupy(cp, val, np.dtype(specs[name].dtype))
        return {k: out[k] for k in names}

    def _run_bound(self, cp: Any, arrays: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
        return self._bind_run(cp, arrays, names)

    def _run_fixed(self, cp: Any, arrays: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
        fb = int(self.fixed_batch or 1)
        n = self._feed_rows(arrays)
        parts: List[Dict[str, Any]] = []
        for a, b in batch_chunks(n, fb) or [(0, 0)]:
            piece = {k: _pad_device(cp, v[a:b], fb) if k in self._batched_in else v for k, v in arrays.items()}
            res = self._bind_run(cp, piece, names)
            parts.append({k: (v[: b - a] if k in self._batched_out else v) for k, v in res.items()})
        if len(parts) == 1:
            return parts[0]
        return {k: (cp.concatenate([p[k] for p in parts]) if k in self._batched_out else parts[0][k]) for k in names}

    def _graph_state(self, cp: Any) -> Dict[str, Any]:
        """Fixed input/output buffers at ``fixed_batch`` and the IOBinding that binds them once."""
        if self._graph is not None:
            return self._graph
        fb = int(self.fixed_batch or 1)
        shapes_in: Dict[str, Tuple[int, ...]] = {}
        for t in self.inputs:
            dims = [fb if i == 0 and t.name in self._batched_in else d for i, d in enumerate(t.shape)]
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise ConfigError(f"{self.path}: cuda_graph needs fixed input shapes apart from the batch; {t.name} is {t.shape}")
            shapes_in[t.name] = tuple(int(d) for d in dims)
        shapes_out = resolve_output_shapes(self.inputs, self.outputs, shapes_in)
        missing = [k for k, v in shapes_out.items() if v is None]
        if missing:
            raise ConfigError(f"{self.path}: cuda_graph needs computable output shapes; {missing} are not")
        io = self._sess.io_binding()
        bufs_in = {k: cp.zeros(s, dtype=np.dtype(next(t.dtype for t in self.inputs if t.name == k))) for k, s in shapes_in.items()}
        bufs_out = {t.name: cp.empty(shapes_out[t.name], dtype=np.dtype(t.dtype)) for t in self.outputs}
        for k, b in bufs_in.items():
            io.bind_input(k, self._io_device, self.device_id, np.dtype(b.dtype).type, tuple(b.shape), int(b.data.ptr))
        for k, b in bufs_out.items():
            io.bind_output(k, self._io_device, self.device_id, np.dtype(b.dtype).type, tuple(b.shape), int(b.data.ptr))
        self._graph = {"io": io, "in": bufs_in, "out": bufs_out}
        return self._graph

    def _run_graph(self, cp: Any, arrays: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Any]:
        fb = int(self.fixed_batch or 1)
        n = self._feed_rows(arrays)
        parts: List[Dict[str, Any]] = []
        with self._lock:  # one set of fixed buffers per session
            g = self._graph_state(cp)
            for a, b in batch_chunks(n, fb) or [(0, 0)]:
                for k, v in arrays.items():
                    buf = g["in"][k]
                    if k in self._batched_in:
                        buf[: b - a] = v[a:b]
                        if b - a < fb:
                            buf[b - a:] = 0
                    else:
                        buf[...] = v
                cp.cuda.get_current_stream().synchronize()
                self._sess.run_with_iobinding(g["io"])
                g["io"].synchronize_outputs()
                parts.append({k: (g["out"][k][: b - a] if k in self._batched_out else g["out"][k]).copy() for k in names})
        if len(parts) == 1:
            return parts[0]
        return {k: (cp.concatenate([p[k] for p in parts]) if k in self._batched_out else parts[0][k]) for k in names}

    def close(self) -> None:
        self._graph = None
        self._sess = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OrtSession({self.path!r}, provider={self.provider}, precision={self.precision})"


def _now() -> float:
    import time

    return time.perf_counter()


def _cupy() -> Any:
    """CuPy, or RuntimeUnavailableError saying what to install (device buffers need it)."""
    try:
        import cupy  # lazy: optional GPU dependency
    except ImportError as exc:
        raise RuntimeUnavailableError("device buffers (OrtSession.run_device / cuda_graph) need CuPy: "
                                      "pip install cupy-cuda12x or cupy-cuda13x") from exc
    return cupy


def _pad_device(cp: Any, a: Any, batch: int) -> Any:
    """Device counterpart of :func:`pad_batch` (a new zero-padded CuPy array when short)."""
    n = int(a.shape[0])
    if n == batch:
        return a
    out = cp.zeros((batch, *a.shape[1:]), dtype=a.dtype)
    out[:n] = a
    return out


def _ortvalue_to_cupy(cp: Any, val: Any, dtype: np.dtype) -> Any:
    """Copy an ORT-allocated CUDA OrtValue into a CuPy array (the OrtValue is freed with the binding)."""
    shape = tuple(int(d) for d in val.shape())
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = cp.cuda.UnownedMemory(int(val.data_ptr()), nbytes, val)
    view = cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(mem, 0))
    return view.copy()


class OrtSessionFromOnnx:
    """Loader (Polygraphy style): stores arguments, builds the OrtSession only when called.

    ``OrtSessionFromOnnx("m.onnx", device="cuda")()`` -> OrtSession.
    """

    def __init__(self, path: PathLike, **session_kwargs: Any) -> None:
        self.path = path
        self.kwargs = session_kwargs

    def __call__(self) -> OrtSession:
        return OrtSession(self.path, **self.kwargs)

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"OrtSessionFromOnnx({str(self.path)!r}{', ' + kw if kw else ''})"


__all__ = ["CPU_EP", "CUDA_EP", "CUDNN_SEARCH", "MAX_AUTO_LANES", "OrtSession", "OrtSessionFromOnnx", "batch_chunks", "cai_dtype",
           "cpu_lanes", "cuda_provider_options", "default_threads", "lane_threads", "pad_batch", "probe_provider", "providers_for",
           "resolve_output_shapes", "session_threads"]

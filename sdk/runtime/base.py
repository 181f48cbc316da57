"""One session interface over every inference backend (ORT CPU, ORT CUDA, TensorRT).

    with OrtSession("classifier.onnx") as s:
        out = s.infer({"image": x})        # dict[str, ndarray] -> dict[str, ndarray]
        s.last_ms, s.provider, s.precision

Sessions are context managers, check inputs against the model's metadata, and record the time of
the last call. Backends are registered by name (``get_runtime("ort-cpu")``).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: Tuple[object, ...]   # ints or symbolic names (str) / None for dynamic axes
    dtype: str                  # numpy dtype name, e.g. "float32"


@dataclass(frozen=True)
class RuntimeInfo:
    """What really ran: reported in TriageResult.runtime."""

    backend: str      # "onnxruntime" | "tensorrt"
    provider: str     # e.g. "CPUExecutionProvider", "CUDAExecutionProvider", "TensorRT"
    precision: str    # "fp32" | "fp16" | "int8"
    device: str       # "cpu" or the GPU name

    def to_dict(self) -> Dict[str, str]:
        return dict(self.__dict__)


class Session:
    """Base class: subclasses implement ``_infer_impl`` and set inputs/outputs/info."""

    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    info: RuntimeInfo
    #: batches :meth:`infer_batched` runs at once (class default for subclasses that do not call
    #: ``Session.__init__``; CPU sessions opened with ``lanes`` set their own)
    lanes: int = 1

    def __init__(self) -> None:
        self.last_ms: float = 0.0

    # context manager -------------------------------------------------------------------------
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    # inference --------------------------------------------------------------------------------
    def infer_batched(
        self,
        source: Union[np.ndarray, Callable[[int, int], np.ndarray]],
        n: Optional[int] = None,
        *,
        batch: int,
        input_name: Optional[str] = None,
        outputs: Optional[Sequence[str]] = None,
        prefetch: bool = True,
        timings: Optional[Dict[str, float]] = None,
        lanes: Optional[int] = None,
    ) -> Dict[str, np.ndarray]:
        """Run ``n`` samples in batches of ``batch`` and concatenate every output along axis 0.

        The one batching loop of the package (classifier, lung U-Net, exports, calibration).

        Args:
            source: the whole input array (N, ...), or ``make(i0, i1)`` returning the input of
                samples ``i0:i1`` (so a caller can build its inputs batch by batch).
            n: number of samples (default ``len(source)`` for an array).
            batch: samples per call (>= 1).
            input_name: the input to feed (default: the model's only input).
            outputs: output names (default: all).
            prefetch: build batch k+1 (``make``) in a helper thread while batch k runs; the
                runtime releases the GIL, so input preparation and inference overlap. Inputs
                do not depend on each other, so results are the same either way.
            timings: receives ``prepare_ms`` (time waiting for inputs) and ``infer_ms``; with
                lanes, ``prepare_ms`` is the time a lane spent building inputs (summed over the
                lanes, divided by their number) and ``infer_ms`` the rest of the wall time.
            lanes: batches in flight at once (default: the session's ``lanes``). With ``lanes``
                > 1 each of that many helper threads builds a batch's input and runs it
                (:func:`sdk.pools.shared_pool` "lanes"): on a CPU session opened with one
                intra-op thread per lane this keeps every core busy through the serial parts
                of a network and the input building (docs/benchmarks/cpu.md). Every sample is
                computed as in sequence; outputs keep the sample order.
        """
        if int(batch) < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        n_lanes = int(lanes if lanes is not None else self.lanes)
        if n_lanes < 1:
            raise ConfigError(f"lanes must be >= 1, got {lanes}")
        make = source if callable(source) else (lambda i0, i1, a=source: a[i0:i1])
        total = int(n if n is not None else len(source))  # type: ignore[arg-type]
        if input_name is None:
            if len(self.inputs) != 1:
                raise ConfigError(f"the model has inputs {[t.name for t in self.inputs]}: pass input_name")
            input_name = self.inputs[0].name
        spans = [(i, min(i + int(batch), total)) for i in range(0, total, int(batch))]
        if n_lanes > 1 and len(spans) > 1:
            return self._infer_lanes(make, spans, n_lanes, input_name, outputs, timings)
        parts: Dict[str, List[np.ndarray]] = {}
        wait = run = 0.0
        pool = _prefetch_pool() if prefetch and callable(source) and len(spans) > 1 else None
        nxt = pool.submit(make, *spans[0]) if pool is not None else None
        for k, span in enumerate(spans):
            t0 = time.perf_counter()
            if nxt is not None:
                x = nxt.result()
                nxt = pool.submit(make, *spans[k + 1]) if k + 1 < len(spans) else None  # type: ignore[union-attr]
            else:
                x = make(*span)
            t1 = time.perf_counter()
            out = self.infer({input_name: np.ascontiguousarray(x)}, outputs)
            run += time.perf_counter() - t1
            wait += t1 - t0
            for name, v in out.items():
                parts.setdefault(name, []).append(np.asarray(v))
        if timings is not None:
            timings.update(prepare_ms=wait * 1e3, infer_ms=run * 1e3)
        if not spans:
            return {}
        return {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in parts.items()}

    def _infer_lanes(self, make: Callable[[int, int], np.ndarray], spans: List[Tuple[int, int]], lanes: int,
                     input_name: str, outputs: Optional[Sequence[str]],
                     timings: Optional[Dict[str, float]]) -> Dict[str, np.ndarray]:
        """:meth:`infer_batched` with ``lanes`` batches in flight: each job builds one batch's input
        and runs it; the outputs are concatenated in span order."""
        t_start = time.perf_counter()

        def job(span: Tuple[int, int]) -> Tuple[Dict[str, np.ndarray], float]:
            t0 = time.perf_counter()
            x = np.ascontiguousarray(make(*span))
            prep = time.perf_counter() - t0
            return {k: np.asarray(v) for k, v in self.infer({input_name: x}, outputs).items()}, prep

        pool = _lanes_pool(lanes)
        pending: List = []
        results: List[Tuple[Dict[str, np.ndarray], float]] = []
        # at most ``lanes`` batches in flight (the pool may be larger when shared by several calls)
        for span in spans:
            if len(pending) >= lanes:
                results.append(pending.pop(0).result())
            pending.append(pool.submit(job, span))
        results.extend(f.result() for f in pending)
        wall = time.perf_counter() - t_start
        if timings is not None:
            prep = sum(p for _, p in results) / lanes
            timings.update(prepare_ms=prep * 1e3, infer_ms=max(0.0, wall - prep) * 1e3)
        names = list(results[0][0])
        return {k: np.concatenate([r[k] for r, _ in results]) for k in names}

    def infer(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        self._check(feed)
        t0 = time.perf_counter()
        out = self._infer_impl(feed, outputs)
        self.last_ms = (time.perf_counter() - t0) * 1000.0
        return out

    def _infer_impl(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def _check(self, feed: Mapping[str, np.ndarray]) -> None:
        expected = {t.name: t for t in self.inputs}
        missing = sorted(set(expected) - set(feed))
        extra = sorted(set(feed) - set(expected))
        if missing or extra:
            raise ConfigError(f"inputs: expected {sorted(expected)}, got {sorted(feed)} (missing {missing}, unexpected {extra})")
        for name, arr in feed.items():
            spec = expected[name]
            if np.dtype(arr.dtype).name != spec.dtype:
                raise ConfigError(f"input {name!r}: expected dtype {spec.dtype}, got {arr.dtype}")
            if len(arr.shape) != len(spec.shape):
                raise ConfigError(f"input {name!r}: expected rank {len(spec.shape)} {spec.shape}, got shape {arr.shape}")
            for want, got in zip(spec.shape, arr.shape):
                if isinstance(want, int) and want > 0 and want != got:
                    raise ConfigError(f"input {name!r}: expected shape {spec.shape}, got {arr.shape}")


def _prefetch_pool() -> ThreadPoolExecutor:
    """The helper threads that build the next batch's input (:func:`sdk.pools.shared_pool`)."""
    from ..pools import shared_pool

    return shared_pool("prefetch")


def _lanes_pool(lanes: int) -> ThreadPoolExecutor:
    """The threads that run batches side by side (:func:`sdk.pools.shared_pool` "lanes")."""
    from ..pools import WORKERS, shared_pool

    return shared_pool("lanes", max(WORKERS, int(lanes)))


#: ORT type strings -> numpy dtype names (for sessions built outside ctsdk)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool"}


class ExternalOrtSession(Session):
    """A ctsdk Session over an ``onnxruntime.InferenceSession`` the caller built themselves (so
    public functions that accept one still run it through this interface and its batching)."""

    def __init__(self, session: object) -> None:
        super().__init__()
        self._sess = session
        self.inputs = [TensorSpec(i.name, tuple(i.shape), _ORT_DTYPES.get(i.type, i.type)) for i in session.get_inputs()]  # type: ignore[attr-defined]
        self.outputs = [TensorSpec(o.name, tuple(o.shape), _ORT_DTYPES.get(o.type, o.type)) for o in session.get_outputs()]  # type: ignore[attr-defined]
        providers = list(session.get_providers())  # type: ignore[attr-defined]
        self.info = RuntimeInfo(backend="onnxruntime", provider=providers[0] if providers else "", precision="fp32",
                                device="cpu" if not providers or providers[0] == "CPUExecutionProvider" else "cuda")

    def _infer_impl(self, feed: Mapping[str, np.ndarray], outputs: Optional[Sequence[str]]) -> Dict[str, np.ndarray]:
        names = list(outputs) if outputs else [t.name for t in self.outputs]
        return dict(zip(names, self._sess.run(names, {k: np.ascontiguousarray(v) for k, v in feed.items()})))  # type: ignore[attr-defined]


# --- process-wide cache of model sessions opened by path ---------------------------------------------
_CACHED: Dict[Tuple[str, str], Any] = {}
_CACHED_LOCK = threading.RLock()  # an opener that asks for another cached session does not deadlock


def session_or_cached(session: Any, onnx_path: Any, default: Any, opener: Callable[[str], Any], kind: str) -> Any:
    """``session`` when given; else this process's one session of ``onnx_path`` (``default`` when
    None), opened once by ``opener(path)`` and kept under ``(kind, path)`` - the free functions of
    ``sdk.lungs`` (2D U-Net) and ``sdk.lungs.unet3d`` (3D U-Net) share their sessions this way."""
    if session is not None:
        return session
    key = (kind, str(Path(onnx_path) if onnx_path is not None else Path(default)))
    with _CACHED_LOCK:
        if key not in _CACHED:
            _CACHED[key] = opener(key[1])
        return _CACHED[key]

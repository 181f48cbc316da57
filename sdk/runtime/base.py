"""One session interface over every inference backend (ORT CPU, ORT CUDA, TensorRT).

    with OrtSession("classifier.onnx") as s:
        out = s.infer({"image": x})        # dict[str, ndarray] -> dict[str, ndarray]
        s.last_ms, s.provider, s.precision

Sessions are context managers, check inputs against the model's metadata, and record the time of
the last call. Backends are registered by name (``get_runtime("ort-cpu")``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

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

"""The runtimes the bench compares, and how each one is driven.

Runtime names (the ``--runtimes`` choices)::

    naive          PyTorch eager FP32 baseline (sdk.bench.naive)
    ort-fp32       sdk.Triage(device="cpu",      precision="fp32")   ONNX Runtime CPU EP
    ort-int8       sdk.Triage(device="cpu",      precision="int8")   ONNX Runtime CPU EP, QDQ INT8
    ort-cuda-fp16  sdk.Triage(device="cuda",     precision="fp16")   ONNX Runtime CUDA EP
    trt-fp16       sdk.Triage(device="tensorrt", precision="fp16")   TensorRT engine
    trt-int8       sdk.Triage(device="tensorrt", precision="int8")   TensorRT engine from the QDQ ONNX

The optimised runtimes run the real product (:class:`sdk.triage.Triage`), so the bench measures
what users get. Triage reports the reader's own split of ``load`` (``load_series(timings=...)``:
``load.scan``, ``load.decode``, ``load.hu``, ``load.geometry``); the bench maps it to ``decode``
(file reading, header parsing, pixel decoding) and ``hu`` (stored -> HU, slice ordering,
geometry). A reader without that keyword leaves ``load`` whole in ``decode``, with a note.

A runtime that cannot run here is *skipped* with the reason that sdk.runtime (or the bundle)
gives: the exception of ``Triage(...)``, or a runtime that silently ran on something else than
requested (e.g. INT8 asked, FP32 granted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ConfigError, CtsdkError
from .stages import STAGE_LABELS, STAGES  # re-exported (one definition, no naive <-> pipelines cycle)

#: Triage.timings_ms key -> canonical stage (classifier input building is resampling: window +
#: resize of the selected slices to S x S)
TRIAGE_STAGE_MAP = {
    "eligibility": "eligibility", "resample": "resample", "classifier_inputs": "resample",
    "lungs": "lungs", "slice_selection": "select", "classification": "classify",
    "aggregation": "aggregate",
}


@dataclass(frozen=True)
class RuntimeSpec:
    """One benchmarked runtime: how to build it and what it should report."""

    name: str
    device: str          # "naive" | "cpu" | "cuda" | "tensorrt"
    precision: str       # "fp32" | "fp16" | "int8"
    description: str

    @property
    def gpu(self) -> bool:
        return self.device in ("cuda", "tensorrt")


RUNTIMES: Dict[str, RuntimeSpec] = {
    "naive": RuntimeSpec("naive", "naive", "fp32", "PyTorch eager FP32, pydicom one file at a time, scipy.ndimage.zoom, one slice at a time"),
    "naive-paper": RuntimeSpec("naive-paper", "naive", "fp32", "paper 000 naively (issue 15's naive pipeline): pydicom one file at a "
                               "time, SciPy zoom to 128^3, 3D U-Net and ResNet-50 on every slice in PyTorch eager FP32"),
    "ort-fp32": RuntimeSpec("ort-fp32", "cpu", "fp32", "sdk.Triage on ONNX Runtime CPU, FP32"),
    "ort-int8": RuntimeSpec("ort-int8", "cpu", "int8", "sdk.Triage on ONNX Runtime CPU, INT8 QDQ classifier"),
    "ort-cuda-fp16": RuntimeSpec("ort-cuda-fp16", "cuda", "fp16", "sdk.Triage on ONNX Runtime CUDA EP, FP16 classifier"),
    "trt-fp16": RuntimeSpec("trt-fp16", "tensorrt", "fp16", "sdk.Triage on a TensorRT FP16 engine"),
    "trt-int8": RuntimeSpec("trt-int8", "tensorrt", "int8", "sdk.Triage on a TensorRT INT8 engine (QDQ ONNX)"),
}
DEFAULT_RUNTIMES = tuple(RUNTIMES)


def parse_runtimes(text: Optional[str]) -> List[str]:
    """``"naive,ort-fp32"`` -> ["naive", "ort-fp32"]; unknown names raise ConfigError listing the valid ones.
    None: the default runtimes; an empty text (``--runtimes ""``) is refused like ``--runtimes ,``."""
    if text is None:
        return list(DEFAULT_RUNTIMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in RUNTIMES]
    if bad:
        raise ConfigError(f"unknown runtime(s) {', '.join(bad)}; valid: {', '.join(RUNTIMES)}")
    if not names:
        raise ConfigError(f"--runtimes is empty; valid: {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


# --- availability ------------------------------------------------------------------------------
def precheck(spec: RuntimeSpec) -> Optional[str]:
    """Why ``spec`` cannot run here, found without building anything (None: try it).

    GPU runtimes ask sdk.runtime's own probes (a visible GPU, a granted CUDA provider, an
    importable TensorRT); CPU runtimes are decided by building them (bundle, INT8 model...).
    """
    if spec.device == "naive":
        from .._lazy import available

        return None if available("torch") else "torch is not installed (the naive baseline is PyTorch eager): pip install 'ctsdk[train]'"
    if not spec.gpu:
        return None
    reasons: List[str] = []
    try:
        from ..runtime.gpu import gpu_reasons

        reasons += gpu_reasons()
    except ImportError as exc:  # pragma: no cover - sdk.runtime incomplete
        reasons.append(f"sdk.runtime.gpu unavailable ({exc})")
    if spec.device == "cuda" and not reasons:
        from ..runtime.ort import CUDA_EP, probe_provider

        ok, why = probe_provider(CUDA_EP)
        if not ok:
            reasons.append(why)
    if spec.device == "tensorrt":
        from .._lazy import available

        if not available("tensorrt"):
            reasons.append("tensorrt is not installed (pip install 'ctsdk[gpu]'; it needs NVIDIA's package index)")
    return "; ".join(reasons) or None


# --- decode / HU split of Triage's "load" ---------------------------------------------------------
#: reader sub-stages (``sdk.io.load_series(timings=...)``, reported by Triage as ``load.<key>``)
#: -> canonical stage: file scan + pixel decoding are "decode"; rescale + geometry are "hu"
LOAD_PARTS = {"scan": "decode", "decode": "decode", "hu": "hu", "geometry": "hu"}


def map_triage_timings(timings: Dict[str, float]) -> Tuple[Dict[str, float], List[str]]:
    """Triage ``timings_ms`` -> canonical stages (ms). Returns (stages, notes).

    ``load`` is split with the reader's own parts (``load.scan`` + ``load.decode`` -> decode,
    ``load.hu`` + ``load.geometry`` -> hu; the few ms of bookkeeping outside them -> hu). A
    reader without the split leaves ``load`` whole in ``decode``, with a note. Unknown keys go to
    ``other``.
    """
    notes: List[str] = []
    out: Dict[str, float] = {s: 0.0 for s in STAGES}
    load = float(timings.get("load", 0.0))
    parts = {k[len("load."):]: float(v) for k, v in timings.items() if k.startswith("load.")}
    if parts:
        for key, val in parts.items():
            out[LOAD_PARTS.get(key, "hu")] += val
        out["hu"] += max(0.0, load - sum(parts.values()))
    else:
        out["decode"] = load
        notes.append("decode includes HU conversion (the reader does not split its load: no load_series(timings=...))")
    for key, val in timings.items():
        if key in ("load", "total") or key.startswith("load.") or key.endswith("_overlapped"):
            continue  # *_overlapped: work hidden behind another stage (kernel path), not wall time
        stage = TRIAGE_STAGE_MAP.get(key)
        if stage is None:
            out["other"] = out.get("other", 0.0) + float(val)
        else:
            out[stage] += float(val)
    return out, notes


# --- drivers -----------------------------------------------------------------------------------
@dataclass
class Driver:
    """A runtime ready to run: ``setup()`` (cold), ``run(source)`` -> (stages ms, summary)."""

    spec: RuntimeSpec
    bundle: Any = None
    threads: Optional[int] = None
    batch_size: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, source: Any) -> Tuple[Dict[str, float], Dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


class NaiveDriver(Driver):
    """The PyTorch-eager baseline (:class:`sdk.bench.naive.NaivePipeline`)."""

    def setup(self) -> None:
        from .naive import NaiveConfig, NaivePipeline

        cfg = NaiveConfig(bundle=self.bundle, threads=self.threads or 0)
        if self.spec.name == "naive-paper":
            cfg = NaiveConfig(bundle=self.bundle, threads=self.threads or 0, classifier="resnet50_mgap",
                              segmenter3d=True, volume_size=128, classify_all=True)
        self._pipe = NaivePipeline(cfg)
        self._pipe.setup()
        self.info = {"runtime": {"backend": "torch", "provider": "eager", "precision": "fp32", "device": "cpu"},
                     **self._pipe.describe()}

    def run(self, source: Any) -> Tuple[Dict[str, float], Dict[str, Any]]:
        return self._pipe.run(source)

    def close(self) -> None:
        if getattr(self, "_pipe", None) is not None:
            self._pipe.close()


class TriageDriver(Driver):
    """The product: :class:`sdk.triage.Triage` with the spec's device and precision."""

    def setup(self) -> None:
        from ..triage import Triage

        self._triage = Triage(self.bundle, device=self.spec.device, precision=self.spec.precision,
                              heatmaps=False, threads=self.threads)
        rt = dict(getattr(self._triage, "runtime", {}) or {})
        self.info = {"runtime": rt, "init_ms": getattr(self._triage, "init_ms", None),
                     "runtime_reasons": list(getattr(self._triage, "runtime_reasons", []) or [])}
        mismatch = runtime_mismatch(self.spec, rt)
        if mismatch:
            raise RuntimeMismatch(mismatch)

    def set_batch(self, batch: Optional[int]) -> None:
        """Classifier batch size for the next calls (None: the Triage object's own default)."""
        if not hasattr(self, "_default_batch"):
            self._default_batch = self._triage.classifier_batch
        self._triage.classifier_batch = int(batch) if batch else self._default_batch

    @property
    def default_batch(self) -> Optional[int]:
        return getattr(self, "_default_batch", self._triage.classifier_batch)

    def run(self, source: Any) -> Tuple[Dict[str, float], Dict[str, Any]]:
        result = self._triage.run(source)
        stages, notes = map_triage_timings(dict(result.timings_ms))
        summary = {
            "label": result.label,
            "probabilities": dict(result.probabilities),
            "eligible": bool(result.eligible),
            "reasons": list(result.reasons),
            "n_slices": (result.shape or [0])[0],
            "n_classified": len(result.slice_scores),
            "triage_timings_ms": {k: round(float(v), 3) for k, v in result.timings_ms.items()},
            "notes": notes,
        }
        return stages, summary

    def close(self) -> None:
        self._triage = None


class RuntimeMismatch(CtsdkError):
    """The runtime that was granted is not the one requested (skip it, with this reason)."""


def runtime_mismatch(spec: RuntimeSpec, runtime: Dict[str, Any]) -> Optional[str]:
    """Why the granted runtime differs from ``spec`` (None when it matches)."""
    provider = str(runtime.get("provider", ""))
    precision = str(runtime.get("precision", ""))
    backend = str(runtime.get("backend", ""))
    problems = []
    if precision and precision != spec.precision:
        problems.append(f"precision {precision} granted instead of {spec.precision}")
    if spec.device == "cpu" and provider and provider != "CPUExecutionProvider":
        problems.append(f"provider {provider} instead of CPUExecutionProvider")
    if spec.device == "cuda" and provider != "CUDAExecutionProvider":
        problems.append(f"provider {provider or '?'} instead of CUDAExecutionProvider")
    if spec.device == "tensorrt" and "tensorrt" not in (backend + provider).lower():
        problems.append(f"backend {backend or provider or '?'} instead of TensorRT")
    return "; ".join(problems) or None


def make_driver(name: str, bundle: Any = None, threads: Optional[int] = None) -> Driver:
    """The driver for a runtime name (see :data:`RUNTIMES`)."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")
    spec = RUNTIMES[name]
    cls = NaiveDriver if spec.device == "naive" else TriageDriver
    return cls(spec=spec, bundle=bundle, threads=threads)


__all__ = ["STAGES", "STAGE_LABELS", "RUNTIMES", "DEFAULT_RUNTIMES", "RuntimeSpec", "parse_runtimes", "precheck",
           "LOAD_PARTS", "map_triage_timings", "Driver", "NaiveDriver", "TriageDriver",
           "RuntimeMismatch", "runtime_mismatch", "make_driver"]

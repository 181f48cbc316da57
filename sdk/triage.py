"""The product facade: ``sdk.Triage().run(series) -> TriageResult``.

    import sdk
    triage = sdk.Triage()                 # loads + verifies the bundle, opens sessions, warms up
    result = triage.run("path/to/series") # many times, from several threads if you like
    print(result.label, result.probabilities)
    result.save_heatmaps("out/")

Stages (each timed in ``TriageResult.timings_ms``): ``load`` (decode + HU), ``eligibility``,
``resample`` (the lung segmenter's input preparation, when the segmenter reports it),
``lungs``, ``slice_selection``, ``opacity`` (HU ground glass / consolidation, :mod:`sdk.opacity`;
it runs in a side thread while the classifier runs, so this is the time the pipeline waited for
it - its own wall time is ``opacity_overlapped``, not a stage),
``classifier_inputs`` (window + resize + mask channels; built batch by batch while the previous
batch is classified, so this is only the time the classifier waited for its inputs),
``classification``, ``aggregation``, ``total``. When the reader splits its load
(``sdk.io.load_series(timings=...)``), the parts of ``load`` are added as ``load.scan``,
``load.decode``, ``load.hu``, ``load.geometry`` (parts, not extra stages: do not add them to
``load``).

Decision: the XGBoost aggregator turns the selected slices' probabilities (20 ordered groups x K
classes, :mod:`sdk.aggregate`) into series probabilities; the label is the bundle's positive
class ("covid") when its probability reaches the bundle's series threshold, otherwise the most
probable other class ("non_covid" in the default bundle, which has no normal/CAP distinction).
The HU opacity evidence adds fixed logit terms to the aggregator's, and weak or conflicting
evidence gives ``label="indeterminate"`` with reasons (:mod:`sdk.decision`).
A series that fails eligibility gives ``label="not_eligible"`` with the reasons - a result, not an
exception; ingest problems raise :class:`~sdk.errors.SeriesError`.

Threads: sessions and the aggregator are created once and shared; ``run`` keeps all per-call
state local, so concurrent calls are safe (ONNX Runtime sessions are thread-safe for ``run``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from .errors import ConfigError, RuntimeUnavailableError, whole_number
from .pools import shared_pool

log = logging.getLogger("sdk.triage")

PathLike = Union[str, Path]
STAGES = ("load", "eligibility", "resample", "lungs", "slice_selection", "opacity", "classifier_inputs",
          "classification", "aggregation", "total")
#: slices per classifier call on a GPU (the kernel path pads every call to it)
CLASSIFIER_BATCH = 16
#: ... and on the CPU: 4 per lane (two lanes on 2 cores: 8 slices in flight) gives the same
#: probabilities as 8 and 16 (max |dp| 0 on covid-P001), is ~10 % faster than 8 per lane, and keeps
#: ORT's arena (peak RSS) as small as one batch of 8 did (docs/benchmarks/cpu.md)
CLASSIFIER_BATCH_CPU = 4
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
LUNG_METHODS = ("auto", "unet2d", "classical", "hybrid", "unet3d", "hybrid3d")
LUNGS_PRECISIONS = ("auto", "fp32", "int8")
#: who builds the classifier's input batch (window + resize + mask channels):
#: "numpy" (OpenCV/NumPy on the CPU), "gpu" (ctsdk's CUDA kernel via pycuda or CuPy),
#: "cpu-harness" (the same kernel source compiled with g++: the kernel path without a GPU),
#: "auto" (gpu when the classifier runs on a CUDA device and the kernels can launch, else numpy).
#: "cpu-harness", "reference" (the kernels' NumPy references) and "cuda"/"gpu" run every stage after
#: eligibility on the kernel path (:mod:`sdk.device_path`): resample, classifier inputs, mask
#: weights and masked GAP by that kernel set, device-resident with "cuda"
KERNELS = ("auto", "numpy", "gpu", "cuda", "cpu-harness", "reference")
#: most intra-op threads one session may be given: ONNX Runtime starts them all when the session
#: opens (``threads=100000`` kept a 2-core machine busy for minutes; a number past 2**31 is refused by
#: ORT with a TypeError)
MAX_THREADS = 1024
#: most slices per classifier call: more than any chest CT selects, and the warm-up allocates one
#: batch (1024 x 3 x 224 x 224 float32 = 0.6 GB)
MAX_CLASSIFIER_BATCH = 1024

__all__ = ["Triage", "TriageResult", "SliceScore", "slice_scores", "STAGES", "NOT_ELIGIBLE"]


from .result import (  # noqa: E402,F401 - the result types live in sdk.result; re-exported here
    NOT_ELIGIBLE, SliceScore, TriageResult, HeatmapSource, slice_scores,
)


class _Timer:
    """Per-call stage timer (local to one run, so threads do not share it)."""

    def __init__(self) -> None:
        self.ms: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ms[stage] = self.ms.get(stage, 0.0) + (time.perf_counter() - t0) * 1000.0


# --- classifier session ------------------------------------------------------------------------
def choose_classifier_runtime(bundle: Any, device: str, precision: str, *, threads: Optional[int] = None,
                              lanes: int = 1) -> Tuple[Any, Any, List[str]]:
    """:func:`sdk.runtime.select_runtime` fed from ``bundle`` as Triage feeds it (its classifier
    files, calibration verdict and measured INT8 speed-up): ``(loader, info, reasons)``; nothing is
    built until ``loader()`` is called (the bench asks it what the default would run)."""
    from .errors import BundleError
    from .runtime import select_runtime

    files = bundle.classifier_paths()
    if not files:
        raise BundleError(f"{bundle.root}: bundle {bundle.name} {bundle.version} lists no file of role 'classifier' "
                          "(a triage needs the slice classifier: add it with python -m sdk.bundle build --file "
                          "classifier_fp32=PATH:classifier:fp32)")
    int8 = bundle.manifest.get("int8", {}) or {}
    return select_runtime(device, precision, files, bundle.calibration_passed,
                          int8_speedup=int8.get("speedup"), threads=threads,
                          engine_cache_dir=bundle.engine_cache_dir(), lanes=lanes)


def _open_classifier(bundle: Any, device: str, precision: str, threads: Optional[int],
                     lanes: int = 1) -> Tuple[Any, Dict[str, str], List[str]]:
    """Open the classifier through :func:`sdk.runtime.select_runtime`; returns (session, runtime, reasons).

    ``runtime`` is what really runs (the session's own ``info``: ORT may fall back to CPU).
    """
    loader, info, reasons = choose_classifier_runtime(bundle, device, precision, threads=threads, lanes=lanes)
    session = loader()
    real = getattr(session, "info", info)
    runtime = real.to_dict()
    reasons = list(reasons) + list(getattr(session, "fallback_reasons", []))
    if real != info:
        reasons.append(f"selected {info.to_dict()} but the session runs {runtime}")
    return session, runtime, reasons


InputBuilder = Callable[[np.ndarray, np.ndarray, np.ndarray, int, Tuple[float, float]], np.ndarray]


def _input_builder(kind: str, device: str, reasons: List[str]) -> Tuple[InputBuilder, str]:
    """The classifier-input builder for ``kind`` (see :data:`KERNELS`) and the name that ran.

    The GPU kernel's batch is copied back to the host because ONNX Runtime is fed NumPy arrays
    here; a TensorRT/IOBinding runtime would consume the device buffer directly.
    """
    if kind == "auto":
        kind = "gpu" if device not in ("", "cpu") else "numpy"
    if kind == "gpu":
        try:
            from .kernels import GpuKernels

            gk = GpuKernels()

            def on_gpu(hu: np.ndarray, mask: np.ndarray, idx: np.ndarray, size: int, window: Tuple[float, float]) -> np.ndarray:
                return gk.to_host(gk.classifier_inputs(hu, mask, idx, size, window))

            return on_gpu, f"gpu ({gk.backend})"
        except Exception as exc:  # no pycuda/CuPy, no device, compile failure: say so, run the CPU path
            reasons.append(f"GPU kernels unavailable ({type(exc).__name__}: {exc}); classifier inputs built with NumPy/OpenCV")
            kind = "numpy"
    if kind == "cpu-harness":
        from .kernels import CpuHarness

        harness = CpuHarness()

        def on_harness(hu: np.ndarray, mask: np.ndarray, idx: np.ndarray, size: int, window: Tuple[float, float]) -> np.ndarray:
            return harness.classifier_inputs(hu, mask, idx, size, window)

        return on_harness, "cpu-harness"
    from .volume.resample import classifier_inputs_fast

    def on_cpu(hu: np.ndarray, mask: np.ndarray, idx: np.ndarray, size: int, window: Tuple[float, float]) -> np.ndarray:
        return classifier_inputs_fast(hu, mask, idx, size=size, window=window)

    return on_cpu, "numpy"


def _open_lungs(path: Optional[Path], threads: Optional[int], precision: str = "fp32", lanes: int = 1) -> Any:
    """CPU ONNX Runtime session for the bundle's 2D lung U-Net (``lungs_fp32.onnx`` or, when
    chosen by :func:`_choose_lungs`, ``lungs_int8.onnx``), its batches run in ``lanes`` lanes."""
    if path is None:
        return None
    from .lungs.unet2d import open_session

    return open_session(path, threads, precision, lanes=lanes)


def _choose_lungs(bundle: Any, lungs_precision: str, runtime: Dict[str, str], reasons: List[str]) -> Tuple[Optional[Path], str]:
    """(2D lung U-Net path, precision) for the classifier ``runtime`` that really runs
    (:func:`sdk.lungs.int8.choose_lungs_precision`); reasons are appended to ``reasons``."""
    from .lungs.int8 import choose_lungs_precision

    paths = bundle.lungs_paths()
    if not paths:
        return None, "fp32"
    on_cpu = runtime.get("provider") == "CPUExecutionProvider" or runtime.get("device") == "cpu"
    prec, why = choose_lungs_precision(lungs_precision, str(runtime.get("precision", "")), on_cpu, paths,
                                       bundle.lungs_int8_passed)
    reasons.extend(why)
    return paths.get(prec) or paths.get(""), prec


def _lungs_stage_name(method: str, precision: Optional[str]) -> str:
    from .lungs.int8 import stage_name

    return stage_name(method, precision)


def _infer(session: Any, x: np.ndarray) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in session.infer({"image": x}).items()}


# --- facade ------------------------------------------------------------------------------------
def _check_finite(volume: Any) -> None:
    """A caller's float Volume must hold finite HU (the reader's never holds NaN / inf; a volume built
    by the integrator's own decoder might): ConfigError naming how many values and the first slice,
    instead of NaN slice probabilities further on. Integer volumes are finite by construction."""
    hu = volume.hu
    if not np.issubdtype(hu.dtype, np.floating):
        return
    bad = ~np.isfinite(hu)
    if bad.any():
        first = int(np.argmax(bad.any(axis=(1, 2))))
        raise ConfigError(f"Volume.hu holds {int(bad.sum())} NaN / inf values (first in slice {first} of {hu.shape[0]}); "
                          "pass finite HU (e.g. np.nan_to_num(hu, nan=-1024.0)) - the models cannot score them")


class Triage:
    """Load a bundle once, then triage many series.

    Args:
        bundle: a bundle folder, a loaded :class:`sdk.bundle.Bundle`, or None (the default bundle
            in the package; its sha256s are verified).
        device: "auto" | "cpu" | "cuda" | "tensorrt" (auto: TensorRT > ORT CUDA > ORT CPU by what
            is installed and usable; ``TriageResult.runtime`` reports what ran).
        precision: "auto" | "fp32" | "fp16" | "int8" (auto: INT8 on CPU when the bundle's
            calibration passed and INT8 measured faster, FP16 on a GPU).
        lung_method: "auto" | "unet2d" | "classical" | "hybrid" | "unet3d" | "hybrid3d" (see :func:`sdk.lungs.segment`).
        lungs_precision: the 2D lung U-Net's precision, "auto" | "fp32" | "int8". auto: INT8
            (``lungs_int8.onnx``) when the classifier runs INT8 on the CPU and the bundle's
            ``lungs_int8`` Dice gate passed, else FP32 (:mod:`sdk.lungs.int8`). Reported as
            ``runtime["stages"]["lungs"]`` (e.g. "hybrid-unet2d-ort-cpu-int8"), the reason in
            ``runtime_reasons``.
        heatmaps: keep references to the volume, mask and CAMs in each result so that
            ``heatmap(i)`` / ``save_heatmaps(dir)`` work (costs no time, holds memory until the
            result is dropped).
        threads: intra-op threads per ONNX Runtime session, 1 to :data:`MAX_THREADS` (None: the
            runtime's default; on the CPU that is the cores shared out between ``lanes``).
        lanes: CPU sessions (classifier, 2D lung U-Net): batches run side by side, each on its
            own intra-op threads (:func:`sdk.runtime.ort.cpu_lanes`). None: one lane per core (at
            most 4) when ``threads`` is None, else 1 (batches one after the other on ``threads``).
            Same results either way; reported as ``runtime["cpu_lanes"]``.
        kernels: who builds the classifier inputs, see :data:`KERNELS`; reported as
            ``runtime["kernels"]``.
        classifier_batch: slices per classifier call, 1 to :data:`MAX_CLASSIFIER_BATCH` (the
            sessions are warmed up at this batch); None: 4 when the classifier runs on the CPU, 16 on
            a GPU.
        pooling: kernel path only: "auto" | "kernel" (features graph + mask-weights / masked-GAP
            kernels + head) | "graph" (the classifier graph's own pooling).
        sync_timings: kernel path on a GPU: synchronise the device at stage boundaries so
            ``timings_ms`` are per-stage device times (otherwise launches stay asynchronous).

    Raises:
        ConfigError: an argument out of its range or of the wrong kind (a count that is not a whole
            number, an unknown name), before anything is loaded.
    """

    def __init__(
        self,
        bundle: Any = None,
        device: str = "auto",
        precision: str = "auto",
        *,
        lung_method: str = "auto",
        lungs_precision: str = "auto",
        heatmaps: bool = True,
        threads: Optional[int] = None,
        kernels: str = "auto",
        classifier_batch: Optional[int] = None,
        pooling: str = "auto",
        sync_timings: bool = False,
        lanes: Optional[int] = None,
    ) -> None:
        from .bundle import Bundle, load_bundle

        if device not in DEVICES:
            raise ConfigError(f"device {device!r} not in {DEVICES}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} not in {PRECISIONS}")
        if lung_method not in LUNG_METHODS:
            raise ConfigError(f"lung_method {lung_method!r} not in {LUNG_METHODS}")
        if lungs_precision not in LUNGS_PRECISIONS:
            raise ConfigError(f"lungs_precision {lungs_precision!r} not in {LUNGS_PRECISIONS}")
        classifier_batch = whole_number("classifier_batch", classifier_batch, maximum=MAX_CLASSIFIER_BATCH)
        if kernels not in KERNELS:
            raise ConfigError(f"kernels {kernels!r} not in {KERNELS}")
        if pooling not in ("auto", "kernel", "graph"):
            raise ConfigError(f"pooling {pooling!r} not in ('auto', 'kernel', 'graph')")
        threads = whole_number("threads", threads, maximum=MAX_THREADS)
        lanes = whole_number("lanes", lanes)
        if bundle is not None and not isinstance(bundle, Bundle) and (
                not isinstance(bundle, (str, os.PathLike)) or not str(bundle).strip()):
            raise ConfigError(f"bundle must be a bundle folder (str or Path), a loaded sdk.bundle.Bundle or None "
                              f"(the packaged default), got {type(bundle).__name__} {bundle!r:.60}")
        t0 = time.perf_counter()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.device, self.precision, self.lung_method = device, precision, lung_method
        self.keep_heatmaps = bool(heatmaps)
        self.threads = threads
        self.classes = self.bundle.classes
        self.positive = self.bundle.positive_class
        if self.positive not in self.classes:
            raise ConfigError(f"bundle positive class {self.positive!r} is not one of its classes {self.classes}")
        self.threshold = self.bundle.threshold
        #: windows, sizes, mean/std of the bundle's models (one owner: sdk.preprocessing)
        self.preprocessing = self.bundle.preprocessing
        self.window = self.preprocessing.classifier_window
        self.size = self.preprocessing.classifier_size
        from .device_path import PATH_KERNELS
        from .runtime.ort import cpu_lanes

        #: CPU batches in flight per stage (the kernel path runs its own sessions, one lane)
        self.lanes = 1 if kernels in PATH_KERNELS else cpu_lanes(threads, lanes)
        self._classifier, self.runtime, self.runtime_reasons = _open_classifier(self.bundle, device, precision, threads,
                                                                                 self.lanes)
        from .bundle_check import check_session

        check_session(self.bundle, self._classifier, "classifier")  # its ONNX metadata / input vs the manifest (no I/O)
        #: what the bundle falls back on or ignores (e.g. no thresholds.series): in every result's warnings
        self.bundle_warnings = self.bundle.warnings
        self.runtime_reasons.extend(self.bundle_warnings)
        on_cpu = self.runtime.get("provider") == "CPUExecutionProvider" or self.runtime.get("device") == "cpu"
        self.classifier_batch = int(classifier_batch) if classifier_batch is not None else (
            CLASSIFIER_BATCH_CPU if on_cpu else CLASSIFIER_BATCH)
        self.lungs_precision: Optional[str] = None  # the 2D U-Net's precision (None: no 2D U-Net session)
        self._lungs = None
        if lung_method not in ("classical", "hybrid3d"):  # hybrid3d: the 3D U-Net is the learned part
            lpath, lprec = _choose_lungs(self.bundle, lungs_precision, self.runtime, self.runtime_reasons)
            self._lungs = _open_lungs(lpath, threads, lprec, self.lanes)
            self.lungs_precision = lprec if self._lungs is not None else None
            if self._lungs is not None:   # its metadata / input vs the manifest, as for the classifier
                check_session(self.bundle, self._lungs, "lungs")
        self._kpath = self._open_kernel_path(kernels, device, pooling, sync_timings)
        if self.runtime.get("device") == "cpu" or self._lungs is not None:
            self.runtime["cpu_lanes"] = str(self.lanes)
        if self._kpath is None:
            self._inputs_fn, self.runtime["kernels"] = _input_builder(
                "numpy" if kernels in ("gpu", "cuda") else kernels, self.runtime.get("device", "cpu"), self.runtime_reasons)
            from .lungs import DEFAULT_METHOD

            method = DEFAULT_METHOD if lung_method == "auto" else lung_method
            # host path: what ran at the lungs stage (the kernel path names all stages)
            self.runtime["stages"] = {"lungs": _lungs_stage_name(method, self.lungs_precision)}
        self._aggregator = self.bundle.load_aggregator()
        #: the per-slice evidence score of the bundle's manifest (None: the bundle defines none)
        self.slice_score_model = self.bundle.slice_score_model
        self._warm_up()
        self.init_ms = (time.perf_counter() - t0) * 1000.0
        log.info("Triage ready in %.0f ms: bundle %s %s, runtime %s", self.init_ms, self.bundle.name,
                 self.bundle.version, self.runtime)

    def __repr__(self) -> str:
        return (f"Triage(bundle={self.bundle.name!r} v{self.bundle.version}, runtime={self.runtime}, "
                f"lung_method={self.lung_method!r})")

    def _open_kernel_path(self, kernels: str, device: str, pooling: str, sync_timings: bool) -> Any:
        """The kernel path (:mod:`sdk.device_path`) when ``kernels`` / the device ask for it, else None.

        ``device="cuda"`` without CuPy / a usable GPU raises; otherwise an unusable GPU kernel set
        is recorded in ``runtime_reasons`` and the host path runs."""
        from .device_path import PATH_KERNELS, KernelPath
        from .errors import CtsdkError

        on_cuda = self.runtime.get("provider") == "CUDAExecutionProvider"
        name = PATH_KERNELS.get(kernels) or ("cuda" if kernels == "auto" and on_cuda else None)
        if name is None:
            return None
        try:
            kpath = KernelPath(self, name, pooling=pooling, sync_timings=sync_timings)
        except CtsdkError as exc:
            if name != "cuda":
                raise
            if device == "cuda":
                raise RuntimeUnavailableError(f"device='cuda': the device-resident path cannot start "
                                              f"({type(exc).__name__}: {exc})") from exc
            self.runtime_reasons.append(f"GPU kernels unavailable ({type(exc).__name__}: {exc}); host path")
            return None
        self.runtime_reasons.extend(kpath.reasons)
        self.runtime["kernels"] = "reference" if kernels == "reference" else name
        self.runtime["path"] = "kernel"
        self.runtime["stages"] = dict(kpath.stages)
        return kpath

    def _warm_up(self) -> None:
        """Inference on every session (the classifier at batch 1 and at its working batch) so the
        first real series pays no lazy initialisation or allocation."""
        x = np.zeros((self.classifier_batch, 3, self.size, self.size), np.float32)
        x[:, 1, self.size // 4 : 3 * self.size // 4, self.size // 4 : 3 * self.size // 4] = 1.0
        _infer(self._classifier, x)
        out = _infer(self._classifier, x[:1])
        for key in ("probs", "cam"):
            if key not in out:
                raise RuntimeUnavailableError(f"classifier of bundle {self.bundle.root} lacks the output {key!r} (outputs: {sorted(out)})")
        if out["probs"].shape[-1] != len(self.classes):
            raise ConfigError(f"classifier outputs {out['probs'].shape[-1]} classes, bundle lists {self.classes}")
        if self._lungs is not None:
            spec = self._lungs.inputs[0]
            fixed = [d if isinstance(d, int) and d > 0 else None for d in spec.shape]
            shape = [1, fixed[1] or 1] + [d or 128 for d in fixed[2:]]
            self._lungs.infer({spec.name: np.zeros(shape, np.float32)})
        if self._kpath is not None:
            self._kpath.warm_up(self.classifier_batch, self.size)
        for _ in range(2):
            self._aggregator.predict_proba(np.full((20, len(self.classes)), 1.0 / len(self.classes), np.float32))

    # --- stages ---------------------------------------------------------------------------------
    def _segment(self, volume: Any) -> Any:
        from . import lungs

        kwargs: Dict[str, Any] = {"method": self.lung_method, "preprocessing": self.preprocessing}
        if self._lungs is not None and self.lung_method not in ("unet3d", "hybrid3d"):  # the 2D U-Net's session
            kwargs["session"] = self._lungs
        return lungs.segment(volume, **kwargs)

    def _classify(self, hu: np.ndarray, mask: np.ndarray, indices: np.ndarray, timer: "_Timer") -> Tuple[np.ndarray, np.ndarray]:
        """Classifier inputs and inference, batch by batch: the inputs of batch k+1 are built in
        a helper thread while batch k runs (``Session.infer_batched``; ORT releases the GIL), so
        no whole-series input array exists. ``classifier_inputs`` is the time spent waiting for
        inputs (the first batch and whatever did not overlap), ``classification`` the inference."""
        size, window = self.size, self.window

        def make(i0: int, i1: int) -> np.ndarray:
            return self._inputs_fn(hu, mask, indices[i0:i1], size, window)

        steps: Dict[str, float] = {}
        out = self._classifier.infer_batched(make, int(indices.size), batch=self.classifier_batch, input_name="image",
                                             outputs=["probs", "cam"], timings=steps)
        timer.ms["classifier_inputs"] = timer.ms.get("classifier_inputs", 0.0) + steps.get("prepare_ms", 0.0)
        timer.ms["classification"] = timer.ms.get("classification", 0.0) + steps.get("infer_ms", 0.0)
        return np.asarray(out["probs"], np.float32), np.asarray(out["cam"], np.float32)

    def _decide(self, probs: Dict[str, float]) -> str:
        if probs[self.positive] >= self.threshold:
            return self.positive
        others = {k: v for k, v in probs.items() if k != self.positive}
        return max(others, key=others.get) if others else self.positive

    @classmethod
    def _timed_opacity(cls, volume: Any, seg: Any, warnings: List[str]) -> Tuple[Any, float]:
        """(:meth:`_opacity`, its wall milliseconds) - the side-thread job of a run."""
        t0 = time.perf_counter()
        out = cls._opacity(volume, seg, warnings)
        return out, (time.perf_counter() - t0) * 1000.0

    @staticmethod
    def _opacity(volume: Any, seg: Any, warnings: List[str], workers: int = 1) -> Any:
        """HU lung-opacity measurement (:func:`sdk.opacity.measure_opacity`, its slices split over
        ``workers`` threads); None with a warning when it cannot be measured (the CNN decision
        stands alone then)."""
        from .errors import ConfigError as _ConfigError
        from .opacity import measure_opacity

        labels = seg.labels if getattr(seg, "labels", None) is not None else seg.mask
        superior_up = float(np.asarray(volume.direction, dtype=np.float64)[2, 2]) >= 0.0
        try:
            return measure_opacity(volume.hu, labels, volume.spacing, superior_is_high_z=superior_up, workers=workers)
        except _ConfigError as exc:
            warnings.append(f"opacity: not measured ({exc})")
            return None

    def _decide_series(self, slice_probs: np.ndarray, opacity: Any, n_slices: int, lung_ml: float) -> Any:
        """Aggregator + HU terms + indeterminate rules (:func:`sdk.decision.decide`)."""
        from .decision import decide

        probs = self._aggregator.predict_proba(slice_probs)
        contribs = self._aggregator.contribution_summary(slice_probs) if len(self.classes) == 2 else None
        return decide(probs, self.positive, self.threshold, opacity=None if opacity is None else opacity.to_dict(),
                      n_slices=n_slices, lung_ml=lung_ml, cnn_contributions=contribs)

    def _base(self, volume: Any) -> Dict[str, Any]:
        return dict(
            series_uid=getattr(getattr(volume, "meta", None), "series_uid", "") or "",
            bundle={"name": self.bundle.name, "version": self.bundle.version, "positive_class": self.positive},
            threshold=self.threshold,
            runtime=dict(self.runtime),
            shape=list(volume.shape),
            spacing_mm=[float(s) for s in volume.spacing],
        )

    # --- public ---------------------------------------------------------------------------------
    def run(self, series: Any, *, series_uid: Optional[str] = None, prior: Any = None,
            prior_checks: bool = True) -> TriageResult:
        """Triage one series.

        Args:
            series: a folder, a file, a list of files, a list of pydicom datasets, or an already
                loaded :class:`sdk.volume.Volume`.
            series_uid: pick this series when the source holds several.
            prior: an earlier study of the same patient (same kinds of input as ``series``) to
                compare with (paper 003, :func:`sdk.prior.compare`); the comparison lands in
                ``TriageResult.prior`` (``{"error": ...}`` when the prior cannot be compared),
                with the header checks of :func:`sdk.prior.check_pair` as ``prior["checks"]``.
            prior_checks: False compares the prior even when its headers name another patient or
                a later date (the findings are still recorded, and warned about).

        Raises:
            SeriesError: the input cannot become a CT volume (names the file and the problem).
        """
        timer = _Timer()
        t_total = time.perf_counter()
        load_parts: Dict[str, float] = {}
        with timer("load"):
            volume = self._load(series, series_uid, load_parts,
                                alloc=self._kpath.host_buffer if self._kpath is not None else None)
        timer.ms.update({f"load.{k}": float(v) for k, v in load_parts.items()})
        result, mask = self._triage_volume(volume, timer)
        if prior is not None:
            with timer("prior"):
                result.prior = self._compare_prior(result, volume, mask, prior, prior_checks)
        timer.ms["total"] = (time.perf_counter() - t_total) * 1000.0
        result.timings_ms = self._ordered(timer.ms)
        return result

    @staticmethod
    def _load(series: Any, series_uid: Optional[str] = None, timings: Optional[Dict[str, float]] = None,
              alloc: Any = None) -> Any:
        """A Volume as is, else ``sdk.io.load_series``; ``timings`` receives the reader's own
        split of the load (scan / decode / hu / geometry ms); ``alloc`` is the kernel path's
        pinned host buffer (see ``sdk.io.load_series``)."""
        from .volume import Volume

        if isinstance(series, Volume):
            _check_finite(series)
            return series
        from .io import load_series

        return load_series(series, series_uid=series_uid, timings=timings, alloc=alloc)

    def _triage_volume(self, volume: Any, timer: _Timer) -> Tuple[TriageResult, Optional[np.ndarray]]:
        """Every stage after loading; returns the result (timings filled by the caller) and the lung mask."""
        warnings: List[str] = list(volume.warnings) + self.bundle_warnings
        base = self._base(volume)
        from .eligibility import check, header_eligible, lung_fraction

        with timer("eligibility"):
            if not header_eligible(volume):
                return self._not_eligible(check(volume), warnings, base), None
        # the header criteria passed: the voxel criterion (lung fraction) runs in a side thread while
        # the lungs are segmented - on the kernel path while the device works - so no stage waits for
        # it; a series that fails it is still reported not eligible, with the same reasons, and its
        # lung mask (kernel path: its whole result) is dropped
        with timer("eligibility"):
            fraction = shared_pool("side").submit(lung_fraction, volume.hu)
        if self._kpath is not None:
            out, failed = self._beside_lung_fraction(
                lambda: self._kpath.triage(self, volume, timer, list(warnings), base), volume, fraction, timer)
            return (self._not_eligible(failed, warnings, base), None) if failed is not None else out
        seg, failed = self._beside_lung_fraction(lambda: self._segment(volume), volume, fraction, timer, "lungs")
        if failed is not None:
            return self._not_eligible(failed, warnings, base), None
        self._split_resample(seg, timer)
        warnings.extend(f"lungs: {w}" for w in getattr(seg, "warnings", ()))
        # HU opacity needs only the volume and the lung mask: it runs in a side thread while the
        # slices are selected and classified (NumPy / OpenCV and ONNX Runtime release the GIL).
        # "opacity" is the time the pipeline waited for it (hand-off + what did not overlap),
        # "opacity_overlapped" its own wall time (hidden behind the selection and the classifier;
        # not an extra stage, as on the kernel path).
        opacity_warnings: List[str] = []
        with timer("opacity"):
            pending = shared_pool("side").submit(self._timed_opacity, volume, seg, opacity_warnings)
        with timer("slice_selection"):
            from .slices import select_slices

            sel = select_slices(volume, seg.mask, lung_voxels=getattr(seg, "slice_voxels", None))
        indices = np.asarray(sel.indices, dtype=np.int64)
        if indices.size == 0:
            pending.exception()  # wait for the side job (it reads the volume); its outcome is not used
            return TriageResult(label=NOT_ELIGIBLE, probabilities={}, eligible=False,
                                reasons=["no slice passed slice selection (no lung found in the series)"],
                                lung_volume_ml=float(seg.lung_volume_ml), warnings=warnings, **base), seg.mask
        if indices.size < 20:
            warnings.append(f"only {indices.size} slices selected (< 20 aggregation groups): slices are repeated across groups")
        slice_probs, cams = self._classify(volume.hu, seg.mask, indices, timer)
        with timer("opacity"):
            opacity, opacity_ms = pending.result()
        timer.ms["opacity_overlapped"] = opacity_ms
        warnings.extend(opacity_warnings)
        with timer("aggregation"):
            decision = self._decide_series(slice_probs, opacity, int(indices.size), float(seg.lung_volume_ml))
        z_mm = np.asarray(volume.z_mm, dtype=np.float64)
        scores = slice_scores(self.classes, self.positive, indices, z_mm, slice_probs, opacity, self.slice_score_model)
        heat = None
        if self.keep_heatmaps:
            heat = HeatmapSource(hu=volume.hu, mask=seg.mask, cams=cams, window=self.window,
                                  class_index=self.classes.index(self.positive), opacity=opacity,
                                  z_mm=np.asarray(volume.z_mm, dtype=np.float64))
        block = None
        if opacity is not None:
            block = opacity.to_dict()
            block["decision"] = decision.to_dict()
        result = TriageResult(label=decision.label, probabilities=decision.probabilities, eligible=True,
                              reasons=list(decision.reasons), slice_scores=scores, lung_volume_ml=float(seg.lung_volume_ml),
                              warnings=warnings, lung_opacity=block, _heat=heat, **base)
        return result, seg.mask

    @staticmethod
    def _beside_lung_fraction(work: Callable[[], Any], volume: Any, fraction: Any, timer: _Timer,
                              stage: Optional[str] = None) -> Tuple[Any, Any]:
        """Run ``work`` (timed as ``stage``) while ``fraction`` (the lung-fraction future) computes;
        returns (its result, None), or (None, the failed Eligibility) for a series that is not
        eligible. ``work``'s error is raised only for an eligible series."""
        from .eligibility import check

        out, error = None, None
        with timer(stage) if stage else contextlib.nullcontext():
            try:
                out = work()
            except Exception as exc:  # raised below, unless the series is not eligible anyway
                error = exc
        with timer("eligibility"):
            elig = check(volume, lung_fraction_value=fraction.result())
        if not elig.eligible:
            return None, elig
        if error is not None:
            raise error
        return out, None

    @staticmethod
    def _not_eligible(elig: Any, warnings: List[str], base: Dict[str, Any]) -> TriageResult:
        return TriageResult(label=NOT_ELIGIBLE, probabilities={}, eligible=False, reasons=list(elig.reasons),
                            warnings=warnings, **base)

    # --- hooks ----------------------------------------------------------------------------------
    def _compare_prior(self, current: TriageResult, volume: Any, mask: Optional[np.ndarray], prior: Any,
                       checks: bool = True) -> Dict[str, Any]:
        """Prior-study comparison hook (paper 003); the comparison itself is :func:`sdk.prior.compare`.

        The prior is loaded (unless it is a Volume), its headers are checked against the current
        study's (:func:`sdk.prior.check_pair`: another patient or a later prior is refused unless
        ``checks`` is False - before the prior is triaged, so a refusal costs only the load), then
        it is triaged with the same models and the two studies' volumes, lung masks and slice
        scores go to ``sdk.prior.compare``. A prior that cannot be compared (refused by the checks,
        not eligible, single slices, unreadable) gives ``{"error": ..., "checks": ...}`` and a
        warning instead of losing the current study's result.
        """
        from .errors import CtsdkError, PriorNotEligibleError

        try:
            from . import prior as prior_mod
        except ImportError as exc:  # pragma: no cover - the module ships with the package
            raise ConfigError("prior-study comparison is not available in this install (sdk.prior is missing)") from exc
        found = None
        ms: Dict[str, float] = {}
        try:
            if not current.eligible or mask is None:
                raise PriorNotEligibleError("the current series is not eligible: " + "; ".join(current.reasons))
            t0 = time.perf_counter()
            prior_volume = self._load(prior)
            ms["load"] = (time.perf_counter() - t0) * 1000.0
            found = prior_mod.check_pair(volume, prior_volume, enforce=checks)
            refusal = found.error() if found.refused else None
            if refusal is not None:
                raise refusal
            log.info("prior: loaded %s slices in %.1f s; triaging it", prior_volume.shape[0], ms["load"] / 1000.0)
            t0 = time.perf_counter()
            prior_result, prior_mask = self._triage_volume(prior_volume, _Timer())
            ms["triage"] = (time.perf_counter() - t0) * 1000.0
            if not prior_result.eligible or prior_mask is None:
                raise PriorNotEligibleError("the prior series is not eligible: " + "; ".join(prior_result.reasons))
            log.info("prior: triaged in %.1f s; comparing", ms["triage"] / 1000.0)
            comparison = prior_mod.compare(
                volume, np.asarray(mask), prior_volume, np.asarray(prior_mask),
                current_slice_scores=[s.to_dict() for s in current.slice_scores],
                prior_slice_scores=[s.to_dict() for s in prior_result.slice_scores],
                positive_class=self.positive,
            )
        except CtsdkError as exc:
            current.warnings.append(f"prior comparison skipped: {exc}")
            failed: Dict[str, Any] = {"error": f"{type(exc).__name__}: {exc}"}
            if found is not None:
                failed["checks"] = found.to_dict()
            return failed
        out = comparison.to_dict()
        out["checks"] = found.to_dict()
        if found.problems:  # only when the caller overrode the checks
            current.warnings.append("prior compared although its headers say: " + "; ".join(found.problems)
                                    + " (prior_checks=False)")
        if found.study == "same series":
            current.warnings.append("prior comparison: the prior is the current series itself, not an earlier study")
        elif found.study == "same study":
            current.warnings.append("prior comparison: the prior is another series of the same study; the change "
                                    "measures reconstruction and segmentation differences, not disease change")
        out["prior_series"] = {"series_uid": prior_result.series_uid, "label": prior_result.label,
                               "probabilities": dict(prior_result.probabilities),
                               "timings_ms": {k: round(v, 1) for k, v in ms.items()}}
        return out

    @staticmethod
    def _split_resample(seg: Any, timer: _Timer) -> None:
        """Move the segmenter's resampling steps (input preparation / down-sampling to its working
        grid, up-sampling the mask back; keys of ``LungSegmentation.timings_ms``) into 'resample'."""
        t = getattr(seg, "timings_ms", None) or getattr(seg, "timings", None) or {}
        ms = 0.0
        for key, val in dict(t).items():
            if any(w in key for w in ("resample", "downsample", "upsample", "prepare")):
                ms += float(val)
        if ms > 0:
            ms = min(ms, timer.ms.get("lungs", 0.0))
            timer.ms["resample"] = ms
            timer.ms["lungs"] -= ms

    @staticmethod
    def _ordered(ms: Dict[str, float]) -> Dict[str, float]:
        out = {k: ms.get(k, 0.0) for k in STAGES}
        out.update({k: v for k, v in ms.items() if k not in out})
        return out

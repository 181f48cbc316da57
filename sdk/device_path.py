"""The kernel path: one orchestration of the triage stages on a kernel set, device-resident on a GPU.

``Triage(device="cuda")`` (CuPy + onnxruntime-gpu), ``Triage(kernels="cpu-harness")`` and
``Triage(kernels="reference")`` run the stages after eligibility here, on the kernel set named by
:mod:`sdk.kernel_ops` (``cuda`` | ``cpu-harness`` | ``numpy``); the code is the same for all three,
only the array module and the four kernels change, so CPU CI exercises the GPU orchestration::

    volume (host; pinned staging) ──1 upload──► hu (device)
      ─► resample kernel 128³ (windowed) ─► 3D U-Net (ORT, run_device) ─► mask (threshold) ─►
         mask at the volume grid (gather through the cube geometry, device)
      |  or, without a 3D U-Net in the bundle: hybrid 2D segmenter on the host, whose working-grid
      |  down-sampling is the resample kernel on the host sets (one mask upload on the GPU)
      ─► lung area per slice (reduction) ─[z areas]─► slice rule (host) ─[indices]─►
      ─► classifier-input kernel ─► features graph at a fixed padded batch (run_device)
      ─► mask-weights + masked-GAP kernels ─► head (W·p + b, softmax) ─[probs]─► XGBoost (host)
         (or the full classifier graph's own pooling: ``pooling="graph"``)

Only per-slice areas, the selected indices, the slice probabilities and (with heat maps) the CAMs
cross to the host; heat-map mask rows come back lazily, one slice at a time, when a heat map is
drawn. :class:`sdk.kernel_ops.Transfers` records every copy (``TriageResult.transfers``).
``TriageResult.runtime["stages"]`` names what ran at each stage.

Stage timings are taken at stage boundaries; on the GPU they are asynchronous (launch time) unless
``sync_timings=True`` synchronises the device at each boundary. ``CTSDK_CUDA_GRAPH=1`` opens the
features session with ORT's CUDA graph capture at the fixed classifier batch
(:class:`sdk.runtime.ort.OrtSession` ``cuda_graph``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import BundleError, ConfigError
from .kernel_ops import KernelSet, Transfers, open_kernel_set
from .opacity import OPACITY_WORKERS_MAX
from .pools import usable_cores

log = logging.getLogger("sdk.device_path")

#: Triage(kernels=...) values that take the kernel path, and the kernel set each uses
PATH_KERNELS = {"cpu-harness": "cpu-harness", "reference": "numpy", "cuda": "cuda", "gpu": "cuda"}
LUNGS = ("auto", "unet3d", "hybrid", "hybrid3d")
POOLING = ("auto", "kernel", "graph")
CUBE = 128
#: threads the host HU opacity splits its slices over here: on a GPU machine the device does the
#: classification meanwhile, so the host cores are free (all but one, at most 8; 1 on a 2-core box)
OPACITY_WORKERS = max(1, min(OPACITY_WORKERS_MAX, usable_cores() - 1))
_SET_LABEL = {"numpy": "numpy", "cpu-harness": "cpu-harness", "cuda": "cuda-kernel"}

__all__ = ["KernelPath", "PATH_KERNELS", "LUNGS", "POOLING", "Unet3dSpec"]


@dataclass(frozen=True)
class Unet3dSpec:
    """The bundle's 3D lung U-Net and its preprocessing (manifest ``preprocessing.lungs3d``)."""

    path: Path
    precision: str
    window: Tuple[float, float]
    mode: str
    size: int
    threshold: float

    @classmethod
    def from_bundle(cls, bundle: Any, precision: str) -> Optional["Unet3dSpec"]:
        """The 3D U-Net file of the bundle (a file whose name starts with ``lungs3d``), preferring
        ``precision``; None when the bundle has none."""
        files = {bf.precision or "fp32": bf for name, bf in bundle.files.items()
                 if name.startswith("lungs3d") or Path(bf.path).name.startswith("lungs3d")}
        if not files:
            return None
        prec = precision if precision in files else ("fp32" if "fp32" in files else sorted(files)[0])
        pre = dict(bundle.manifest.get("preprocessing", {}).get("lungs3d", {}))
        lo, hi = pre.get("window", (-1000.0, 400.0))
        size = int(pre.get("size", (pre.get("out_shape") or [CUBE])[0]))
        return cls(path=bundle.root / files[prec].path, precision=prec, window=(float(lo), float(hi)),
                   mode=str(pre.get("resample", pre.get("mode", "area"))), size=size,
                   threshold=float(pre.get("threshold", 0.5)))


def _parallel_copy(dst: np.ndarray, src: np.ndarray, min_bytes: int = 16 << 20) -> None:
    """``dst[...] = src`` in slabs along z on a few threads (NumPy copies release the GIL): the
    staging copy of a decoded Volume into pinned memory runs at memory bandwidth, not one core's."""
    n = min(8, os.cpu_count() or 1, int(src.shape[0]))
    if src.nbytes < min_bytes or n < 2:
        np.copyto(dst, src)
        return
    from concurrent.futures import ThreadPoolExecutor

    edges = np.linspace(0, src.shape[0], n + 1).astype(int)
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda k: np.copyto(dst[edges[k]:edges[k + 1]], src[edges[k]:edges[k + 1]]), range(n)))


# --- lazy host views ---------------------------------------------------------------------------
class _MaskRows:
    """Host view of a device (z, y, x) lung mask: ``rows[z]`` downloads one slice (counted), so a
    heat map brings back only the slices it draws; ``np.asarray(rows)`` downloads all (prior
    comparison)."""

    def __init__(self, mask: Any, ops: KernelSet, io: Transfers):
        self._m, self._ops, self._io = mask, ops, io
        self.shape = tuple(int(s) for s in mask.shape)
        self._rows: Dict[int, np.ndarray] = {}

    def __getitem__(self, z: Any) -> np.ndarray:
        k = int(z)
        if k not in self._rows:
            self._rows[k] = self._ops.download(self._m[k], self._io, f"lung mask slice {k} (heat map)") != 0
        return self._rows[k]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self._ops.download(self._m, self._io, "lung mask (prior comparison)") != 0
        return a if dtype is None else a.astype(dtype)


# --- the path ------------------------------------------------------------------------------------
class KernelPath:
    """The stages after eligibility on one kernel set (see the module docstring).

    Built by :class:`sdk.Triage` (which owns the bundle, the classifier session, the 2D lung
    session and the aggregator); this object adds the kernel set, the features session + head,
    and the 3D U-Net session when the bundle has one.
    """

    def __init__(self, triage: Any, kernel_set: str, *, lungs: str = "auto", pooling: str = "auto",
                 sync_timings: bool = False) -> None:
        if lungs not in LUNGS:
            raise ConfigError(f"lungs {lungs!r} not in {LUNGS}")
        if pooling not in POOLING:
            raise ConfigError(f"pooling {pooling!r} not in {POOLING}")
        self.ops = open_kernel_set(kernel_set)
        self.sync_timings = bool(sync_timings)
        self.reasons: List[str] = []
        self.init_transfers = Transfers()
        self._pinned: Dict[int, Any] = {}
        self._pinned_lock = threading.Lock()
        clf = self._classifier = triage._classifier
        self.device = "cuda" if getattr(clf, "provider", "") == "CUDAExecutionProvider" else "cpu"
        self.precision = str(triage.runtime.get("precision", "fp32"))
        self._threads = triage.threads
        self.cuda_graph = self.device == "cuda" and os.environ.get("CTSDK_CUDA_GRAPH", "") == "1"
        self._batch = int(triage.classifier_batch)
        self._open_pooling(triage, pooling)
        self._open_lungs(triage, lungs)
        self.stages = self._stage_names(triage)

    # --- construction ------------------------------------------------------------------------------
    def _session(self, path: Path, precision: str, graph: bool = False) -> Any:
        from .runtime.ort import OrtSession

        kw: Dict[str, Any] = {"fixed_batch": self._batch, "cuda_graph": True} if graph else {}
        return OrtSession(path, device=self.device, threads=self._threads, precision=precision,
                          strict=self.device == "cuda", **kw)

    def _open_pooling(self, triage: Any, pooling: str) -> None:
        feats = triage.bundle.features_paths()
        self.features = None
        if pooling in ("auto", "kernel") and self.precision in feats:
            fpath, hpath = feats[self.precision]
            self.features = self._session(Path(fpath), self.precision, graph=self.cuda_graph)
            self._check_features_source(triage.bundle, Path(fpath), getattr(self.features, "metadata", {}))
            head = np.load(hpath)
            w = np.ascontiguousarray(head["fc_weight"], np.float32)
            b = np.ascontiguousarray(head["fc_bias"], np.float32)
            if w.shape[0] != len(triage.classes):
                raise BundleError(f"{hpath}: head has {w.shape[0]} classes, the bundle lists {triage.classes}")
            self._w = self.ops.upload(w, self.init_transfers, "head weight (once, at construction)")
            self._wt = self.ops.xp.ascontiguousarray(self._w.T)
            self._b = self.ops.upload(b, self.init_transfers, "head bias (once, at construction)")
        elif pooling == "kernel":
            raise BundleError(f"{triage.bundle.root}: no classifier features variant for {self.precision} "
                              f"(has {sorted(feats)}); run `python -m sdk.export.features --bundle {triage.bundle.root}`")
        else:
            why = "pooling='graph' asked" if pooling == "graph" else f"no {self.precision} features variant in the bundle"
            self.reasons.append(f"pooling by the classifier graph ({why})")
        self.pooling = "kernel" if self.features is not None else "graph"

    @staticmethod
    def _check_features_source(bundle: Any, fpath: Path, props: Mapping[str, str]) -> None:
        """The features graph reads its weights from the classifier file it was derived from (by
        byte offset): refuse it when that classifier's bytes changed since the derivation."""
        src, want = props.get("ctsdk.features_of", ""), props.get("ctsdk.source_sha256", "")
        have = {Path(bf.path).name: bf.sha256 for bf in bundle.files.values()}.get(src)
        if not src or have is None or want != have:
            raise BundleError(f"{fpath}: derived from {src or '?'} (sha256 {want[:12] or '?'}), which the bundle no longer "
                              f"holds unchanged (sha256 {str(have)[:12]}); re-run `python -m sdk.export.features --bundle {bundle.root}`")

    def _open_lungs(self, triage: Any, lungs: str) -> None:
        """``lungs="auto"``: the 3D U-Net on the GPU set when the bundle has one, else the hybrid;
        ``Triage(lung_method="unet3d")`` asks for the 3D U-Net on any set, "hybrid" / "unet2d" /
        "classical" for the host segmenter."""
        method = triage.lung_method
        if lungs == "auto" and method != "auto":
            lungs = method if method in ("unet3d", "hybrid3d") else "hybrid"
        elif lungs == "auto" and not self.ops.on_device:
            lungs = "hybrid"  # the CPU keeps the hybrid (issue 13); lung_method="unet3d" to change
        # FP32 3D U-Net by default, also on the GPU: on covid-P001 the FP16 cube mask moved edge voxels
        # enough to shift P(covid) by 0.08 against the FP32 mask (H200, 2026-12-04); the classifier is
        # sensitive to the mask it pools with. $CTSDK_LUNGS3D_PRECISION=fp16 picks the FP16 file.
        self.unet3d = Unet3dSpec.from_bundle(triage.bundle, os.environ.get("CTSDK_LUNGS3D_PRECISION", "fp32"))
        self._lungs3d = None
        if lungs in ("unet3d", "hybrid3d") and self.unet3d is None:
            raise BundleError(f"{triage.bundle.root}: lungs={lungs!r} but the bundle has no lungs3d_*.onnx")
        if self.unet3d is not None and lungs in ("auto", "unet3d", "hybrid3d"):
            self._lungs3d = self._session(self.unet3d.path, self.unet3d.precision)
            spec = self._lungs3d.inputs[0]
            self._lungs3d_in = (spec.name, spec.dtype)
            outs = [o.name for o in self._lungs3d.outputs]
            probs = [o for o in outs if "prob" in o.lower()]
            self._lungs3d_out = probs[0] if probs else outs[0]
            self._lungs3d_logits = not probs and "logit" in outs[0].lower()
            self.lungs = "hybrid3d" if lungs == "hybrid3d" else "unet3d"
        else:
            if self.unet3d is None:
                self.reasons.append("no 3D lung U-Net (lungs3d_*.onnx) in the bundle: hybrid 2D/classical lungs on the CPU")
            self.lungs = "hybrid"

    def _stage_names(self, triage: Any) -> Dict[str, str]:
        dev = "cuda" if self.device == "cuda" else "cpu"
        k = _SET_LABEL[self.ops.name]
        clf_prec = self.precision
        if self.lungs == "unet3d":
            resample, lungs = k, f"unet3d-ort-{dev}-{self.unet3d.precision}"
        elif self.lungs == "hybrid3d":  # the cube on the set, the hybrid's classical steps on the host
            resample, lungs = k, f"hybrid-unet3d-ort-{dev}-{self.unet3d.precision}+classical-cpu"
        else:
            from .lungs.int8 import stage_name

            method = triage.lung_method if triage.lung_method not in ("auto", "unet3d") else "hybrid"
            lungs = stage_name(method, getattr(triage, "lungs_precision", None))  # e.g. hybrid-unet2d-ort-cpu-int8
            resample = k if not self.ops.on_device and method != "unet2d" else "opencv (inside the CPU lung segmenter)"
        return {"upload": "pinned staging, 1 copy" if self.ops.on_device else "host (no device)",
                "resample": resample, "lungs": lungs, "mask": f"threshold ({k})" if self.lungs == "unet3d" else "host segmenter",
                "slice_selection": f"area reduction ({k}) + lung rule (host)",
                "classifier_inputs": k,
                "classifier": f"ort-{dev}-{clf_prec}" + ("-features" if self.pooling == "kernel" else "")
                + ("+cudagraph" if self.cuda_graph and self.pooling == "kernel" else ""),
                "pooling": k if self.pooling == "kernel" else "graph",
                "aggregation": "xgboost-cpu"}

    def warm_up(self, batch: int, size: int) -> None:
        """One inference of each session this path adds and one launch of each kernel, at the
        working shapes (CuPy / ORT allocate and pick algorithms on first use)."""
        io = Transfers()
        xp = self.ops.xp
        x = xp.zeros((batch, 3, size, size), dtype=xp.float32)
        x[:, 1, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
        if self.features is not None:
            f = self._run(self.features, "image", x, ["features"], io)["features"]
            self.ops.masked_gap(xp.ascontiguousarray(f), self.ops.mask_weights(x, tuple(f.shape[-2:]), channel=1))
        elif self.ops.on_device:  # the classifier graph through its device binding
            self._run(self._classifier, "image", x, ["probs", "cam"], io)
        if self._lungs3d is not None:
            n = self.unet3d.size
            dt = xp.float16 if self._lungs3d_in[1] == "float16" else xp.float32
            self._run(self._lungs3d, self._lungs3d_in[0], xp.zeros((1, 1, n, n, n), dtype=dt), [self._lungs3d_out], io)
        hu = np.full((4, 32, 32), -1000, np.int16)
        d = self.ops.upload(hu, io, "warm-up")
        self.ops.resample(d, np.arange(4.0), (4, 8, 8), mode="area")
        self.ops.classifier_inputs(d, self.ops.upload(np.ones(hu.shape, np.uint8), io, "warm-up"), np.arange(2),
                                   size, (-1350.0, 150.0))
        self.ops.synchronize()

    # --- helpers ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage(self, timer: Any, name: str) -> Iterator[None]:
        with timer(name):
            yield
            if self.sync_timings:
                self.ops.synchronize()

    def host_buffer(self, shape: Tuple[int, ...], dtype: Any) -> Optional[np.ndarray]:
        """Allocator for ingest (``load_series(alloc=...)``): page-locked memory on the GPU set,
        so the decoded volume is uploaded with no staging copy; plain memory otherwise."""
        if not self.ops.on_device:
            return np.empty(shape, dtype)
        buf = self.ops.pinned(shape, dtype)
        with self._pinned_lock:
            for k in [k for k, r in self._pinned.items() if r() is None]:
                del self._pinned[k]
            self._pinned[id(buf)] = weakref.ref(buf)
        return buf

    def _pinned_base(self, a: np.ndarray) -> Optional[np.ndarray]:
        """The pinned buffer from :meth:`host_buffer` that ``a`` is (a view of), or None."""
        b: Any = a
        while b is not None:
            ref = self._pinned.get(id(b)) if isinstance(b, np.ndarray) else None
            if ref is not None and ref() is b:
                return b
            b = getattr(b, "base", None)
        return None

    def _upload_volume(self, hu: np.ndarray, io: Transfers) -> Any:
        """One upload of the HU volume. On the GPU: decoded straight into pinned memory by ingest
        (the canonical flips / transposes are views of it: the buffer goes up as decoded and the
        view is made contiguous on the device), else through a pinned staging copy."""
        a = np.asarray(hu)
        if not self.ops.on_device:
            return self.ops.upload(a, io, "volume (HU)")
        base = self._pinned_base(a)
        if base is None or base.nbytes != a.nbytes or not base.flags.c_contiguous:
            staging = self.ops.pinned(a.shape, a.dtype)  # CuPy's pinned pool: reused across runs
            _parallel_copy(staging, a)
            return self.ops.upload(staging, io, "volume (HU)")
        d_base = self.ops.upload(base, io, "volume (HU)")
        if a.flags.c_contiguous and a.__array_interface__["data"][0] == base.__array_interface__["data"][0]:
            return d_base.reshape(a.shape)
        return self.ops.device_view(d_base, base, a)

    def _run(self, sess: Any, name: str, x: Any, outputs: Sequence[str], io: Transfers) -> Dict[str, Any]:
        """Run an ORT session on a kernel-set array; device arrays stay on the device when the
        session has ``run_device`` (IOBinding); otherwise the copies are counted."""
        if not self.ops.on_device:
            return sess.infer({name: x}, outputs)
        run_device = getattr(sess, "run_device", None)
        if run_device is not None and getattr(sess, "provider", "") == "CUDAExecutionProvider":
            out = run_device({name: x}, list(outputs))
            return dict(out) if isinstance(out, Mapping) else dict(zip(outputs, out))
        host = self.ops.download(x, io, f"{Path(sess.path).name} input (session has no run_device: host round trip)")
        res = sess.infer({name: host}, outputs)
        return {k: self.ops.upload(v, io, f"{Path(sess.path).name} output {k} (host round trip)") for k, v in res.items()}

    # --- stages ----------------------------------------------------------------------------------
    def _lungs_unet3d(self, volume: Any, d_hu: Any, io: Transfers, timer: Any) -> Tuple[Any, Tuple[Any, Any]]:
        """(mask at the volume grid (uint8, kernel-set array), (cube mask, cube geometry))."""
        from .lungs.unet3d import cube_to_volume

        xp, spec = self.ops.xp, self.unet3d
        prob, thr, m128, geom = self._unet3d_cube(volume, d_hu, io, timer)
        with self._stage(timer, "lungs"):
            if self.ops.on_device:  # cube_to_volume uploads its z taps and in-plane interpolation matrices
                nz, ny, nx = (int(v) for v in volume.hu.shape)
                io.record("h2d", "cube -> volume taps and interpolation matrices (unet3d.cube_to_volume)",
                          nz * (8 + 8 + 4) + (ny + nx) * spec.size * 4)
            mask = cube_to_volume(prob, geom, thr)
            return mask.view(xp.uint8), (m128, geom)

    def _unet3d_cube(self, volume: Any, d_hu: Any, io: Transfers, timer: Any) -> Tuple[Any, float, Any, Any]:
        """The 3D U-Net on the kernel set: (probability cube, its threshold, the thresholded uint8
        cube, cube geometry)."""
        from .lungs.unet3d import cube_geometry

        spec = self.unet3d
        st = getattr(volume.meta, "slice_thickness_mm", None)
        name, dtype = self._lungs3d_in
        with self._stage(timer, "resample"):
            cube = self.ops.resample(d_hu, volume.z_mm, (spec.size,) * 3, mode=spec.mode, isotropic=True,
                                     pixel_spacing_mm=volume.pixel_spacing_mm, fill_hu=-1024.0, window=spec.window,
                                     slice_thickness_mm=st, out_dtype="float16" if dtype == "float16" else "float32",
                                     io=io)
        with self._stage(timer, "lungs"):
            out = self._run(self._lungs3d, name, cube.reshape((1, 1) + tuple(cube.shape)), [self._lungs3d_out], io)
            prob = out[self._lungs3d_out].reshape(cube.shape)
            thr = 0.0 if self._lungs3d_logits else spec.threshold
            geom = cube_geometry(volume.hu.shape, volume.z_mm, volume.pixel_spacing_mm, st, spec.size)
            return prob, thr, (prob > thr).astype(self.ops.xp.uint8), geom

    def _lungs_hybrid(self, triage: Any, volume: Any, io: Transfers, timer: Any, warnings: List[str],
                      learned_cube: Any = None) -> Tuple[Any, Any]:
        """(mask at the volume grid (uint8, kernel-set array), the host LungSegmentation);
        ``learned_cube``: the 3D U-Net's cube (host CubeLabels) as the hybrid's learned part."""
        from . import lungs

        downsample = None
        if not self.ops.on_device:
            nz = volume.hu.shape[0]
            z_index = np.arange(nz, dtype=np.float64)  # z unchanged: one output slice per input slice

            def area(hu: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
                return self.ops.resample(hu, z_index, (nz, int(hw[0]), int(hw[1])), mode="area", io=io)

            downsample = area
        method = triage.lung_method if triage.lung_method not in ("unet3d", "hybrid3d") else "auto"
        kwargs: Dict[str, Any] = {"method": method, "downsample": downsample}
        if learned_cube is not None:
            kwargs.update(method="hybrid", learned_cube=learned_cube)
        elif triage._lungs is not None:
            kwargs["session"] = triage._lungs
        with self._stage(timer, "lungs"):
            seg = lungs.segment(volume, **kwargs)
        triage._split_resample(seg, timer)
        warnings.extend(f"lungs: {w}" for w in getattr(seg, "warnings", ()))
        return self.ops.upload(seg.mask.astype(np.uint8), io, "lung mask (host segmenter)"), seg

    def _classify(self, x: Any, batch: int, keep_cams: bool, io: Transfers, timer: Any) -> Tuple[Any, Optional[Any]]:
        xp = self.ops.xp
        n = int(x.shape[0])
        probs, cams = [], []
        pad = self.ops.on_device  # fixed shapes on the GPU (no re-planning, graph-capturable)
        for i in range(0, n, batch):
            xb = x[i:i + batch]
            m = int(xb.shape[0])
            if pad and m < batch:
                full = xp.zeros((batch,) + tuple(x.shape[1:]), dtype=x.dtype)
                full[:m] = xb
                xb = full
            if self.pooling == "kernel":
                with self._stage(timer, "classification"):
                    f = self._run(self.features, "image", xp.ascontiguousarray(xb), ["features"], io)["features"]
                with self._stage(timer, "pooling"):
                    w = self.ops.mask_weights(xb, tuple(f.shape[-2:]), channel=1)
                    pooled = self.ops.masked_gap(xp.ascontiguousarray(f), w)
                    logits = pooled @ self._wt + self._b
                    e = xp.exp(logits - logits.max(axis=1, keepdims=True))
                    probs.append((e / e.sum(axis=1, keepdims=True))[:m])
                    if keep_cams:
                        hw = float(f.shape[-2] * f.shape[-1])
                        cams.append((xp.einsum("kc,nchw->nkhw", self._w, f.astype(xp.float32) * w) * hw)[:m])
            else:
                with self._stage(timer, "classification"):
                    out = self._run(self._classifier, "image", xp.ascontiguousarray(xb), ["probs", "cam"], io)
                    probs.append(out["probs"][:m])
                    cams.append(out["cam"][:m])
        p = xp.concatenate(probs).astype(xp.float32)
        c = xp.concatenate(cams).astype(xp.float32) if (keep_cams and cams) else None
        return p, c

    # --- public ----------------------------------------------------------------------------------
    def triage(self, triage: Any, volume: Any, timer: Any, warnings: List[str], base: Dict[str, Any]) -> Tuple[Any, Any]:
        """Every stage after eligibility; returns (TriageResult, lung mask or a lazy host view)."""
        from .lungs import slice_thickness_mm
        from .slices import select_by_lung_area
        from .result import NOT_ELIGIBLE, TriageResult, HeatmapSource, slice_scores

        io = Transfers()
        xp = self.ops.xp
        with self._stage(timer, "upload"):
            d_hu = self._upload_volume(volume.hu, io)
        if self.lungs == "unet3d":
            d_mask, (m128, geom) = self._lungs_unet3d(volume, d_hu, io, timer)
            cube_mask = self.ops.download(m128, io, "3D U-Net cube mask (HU opacity on the host)")
            seg_for_opacity: Any = None
        else:
            learned = None
            if self.lungs == "hybrid3d":  # the cube comes back (2 MB); the classical steps run on the host
                from .lungs.unet3d import CubeLabels

                _, _, m128, geom = self._unet3d_cube(volume, d_hu, io, timer)
                learned = CubeLabels(self.ops.download(m128, io, "3D U-Net cube mask (the hybrid's learned part, host)"), geom)
            d_mask, seg_for_opacity = self._lungs_hybrid(triage, volume, io, timer, warnings, learned)
        with self._stage(timer, "slice_selection"):
            nz = int(d_mask.shape[0])
            px = self.ops.download(d_mask.reshape(nz, -1).sum(axis=1, dtype=xp.int64), io, "lung pixels per slice")
            ps = volume.pixel_spacing_mm
            area = px.astype(np.float64) * float(ps[0]) * float(ps[1])
            fallback_dz = float(getattr(volume.meta, "slice_thickness_mm", None) or volume.spacing[0] or 1.0)
            lung_ml = float((area * slice_thickness_mm(volume.z_mm, fallback_dz)).sum() / 1000.0)
            indices = select_by_lung_area(area)
        mask_view = d_mask if not self.ops.on_device else _MaskRows(d_mask, self.ops, io)
        if indices.size == 0:
            res = TriageResult(label=NOT_ELIGIBLE, probabilities={}, eligible=False,
                               reasons=["no slice passed slice selection (no lung found in the series)"],
                               lung_volume_ml=lung_ml, warnings=warnings, **base)
            res.transfers = io.to_dict()
            return res, mask_view
        if indices.size < 20:
            warnings.append(f"only {indices.size} slices selected (< 20 aggregation groups): slices are repeated across groups")

        def opacity_job() -> Any:  # host HU opacity, overlapping the device's classification
            import time as _time

            t0 = _time.perf_counter()
            seg = seg_for_opacity
            if seg is None:
                from types import SimpleNamespace

                from .lungs.unet3d import CubeLabels

                seg = SimpleNamespace(labels=None, mask=CubeLabels(cube_mask, geom))   # sampled at opacity's stride only
            out = triage._opacity(volume, seg, warnings, workers=OPACITY_WORKERS)
            # its compute time, hidden behind the classification: informational, not a stage (the
            # "opacity" stage below is only the wait that was not hidden, so stages sum to the wall time)
            timer.ms["opacity_overlapped"] = (_time.perf_counter() - t0) * 1000.0
            return out

        from .pools import shared_pool

        opacity_future = shared_pool("side").submit(opacity_job)
        with self._stage(timer, "classifier_inputs"):
            x = self.ops.classifier_inputs(d_hu, d_mask, indices, triage.size, triage.window, io=io)
        d_probs, d_cams = self._classify(x, triage.classifier_batch, triage.keep_heatmaps, io, timer)
        with self._stage(timer, "aggregation"):
            slice_probs = self.ops.download(d_probs, io, "slice probabilities")
            cams = None if d_cams is None else self.ops.download(d_cams, io, "CAMs (heat maps)")
        with self._stage(timer, "opacity"):
            opacity = opacity_future.result()
        with self._stage(timer, "aggregation"):
            decision = triage._decide_series(slice_probs, opacity, int(indices.size), lung_ml)
        z_mm = np.asarray(volume.z_mm, dtype=np.float64)
        scores = slice_scores(triage.classes, triage.positive, indices, z_mm, slice_probs, opacity,
                              getattr(triage, "slice_score_model", None))
        heat = None
        if triage.keep_heatmaps and cams is not None:
            heat = HeatmapSource(hu=volume.hu, mask=mask_view, cams=cams, window=triage.window,
                                  class_index=triage.classes.index(triage.positive), opacity=opacity, z_mm=z_mm)
        block = None
        if opacity is not None:
            block = opacity.to_dict()
            block["decision"] = decision.to_dict()
        res = TriageResult(label=decision.label, probabilities=decision.probabilities, eligible=True,
                           reasons=list(decision.reasons), slice_scores=scores, lung_volume_ml=lung_ml,
                           warnings=warnings, lung_opacity=block, _heat=heat, **base)
        res.transfers = io.to_dict()
        return res, mask_view


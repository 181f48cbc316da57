"""The naive baseline: the triage pipeline as a researcher would first write it.

Nothing is cached between calls and nothing is batched:

- **decode**: ``pydicom.dcmread`` + ``.pixel_array`` one file at a time, single thread;
- **hu**: slices sorted by ImagePositionPatient z, ``stored * slope + intercept`` per slice,
  stacked as float32;
- **eligibility**: the product's own check (:func:`sdk.eligibility.check`) when it is installed,
  else the header rule it implements (CT, slice thickness <= 3 mm) - cheap either way;
- **resample**: ``scipy.ndimage.zoom`` one slice at a time (the classifier's 224^2 inputs) plus
  the segmenter's per-slice input preparation; no 128^3 volume by default, because the product's
  default segmenter (the 2D U-Net) works on slices (``NaiveConfig.volume_size=128`` adds one);
- **lungs**: the product's learned 2D U-Net run in **PyTorch eager, one slice at a time**, on the
  full-resolution slices (falls back to a textbook HU-threshold + connected-component segmenter
  with SciPy when the U-Net checkpoint or torch model is missing; the report says which ran);
- **select**: every slice with any lung pixel;
- **classify**: ``sdk.models.create_model`` in PyTorch eager FP32, **one slice at a time** on
  every lung slice, each input built with ``scipy.ndimage.zoom`` to 224^2;
- **aggregate**: the bundle's XGBoost aggregator (same as the product) when available, else the
  mean slice probability.

torch is required (``MissingDependencyError`` otherwise): the harness lists the baseline as
skipped with that reason on a torch-free install.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._lazy import require
from ..errors import ConfigError, CtsdkError, SeriesError
from ..preprocessing import CLASSIFIER_WINDOW, SEGMENTER_WINDOW
from .stages import STAGES

REPO = Path(__file__).resolve().parents[2]
SourceLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]



@dataclass
class NaiveConfig:
    """What the baseline runs. ``None`` paths are looked up in the bundle / runs/ at setup.

    Attributes:
        classifier: registry name of the slice classifier (``sdk.models``).
        classifier_weights: a torch state-dict checkpoint; None = look for one, else random
            weights (the cost is the same; ``describe()`` says which).
        segmenter_weights: the 2D U-Net checkpoint (``runs/seg/unet2d_lung.pt``).
        aggregator: XGBoost JSON of the bundle; None = look in the bundle.
        window: classifier HU window (lo, hi); seg_window: segmenter HU window.
        size: classifier input side.
        volume_size: also zoom the whole volume to this cube (e.g. 128 for a 3D segmenter's
            input); None (default) because the product's default segmenter works on slices.
        threads: torch intra-op threads (0 = torch's default).
        segmenter3d: the paper's lung segmentation instead of the 2D U-Net: the volume zoomed to
            ``volume_size``^3 (SciPy), ``unet3d_lung`` in torch eager, the mask zoomed back.
        classify_all: classify every slice (paper 000's pipeline as issue 15 measures it), not only
            the slices with lung pixels.
    """

    classifier: str = "effnet_lite0_mgap"
    classifier_weights: Optional[Path] = None
    segmenter_weights: Optional[Path] = None
    aggregator: Optional[Path] = None
    bundle: Optional[Path] = None
    window: Tuple[float, float] = CLASSIFIER_WINDOW
    seg_window: Tuple[float, float] = SEGMENTER_WINDOW
    size: int = 224
    volume_size: Optional[int] = None
    threads: int = 0
    segmenter3d: bool = False
    classify_all: bool = False


def list_dicom_files(source: SourceLike) -> List[str]:
    """Every file under a folder (recursive) or the given list, sorted by name."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            files = sorted(str(f) for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files = [str(p)]
        else:
            raise SeriesError("no such file or folder", path=p, hint="give a DICOM series folder")
    else:
        files = [str(f) for f in source]
    if not files:
        raise SeriesError("no files found", path=str(source), hint="give a folder holding one CT series")
    return files


def window01(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip((hu - lo) / (hi - lo), 0, 1)`` as float32 (docs/conventions.md)."""
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _find_checkpoint(explicit: Optional[Path], folder: Path, patterns: Sequence[str]) -> Optional[Path]:
    if explicit is not None:
        return Path(explicit)
    for pat in patterns:
        hits = sorted(folder.glob(pat)) if folder.is_dir() else []
        if hits:
            return hits[0]
    return None


@dataclass
class NaivePipeline:
    """The baseline as one object: ``setup()`` builds the torch models, ``run(source)`` triages.

    ``describe()`` records what really ran (weights or random, which segmenter, aggregator).
    """

    config: NaiveConfig = field(default_factory=NaiveConfig)
    name: str = "naive"

    def __post_init__(self) -> None:
        self._torch: Any = None
        self._cls: Any = None
        self._seg: Any = None
        self._agg: Any = None
        self._classes: List[str] = []
        self._notes: Dict[str, Any] = {}
        self._manifest: Dict[str, Any] = {}

    # --- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Import torch and build the models (counted as the baseline's cold start)."""
        torch = require("torch", "the naive PyTorch-eager baseline")
        self._torch = torch
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        from ..bundle import load_bundle

        bundle = load_bundle(self.config.bundle, verify=False)
        self._manifest = dict(bundle.manifest)
        self._classes = bundle.classes
        self.config.window = bundle.window
        self.config.size = bundle.input_size
        self._cls = self._build_classifier()
        self._seg = self._build_segmenter()
        agg_path = self.config.aggregator or bundle.aggregator_path
        if agg_path is not None:
            from ..aggregate import Aggregator

            self._agg = Aggregator.load(agg_path)
            self._notes["aggregator"] = f"XGBoost {Path(agg_path).name} (the product's)"
        else:
            self._notes["aggregator"] = "mean slice probability (the bundle has no aggregator)"
        self._notes["torch_threads"] = torch.get_num_threads()

    def _build_classifier(self) -> Any:
        from ..models import create_model

        # the bundle's checkpoint is the default classifier's; another architecture runs with its own or random weights
        ckpt = self.config.classifier_weights or (self._bundle_checkpoint() if self.config.classifier == "effnet_lite0_mgap" else None)
        model, note = None, "no classifier checkpoint here"
        if ckpt is not None and ckpt.is_file():
            from ..models.classifier import load_checkpoint

            try:
                model = load_checkpoint(ckpt)
                name = getattr(getattr(model, "cfg", None), "name", None) or self.config.classifier
                weights = f"trained checkpoint {ckpt}"
            except CtsdkError as exc:
                note = f"checkpoint {ckpt} not usable: {exc}"
        if model is None:
            name = self.config.classifier
            self._torch.manual_seed(0)  # random but reproducible weights, so runs agree
            model = create_model(name, pretrained=False, classes=tuple(self._classes))
            weights = f"random ({note}; the architecture's cost is the same)"
        model.eval()
        self._notes["classifier"] = {"model": name, "weights": weights, "precision": "fp32", "batch": 1}
        return model

    def _bundle_checkpoint(self) -> Optional[Path]:
        """The torch checkpoint the bundle's classifier was exported from, when it is on disk:
        the manifest's ``provenance.classifier`` folder, else ``runs/classifier/<model>/``."""
        prov = str((self._manifest.get("provenance") or {}).get("classifier", "")).split(" ")[0]
        folders = [REPO / prov] if prov else []
        folders.append(REPO / "runs" / "classifier" / self.config.classifier)
        for folder in folders:
            if (folder / "best.pt").is_file():
                return folder / "best.pt"
        return None

    def _build_segmenter(self) -> Any:
        torch = self._torch
        if self.config.segmenter3d:
            from ..models import create_model

            torch.manual_seed(0)
            net = create_model("unet3d_lung").eval()
            self._notes["segmenter"] = (f"3D U-Net (unet3d_lung, random weights: the cost reference) in torch eager on the "
                                        f"volume zoomed to {self.config.volume_size}^3 with SciPy, mask zoomed back with SciPy")
            return net
        ckpt = _find_checkpoint(self.config.segmenter_weights, REPO / "runs" / "seg", ["unet2d_lung.pt"])
        if ckpt is None or not ckpt.is_file():
            self._notes["segmenter"] = ("HU threshold + connected components (SciPy, full resolution): no U-Net "
                                        "checkpoint (runs/seg/unet2d_lung.pt) to run the product's segmenter in torch")
            return None
        from ..models import create_model

        net = create_model("unet2d_lung")
        state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
        net.load_state_dict(state)
        net.eval()
        self._notes["segmenter"] = (f"the product's 2D U-Net ({ckpt.name}) in torch eager, one slice at a time on "
                                    "every slice, logits zoomed back to full resolution with SciPy")
        return net

    def describe(self) -> Dict[str, Any]:
        """What the baseline is made of (JSON-safe)."""
        return {"description": "pydicom one file at a time, scipy.ndimage.zoom, PyTorch eager FP32 one slice at a time, no caching",
                **self._notes}

    def close(self) -> None:
        self._cls = self._seg = self._agg = None

    # --- stages ----------------------------------------------------------------------------------
    def run(self, source: SourceLike) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Triage one series; returns (stage -> ms, result summary).

        Per-slice resizing (the segmenter's input preparation and the classifier's 224^2 inputs)
        is timed inside the loops and reported as ``resample``, like the product's stages.
        """
        if self._cls is None:
            raise ConfigError("NaivePipeline.run before setup(): call setup() first")
        ms: Dict[str, float] = {s: 0.0 for s in STAGES}
        clock = time.perf_counter

        t = clock()
        files = list_dicom_files(source)
        pydicom = require("pydicom", "reading DICOM")
        slices = []
        for f in files:
            ds = pydicom.dcmread(f)
            if "PixelData" not in ds:
                continue
            slices.append((ds, ds.pixel_array))
        if not slices:
            raise SeriesError("no image files with pixel data", path=str(source))
        ms["decode"] = (clock() - t) * 1e3

        t = clock()
        slices.sort(key=lambda s: float(s[0].ImagePositionPatient[2]))
        hu = np.stack([px.astype(np.float32) * np.float32(getattr(ds, "RescaleSlope", 1.0)) + np.float32(getattr(ds, "RescaleIntercept", 0.0))
                       for ds, px in slices])
        z = np.array([float(ds.ImagePositionPatient[2]) for ds, _ in slices])
        ms["hu"] = (clock() - t) * 1e3

        t = clock()
        eligible, reasons = self._eligibility(slices[0][0], hu, z)
        ms["eligibility"] = (clock() - t) * 1e3

        if self.config.volume_size and not self.config.segmenter3d:
            t = clock()
            from scipy import ndimage as ndi

            n = self.config.volume_size
            ndi.zoom(hu, (n / hu.shape[0], n / hu.shape[1], n / hu.shape[2]), order=1, grid_mode=True, mode="nearest")
            ms["resample"] += (clock() - t) * 1e3

        mask = self._segment(hu, ms)

        t = clock()
        area = mask.reshape(mask.shape[0], -1).sum(axis=1)
        selected = np.arange(mask.shape[0]) if self.config.classify_all else np.flatnonzero(area > 0)
        ms["select"] = (clock() - t) * 1e3

        probs = self._classify(hu, mask, selected, ms)

        t = clock()
        if self._agg is not None and len(probs):
            patient = self._agg.predict_proba(probs)
        elif len(probs):
            patient = {c: float(v) for c, v in zip(self._classes, probs.mean(axis=0))}
        else:
            patient = {}
        ms["aggregate"] = (clock() - t) * 1e3

        label = max(patient, key=patient.get) if patient else "not_eligible"
        summary = {
            "label": label if eligible else "not_eligible",
            "probabilities": patient,
            "eligible": eligible,
            "reasons": reasons,
            "n_slices": int(hu.shape[0]),
            "n_classified": int(len(selected)),
        }
        return ms, summary

    def _eligibility(self, first: Any, hu: np.ndarray, z: np.ndarray) -> Tuple[bool, List[str]]:
        """The product's rule on the naive volume (cheap); header rule if it is not installed."""
        try:
            from ..eligibility import check
            from ..volume import SeriesMeta, Volume
        except ImportError:
            check = None  # type: ignore[assignment]
        if check is not None:
            thick = getattr(first, "SliceThickness", None)
            meta = SeriesMeta(modality=str(getattr(first, "Modality", "")),
                              slice_thickness_mm=None if thick is None else float(thick),
                              contrast_agent=str(getattr(first, "ContrastBolusAgent", "") or ""), n_files=int(hu.shape[0]))
            vol = Volume(hu=hu, z_mm=z, pixel_spacing_mm=tuple(float(v) for v in first.PixelSpacing), meta=meta)
            res = check(vol)
            return bool(res.eligible), list(res.reasons)
        reasons = []
        if str(getattr(first, "Modality", "CT")) != "CT":
            reasons.append(f"modality {first.Modality} is not CT")
        thick = getattr(first, "SliceThickness", None)
        if thick is not None and float(thick) > 3.0:
            reasons.append(f"slice thickness {float(thick)} mm > 3 mm")
        return not reasons, reasons

    def _segment(self, hu: np.ndarray, ms: Dict[str, float]) -> np.ndarray:
        """(Z, Y, X) uint8 lung mask at full resolution, one slice at a time."""
        clock = time.perf_counter
        if self.config.segmenter3d:
            return self._segment3d(hu, ms)
        if self._seg is None:
            t = clock()
            mask = threshold_lungs(hu)
            ms["lungs"] += (clock() - t) * 1e3
            return mask
        torch = self._torch
        from scipy import ndimage as ndi

        from ..lungs.unet2d import prepare_slice

        lo, hi = self.config.seg_window
        mask = np.zeros(hu.shape, np.uint8)
        with torch.no_grad():
            for k in range(hu.shape[0]):
                t = clock()
                x = prepare_slice(window01(hu[k], lo, hi))
                t1 = clock()
                logits = self._seg(torch.from_numpy(x[None, None])).numpy()[0, 0]
                up = ndi.zoom(logits, (hu.shape[1] / logits.shape[0], hu.shape[2] / logits.shape[1]), order=1, grid_mode=True, mode="nearest")
                mask[k] = ndi.binary_fill_holes(up > 0)
                t2 = clock()
                ms["resample"] += (t1 - t) * 1e3
                ms["lungs"] += (t2 - t1) * 1e3
        return mask

    def _segment3d(self, hu: np.ndarray, ms: Dict[str, float]) -> np.ndarray:
        """Paper 000's way, naively: zoom the volume to n^3, 3D U-Net in torch eager, zoom back."""
        from scipy import ndimage as ndi

        clock = time.perf_counter
        n = int(self.config.volume_size or 128)
        lo, hi = self.config.seg_window
        t = clock()
        cube = window01(ndi.zoom(hu, (n / hu.shape[0], n / hu.shape[1], n / hu.shape[2]), order=1, grid_mode=True, mode="nearest"), lo, hi)
        t1 = clock()
        with self._torch.no_grad():
            logits = self._seg(self._torch.from_numpy(cube[None, None].astype(np.float32))).numpy()[0, 0]
        t2 = clock()
        back = ndi.zoom(logits, (hu.shape[0] / n, hu.shape[1] / n, hu.shape[2] / n), order=1, grid_mode=True, mode="nearest")
        mask = (back > 0).astype(np.uint8)
        t3 = clock()
        ms["resample"] += ((t1 - t) + (t3 - t2)) * 1e3
        ms["lungs"] += (t2 - t1) * 1e3
        return mask

    def _classify(self, hu: np.ndarray, mask: np.ndarray, selected: np.ndarray, ms: Dict[str, float]) -> np.ndarray:
        """(n_selected, K) probabilities, one slice per forward pass."""
        torch = self._torch
        from scipy import ndimage as ndi

        clock = time.perf_counter
        lo, hi = self.config.window
        s = self.config.size
        f = (s / hu.shape[1], s / hu.shape[2])
        out = []
        with torch.no_grad():
            for k in selected:
                t = clock()
                grey = window01(ndi.zoom(hu[k], f, order=1, grid_mode=True, mode="nearest"), lo, hi)
                m = ndi.zoom(mask[k].astype(np.float32), f, order=0, grid_mode=True, mode="nearest")
                x = np.stack([grey, m, grey * m])[None].astype(np.float32)
                t1 = clock()
                y = self._cls(torch.from_numpy(x))
                probs = y[1] if isinstance(y, (tuple, list)) else torch.softmax(y, dim=1)
                out.append(probs.numpy()[0])
                t2 = clock()
                ms["resample"] += (t1 - t) * 1e3
                ms["classify"] += (t2 - t1) * 1e3
        return np.asarray(out, dtype=np.float64).reshape(len(out), -1)


def threshold_lungs(hu: np.ndarray, threshold: float = -320.0) -> np.ndarray:
    """Textbook lung mask: air below ``threshold`` HU inside the body, not touching the slice
    border, two largest 3D components kept, holes filled per slice (SciPy, full resolution)."""
    from scipy import ndimage as ndi

    air = hu < threshold
    lab, n = ndi.label(air)
    if n == 0:
        return np.zeros(hu.shape, np.uint8)
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    sizes = ndi.sum(np.ones_like(lab, dtype=np.int32), lab, index=np.arange(1, n + 1))
    sizes[border[border > 0] - 1] = 0
    keep = np.argsort(sizes)[::-1][:2]
    keep = [k + 1 for k in keep if sizes[k] > 0]
    mask = np.isin(lab, keep)
    for k in range(mask.shape[0]):
        mask[k] = ndi.binary_fill_holes(mask[k])
    return mask.astype(np.uint8)


__all__ = ["NaiveConfig", "NaivePipeline", "STAGES", "list_dicom_files", "threshold_lungs", "window01"]

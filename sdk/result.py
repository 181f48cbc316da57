"""What a triage returns: :class:`TriageResult` (label, probabilities, per-slice scores, HU
opacity block, runtime and timings, heat maps on demand) and :class:`SliceScore`.

Plain data owned by no pipeline: :mod:`sdk.triage` (host path) and :mod:`sdk.device_path` (kernel
path) both build these, so neither has to import the other for its result types.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import ConfigError, whole_number

#: The statement every result object carries (result JSON, human output, DICOM objects).
RESEARCH_ONLY = "Research use only - not for diagnosis"

PathLike = Union[str, Path]
NOT_ELIGIBLE = "not_eligible"


# --- result ------------------------------------------------------------------------------------
def _heatmap_folder(out_dir: Any) -> Path:
    """The folder ``save_heatmaps`` writes into, created now: ConfigError for a value that is no
    path (None, a number, bytes, ``""`` - which would mean the working directory), ResultWriteError
    when it cannot be created (a file is in the way, a read-only place), before any slice is drawn."""
    from .errors import ResultWriteError

    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise ConfigError(f"out_dir must be a folder path (str or Path; '.' for the working directory), got "
                          f"{out_dir!r} ({type(out_dir).__name__})")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file, not a folder" if out.is_file() else (exc.strerror or str(exc))
        raise ResultWriteError(f"{out}: cannot write heat maps there ({why}); give a folder you can create and "
                               "write to") from exc
    return out


def _opt(v: Any) -> Optional[float]:
    """A finite float, or None (NaN / missing)."""
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


@dataclass(frozen=True)
class SliceScore:
    """Score of one selected slice: ``index`` into the volume's z axis, its position, the CNN's
    class probabilities, and the slice's HU evidence.

    ``ggo_fraction`` / ``consolidation_fraction``: share of the slice's analysed lung in ground
    glass / consolidation (:attr:`sdk.opacity.LungOpacity.slice_ggo_fraction`; None when the
    opacity was not measured or the slice has no analysed lung - e.g. the basal / apical ends the
    opacity rules leave out). ``slice_score``: the bundle's fused per-slice evidence score
    (:mod:`sdk.slice_score`; None when the bundle defines none). ``z_context_score``: the CNN's
    P(positive) with z context - the logits of the selected slices within
    :data:`sdk.slice_score.Z_CONTEXT_MM` of this one averaged (:func:`sdk.slice_score.z_context`).
    """

    index: int
    z_mm: float
    probabilities: Dict[str, float]
    ggo_fraction: Optional[float] = None
    consolidation_fraction: Optional[float] = None
    slice_score: Optional[float] = None
    z_context_score: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"index": int(self.index), "z_mm": float(self.z_mm),
                "probabilities": {k: float(v) for k, v in self.probabilities.items()},
                "ggo_fraction": _opt(self.ggo_fraction), "consolidation_fraction": _opt(self.consolidation_fraction),
                "slice_score": _opt(self.slice_score), "z_context_score": _opt(self.z_context_score)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SliceScore":
        return cls(int(d["index"]), float(d["z_mm"]), dict(d["probabilities"]), _opt(d.get("ggo_fraction")),
                   _opt(d.get("consolidation_fraction")), _opt(d.get("slice_score")), _opt(d.get("z_context_score")))


def slice_scores(classes: List[str], positive: str, indices: np.ndarray, z_mm: np.ndarray, slice_probs: np.ndarray,
                 opacity: Any = None, model: Any = None) -> List[SliceScore]:
    """One :class:`SliceScore` per selected slice: the CNN's probabilities, the slice's opacity
    fractions (from ``opacity``, a :class:`sdk.opacity.LungOpacity`) and the fused score
    (``model``, a :class:`sdk.slice_score.SliceScoreModel`), and the z-context score
    (:func:`sdk.slice_score.z_context`) - used by the host and kernel paths."""
    from .slice_score import z_context

    idx = np.asarray(indices, dtype=np.int64)
    probs = np.asarray(slice_probs, dtype=np.float64).reshape(idx.size, len(classes))
    nan = np.full(idx.size, np.nan)
    ggo = cons = nan
    if opacity is not None and getattr(opacity, "slice_ggo_fraction", None) is not None:
        ggo = np.asarray(opacity.slice_ggo_fraction, dtype=np.float64)[idx]
        cons = np.asarray(opacity.slice_consolidation_fraction, dtype=np.float64)[idx]
    fused = nan
    if model is not None:
        # without an opacity measurement the fractions are missing (the model's missing_fraction)
        fused = np.asarray(model.score(probs[:, classes.index(positive)], ggo, cons), dtype=np.float64).reshape(-1)
    zpos = np.asarray(z_mm, dtype=np.float64)[idx]
    zc = z_context(probs[:, classes.index(positive)], zpos)
    return [SliceScore(int(z), float(z_mm[z]), {c: float(p) for c, p in zip(classes, row)},
                       _opt(g), _opt(c), _opt(f), _opt(q))
            for z, row, g, c, f, q in zip(idx, probs, ggo, cons, fused, zc)]


@dataclass
class HeatmapSource:
    """What heat maps need, kept by reference (no copies): HU volume, lung mask, CAM grids."""

    hu: np.ndarray            # (z, y, x)
    mask: np.ndarray          # (z, y, x) lung mask
    cams: np.ndarray          # (N_selected, K, h, w)
    window: Tuple[float, float]
    class_index: int
    opacity: Any = None       # sdk.opacity.LungOpacity (its label map), when measured
    z_mm: Optional[np.ndarray] = None  # (z,) slice positions


@dataclass
class TriageResult:
    """Outcome of one series (the DESIGN.md contract). ``to_dict()`` is JSON-safe.

    Attributes:
        label: a bundle class (default bundle: "non_covid" | "covid"), "not_eligible", or
            "indeterminate" when the evidence is weak or conflicting (``reasons`` say which rule
            fired: fewer than 20 selected slices, lung volume < 1500 ml, CNN and HU evidence
            disagreeing, final P(covid) within 0.05 of the threshold; :mod:`sdk.decision`).
        probabilities: series-level class probabilities (empty when not eligible): the
            aggregator's, with the HU opacity terms added to the positive class's logit.
        eligible: False when the series failed eligibility (``reasons`` say why).
        reasons: eligibility failures, or why the label is "indeterminate" (else empty).
        slice_scores: per selected slice (z order): volume index, z_mm, class probabilities, the
            slice's ground-glass / consolidation fractions and the fused ``slice_score``
            (:class:`SliceScore`).
        lung_volume_ml: segmented lung volume (None when not computed).
        timings_ms: per stage (see ``STAGES``).
        warnings: ingest warnings (skipped files, quirks) and pipeline warnings.
        runtime: provider, precision, device (and backend) that ran the classifier; ``kernels``;
            on the kernel path ``stages``: what ran at each stage (:mod:`sdk.device_path`).
        series_uid, bundle, threshold, shape, spacing_mm: provenance.
        prior: the prior-study comparison (``run(prior=...)``), when requested.
        transfers: host <-> device copies of the run on the kernel path (calls, bytes, each copy).
        lung_opacity: HU lung-opacity block (``sdk.opacity.LungOpacity.to_dict()``: ground glass /
            consolidation fractions overall, per lung, per zone, pattern features) plus
            ``decision`` (the CNN's P and logit, XGBoost contributions, each HU logit term, the
            indeterminate rules); None when not eligible.
    """

    label: str
    probabilities: Dict[str, float]
    eligible: bool
    reasons: List[str] = field(default_factory=list)
    slice_scores: List[SliceScore] = field(default_factory=list)
    lung_volume_ml: Optional[float] = None
    timings_ms: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    runtime: Dict[str, Any] = field(default_factory=dict)
    series_uid: str = ""
    bundle: Dict[str, str] = field(default_factory=dict)
    threshold: Optional[float] = None
    shape: Optional[List[int]] = None
    spacing_mm: Optional[List[float]] = None
    prior: Optional[Dict[str, Any]] = None
    transfers: Optional[Dict[str, Any]] = None
    lung_opacity: Optional[Dict[str, Any]] = None
    _heat: Optional[HeatmapSource] = field(default=None, repr=False, compare=False)

    # --- heat maps -------------------------------------------------------------------------------
    def _source(self) -> HeatmapSource:
        if self._heat is None:
            why = "the series was not eligible" if not self.eligible else "Triage(heatmaps=False) keeps no image data"
            raise ConfigError(f"no heat maps for this result: {why}")
        return self._heat

    def heatmap(self, i: int) -> np.ndarray:
        """Heat map of the ``i``-th selected slice (``slice_scores[i]``), at the slice's resolution.

        The class-discriminative CAM of the positive class (:mod:`sdk.heatmap`), bilinearly
        up-sampled from the feature grid to (rows, columns) of the slice and zeroed outside the
        lung mask; units: logit contribution per pixel (grid mean + bias = logit).
        """
        from .heatmap import slice_heatmap

        src = self._source()
        n = len(self.slice_scores)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise ConfigError(f"heat map index must be a whole number (a position in slice_scores), got {i!r} "
                              f"({type(i).__name__})")
        if not -n <= i < n:
            raise ConfigError(f"heat map index {i} out of range: {n} selected slices (0..{n - 1})")
        z = self.slice_scores[i].index
        return slice_heatmap(src.cams[i], src.class_index, src.mask[z], src.hu.shape[1:])

    def opacity_map(self) -> Tuple[np.ndarray, np.ndarray]:
        """The HU opacity map at the native grid: ``(z_mm (n,), labels (n, rows, cols) uint8)`` for
        the n slices holding any ground glass (1) or consolidation (2) (:mod:`sdk.opacity`)."""
        src = self._source()
        op = src.opacity
        rows, cols = src.hu.shape[1:]
        if op is None or op.label_map is None or src.z_mm is None:
            return np.zeros(0), np.zeros((0, rows, cols), np.uint8)
        zs = [z for z in range(op.label_map.shape[0]) if op.label_map[z].any()]
        labels = np.stack([op.full_slice(z) for z in zs]) if zs else np.zeros((0, rows, cols), np.uint8)
        return np.asarray(src.z_mm, dtype=np.float64)[zs], labels

    def save_heatmaps(self, out_dir: PathLike, *, top: Optional[int] = None, alpha: float = 0.5) -> List[Path]:
        """Write one reading panel per selected slice (:func:`sdk.heatmap.reading_panel`).

        ``slice_<index:04d>.png`` (``top=k``: only the k slices with the highest positive-class
        probability): a title with the slice index, its z position (mm), its P(positive) and the
        series label; the CAM (JET, positive evidence only, weight growing with the evidence) over
        the lung-windowed slice; the HU opacity map beside it (ground glass yellow, consolidation
        red, with the slice's fractions); a colour bar in logit/pixel. One robust colour scale for
        the whole series (99th percentile of the positive evidence in the lungs over all selected
        slices) so slices compare. Returns the written paths.

        Raises:
            ConfigError: no heat-map data kept, ``top`` not a whole number >= 1, ``alpha`` not a
                number from 0 to 1, ``out_dir`` not a path (or empty).
            ResultWriteError: ``out_dir`` cannot be created or written.
        """
        from .heatmap import (check_alpha, opacity_overlay, overlay, reading_panel, robust_scale, slice_heatmap,
                              window_to_unit, write_png)

        src = self._source()
        alpha = check_alpha(alpha)
        top = whole_number("top", top, what="the slices with the highest P(positive); None: every selected slice")
        out = _heatmap_folder(out_dir)
        pos = self.bundle.get("positive_class", "")
        order = list(range(len(self.slice_scores)))
        if top is not None:
            order = sorted(order, key=lambda j: -self.slice_scores[j].probabilities.get(pos, 0.0))[: int(top)]
        # the series scale, on every 8th pixel of every selected slice (cheap, same distribution)
        rows, cols = src.hu.shape[1:]
        small = [slice_heatmap(src.cams[j], src.class_index, None, ((rows + 7) // 8, (cols + 7) // 8))
                 for j in range(len(self.slice_scores))]
        masks = [src.mask[s.index][4::8, 4::8][: h.shape[0], : h.shape[1]] for s, h in zip(self.slice_scores, small)]
        small = [h[: m.shape[0], : m.shape[1]] for h, m in zip(small, masks)]
        vmax = robust_scale(small, masks)
        p_series = self.probabilities.get(pos)
        paths = []
        for j in sorted(order):
            sc = self.slice_scores[j]
            z = sc.index
            grey = window_to_unit(src.hu[z], src.window)
            cam_img = overlay(grey, self.heatmap(j), src.mask[z], vmax=vmax, alpha=alpha)
            op_img, note = None, ""
            if src.opacity is not None:
                lab = src.opacity.full_slice(z)
                n = max(1, int(np.count_nonzero(src.mask[z])))
                op_img = opacity_overlay(grey, lab, src.mask[z])
                note = (f"slice: GGO {100 * np.count_nonzero(lab == 1) / n:.1f} %, "
                        f"cons. {100 * np.count_nonzero(lab == 2) / n:.1f} % of lung")
            series = f"series: {self.label}" + (f" P={p_series:.2f}" if p_series is not None else "")
            title = f"slice {z}  z = {sc.z_mm:.1f} mm  P({pos}) = {sc.probabilities.get(pos, float('nan')):.2f}  |  {series}"
            img = reading_panel(cam_img, op_img, vmax, title, note)
            paths.append(write_png(out / f"slice_{z:04d}.png", img))
        return paths

    # --- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (plain str/float/int/bool/list/dict/None)."""
        return {
            "label": self.label,
            "probabilities": {k: float(v) for k, v in self.probabilities.items()},
            "eligible": bool(self.eligible),
            "reasons": [str(r) for r in self.reasons],
            "slice_scores": [s.to_dict() for s in self.slice_scores],
            "lung_volume_ml": None if self.lung_volume_ml is None else float(self.lung_volume_ml),
            "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
            "warnings": [str(w) for w in self.warnings],
            "runtime": {k: ({str(a): str(b) for a, b in v.items()} if isinstance(v, dict) else str(v))
                        for k, v in self.runtime.items()},
            "series_uid": self.series_uid,
            "bundle": dict(self.bundle),
            "threshold": None if self.threshold is None else float(self.threshold),
            "shape": None if self.shape is None else [int(v) for v in self.shape],
            "spacing_mm": None if self.spacing_mm is None else [float(v) for v in self.spacing_mm],
            "prior": self.prior,
            "transfers": self.transfers,
            "lung_opacity": self.lung_opacity,
            "statement": RESEARCH_ONLY,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TriageResult":
        """Rebuild a result from :meth:`to_dict` output (without heat-map data)."""
        return cls(
            label=d["label"], probabilities=dict(d["probabilities"]), eligible=bool(d["eligible"]),
            reasons=list(d.get("reasons", [])),
            slice_scores=[SliceScore.from_dict(s) for s in d.get("slice_scores", [])],
            lung_volume_ml=d.get("lung_volume_ml"), timings_ms=dict(d.get("timings_ms", {})),
            warnings=list(d.get("warnings", [])), runtime=dict(d.get("runtime", {})),
            series_uid=d.get("series_uid", ""), bundle=dict(d.get("bundle", {})), threshold=d.get("threshold"),
            shape=d.get("shape"), spacing_mm=d.get("spacing_mm"), prior=d.get("prior"), transfers=d.get("transfers"),
            lung_opacity=d.get("lung_opacity"),
        )


# --- timing ------------------------------------------------------------------------------------

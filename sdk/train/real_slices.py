"""Labelled real HU slices for training and leave-one-series-out evaluation of the slice classifier.

The COVID-CT-MD sample series in ``shared/data/dicom/covid-ct-md`` (``covid-P001``, ``cap-cap001``,
``normal-normal001``) come with radiologists' slice-level infection labels
(``labels/Slice-level-labels-updated-1.npy``: rows = labelled cases, columns = slices, padded to
200; P001 is row 0, cap001 row 55; normals have no row). The columns run head -> feet
(InstanceNumber order), the reverse of our z order: ``sdk.labels.align_slice_labels`` with
``order="reversed"``.

Binary slice label for the ``non_covid`` / ``covid`` classifier: a slice of a COVID series
labelled infected is positive (1); every other slice - a COVID slice without visible infection,
every CAP slice (infected or not), every normal slice - is negative (0). The CAP series'
infected slices are counted separately (``infected``) so that reports can show them.

Inputs are built exactly as at triage (``sdk.triage``): ``sdk.io.load_series`` ->
``sdk.lungs.segment(method="auto")`` -> ``sdk.slices.select_slices`` -> the classifier input of
the selected slices. What is kept (:class:`RealSeries`) is the HU of each selected slice resized
to ``size x size`` with the runtime's rule (``sdk.volume.resample.resize_slices``; the window is
applied afterwards, see :func:`render_inputs`) and its lung mask with the runtime's nearest rule,
so that training can jitter the window; :func:`render_inputs` with the runtime window reproduces
``classifier_inputs`` exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError

__all__ = [
    "COVID_CT_MD_SERIES",
    "RealSeriesSpec",
    "RealSeries",
    "covid_ct_md_specs",
    "load_real_series",
    "render_inputs",
    "save_real_series",
    "load_real_series_cache",
]

LABELS_FILE = "labels/Slice-level-labels-updated-1.npy"


@dataclass(frozen=True)
class RealSeriesSpec:
    """One labelled series: folder, series-level label, row of the slice-label file (None = none)."""

    name: str
    path: Path
    label: str                      # "covid" | "cap" | "normal"
    labels_file: Optional[Path]
    labels_row: Optional[int]


#: (folder name, series label, row in Slice-level-labels-updated-1.npy)
COVID_CT_MD_SERIES: Tuple[Tuple[str, str, Optional[int]], ...] = (
    ("covid-P001", "covid", 0),
    ("cap-cap001", "cap", 55),
    ("normal-normal001", "normal", None),
)


def covid_ct_md_specs(data_root: Path) -> List[RealSeriesSpec]:
    """The three COVID-CT-MD series with their label rows (ConfigError when a file is missing)."""
    base = Path(data_root) / "dicom" / "covid-ct-md"
    labels = base / LABELS_FILE
    if not labels.is_file():
        raise ConfigError(f"{labels}: COVID-CT-MD slice labels not found (expected under shared/data/dicom/covid-ct-md)")
    out = []
    for name, label, row in COVID_CT_MD_SERIES:
        if not (base / name).is_dir():
            raise ConfigError(f"{base / name}: COVID-CT-MD series folder not found")
        out.append(RealSeriesSpec(name, base / name, label, labels if row is not None else None, row))
    return out


@dataclass
class RealSeries:
    """Selected slices of one series at classifier resolution.

    Attributes:
        name: series name (the leave-one-out unit: one patient).
        label: series label ("covid" | "cap" | "normal").
        index: (n,) selected slice indices (z order) in the series.
        hu: (n, S, S) float32 HU resized with the runtime rule (window not applied yet).
        mask: (n, S, S) uint8 lung mask (runtime nearest rule).
        y: (n,) int64 classifier label (1 = infected slice of a COVID series).
        infected: (n,) int64 radiologists' infection label (any class; 0 where no labels exist).
    """

    name: str
    label: str
    index: np.ndarray
    hu: np.ndarray
    mask: np.ndarray
    y: np.ndarray
    infected: np.ndarray


#: COVID-CT-MD's label rows run head -> feet (``sdk.labels.align_slice_labels``)
LABEL_ORDER = "reversed"


def _slice_labels(spec: RealSeriesSpec, n_slices: int) -> np.ndarray:
    from ..labels import align_slice_labels

    if spec.labels_file is None or spec.labels_row is None:
        return np.zeros(n_slices, np.int64)
    try:
        return align_slice_labels(np.load(spec.labels_file)[spec.labels_row], n_slices, LABEL_ORDER)
    except ConfigError as exc:
        raise ConfigError(f"{spec.labels_file} row {spec.labels_row} ({spec.name}): {exc}") from exc


def load_real_series(spec: RealSeriesSpec, size: int = 224, lung_method: str = "auto") -> RealSeries:
    """Load one series the way :class:`sdk.Triage` does and keep its selected slices."""
    from ..io import load_series
    from ..lungs import segment
    from ..slices import select_slices
    from ..volume.resample import nearest_indices, resize_slices

    vol = load_series(spec.path)
    seg = segment(vol, method=lung_method)
    mask = np.asarray(seg.mask)
    idx = np.asarray(select_slices(vol, mask).indices, np.int64)
    hu = resize_slices(np.asarray(vol.hu)[idx], (size, size)).astype(np.float32)
    ny, nx = nearest_indices(mask.shape[1], size), nearest_indices(mask.shape[2], size)
    m = (mask[idx][:, ny][:, :, nx] != 0).astype(np.uint8)
    infected = _slice_labels(spec, vol.hu.shape[0])[idx]
    y = infected if spec.label == "covid" else np.zeros_like(infected)
    return RealSeries(spec.name, spec.label, idx, hu, m, y.astype(np.int64), infected.astype(np.int64))


def render_inputs(hu: np.ndarray, mask: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """``(n, S, S)`` resized HU + masks -> classifier inputs ``(n, 3, S, S)`` float32 (window after
    resizing, as ``sdk.volume.resample.classifier_inputs``)."""
    from ..volume.resample import window_hu

    g = window_hu(hu, window)
    m = (np.asarray(mask) != 0).astype(np.float32)
    return np.stack([g, m, g * m], axis=1).astype(np.float32)


def save_real_series(series: Sequence[RealSeries], path: Path) -> Path:
    """One npz for all series (HU stored as int16 after rounding to 0.25 HU would lose nothing
    the window keeps; we store float16-safe int16 HU * 4)."""
    arrays: Dict[str, np.ndarray] = {"names": np.array([s.name for s in series]), "labels": np.array([s.label for s in series])}
    for i, s in enumerate(series):
        arrays[f"s{i}_index"] = s.index
        arrays[f"s{i}_hu4"] = np.clip(np.round(s.hu * 4.0), -32768, 32767).astype(np.int16)
        arrays[f"s{i}_mask"] = s.mask
        arrays[f"s{i}_y"] = s.y
        arrays[f"s{i}_infected"] = s.infected
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_real_series_cache(path: Path) -> List[RealSeries]:
    """Inverse of :func:`save_real_series` (HU to 0.25 HU)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: real-slice cache not found; build it with `python -m sdk.train.finetune prepare`")
    with np.load(p) as z:
        out = []
        for i, (name, label) in enumerate(zip(z["names"], z["labels"])):
            out.append(RealSeries(str(name), str(label), z[f"s{i}_index"], z[f"s{i}_hu4"].astype(np.float32) / 4.0,
                                  z[f"s{i}_mask"], z[f"s{i}_y"], z[f"s{i}_infected"]))
    return out

"""The one volume type that flows through every stage.

Conventions (see docs/conventions.md):
- ``hu`` is indexed (z, y, x). Canonical orientation: x (columns) increases towards the patient's
  Left, y (rows) towards Posterior, z (slices) towards Superior - i.e. LPS, slices sorted by their
  position along the slice normal, ascending.
- ``z_mm`` holds each slice's position along the normal (mm); spacing in z may be uneven.
- ``affine`` maps (x, y, z) voxel indices (homogeneous, column vector [i, j, k, 1]) to patient LPS mm
  when the slices lie on a regular grid; for an unevenly spaced series it is ``None`` (the reason
  is in ``affine_problem``) and ``voxel_to_lps`` / ``slice_origins_lps`` give the true positions.
Spacing and shape are derived from the arrays, never stored twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

import numpy as np


#: the affine exists when every slice is within this fraction of a z step of where it puts it
AFFINE_MAX_ERROR = 0.05


@dataclass(frozen=True)
class StudyIdentity:
    """Patient and study-time header values, as written (stripped; "" when absent or empty).

    Only for checking that a prior study belongs to the same patient and is earlier
    (:func:`sdk.prior.check_pair`); it is kept out of :meth:`SeriesMeta.to_dict`, ``repr`` and
    every result, so patient identity never reaches a JSON/SR output through it.
    """

    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    study_date: str = ""
    study_time: str = ""
    series_date: str = ""
    series_time: str = ""
    acquisition_date: str = ""
    acquisition_time: str = ""
    content_date: str = ""
    content_time: str = ""
    identity_removed: str = ""        # PatientIdentityRemoved ("YES" on de-identified data)

    @classmethod
    def from_dataset(cls, ds: Any) -> "StudyIdentity":
        """From a pydicom Dataset (any object with DICOM keyword attributes)."""
        def s(kw: str) -> str:
            v = getattr(ds, kw, None)
            return "" if v is None else str(v).strip()

        return cls(patient_id=s("PatientID"), issuer_of_patient_id=s("IssuerOfPatientID"), patient_name=s("PatientName"),
                   patient_birth_date=s("PatientBirthDate"), patient_sex=s("PatientSex"), patient_age=s("PatientAge"),
                   study_date=s("StudyDate"), study_time=s("StudyTime"), series_date=s("SeriesDate"),
                   series_time=s("SeriesTime"), acquisition_date=s("AcquisitionDate"),
                   acquisition_time=s("AcquisitionTime"), content_date=s("ContentDate"), content_time=s("ContentTime"),
                   identity_removed=s("PatientIdentityRemoved").upper())

    def __repr__(self) -> str:  # never print identity by accident (logs, tracebacks)
        return "StudyIdentity(<withheld>)"


@dataclass(frozen=True)
class SeriesMeta:
    """Identity-free summary of the series (no patient name, id, birth date...).

    ``identity`` (patient / study-time headers for the prior-study checks) is the one exception:
    it is excluded from ``to_dict()`` and ``repr``.
    """

    modality: str = ""
    manufacturer: str = ""
    model: str = ""
    kvp: Optional[float] = None
    kernel: str = ""
    slice_thickness_mm: Optional[float] = None   # median over the slices that state one
    slice_thickness_range_mm: Optional[Tuple[float, float]] = None   # (thinnest, thickest) of those
    contrast_agent: str = ""          # ContrastBolusAgent and friends, joined; "" when none
    series_description: str = ""
    body_part: str = ""
    study_uid: str = ""
    series_uid: str = ""
    frame_of_reference_uid: str = ""
    transfer_syntaxes: Tuple[str, ...] = ()
    image_type: Tuple[str, ...] = ()
    gantry_tilt_deg: float = 0.0      # from the slice positions (sdk.io.geometry.tilt_from_offsets); 0 = no shear
    n_files: int = 0
    gantry_tilt_header_deg: Optional[float] = None   # GantryDetectorTilt as written (vendors differ in sign)
    identity: Optional[StudyIdentity] = field(default=None, repr=False)  # None: no DICOM header (not in to_dict)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("identity", None)
        d["transfer_syntaxes"] = list(self.transfer_syntaxes)
        d["image_type"] = list(self.image_type)
        if self.slice_thickness_range_mm is not None:
            d["slice_thickness_range_mm"] = list(self.slice_thickness_range_mm)
        return d


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units with its geometry.

    Attributes:
        hu: (z, y, x) array; int16 when every slice's rescale maps exactly to integers in range,
            float32 otherwise.
        z_mm: (z,) slice positions along the slice normal in mm, ascending (may be uneven).
        pixel_spacing_mm: (row spacing = y, column spacing = x) in mm.
        origin: LPS position (mm) of voxel (x=0, y=0, z=0).
        direction: 3x3, columns are the unit LPS directions of the x, y and z index axes.
        meta: identity-free series summary.
        warnings: every skipped file or fixed quirk, with its reason.
        files: source file per slice, in slice order ("" for in-memory datasets).
    """

    hu: np.ndarray
    z_mm: np.ndarray
    pixel_spacing_mm: Tuple[float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: SeriesMeta = field(default_factory=SeriesMeta)
    warnings: Tuple[str, ...] = ()
    files: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """The contract every stage relies on (the reader's volumes meet it by construction; a
        caller's own Volume is checked here): :class:`~sdk.errors.VolumeError` naming what is wrong."""
        from ..errors import VolumeError

        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise VolumeError(f"Volume.hu must be 3-D (z, y, x), not shape {hu.shape}")
        if hu.dtype == np.bool_ or not np.issubdtype(hu.dtype, np.number):
            raise VolumeError(f"Volume.hu must hold HU numbers, not {hu.dtype}")
        z = np.asarray(self.z_mm, dtype=np.float64)
        if z.ndim != 1 or len(z) != hu.shape[0]:
            raise VolumeError(f"z_mm has {z.size} positions for {hu.shape[0]} slices")
        if not np.isfinite(z).all():
            raise VolumeError(f"z_mm holds NaN / inf (slice {int(np.argmax(~np.isfinite(z)))})")
        steps = np.diff(z)
        if steps.size and not (steps > 0).all():
            k = int(np.argmax(steps <= 0))
            raise VolumeError(f"z_mm must ascend strictly (slice positions in mm, bottom to top): z_mm[{k}] = {z[k]:g} "
                              f"and z_mm[{k + 1}] = {z[k + 1]:g}; sort the slices by position and drop duplicates")
        spacing = tuple(self.pixel_spacing_mm)
        if len(spacing) != 2 or not all(np.isfinite(float(v)) and float(v) > 0 for v in spacing):
            raise VolumeError(f"pixel_spacing_mm must be two finite positive numbers (row, column) in mm, not {spacing}")

    # --- derived geometry ---------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def slice_spacings_mm(self) -> np.ndarray:
        """Distances between consecutive slices (len z-1)."""
        return np.diff(np.asarray(self.z_mm, dtype=np.float64))

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """(z, y, x) spacing in mm; z is the median slice spacing (or the thickness for 1 slice)."""
        d = self.slice_spacings_mm
        if d.size:
            dz = float(np.median(d))
        else:
            dz = float(self.meta.slice_thickness_mm or 1.0)
        return (dz, float(self.pixel_spacing_mm[0]), float(self.pixel_spacing_mm[1]))

    @property
    def uniform_z(self) -> bool:
        d = self.slice_spacings_mm
        return bool(d.size == 0 or np.allclose(d, d[0], rtol=0.01, atol=0.01))

    @property
    def slice_origins_lps(self) -> np.ndarray:
        """(z, 3) LPS position (mm) of voxel (x=0, y=0) of every slice, from ``z_mm`` (exact for
        uneven spacing)."""
        ez = np.asarray(self.direction, dtype=np.float64)[:, 2]
        dz = np.asarray(self.z_mm, dtype=np.float64) - float(self.z_mm[0])
        return np.asarray(self.origin, dtype=np.float64)[None, :] + dz[:, None] * ez[None, :]

    def voxel_to_lps(self, xyz: np.ndarray) -> np.ndarray:
        """LPS mm of voxel indices ``(..., 3)`` as (x, y, z); z may be fractional (interpolated
        between the true slice positions). Valid whether or not :attr:`affine` exists."""
        p = np.asarray(xyz, dtype=np.float64)
        k = np.arange(len(self.z_mm), dtype=np.float64)
        z_rel = np.interp(p[..., 2], k, np.asarray(self.z_mm, dtype=np.float64)) - float(self.z_mm[0])
        d = np.asarray(self.direction, dtype=np.float64)
        dy, dx = self.pixel_spacing_mm
        return (np.asarray(self.origin, dtype=np.float64) + p[..., 0:1] * dx * d[:, 0] + p[..., 1:2] * dy * d[:, 1]
                + z_rel[..., None] * d[:, 2])

    @property
    def affine_problem(self) -> str:
        """Why :attr:`affine` is None ("" when it exists)."""
        z = np.asarray(self.z_mm, dtype=np.float64)
        if z.size < 3:
            return ""
        step = (z[-1] - z[0]) / (z.size - 1)
        err = np.abs(z - (z[0] + step * np.arange(z.size)))
        k = int(np.argmax(err))
        if err[k] <= AFFINE_MAX_ERROR * abs(step):
            return ""
        d = np.diff(z)
        return (f"uneven slice spacing ({d.min():.3f}-{d.max():.3f} mm): a single z step would put slice {k} "
                f"{err[k]:.2f} mm from its true position; use z_mm / voxel_to_lps / slice_origins_lps, "
                "or resample to a regular grid first")

    @property
    def affine(self) -> Optional[np.ndarray]:
        """4x4 voxel (x, y, z, 1) -> LPS mm, or None when no single z step fits the slices.

        The z step is the mean step ``(z_mm[-1] - z_mm[0]) / (n - 1)``; the affine exists only when
        every slice lies within ``AFFINE_MAX_ERROR`` (5 %) of that step from where it puts it, so it
        never lies by more than that. Otherwise see :attr:`affine_problem`.
        """
        if self.affine_problem:
            return None
        z = np.asarray(self.z_mm, dtype=np.float64)
        dz = float((z[-1] - z[0]) / (z.size - 1)) if z.size > 1 else self.spacing[0]
        dy, dx = self.pixel_spacing_mm
        a = np.eye(4)
        a[:3, :3] = np.asarray(self.direction, dtype=np.float64) @ np.diag([dx, dy, dz])
        a[:3, 3] = self.origin
        return a

    @property
    def extent_mm(self) -> Tuple[float, float, float]:
        """Physical (z, y, x) extent covered by the voxels, edge to edge."""
        dz, dy, dx = self.spacing
        z = np.asarray(self.z_mm, dtype=np.float64)
        ez = float(z[-1] - z[0] + dz) if z.size > 1 else dz
        return (ez, self.hu.shape[1] * dy, self.hu.shape[2] * dx)

    def with_hu(self, hu: np.ndarray, **changes: Any) -> "Volume":
        return replace(self, hu=hu, **changes)

    def summary(self) -> Dict[str, Any]:
        """JSON-safe description (no pixel data, no patient identity)."""
        hu = self.hu
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(s, 4) for s in self.spacing],
            "uniform_z": self.uniform_z,
            "affine_problem": self.affine_problem,
            "z_range_mm": [float(self.z_mm[0]), float(self.z_mm[-1])],
            "origin": [float(v) for v in self.origin],
            "direction": np.asarray(self.direction).round(6).tolist(),
            "hu_dtype": str(hu.dtype),
            "hu_range": [float(hu.min()), float(hu.max())] if hu.size else [0.0, 0.0],
            "meta": self.meta.to_dict(),
            "warnings": list(self.warnings),
        }

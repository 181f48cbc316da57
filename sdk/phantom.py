"""Synthetic chest-CT phantom written as real DICOM CT Image Storage series.

Used by tests across the project so that a fresh clone (without ../shared/data) still exercises
ingest, eligibility, resampling and the pipeline end to end. The phantom is analytic: every voxel
is evaluated from closed-form shapes at its physical position, so tilted or shuffled series can be
written and checked against the untilted truth.

Shapes (HU): air -1000 outside the body; body ellipse 40; two lung ellipsoids -850; vessels
(tubes running along z, radius ~2 mm) 40; a spine disc 400; optional ground-glass blob -600 in the
right lung, consolidation blob 0 in the left lung; any extra :class:`Opacity`.

Example:
    >>> from sdk.phantom import make_phantom_hu
    >>> hu = make_phantom_hu(n_slices=8, size=64)
    >>> hu.shape, hu.dtype.name
    ((8, 64, 64), 'int16')
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ConfigError, MissingDependencyError

__all__ = ["Opacity", "PhantomOptions", "make_phantom_hu", "write_phantom_series", "PHANTOM_SYNTAXES", "LOSSLESS_SYNTAXES"]

HU_AIR, HU_BODY, HU_LUNG, HU_VESSEL, HU_BONE = -1000, 40, -850, 40, 400
HU_GGO, HU_CONSOLIDATION = -600, 0

# transfer syntaxes write_phantom_series can produce, and which need an encoder package
PHANTOM_SYNTAXES: Dict[str, str] = {
    "1.2.840.10008.1.2.1": "explicit",
    "1.2.840.10008.1.2": "implicit",
    "1.2.840.10008.1.2.2": "big-endian",
    "1.2.840.10008.1.2.1.99": "deflate",
    "1.2.840.10008.1.2.5": "rle",
    "1.2.840.10008.1.2.4.80": "jpeg-ls",
    "1.2.840.10008.1.2.4.90": "j2k",
}
LOSSLESS_SYNTAXES = tuple(PHANTOM_SYNTAXES)
_ALIASES = {v: k for k, v in PHANTOM_SYNTAXES.items()}


@dataclass(frozen=True)
class Opacity:
    """A spherical blob in fractional volume coordinates.

    Attributes:
        center: (z, y, x) in [0, 1] of the volume extent.
        radius_mm: sphere radius in mm.
        hu: value inside (-600 ground glass, 0 consolidation, ...).
        lung_only: clip the blob to the lungs.
    """

    center: Tuple[float, float, float]
    radius_mm: float
    hu: float
    lung_only: bool = True


def _shapes(n_slices: int, size: int, spacing: Tuple[float, float, float], ground_glass: bool,
            consolidation: bool, opacities: Sequence[Opacity]):
    """Closed-form phantom: returns f(w_mm, u_mm, x_mm) -> HU (float32) on broadcastable grids."""
    dz, dy, dx = (float(s) for s in spacing)
    ez, ey, ex = n_slices * dz, size * dy, size * dx
    cz, cy, cx = ez / 2, ey / 2, ex / 2
    body_a, body_b = 0.45 * ex, 0.36 * ey                    # half axes in x, y
    lung_ax, lung_ay, lung_az = 0.15 * ex, 0.24 * ey, 0.46 * ez
    lung_cx = (cx - 0.19 * ex, cx + 0.19 * ex)            # patient right (low x), left (high x)
    lung_cy = cy - 0.02 * ey
    vessel_r = max(2.0, 1.5 * dx)
    vessels = [(lc + ox * lung_ax, lung_cy + oy * lung_ay) for lc in lung_cx
               for ox, oy in ((-0.4, -0.3), (0.35, 0.1), (0.0, 0.5), (-0.2, -0.6))]
    blobs: List[Opacity] = list(opacities)
    if ground_glass:
        blobs.append(Opacity((0.55, 0.45, 0.30), 0.5 * lung_ax, HU_GGO))
    if consolidation:
        blobs.append(Opacity((0.40, 0.55, 0.70), 0.4 * lung_ax, HU_CONSOLIDATION))

    def f(w: np.ndarray, u: np.ndarray, x: np.ndarray) -> np.ndarray:
        shape = np.broadcast_shapes(w.shape, u.shape, x.shape)
        out = np.full(shape, HU_AIR, dtype=np.float32)
        body = ((x - cx) / body_a) ** 2 + ((u - cy) / body_b) ** 2 <= 1.0
        body = np.broadcast_to(body, shape)
        out[body] = HU_BODY
        lungs = np.zeros(shape, dtype=bool)
        for lx in lung_cx:
            lungs |= (((x - lx) / lung_ax) ** 2 + ((u - lung_cy) / lung_ay) ** 2 + ((w - cz) / lung_az) ** 2) <= 1.0
        lungs &= body
        out[lungs] = HU_LUNG
        for vx, vy in vessels:
            tube = ((x - vx) ** 2 + (u - vy) ** 2 <= vessel_r ** 2) & lungs
            out[tube] = HU_VESSEL
        spine = (x - cx) ** 2 + (u - (cy + 0.27 * ey)) ** 2 <= (0.06 * ex) ** 2
        out[np.broadcast_to(spine, shape) & body] = HU_BONE
        for b in blobs:
            bz, by, bx = b.center[0] * ez, b.center[1] * ey, b.center[2] * ex
            inside = (x - bx) ** 2 + (u - by) ** 2 + (w - bz) ** 2 <= b.radius_mm ** 2
            inside = np.broadcast_to(inside, shape) & (lungs if b.lung_only else body)
            out[inside] = b.hu
        return out

    return f


def make_phantom_hu(n_slices: int = 64, size: int = 128, spacing: Tuple[float, float, float] = (2.0, 0.7, 0.7), *,
                    ground_glass: bool = False, consolidation: bool = False,
                    opacities: Sequence[Opacity] = (), noise_hu: float = 0.0, seed: int = 0) -> np.ndarray:
    """The phantom as an int16 (z, y, x) HU array on the voxel-centre grid.

    Args:
        n_slices, size: array shape (n_slices, size, size).
        spacing: (z, y, x) voxel size in mm.
        ground_glass / consolidation: add the standard blobs (-600 HU / 0 HU).
        opacities: extra blobs (e.g. for longitudinal tests).
        noise_hu: standard deviation of Gaussian noise (0 = none), drawn with ``seed``.
    """
    _check(n_slices, size, spacing)
    f = _shapes(n_slices, size, spacing, ground_glass, consolidation, opacities)
    dz, dy, dx = spacing
    w = ((np.arange(n_slices) + 0.5) * dz)[:, None, None]
    u = ((np.arange(size) + 0.5) * dy)[None, :, None]
    x = ((np.arange(size) + 0.5) * dx)[None, None, :]
    hu = f(w, u, x)
    if noise_hu > 0:
        hu = hu + np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _check(n_slices: int, size: int, spacing: Sequence[float]) -> None:
    if n_slices < 1 or size < 8:
        raise ConfigError(f"phantom needs n_slices >= 1 and size >= 8, not {n_slices} and {size}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ConfigError(f"spacing must be 3 positive mm values (z, y, x), not {tuple(spacing)}")


def _resolve_syntax(transfer_syntax: str) -> str:
    uid = _ALIASES.get(transfer_syntax, transfer_syntax)
    if uid not in PHANTOM_SYNTAXES:
        raise ConfigError(f"phantom cannot write transfer syntax {transfer_syntax!r}; "
                          f"valid: {', '.join(f'{k} ({v})' for k, v in PHANTOM_SYNTAXES.items())}")
    return uid


@dataclass(frozen=True)
class PhantomOptions:
    """What :func:`write_phantom_series` writes (every field has a default; use
    ``dataclasses.replace`` or keyword overrides to change a few).

    Attributes:
        n_slices, size: (z, y, x) shape (n_slices, size, size) of the analytic phantom.
        spacing: (z, y, x) voxel size in mm.
        transfer_syntax: a UID or alias from :data:`PHANTOM_SYNTAXES` (explicit, implicit,
            big-endian, deflate, rle, jpeg-ls, j2k).
        ground_glass, consolidation, opacities, noise_hu, seed: content (see :func:`make_phantom_hu`);
            ``seed`` also drives the file names and the UIDs.
        tilt_deg: gantry tilt: ImageOrientationPatient column vector (0, cos t, -sin t) and slices
            stacked along the table axis z, pixels sampled from the tilted planes (like GE).
        slope, intercept: rescale; ``stored = round((HU - intercept) / slope)``, so HU are exact
            when ``slope`` divides every value.
        per_slice_rescale: alternate slopes 1 / 2 and intercepts between slices.
        missing: slice indices (0-based, before writing) to leave out.
        contrast_agent: written to ContrastBolusAgent (and Route "IV") when non-empty.
        slice_thickness: SliceThickness (default: the z spacing).
        modality, series_uid, study_uid, series_description, image_type: header values (UIDs are
            generated from ``seed`` when None).
        flip_x / flip_y: write a non-LPS but axis-aligned orientation (row direction -x / column
            direction -y; one of them alone makes the slice normal point to -z) for canonicalisation
            tests. The anatomy is the same; only the storage order changes.
        hu: write this (z, y, x) int16 array instead of the analytic phantom (tilt must be 0).
        z0_mm: z position of the first slice.
    """

    n_slices: int = 64
    size: int = 128
    spacing: Tuple[float, float, float] = (2.0, 0.7, 0.7)
    transfer_syntax: str = "1.2.840.10008.1.2.1"
    ground_glass: bool = False
    consolidation: bool = False
    opacities: Sequence[Opacity] = ()
    seed: int = 0
    noise_hu: float = 0.0
    tilt_deg: float = 0.0
    slope: float = 1.0
    intercept: float = -1024.0
    per_slice_rescale: bool = False
    missing: Sequence[int] = ()
    contrast_agent: str = ""
    slice_thickness: Optional[float] = None
    modality: str = "CT"
    series_uid: Optional[str] = None
    study_uid: Optional[str] = None
    series_description: str = "ctsdk phantom"
    flip_x: bool = False
    flip_y: bool = False
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    hu: Optional[np.ndarray] = None
    z0_mm: float = -100.0


def write_phantom_series(out_dir: Union[str, Path], options: Optional[PhantomOptions] = None,
                         **overrides: Any) -> List[Path]:
    """Write the phantom as one DICOM CT Image Storage file per slice.

    File names are random-ish (seeded) so that name order is not slice order.

    Args:
        out_dir: folder to create/fill.
        options: what to write (default ``PhantomOptions()``).
        **overrides: :class:`PhantomOptions` fields replacing those of ``options``
            (``write_phantom_series(d, n_slices=8, size=32)``).

    Returns:
        The written paths, in slice order (index k = slice k).

    Raises:
        ConfigError: unknown override, impossible shape/rescale, unsupported syntax.
        MissingDependencyError: the encoder of a compressed syntax is not installed.
    """
    opts = _options(options, overrides)
    slices_hu, size, ncols = _slice_images(opts)
    ts = _resolve_syntax(opts.transfer_syntax)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(opts, ts, size, ncols)
    rng_names = np.random.default_rng(opts.seed + 7919)
    used: set = set()
    paths: List[Path] = []
    for k in [k for k in range(len(slices_hu)) if k not in set(opts.missing)]:
        ds = _slice_dataset(base, opts, ts, k, slices_hu[k], size, ncols)
        path = out / f"IM{rng_names.integers(0, 16**8):08x}.dcm"   # name order is not slice order
        while path in used:
            path = out / f"IM{rng_names.integers(0, 16**8):08x}.dcm"
        used.add(path)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _options(options: Optional[PhantomOptions], overrides: Dict[str, Any]) -> PhantomOptions:
    opts = options if options is not None else PhantomOptions()
    valid = {f.name for f in fields(PhantomOptions)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"unknown phantom option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return replace(opts, **overrides) if overrides else opts


def _slice_images(opts: PhantomOptions) -> Tuple[List[np.ndarray], int, int]:
    """(int16 HU image per slice, rows, columns): the given ``hu`` or the (tilted) analytic phantom."""
    if opts.hu is not None:
        if opts.tilt_deg:
            raise ConfigError("tilt_deg needs the analytic phantom (hu=None)")
        hu = np.asarray(opts.hu)
        _check(hu.shape[0], hu.shape[1], opts.spacing)
        return [hu[k] for k in range(hu.shape[0])], hu.shape[1], hu.shape[2]
    _check(opts.n_slices, opts.size, opts.spacing)
    dz, dy, dx = (float(v) for v in opts.spacing)
    size = opts.size
    f = _shapes(opts.n_slices, size, opts.spacing, opts.ground_glass, opts.consolidation, opts.opacities)
    t = np.radians(opts.tilt_deg)
    x = ((np.arange(size) + 0.5) * dx)[None, :]
    j = np.arange(size)[:, None]
    rng = np.random.default_rng(opts.seed)
    out = []
    for k in range(opts.n_slices):
        # slice k: normal position w = (k + 0.5) dz; in a tilted plane row j sits at u = j dy - w tan t
        w = np.full((1, 1), (k + 0.5) * dz)
        u = (j + 0.5) * dy - (k * dz) * np.tan(t)
        img = f(w, u, x)
        if opts.noise_hu > 0:
            img = img + rng.normal(0.0, opts.noise_hu, img.shape).astype(np.float32)
        out.append(np.clip(np.rint(img), -1024, 3071).astype(np.int16))
    return out, size, size


_UID_ROOT = "1.2.826.0.1.3680043.8.498."


def _base_dataset(opts: PhantomOptions, ts: str, size: int, ncols: int):
    """Header elements shared by every slice of the series."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    dz, dy, dx = (float(v) for v in opts.spacing)
    n = opts.n_slices if opts.hu is None else int(np.asarray(opts.hu).shape[0])
    study = opts.study_uid or generate_uid(_UID_ROOT, entropy_srcs=[f"study-{opts.seed}"])
    series = opts.series_uid or generate_uid(_UID_ROOT, entropy_srcs=[f"series-{opts.seed}-{ts}-{opts.tilt_deg}-{n}"])
    row_dir, col_dir = _directions(opts)
    thickness = opts.slice_thickness if opts.slice_thickness is not None else dz
    base = Dataset()
    base.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    base.Modality = opts.modality
    base.ImageType = list(opts.image_type)
    base.Manufacturer = "ctsdk"
    base.ManufacturerModelName = "phantom"
    base.StudyInstanceUID = study
    base.SeriesInstanceUID = series
    base.FrameOfReferenceUID = generate_uid(_UID_ROOT, entropy_srcs=[f"for-{opts.seed}"])
    base.SeriesDescription = opts.series_description
    base.SeriesNumber = 1
    base.StudyDate = _dt.datetime(2026, 1, 1, 12, 0, 0).strftime("%Y%m%d")
    base.PatientName = "Phantom^Ctsdk"
    base.PatientID = "PHANTOM"
    base.KVP = 120
    base.ConvolutionKernel = "STANDARD"
    base.BodyPartExamined = "CHEST"
    base.SliceThickness = f"{thickness:g}"
    base.PixelSpacing = [f"{dy:g}", f"{dx:g}"]
    base.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
    base.Rows, base.Columns = int(size), int(ncols)
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.BitsAllocated, base.BitsStored, base.HighBit = 16, 16, 15
    base.PixelRepresentation = 1
    base.RescaleType = "HU"
    if opts.tilt_deg:
        base.GantryDetectorTilt = f"{opts.tilt_deg:g}"
    if opts.contrast_agent:
        base.ContrastBolusAgent = opts.contrast_agent
        base.ContrastBolusRoute = "IV"
    return base


def _directions(opts: PhantomOptions) -> Tuple[np.ndarray, np.ndarray]:
    """(row direction, column direction) of ImageOrientationPatient."""
    t = np.radians(opts.tilt_deg)
    row_dir = np.array([-1.0 if opts.flip_x else 1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(t), -np.sin(t)]) * (-1.0 if opts.flip_y else 1.0)
    return row_dir, col_dir


def _slice_dataset(base, opts: PhantomOptions, ts: str, k: int, image: np.ndarray, size: int, ncols: int):
    """The dataset of slice ``k``: position, identity, rescale and encoded pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    dz, dy, dx = (float(v) for v in opts.spacing)
    ds = Dataset()
    ds.update(base)
    sl, ic = opts.slope, opts.intercept
    if opts.per_slice_rescale and k % 2 == 1:
        sl, ic = opts.slope * 2.0, opts.intercept + 24.0
    stored = np.rint((image.astype(np.float64) - ic) / sl)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ConfigError(f"slope {sl} / intercept {ic} put slice {k} outside int16")
    stored = stored.astype(np.int16)
    if opts.flip_x:
        stored = stored[:, ::-1]
    if opts.flip_y:
        stored = stored[::-1, :]
    # position of pixel (0, 0): table position z_k (+ the in-plane origin); a tilted plane keeps
    # its normal position (k + 0.5) dz by stacking along z by dz / cos(t)
    t = np.radians(opts.tilt_deg)
    zk = opts.z0_mm + k * dz / np.cos(t)
    x0 = -0.5 * ncols * dx + 0.5 * dx + ((ncols - 1) * dx if opts.flip_x else 0.0)
    y0 = -0.5 * size * dy + 0.5 * dy + ((size - 1) * dy * np.cos(t) if opts.flip_y else 0.0)
    z0 = zk - ((size - 1) * dy * np.sin(t) if opts.flip_y else 0.0)
    ds.ImagePositionPatient = [f"{x0:.6f}", f"{y0:.6f}", f"{z0:.6f}"]
    ds.SliceLocation = f"{zk:.6f}"
    ds.InstanceNumber = k + 1
    ds.SOPInstanceUID = generate_uid(_UID_ROOT, entropy_srcs=[str(base.SeriesInstanceUID), str(k)])
    ds.RescaleSlope = f"{sl:g}"
    ds.RescaleIntercept = f"{ic:g}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    _set_pixels(ds, stored, ts)
    return ds


def _set_pixels(ds, stored: np.ndarray, ts: str) -> None:
    """Encode ``stored`` (int16) into ds.PixelData for transfer syntax ``ts``."""
    from pydicom.uid import ExplicitVRBigEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless

    if ts in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        try:
            kwargs: Dict[str, Any] = {"encoding_plugin": "pylibjpeg"} if ts == RLELossless else {}
            kwargs["generate_instance_uid"] = False   # keep the seeded UID (pydicom makes a random one)
            ds.compress(ts, stored, **kwargs)
        except (RuntimeError, ImportError) as exc:
            pkg = {JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg-openjpeg"}.get(ts, "pylibjpeg-rle")
            raise MissingDependencyError(pkg, f"writing a {ts} phantom ({exc})") from exc
        return
    if ts == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(">i2").tobytes()
    else:
        ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"

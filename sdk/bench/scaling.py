"""Series of any slice count made from a real one, for the latency / memory scaling curve.

The source series is loaded with the product's reader (:func:`sdk.io.load_series`, canonical LPS,
HU) and resampled **along z only** to ``n`` slices covering the same physical extent (cell-centre
rule of docs/conventions.md: output slice ``k`` sits at ``t_k = z_0 - dz/2 + (k + 0.5) E / n``,
linear interpolation between the two nearest source slices). So 64 slices of a 296 mm chest are
4.6 mm apart and 600 slices 0.49 mm apart - what a scanner reconstructing thicker or thinner
slices would deliver. ``SliceThickness`` is written as ``min(original thickness, new spacing)``
(thinner-than-spacing slices are a valid gapped reconstruction), so every point of the curve
passes eligibility and runs the whole pipeline.

The slices are written as a **temporary DICOM series on disk** (explicit VR little endian,
signed 16-bit, slope 1, intercept 0, one file per slice, header copied from the source's first
file with geometry, UIDs and pixel tags replaced), so every runtime reads and decodes real files
as it would in production. Uncompressed pixels decode faster than the source's JPEG-lossless
ones: the decode cost of compressed data is in the main table, the curve shows how the rest grows.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError, SeriesError

PathLike = Union[str, os.PathLike]


def z_positions(z_mm: Sequence[float], n_out: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """Output slice positions and their source coordinates (fractional slice indices).

    Returns ``(t_mm, src, new_spacing)`` for ``n_out`` slices spanning the input's extent.
    """
    z = np.asarray(z_mm, dtype=np.float64)
    if z.ndim != 1 or z.size < 2:
        raise ConfigError(f"scaling needs a series of at least 2 slices, got {z.size}")
    if n_out < 2:
        raise ConfigError(f"scaling slice count must be >= 2, got {n_out}")
    dz = float(np.median(np.diff(z)))
    extent = float(z[-1] - z[0] + dz)
    t = z[0] - dz / 2.0 + (np.arange(n_out) + 0.5) * extent / n_out
    src = np.interp(t, z, np.arange(z.size, dtype=np.float64))
    return t, src, extent / n_out


def resample_z(hu: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Linear interpolation of (z, y, x) ``hu`` at fractional slice coordinates ``src``, rounded
    to int16 (computed one output slice at a time, so no float copy of the whole volume)."""
    n_in = hu.shape[0]
    out = np.empty((len(src),) + hu.shape[1:], dtype=np.int16)
    for k, s in enumerate(src):
        s = min(max(float(s), 0.0), n_in - 1.0)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, n_in - 1)
        w = s - i0
        v = hu[i0].astype(np.float32) * (1.0 - w) + hu[i1].astype(np.float32) * w
        out[k] = np.clip(np.rint(v), -32768, 32767).astype(np.int16)
    return out


def _template(volume: Any, source: PathLike) -> Any:
    """Header of the source's first slice file (pixel data dropped), for realistic tags."""
    import pydicom

    files = [f for f in getattr(volume, "files", ()) if f]
    if not files:
        p = Path(source)
        files = sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [str(p)]
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM: try the next file
            continue
        return ds
    raise SeriesError("no readable DICOM file to copy a header from", path=str(source))


def write_z_resampled(source: PathLike, n_slices: int, out_dir: PathLike) -> List[Path]:
    """Write ``source`` resampled along z to ``n_slices`` as a DICOM series in ``out_dir``.

    Returns the written paths in slice order. See the module docstring for the rule.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from ..io import load_series

    volume = load_series(source)
    z = np.asarray(volume.z_mm, dtype=np.float64)
    t, src, spacing = z_positions(z, int(n_slices))
    hu = np.asarray(volume.hu)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    new = resample_z(hu, src)
    template = _template(volume, source)
    direction = np.asarray(volume.direction, dtype=np.float64)
    normal = direction[:, 2]
    origin = np.asarray(volume.origin, dtype=np.float64)
    thick = volume.meta.slice_thickness_mm or spacing
    thickness = min(float(thick), spacing)
    series_uid = generate_uid()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(new.shape[0]):
        ds = copy.deepcopy(template)
        for kw in ("PixelData", "LargestImagePixelValue", "SmallestImagePixelValue", "LossyImageCompression"):
            if kw in ds:
                delattr(ds, kw)
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = f"ctsdk bench z-resampled to {n_slices} slices"
        ds.InstanceNumber = k + 1
        pos = origin + normal * (t[k] - z[0])
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
        ds.SliceLocation = round(float(t[k]), 4)
        ds.SliceThickness = round(thickness, 4)
        ds.SpacingBetweenSlices = round(spacing, 4)
        ds.PixelSpacing = [float(v) for v in volume.pixel_spacing_mm]
        ds.Rows, ds.Columns = int(new.shape[1]), int(new.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(new[k]).astype("<i2").tobytes())
        path = out / f"z{n_slices:04d}_{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["z_positions", "resample_z", "write_z_resampled"]

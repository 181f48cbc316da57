"""DICOM series ingest: scan -> group -> choose -> decode -> HU -> canonical geometry.

Public entry points are :func:`list_series` and :func:`load_series` (re-exported by ``sdk.io``).
The rules (series selection, orientation, tilt, gaps) are documented in docs/ingest.md.
"""
from __future__ import annotations

import logging
import os
import re
import time
import warnings as _pywarnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import (
    ConfigError, CorruptFileError, CtsdkError, SourceNotFoundError, GantryTiltError, GeometryError, MissingSlicesError, MixedSeriesError,
    NoImageSeriesError, NotCTError, NotDicomError, SeriesError, UnsupportedTransferSyntaxError, whole_number,
)
from ..volume.core import SeriesMeta, StudyIdentity, Volume
from . import geometry as geo
from . import parallel
from .decoders import decode_pixels, syntax_name

log = logging.getLogger("sdk.io")

Source = Union[str, os.PathLike, "Any", Sequence[Any]]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NON_IMAGE_MODALITIES = {"SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "KO", "PR", "DOC", "REG", "RWV"}
NOT_DICOM_SUFFIXES = {".md", ".txt", ".csv", ".npy", ".npz", ".json", ".xml", ".png", ".jpg", ".jpeg",
                      ".nrrd", ".nii", ".gz", ".zip", ".pdf", ".py", ".html", ".tsv", ".log"}
DEFAULT_WORKERS = 4


def default_workers(mode: str = "auto") -> int:
    """Decode workers when the caller gives none: for threads (``auto``, ``threads``) one more than
    the usable cores, at most :data:`DEFAULT_WORKERS`; for ``processes`` the cores (at most
    :data:`DEFAULT_WORKERS`); 1 on a single core. A thread's decode holds the GIL for a moment
    (reading the plane's bytes, finding its frame) around the codec call that releases it; a
    worker more than the cores keeps the codec running on every core through those moments
    (covid-P001 on 2 cores: decode 166 -> 149 ms with 3 threads, median of 11; same HU bit for bit)."""
    from ..pools import usable_cores

    cores = usable_cores()
    if cores <= 1:
        return 1
    return min(DEFAULT_WORKERS, cores if mode == "processes" else cores + 1)
DECODE_MODES = ("auto",) + parallel.MODES
TIMING_KEYS = ("scan", "decode", "hu", "geometry")


# --- records ------------------------------------------------------------------------------------
@dataclass
class _Slice:
    """One image plane found in the source (a file, or one frame of a multi-frame file)."""

    path: str
    ds: Any
    frame: Optional[int]
    series_uid: str
    sop_uid: str
    modality: str
    iop: Optional[Tuple[float, ...]]
    ipp: Optional[Tuple[float, float, float]]
    spacing: Tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    syntax: str
    image_type: Tuple[str, ...]
    acquisition: str
    thickness: Optional[float]
    notes: List[str] = field(default_factory=list)
    uid_source: str = "SOPInstanceUID"      # or "MediaStorageSOPInstanceUID" / "file name" (anonymised files)
    instance_number: Optional[str] = None

    @property
    def name(self) -> str:
        """File path (or the instance UID for in-memory datasets) for messages."""
        return self.path or self.sop_uid

    @property
    def geometry_key(self) -> Tuple[Any, ...]:
        iop = None if self.iop is None else tuple(round(v, 3) for v in self.iop)
        return (iop, self.rows, self.cols, round(self.spacing[0], 4), round(self.spacing[1], 4))


@dataclass(frozen=True)
class SeriesInfo:
    """One candidate series found in a source (see :func:`list_series`).

    Attributes:
        uid: id to pass as ``series_uid``: the SeriesInstanceUID, suffixed ``#k`` when one UID holds
            several geometries/acquisitions, or ``unnamed-k`` when the files have no UID.
        description: SeriesDescription ("" when absent).
        modality: Modality ("" when absent).
        n_files: number of image planes (files or frames).
        orientation: "axial", "coronal", "sagittal", "oblique" or "unknown".
        shape: (z, y, x) before any de-duplication.
        transfer_syntaxes: syntax UIDs used by the files.
        chosen: True for the series :func:`load_series` loads by default.
        reason: why it was (not) chosen.
        errors: problems inside this series (duplicates, missing headers...).
        skipped: files under the source that belong to no series, each with its reason.
    """

    uid: str
    description: str
    modality: str
    n_files: int
    orientation: str
    shape: Tuple[int, int, int]
    transfer_syntaxes: Tuple[str, ...]
    chosen: bool
    reason: str
    errors: Tuple[str, ...] = ()
    skipped: Tuple[str, ...] = ()
    image_type: Tuple[str, ...] = ()
    slice_thickness_mm: Optional[float] = None
    pixel_spacing_mm: Tuple[float, float] = (0.0, 0.0)

    def to_dict(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("shape", "transfer_syntaxes", "errors", "skipped", "image_type", "pixel_spacing_mm"):
            d[k] = list(d[k])
        return d


@dataclass
class _Scan:
    slices: List[_Slice]
    bad: List[Tuple[str, SeriesError]]
    notes: List[str]
    single_file: bool


# --- input --------------------------------------------------------------------------------------
def _is_dataset(obj: Any) -> bool:
    try:
        from pydicom.dataset import Dataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, Dataset)


def _check_source(source: Any) -> None:
    """NotDicomError naming the type for a source that is no folder, file, list of those or of
    pydicom Datasets (None, a number, bytes, a mapping, an array): before it is iterated, which would
    raise a bare TypeError or read a bytes object as a list of integers. SourceNotFoundError for an
    empty path (it would scan the working directory)."""
    hint = "pass a folder or file path, or a list of paths / pydicom Datasets"
    if isinstance(source, (str, os.PathLike)):
        if not str(source).strip():  # Path("") is the working directory: never what was meant
            raise SourceNotFoundError("an empty path given", None, f"{hint} ('.' for the working directory)")
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        raise NotDicomError(f"unsupported source of type {type(source).__name__}", None,
                            f"{hint}; for DICOM bytes in memory pass pydicom.dcmread(io.BytesIO(data))")
    if isinstance(source, np.ndarray):
        raise NotDicomError(f"unsupported source of type ndarray (shape {source.shape})", None,
                            f"{hint}; an HU array is triaged as sdk.volume.Volume(hu, ...), not read as DICOM")
    if isinstance(source, dict) or not isinstance(source, Iterable):
        raise NotDicomError(f"unsupported source of type {type(source).__name__}: {source!r:.60}", None, hint)


def _check_arguments(workers: Any, timings: Any, alloc: Any) -> None:
    """ConfigError for a ``workers`` / ``timings`` / ``alloc`` argument of :func:`load_series` that
    breaks its contract (before the source is scanned)."""
    whole_number("workers", workers, what="1: decode in the calling thread; None: the default for the decode mode")
    if timings is not None and not callable(getattr(timings, "update", None)):
        raise ConfigError(f"timings must be a dict to fill with milliseconds per stage, or None, got "
                          f"{type(timings).__name__}")
    if alloc is not None and not callable(alloc):
        raise ConfigError(f"alloc must be a callable alloc(shape, dtype) -> ndarray, or None, got "
                          f"{type(alloc).__name__}")


def _expand(source: Source) -> Tuple[List[Any], bool, List[str]]:
    """Source -> list of paths / datasets; whether it was one file; notes on skipped names."""
    notes: List[str] = []
    if _is_dataset(source):
        return [source], True, notes
    _check_source(source)
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            items: List[Any] = []
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix.lower() in NOT_DICOM_SUFFIXES:
                    notes.append(f"{f}: skipped: not DICOM ({f.suffix} file)")
                    continue
                items.append(str(f))
            if not items:
                raise NoImageSeriesError("folder holds no candidate DICOM files", p,
                                         "point at the folder that holds the series' .dcm files")
            return items, False, notes
        if p.is_file():
            return [str(p)], True, notes
        raise SourceNotFoundError("no such file or folder", p, "check the path")
    items = list(source)
    if not items:
        raise NoImageSeriesError("empty list of files / datasets given", None, "pass a folder or a non-empty list")
    out: List[Any] = []
    for it in items:
        if _is_dataset(it):
            out.append(it)
        elif isinstance(it, (str, os.PathLike)):
            out.append(str(it))
        else:
            raise NotDicomError(f"unsupported source item of type {type(it).__name__}", None,
                                "pass paths or pydicom Datasets")
    return out, len(out) == 1, notes


#: read the headers of plain single-frame files of the lossless archive syntaxes with the fast
#: scan (:mod:`sdk.io.header`: pydicom's values in ~1/3 of the time; covid-P001 scan 135 -> 40 ms,
#: examples/header_scan_bench.py); False reads every file with ``pydicom.dcmread`` (tests compare
#: the two on every file of ../shared/data the scan takes)
FAST_HEADERS = True


def _read(path: str) -> Tuple[Any, List[str]]:
    """The file's header: :func:`sdk.io.header.scan_header` for the plain case, else dcmread with
    deferred pixel data; ACR-NEMA headless files are read with force=True."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    notes: List[str] = []
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise NotDicomError(f"cannot read file: {exc}", path, "check permissions") from None
    if size == 0:
        raise NotDicomError("empty file (0 bytes)", path, "re-copy the file from the source")
    if FAST_HEADERS:
        from .header import scan_header

        try:
            fast = scan_header(path)
        except OSError as exc:
            raise NotDicomError(f"cannot read file: {exc}", path, "check permissions") from None
        if fast is not None:
            return fast, notes
    try:
        with _pywarnings.catch_warnings():
            _pywarnings.simplefilter("ignore")
            return pydicom.dcmread(path, defer_size=2048), notes
    except InvalidDicomError:
        pass
    except Exception as exc:
        raise CorruptFileError(f"DICOM header cannot be parsed ({type(exc).__name__}: {exc})", path,
                               "the file is truncated or corrupt; re-export it") from None
    try:
        with _pywarnings.catch_warnings():
            _pywarnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size=2048, force=True)
            for _elem in ds:   # convert raw elements now, so their (old-style) VR warnings stay silent
                pass
    except Exception:
        ds = None
    if ds is None or "Rows" not in ds or "PixelData" not in ds:
        raise NotDicomError("not a DICOM file (no preamble/DICM prefix and no image elements)", path,
                            "pass DICOM files only")
    _fix_headless(ds)
    notes.append(f"{path}: ACR-NEMA style file without DICOM preamble/file meta; read with force=True, "
                 "assumed Implicit VR Little Endian, MONOCHROME2")
    return ds, notes


def _fix_headless(ds: Any) -> None:
    """Supply the file meta and image-pixel elements a headless ACR-NEMA file lacks."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta = meta
    if "PhotometricInterpretation" not in ds:
        ds.PhotometricInterpretation = "MONOCHROME2"
    if "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
    if "PixelRepresentation" not in ds:
        ds.PixelRepresentation = 0
    if "BitsStored" not in ds and "BitsAllocated" in ds:
        ds.BitsStored = ds.BitsAllocated
    if "HighBit" not in ds and "BitsStored" in ds:
        ds.HighBit = int(ds.BitsStored) - 1


def _floats(value: Any, n: int) -> Optional[Tuple[float, ...]]:
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


#: rescale values beyond these are no CT's (stored values of at most 16 bits map to HU in the tens of
#: thousands); a header that says otherwise is damaged, and the int16 fast path could overflow on it
MAX_ABS_SLOPE = 1e4
MAX_ABS_INTERCEPT = 1e5


def _number(obj: Any, keyword: str, label: str, default: Optional[float],
            notes: Optional[List[str]] = None) -> Optional[float]:
    """The header element ``keyword`` of ``obj`` as a finite float; ``default`` when it is absent or
    empty. One value or nothing: a multi-valued, non-numeric or infinite value is a damaged header -
    :class:`CorruptFileError` naming the file, the element and the value, or, for an element the
    reader can do without (``notes`` given), ``default`` and a note saying it was ignored."""
    raw = getattr(obj, keyword, None) if obj is not None else None
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = None
    if value is not None and np.isfinite(value):
        return value
    many = hasattr(raw, "__iter__") and not isinstance(raw, (str, bytes))
    shown = ("\\".join(str(v) for v in raw) if many else str(raw))[:40]
    if notes is not None:
        notes.append(f"{label}: {keyword} '{shown}' is not one finite number; ignored")
        return default
    raise CorruptFileError(f"{keyword} '{shown}' is not one finite number", label,
                           f"correct {keyword} in the header or re-export the series")


def _optional_text(ds: Any, keyword: str, label: str, notes: List[str]) -> str:
    """An element the reader can do without (InstanceNumber, AcquisitionNumber) as text; "" when
    absent, or - with a note - when its value cannot be converted (an IS of 'inf' raises in pydicom)."""
    try:
        return str(getattr(ds, keyword, "") or "")
    except (ValueError, TypeError, OverflowError):
        notes.append(f"{label}: {keyword} cannot be read; ignored")
        return ""


def _matrix_size(ds: Any, keyword: str, label: str) -> int:
    """Rows / Columns: one positive whole number (CorruptFileError naming the file otherwise)."""
    value = _number(ds, keyword, label, None)
    if value is None or value < 1 or not float(value).is_integer():
        raise CorruptFileError(f"{keyword} {value if value is not None else 'empty'} is not a positive whole number", label,
                               "the image header is damaged; re-export the file")
    return int(value)


def _rescale(obj: Any, label: str) -> Tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of ``obj``: 1 and 0 when absent (a slope of 0, never valid,
    reads as 1, as before); values no CT can have are refused (:data:`MAX_ABS_SLOPE`)."""
    slope = _number(obj, "RescaleSlope", label, 1.0) or 1.0
    intercept = _number(obj, "RescaleIntercept", label, 0.0) or 0.0
    if abs(slope) > MAX_ABS_SLOPE or abs(intercept) > MAX_ABS_INTERCEPT:
        raise CorruptFileError(f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} are no CT's "
                               f"(|slope| <= {MAX_ABS_SLOPE:g}, |intercept| <= {MAX_ABS_INTERCEPT:g})", label,
                               "correct the rescale elements in the header or re-export the series")
    return slope, intercept


def _seq_item(ds: Any, *names: str) -> Any:
    """ds.names[0][0].names[1][0]... or None."""
    cur = ds
    for name in names:
        seq = getattr(cur, name, None)
        if not seq:
            return None
        cur = seq[0]
    return cur


def _slices_from(ds: Any, path: str, label: str) -> List[_Slice]:
    """Validate one dataset and turn it into image planes (one per frame)."""
    sop_class = str(getattr(ds, "SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    modality = str(getattr(ds, "Modality", "") or "").upper()
    if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise NotCTError("a DICOMDIR (media directory), not an image", label,
                         "point at the folder holding the image files instead")
    if "PixelData" not in ds:
        if modality in NON_IMAGE_MODALITIES or not modality:
            raise NotCTError(f"not an image (Modality {modality or 'absent'}, no Pixel Data)", label,
                             "pass the CT image series, not reports or annotations")
        raise CorruptFileError(f"Modality {modality} file has no Pixel Data (truncated header?)", label,
                               "re-export the file")
    if modality in NON_IMAGE_MODALITIES:
        raise NotCTError(f"not a CT image (Modality {modality})", label, "pass the CT image series")
    for tag in ("Rows", "Columns"):
        if tag not in ds:
            raise CorruptFileError(f"missing {tag} element (0028,{'0010' if tag == 'Rows' else '0011'})", label,
                                   "the image header is incomplete; re-export the file")
    notes: List[str] = []
    if not modality:
        notes.append(f"{label}: no Modality element; assumed CT")
    sop, uid_source = _instance_uid(ds, label)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    image_type = tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ()))
    common = dict(
        path=path, ds=ds, series_uid=str(getattr(ds, "SeriesInstanceUID", "") or ""), modality=modality,
        rows=_matrix_size(ds, "Rows", label), cols=_matrix_size(ds, "Columns", label), syntax=syntax, image_type=image_type,
        acquisition=_optional_text(ds, "AcquisitionNumber", label, notes), uid_source=uid_source,
        instance_number=_optional_text(ds, "InstanceNumber", label, notes) or None,
    )
    n_frames = int(_number(ds, "NumberOfFrames", label, 1.0) or 1)
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _frames_from(ds, label, sop, notes, n_frames, common)
    spacing = _floats(getattr(ds, "PixelSpacing", None), 2)
    if spacing is None:
        spacing = (1.0, 1.0)
        notes.append(f"{label}: no PixelSpacing; assumed 1 mm")
    iop = _floats(getattr(ds, "ImageOrientationPatient", None), 6)
    ipp = _floats(getattr(ds, "ImagePositionPatient", None), 3)
    slope, intercept = _rescale(ds, label)
    return [_Slice(frame=None, sop_uid=sop, iop=iop, ipp=ipp, spacing=spacing, slope=slope, intercept=intercept,
                   thickness=_number(ds, "SliceThickness", label, None, notes), notes=notes, **common)]


def _instance_uid(ds: Any, label: str) -> Tuple[str, str]:
    """(SOPInstanceUID, where it came from): the dataset's, else the file meta's, else the file name.

    Anonymisers often blank SOPInstanceUID or write one placeholder into every file; the UID is then
    only a label (slices are told apart by position and pixels, see :func:`_order`).
    """
    sop = str(getattr(ds, "SOPInstanceUID", "") or "").strip()
    if sop:
        return sop, "SOPInstanceUID"
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or "").strip()
    if sop:
        return sop, "MediaStorageSOPInstanceUID"
    return f"file:{label}", "file name"


def _frames_from(ds: Any, label: str, sop: str, notes: List[str], n_frames: int, common: Dict[str, Any]) -> List[_Slice]:
    """Enhanced (multi-frame) image: one plane per frame from the functional groups."""
    per = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if not per or len(per) != n_frames:
        if common["modality"] not in ("CT", ""):
            raise NotCTError(f"not a CT image (Modality {common['modality']}, {n_frames} frames)", label,
                             "pass a CT image series")
        raise GeometryError(f"multi-frame image ({n_frames} frames) without per-frame positions", label,
                            "export the series as single-frame images")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    out = []
    for k, fr in enumerate(per):
        def pick(*names: str) -> Any:
            item = _seq_item(fr, *names)
            return item if item is not None else (_seq_item(shared, *names) if shared is not None else None)

        pos, ori = pick("PlanePositionSequence"), pick("PlaneOrientationSequence")
        meas, pvt = pick("PixelMeasuresSequence"), pick("PixelValueTransformationSequence")
        ipp = _floats(getattr(pos, "ImagePositionPatient", None), 3) if pos is not None else None
        iop = _floats(getattr(ori, "ImageOrientationPatient", None), 6) if ori is not None else None
        spacing = _floats(getattr(meas, "PixelSpacing", None), 2) if meas is not None else None
        if ipp is None or iop is None or spacing is None:
            raise GeometryError(f"frame {k + 1} of {n_frames} lacks position, orientation or pixel spacing", label,
                                "export the series as single-frame images")
        slope, intercept = _rescale(pvt if pvt is not None else ds, label)
        out.append(_Slice(frame=k, sop_uid=f"{sop}#{k + 1}", iop=iop, ipp=ipp, spacing=spacing, slope=slope,
                          intercept=intercept, thickness=_number(meas, "SliceThickness", label, None, notes if k == 0 else []),
                          notes=notes if k == 0 else [], **common))
    return out


def _interpret(ds: Any, path: str, label: str) -> List[_Slice]:
    """:func:`_slices_from`, with a header element whose value cannot be converted (pydicom's value
    conversion raising e.g. OverflowError for an IS of 'inf', TypeError for a VM it does not expect)
    as a CorruptFileError naming the file: the file is unusable, the scan goes on."""
    try:
        return _slices_from(ds, path, label)
    except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
        raise CorruptFileError(f"a header element cannot be read ({type(exc).__name__}: {str(exc)[:120]})", label,
                               "re-export the file") from exc


def _scan(source: Source) -> _Scan:
    items, single, notes = _expand(source)
    slices: List[_Slice] = []
    bad: List[Tuple[str, SeriesError]] = []
    for idx, item in enumerate(items):
        if isinstance(item, str):
            label = item
            try:
                ds, read_notes = _read(item)
                found = _interpret(ds, item, label)
            except SeriesError as exc:
                bad.append((label, exc))
                continue
            notes.extend(read_notes)
        else:
            label = str(getattr(item, "filename", "") or f"<dataset {idx}>")
            try:
                found = _interpret(item, "", label)
            except SeriesError as exc:
                bad.append((label, exc))
                continue
        slices.extend(found)
    return _Scan(slices, bad, notes, single)


# --- grouping and choice --------------------------------------------------------------------------
@dataclass
class _Group:
    uid: str
    slices: List[_Slice]
    errors: List[str] = field(default_factory=list)

    @property
    def first(self) -> _Slice:
        return self.slices[0]

    @property
    def modality(self) -> str:
        return self.first.modality

    @property
    def orientation(self) -> str:
        return "unknown" if self.first.iop is None else geo.orientation_label(self.first.iop)

    @property
    def description(self) -> str:
        v = getattr(self.first.ds, "SeriesDescription", None)
        return "" if v is None else str(v)

    @property
    def thickness(self) -> Optional[float]:
        vals = [s.thickness for s in self.slices if s.thickness]
        return float(np.median(vals)) if vals else None

    @property
    def thickness_range(self) -> Optional[Tuple[float, float]]:
        vals = [float(s.thickness) for s in self.slices if s.thickness]
        return (min(vals), max(vals)) if vals else None

    @property
    def syntaxes(self) -> Tuple[str, ...]:
        return tuple(sorted({s.syntax for s in self.slices}))

    @property
    def derived(self) -> bool:
        it = self.first.image_type
        return bool(it) and (it[0] == "DERIVED" or "LOCALIZER" in it or "SECONDARY" in it)

    @property
    def is_ct(self) -> bool:
        return self.modality in ("CT", "")

    def rank(self) -> Tuple[Any, ...]:
        """Higher is better: CT, axial, ORIGINAL, most planes, thinnest."""
        return (self.is_ct, self.orientation == "axial", not self.derived, len(self.slices),
                -(self.thickness or 1e9))


#: at least this many single-image "series" of one geometry, at distinct positions, are read as
#: one series whose SeriesInstanceUID an anonymiser regenerated for every file
MIN_SPLIT_SERIES = 10


def _study_uid(s: _Slice) -> str:
    return str(getattr(s.ds, "StudyInstanceUID", "") or "")


def _merge_split_series(groups: List[_Group]) -> List[_Group]:
    """Single-image groups that are one series whose SeriesInstanceUID differs on every file.

    Merged when at least :data:`MIN_SPLIT_SERIES` single-frame images share modality, geometry
    (orientation, matrix, pixel spacing), ImageType and slice thickness, lie at distinct positions,
    and either share one StudyInstanceUID or each carry their own (the anonymiser regenerated every
    UID). Images of two real studies (each UID on several files) are never merged; nor is anything
    that already forms a multi-image series. The merged group carries a note that names the damage.
    """
    by_key: Dict[Tuple[Any, ...], List[_Group]] = {}
    for g in groups:
        s = g.first
        if len(g.slices) == 1 and s.frame is None and s.ipp is not None and s.iop is not None:
            by_key.setdefault((s.modality, s.geometry_key, s.image_type[:2], s.thickness), []).append(g)
    merged: Dict[int, _Group] = {}
    drop: set = set()
    for members in by_key.values():
        if len(members) < MIN_SPLIT_SERIES:
            continue
        positions = {tuple(round(v, 2) for v in m.first.ipp) for m in members}   # type: ignore[union-attr]
        studies = [_study_uid(m.first) for m in members]
        if len(positions) != len(members) or len(set(studies)) not in (1, len(members)):
            continue
        uids = [m.uid for m in members]
        group = _Group(f"{uids[0]}+{len(uids) - 1}", [m.first for m in members])
        group.errors.append(
            f"series {group.uid}: {len(members)} single-image series with one geometry and distinct positions "
            f"({'one StudyInstanceUID' if len(set(studies)) == 1 else 'a StudyInstanceUID per file'}) loaded as "
            f"one series: their SeriesInstanceUID differs on every file (an anonymiser that regenerated UIDs "
            f"per file?); first {uids[0]}, last {uids[-1]}")
        merged[id(members[0])] = group
        drop.update(id(m) for m in members[1:])
    return [merged.get(id(g), g) for g in groups if id(g) not in drop]


def _group(slices: List[_Slice]) -> List[_Group]:
    """SeriesInstanceUID first; split by geometry, then by acquisition where positions collide;
    then single-image series that are one series split by per-file UIDs are merged back
    (:func:`_merge_split_series`)."""
    by_uid: Dict[str, List[_Slice]] = {}
    for s in slices:
        by_uid.setdefault(s.series_uid, []).append(s)
    groups: List[_Group] = []
    unnamed = 0
    for uid, members in by_uid.items():
        by_geo: Dict[Tuple[Any, ...], List[_Slice]] = {}
        for s in members:
            by_geo.setdefault(s.geometry_key, []).append(s)
        parts: List[List[_Slice]] = []
        for part in by_geo.values():
            parts.extend(_split_acquisitions(part))
        for k, part in enumerate(parts):
            if uid:
                gid = uid if len(parts) == 1 else f"{uid}#{k + 1}"
            else:
                unnamed += 1
                gid = f"unnamed-{unnamed}"
            groups.append(_Group(gid, part))
    return _merge_split_series(groups)


def _split_acquisitions(part: List[_Slice]) -> List[List[_Slice]]:
    """Split by AcquisitionNumber only when two images share a position.

    Instance UIDs are not trusted here (anonymisers blank them or write one placeholder into every
    file), so a collision is any two planes at one position, whatever their UIDs.
    """
    seen: set = set()
    collide = False
    for s in part:
        if s.ipp is None:
            continue
        key = tuple(round(v, 2) for v in s.ipp)
        if key in seen:
            collide = True
            break
        seen.add(key)
    acqs = sorted({s.acquisition for s in part})
    if not collide or len(acqs) < 2:
        return [part]
    return [[s for s in part if s.acquisition == a] for a in acqs]


def _n_positions(slices: Sequence[_Slice]) -> int:
    """Distinct ImagePositionPatient values (to 1e-3 mm) among ``slices`` that have one."""
    return len({tuple(round(v, 3) for v in s.ipp) for s in slices if s.ipp is not None})


def _describe_rank(g: _Group) -> str:
    it = "\\".join(g.first.image_type[:2]) or "no ImageType"
    thick = f"{g.thickness:g} mm" if g.thickness else "thickness unknown"
    n = len(g.slices)
    at = _n_positions(g.slices)
    planes = f"{n} planes" if at in (0, n) else f"{n} planes at {at} position(s)"  # copies are counted by file
    return f"{g.modality or 'no modality'}, {g.orientation}, {it}, {planes}, {thick}"


def _choose(groups: List[_Group], series_uid: Optional[str], where: str) -> Tuple[_Group, str]:
    if series_uid is not None:
        exact = [g for g in groups if g.uid == series_uid]
        if not exact:
            split = [g for g in groups if g.uid.split("#")[0] == series_uid]
            if len(split) == 1:
                exact = split
            elif split:
                raise MixedSeriesError(
                    f"SeriesInstanceUID {series_uid} holds {len(split)} geometries/acquisitions: "
                    + ", ".join(g.uid for g in split), where, "pass one of those ids as series_uid")
        if not exact:
            raise NoImageSeriesError(f"no series {series_uid!r}; found: " + ", ".join(g.uid for g in groups), where,
                                     "run `ctsdk inspect` to list the series")
        return exact[0], f"selected by series_uid {series_uid}"
    ct = [g for g in groups if g.is_ct]
    if not ct:
        mods = sorted({g.modality for g in groups})
        files = ", ".join(g.first.path or g.uid for g in groups[:3])
        raise NotCTError(f"no CT image series (found Modality {', '.join(mods)} in {files})", where,
                         "pass a CT series")
    ranked = sorted(ct, key=lambda g: g.rank(), reverse=True)
    best = ranked[0]
    ties = [g for g in ranked[1:] if g.rank() == best.rank()]
    if ties:
        raise MixedSeriesError(
            f"{len(ties) + 1} equally ranked series ({_describe_rank(best)}): "
            + ", ".join(g.uid for g in [best] + ties), where, "choose one with series_uid (see `ctsdk inspect`)")
    reason = f"best by rule CT > axial > ORIGINAL > most planes > thinnest: {_describe_rank(best)}"
    if len(groups) > 1:
        reason += f"; {len(groups) - 1} other series not loaded"
    return best, reason


# --- public API ----------------------------------------------------------------------------------
def _where(source: Source) -> Optional[str]:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return None


def _raise_nothing_usable(scan: _Scan, where: Optional[str]) -> None:
    """No image planes at all: raise the most specific error naming the files."""
    if scan.single_file and len(scan.bad) == 1:
        raise scan.bad[0][1]
    if not scan.bad:
        raise NoImageSeriesError("no DICOM image files found", where, "point at a folder of CT .dcm files")
    kinds = {type(e) for _, e in scan.bad}
    listing = "; ".join(f"{Path(p).name}: {e.problem}" for p, e in scan.bad[:6])
    more = f" (+{len(scan.bad) - 6} more)" if len(scan.bad) > 6 else ""
    cls = kinds.pop() if len(kinds) == 1 else NoImageSeriesError
    raise cls(f"no usable CT image file among {len(scan.bad)}: {listing}{more}", where,
              "pass a folder with a CT image series")


def _skipped(scan: _Scan) -> List[str]:
    return list(scan.notes) + [f"{p}: skipped: {e.problem}" + (f" ({e.hint})" if e.hint else "")
                               for p, e in scan.bad]


def _infos(scan: _Scan, groups: List[_Group], where: Optional[str]) -> List[SeriesInfo]:
    try:
        chosen, reason = _choose(groups, None, where or "")
        choice_error = ""
    except SeriesError as exc:
        chosen, reason, choice_error = None, "", exc.problem
    skipped = tuple(_skipped(scan))
    ordered = sorted(groups, key=lambda g: g.rank(), reverse=True)
    ordered.sort(key=lambda g: g is not chosen)
    infos = []
    for g in ordered:
        f = g.first
        if g is chosen:
            why = reason
        elif choice_error:
            why = f"not chosen: {choice_error}"
        else:
            why = f"not chosen: {_describe_rank(g)}"
        errs = tuple(g.errors) + tuple(n for s in g.slices for n in s.notes) + tuple(_identity_warnings(g.uid, g.slices))
        infos.append(SeriesInfo(
            uid=g.uid, description=g.description, modality=g.modality, n_files=len(g.slices),
            orientation=g.orientation, shape=(len(g.slices), f.rows, f.cols), transfer_syntaxes=g.syntaxes,
            chosen=g is chosen, reason=why, errors=errs, skipped=skipped, image_type=f.image_type,
            slice_thickness_mm=g.thickness, pixel_spacing_mm=f.spacing,
        ))
    return infos


def _scan_groups(source: Source) -> Tuple[_Scan, List[_Group], Optional[str]]:
    where = _where(source)
    scan = _scan(source)
    if not scan.slices:
        _raise_nothing_usable(scan, where)
    return scan, _group(scan.slices), where


def list_series(source: Source) -> List[SeriesInfo]:
    """Every image series in ``source`` with the default choice marked.

    Args:
        source: folder (searched recursively), file path, list of paths, or pydicom Datasets.

    Returns:
        One :class:`SeriesInfo` per series (split by geometry/acquisition), the chosen one first.
        When no series can be chosen (no CT, or a tie) every entry says why in ``reason``.

    Raises:
        SeriesError subclass: nothing in the source is a DICOM image (the most specific error).
    """
    scan, groups, where = _scan_groups(source)
    return _infos(scan, groups, where)


def series_files(source: Source) -> List[Tuple[str, Tuple[str, ...]]]:
    """The series of ``source`` as :func:`list_series` groups them - ``(id, file paths)`` each, in
    scan order - for callers that hand files on (the batch engine's discovery). Files that are no
    image are left out (:func:`list_series` names them).

    Raises:
        SeriesError subclass: nothing in the source is a DICOM image.
    """
    _, groups, _ = _scan_groups(source)
    return [(g.uid, tuple(dict.fromkeys(s.path for s in g.slices if s.path))) for g in groups]


def regroup_single_files(files: Sequence[str]) -> List[Tuple[str, Tuple[str, ...]]]:
    """Of files that each arrived as a series of their own, the groups the reader reads as one
    series (an anonymiser regenerated every file's SeriesInstanceUID: :data:`MIN_SPLIT_SERIES` or
    more images of one geometry at distinct positions) - ``(reader id, files)`` for each group of
    two or more, for callers that group files before reading them (the batch's discovery, the
    listener's store). Empty when fewer files are given or none of them is a DICOM image."""
    if isinstance(files, (str, bytes, os.PathLike)) or not isinstance(files, Sequence):
        raise ConfigError(f"files must be a list of file paths, got {type(files).__name__} {files!r:.60}")
    if len(files) < MIN_SPLIT_SERIES:
        return []
    try:
        found = series_files(sorted(files))
    except CtsdkError as exc:
        log.info("%d single-file series not regrouped: %s", len(files), exc)
        return []
    given = set(files)
    return [(uid, fs) for uid, fs in found if len(fs) >= 2 and all(f in given for f in fs)]


def load_series(source: Source, series_uid: Optional[str] = None, *, allow_tilt: bool = True,
                allow_gaps: bool = False, workers: Optional[int] = None, progress: bool = False,
                decode: str = "auto", timings: Optional[Dict[str, float]] = None,
                alloc: Optional[Callable[[Tuple[int, ...], Any], np.ndarray]] = None) -> Volume:
    """Load one CT series as a :class:`~sdk.volume.Volume` in HU, canonical LPS orientation.

    Args:
        source: folder (recursive), file path, list of paths, or pydicom Datasets.
        series_uid: pick this series (a SeriesInfo.uid) instead of the default choice.
        allow_tilt: correct gantry tilt by shearing each slice in-plane (else raise GantryTiltError).
        allow_gaps: keep series with missing slices (a warning) instead of raising MissingSlicesError.
        workers: decode workers in all, the calling process included (None: :func:`default_workers`:
            threads the usable cores + 1, processes the cores, at most 4; 1: decode in the calling thread).
        progress: show a tqdm bar on stderr while decoding.
        decode: ``"auto"`` (threads; serial for tiny series), ``"processes"``, ``"threads"`` or
            ``"serial"``. imagecodecs (first for the lossless syntaxes) releases the GIL, so threads
            decode in parallel; pylibjpeg / GDCM (lossy JPEG, fallbacks) hold it, where only
            processes run in parallel (docs/benchmarks/ingest.md). Every mode gives the same HU, bit
            for bit. ``processes`` falls back to threads where ``os.fork`` does not exist.
        timings: if given, filled with wall-clock milliseconds per stage (keys added where the
            stage ran; the values add up to the load's wall time up to a few ms of bookkeeping):

            - ``"scan"``: listing the source and reading every file's header (pixel data is
              deferred), grouping and choosing the series;
            - ``"decode"``: reading and decoding the pixel data of the chosen series;
            - ``"hu"``: stored values -> HU written into the volume (and the float32 redo when an
              integer rescale overflows int16). Decode and HU run together per slice in the
              workers; the wall time of that phase is split between them in proportion to the
              time the workers spent in each;
            - ``"geometry"``: ordering, gap and duplicate checks, tilt correction and the
              canonical LPS re-orientation.

            Only these four keys are written (the mode that ran is logged at DEBUG on ``sdk.io``).
        alloc: ``alloc(shape, dtype) -> ndarray`` for the HU buffer the planes are decoded into by
            threads (e.g. page-locked memory for one asynchronous GPU upload); default ``np.empty``.
            The ``processes`` mode decodes into its own shared mapping and ignores it.

    Raises:
        SeriesError subclass naming the file(s) and the problem (see sdk.errors); NotDicomError
            also for a source of the wrong kind (None, a number, bytes, a mapping, an array).
        ConfigError: unknown ``decode`` mode; ``workers`` not a whole number >= 1; ``timings`` not
            a dict; ``alloc`` not callable or returning a buffer of another shape / dtype.
    """
    return inspect_and_load(source, series_uid, allow_tilt=allow_tilt, allow_gaps=allow_gaps,
                            workers=workers, progress=progress, decode=decode, timings=timings, alloc=alloc)[1]


def inspect_and_load(source: Source, series_uid: Optional[str] = None, *, allow_tilt: bool = True,
                     allow_gaps: bool = False, workers: Optional[int] = None, progress: bool = False,
                     decode: str = "auto", timings: Optional[Dict[str, float]] = None,
                     alloc: Optional[Callable[[Tuple[int, ...], Any], np.ndarray]] = None
                     ) -> Tuple[List[SeriesInfo], Volume]:
    """:func:`list_series` and :func:`load_series` from one scan of the source (same arguments
    and ``timings`` keys as :func:`load_series`)."""
    if decode not in DECODE_MODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, not {decode!r}")
    _check_arguments(workers, timings, alloc)
    t0 = time.perf_counter()
    scan, groups, where = _scan_groups(source)
    infos = _infos(scan, groups, where)
    group, reason = _choose(groups, series_uid, where or "")
    warnings = _skipped(scan)
    if len(groups) > 1:  # a choice was made: say which and why (one series is no news)
        warnings.append(f"series {group.uid}: {reason}")
    else:
        log.debug("series %s: %s", group.uid, reason)
    for g in groups:
        if g is not group:
            warnings.append(f"series {g.uid} not loaded ({_describe_rank(g)})")
    clock = _Clock({"scan": (time.perf_counter() - t0) * 1000.0})
    vol = _load_group(group, warnings, allow_tilt=allow_tilt, allow_gaps=allow_gaps, workers=workers,
                      progress=progress, single=scan.single_file, decode=decode, clock=clock,
                      alloc=alloc, skipped=scan.bad)
    if timings is not None:
        timings.update(clock.ms)
    return infos, vol


class _Clock:
    """Wall-clock milliseconds per stage (see load_series' ``timings``)."""

    def __init__(self, ms: Optional[Dict[str, float]] = None) -> None:
        self.ms: Dict[str, float] = dict(ms or {})
        self._t = time.perf_counter()

    def lap(self, key: str) -> None:
        """Add the time since the previous lap to ``key``."""
        now = time.perf_counter()
        self.ms[key] = self.ms.get(key, 0.0) + (now - self._t) * 1000.0
        self._t = now

    def split(self, stats: "DecodeStats") -> None:
        """Book the time since the previous lap as decode + HU, split as the workers spent it."""
        now = time.perf_counter()
        wall = (now - self._t) * 1000.0
        busy = stats.decode_s + stats.hu_s
        share = stats.decode_s / busy if busy > 0 else 1.0
        self.ms["decode"] = self.ms.get("decode", 0.0) + wall * share
        self.ms["hu"] = self.ms.get("hu", 0.0) + wall * (1.0 - share)
        self._t = now


_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_SHARED_UID_NOTES = 3


def _uid_conforms(uid: str) -> bool:
    """DICOM PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters."""
    return len(uid) <= 64 and bool(_UID_RE.match(uid))


def _identity_warnings(gid: str, slices: List[_Slice]) -> List[str]:
    """Series-level notes on damaged instance identity (anonymisers): missing, shared or
    non-conforming SOPInstanceUIDs, missing InstanceNumber. None of them drops a slice."""
    out: List[str] = []
    n = len(slices)
    for src, how in (("MediaStorageSOPInstanceUID", "used the file meta's MediaStorageSOPInstanceUID"),
                     ("file name", "used the file name")):
        lacking = [s for s in slices if s.uid_source == src]
        if lacking:
            out.append(f"series {gid}: {len(lacking)} of {n} files have no SOPInstanceUID; {how} "
                       f"(first: {lacking[0].name})")
    by_uid: Dict[str, List[_Slice]] = {}
    for s in slices:
        by_uid.setdefault(s.sop_uid, []).append(s)
    shared = [(uid, m) for uid, m in by_uid.items() if len(m) > 1]
    for uid, members in shared[:MAX_SHARED_UID_NOTES]:
        where = _n_positions(members)
        if where <= 1:  # copies of one instance: said as such, not as distinct slices
            out.append(f"series {gid}: {len(members)} files share SOPInstanceUID {uid} at one position: copies of one "
                       "image - one is kept when their pixels are identical, different pixels are refused (checked "
                       "when decoded)")
            continue
        out.append(f"series {gid}: {len(members)} files share SOPInstanceUID {uid} at {where} distinct "
                   "position(s): kept as distinct slices; only a copy at the same position with identical "
                   "pixels is dropped as a duplicate")
    if len(shared) > MAX_SHARED_UID_NOTES:
        out.append(f"series {gid}: {len(shared) - MAX_SHARED_UID_NOTES} more SOPInstanceUIDs are shared by several files")
    bad = [s for s in slices if s.uid_source != "file name" and not _uid_conforms(s.sop_uid.split("#")[0])]
    if bad:
        out.append(f"series {gid}: {len(bad)} of {n} files carry a non-conforming instance UID "
                   f"(e.g. {bad[0].sop_uid!r} in {bad[0].name}); loaded anyway (UIDs are not used to order slices)")
    no_number = [s for s in slices if s.instance_number is None]
    if no_number:
        out.append(f"series {gid}: {len(no_number)} of {n} files have no InstanceNumber (not needed: slices are "
                   "ordered by ImagePositionPatient)")
    return out


def _decode_one(s: _Slice) -> np.ndarray:
    arr, _plugin = decode_pixels(s.ds, s.path or s.sop_uid)
    if s.frame is not None:
        arr = arr[s.frame] if arr.ndim == 3 else arr
    if arr.shape != (s.rows, s.cols):
        raise CorruptFileError(f"decoded pixels have shape {arr.shape}, header says {(s.rows, s.cols)}",
                               s.path or s.sop_uid, "the file is not a single-channel image; re-export it")
    return arr


def _hu_dtype(slices: List[_Slice]) -> np.dtype:
    """int16 when every slope and intercept is an integer (exact HU), else float32."""
    exact = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    return np.dtype(np.int16) if exact else np.dtype(np.float32)


def _int16_view(stored: np.ndarray) -> Optional[np.ndarray]:
    """``stored`` as int16 without a copy when that is exact (int16, or uint16 below 2^15), else None."""
    if stored.dtype == np.int16:
        return stored
    if stored.dtype == np.uint16 and (not stored.size or int(stored.max()) <= 32767):
        return stored.view(np.int16)
    return None


def _store_hu(out: np.ndarray, k: int, stored: np.ndarray, s: _Slice) -> bool:
    """out[k] = stored * slope + intercept; False when an int16 volume would overflow."""
    if out.dtype == np.int16:
        fast = _int16_view(stored) if s.slope == 1 and -32768 <= int(s.intercept) <= 32767 else None
        if fast is not None:                  # one int16 pass, no int32 copy (the usual CT case)
            if fast.size and (int(fast.min()) + int(s.intercept) < -32768 or int(fast.max()) + int(s.intercept) > 32767):
                return False
            np.add(fast, np.int16(s.intercept), out=out[k])
            return True
        v = stored.astype(np.int32)
        if s.slope != 1:
            v *= int(s.slope)
        if s.intercept:
            v += int(s.intercept)
        if v.size and (v.min() < -32768 or v.max() > 32767):
            return False
        out[k] = v
    else:
        out[k] = stored.astype(np.float64) * s.slope + s.intercept
    return True


@dataclass
class DecodeStats:
    """What the decode phase did: mode used and summed per-slice seconds (all workers)."""

    mode: str = "serial"
    decode_s: float = 0.0     # reading the pixel bytes + decoding them
    hu_s: float = 0.0         # stored -> HU into the volume
    wall_s: float = 0.0


def _decode_mode(slices: List[_Slice], mode: str, n: int) -> str:
    """``auto``: threads. The first decoder of the lossless syntaxes (imagecodecs) releases the
    GIL, so threads decode in parallel (covid-P001 on 2 threads: 0.28 s against 0.73 s with GDCM;
    docs/benchmarks/ingest.md). Forked processes (``decode="processes"``) get around the GIL that
    pylibjpeg / GDCM hold for the other syntaxes (sdk.io.parallel), but forking a process that
    already runs ONNX Runtime / CUDA threads (an integrator's application) is not a safe default.
    Opt in where cores are many and the syntax is lossy JPEG."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    if n <= 1 or len(slices) < 4:
        return "serial"
    return "threads"


def _decode_job(slices: List[_Slice], out: np.ndarray, k: int) -> Tuple[str, float, float, Any]:
    """Decode plane k into ``out[k]`` (HU). Returns (status "ok" / "overflow" / "error", decode s,
    HU s, (error class name, problem, path, hint) or None). Never raises (runs in workers)."""
    s = slices[k]
    t0 = time.perf_counter()
    try:
        stored = _decode_one(s)
    except SeriesError as exc:
        return "error", time.perf_counter() - t0, 0.0, (type(exc).__name__, exc.problem, exc.path, exc.hint)
    except Exception as exc:  # decoders raise many types; keep it typed and named
        return "error", time.perf_counter() - t0, 0.0, (
            "CorruptFileError", f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", s.name,
            "re-export the file")
    finally:
        if s.frame is None and s.path:   # drop the raw bytes as soon as the plane is done
            try:
                del s.ds.PixelData
            except Exception:
                pass
    t1 = time.perf_counter()
    ok = _store_hu(out, k, stored, s)
    return ("ok" if ok else "overflow"), t1 - t0, time.perf_counter() - t1, None


_ERRORS = {c.__name__: c for c in (CorruptFileError, UnsupportedTransferSyntaxError, NotCTError, NotDicomError,
                                    GeometryError, SeriesError)}


def _decode_into(slices: List[_Slice], out: np.ndarray, workers: Optional[int], progress: bool,
                 mode: str = "auto", stats: Optional[DecodeStats] = None
                 ) -> Tuple[Dict[int, SeriesError], List[int]]:
    """Decode every plane straight into ``out`` (HU): decode and rescale run together per plane, in
    ``mode`` (see :func:`_decode_mode`); ``out`` must come from :func:`parallel.shared_empty` for
    ``processes``. Returns (failures by slice index, indices that overflowed int16).
    """
    failures: Dict[int, SeriesError] = {}
    overflow: List[int] = []
    st = stats if stats is not None else DecodeStats()
    n = workers if workers is not None else default_workers(mode)
    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(slices), desc="decode", unit="slice", leave=False)
    if any(s.frame is not None for s in slices):
        _decode_frames(slices, out, failures, overflow, st, bar)
        st.mode = "serial"
    else:
        results, st.mode = parallel.map_indices(
            len(slices), lambda k: _decode_job(slices, out, k), mode=_decode_mode(slices, mode, n), workers=n,
            on_done=None if bar is None else bar.update)
        for k, (status, dec_s, hu_s, err) in enumerate(results):
            st.decode_s += dec_s
            st.hu_s += hu_s
            if status == "overflow":
                overflow.append(k)
            elif status == "error":
                cls, problem, path, hint = err
                failures[k] = _ERRORS.get(cls, CorruptFileError)(problem, path, hint)
    if bar is not None:
        bar.close()
    st.wall_s += time.perf_counter() - t_start
    return failures, overflow


def _decode_frames(slices: List[_Slice], out: np.ndarray, failures: Dict[int, SeriesError], overflow: List[int],
                   st: DecodeStats, bar: Any) -> None:
    """Frames of multi-frame files: decode each file once, sequentially."""
    cache: Dict[str, np.ndarray] = {}
    for k, s in enumerate(slices):
        try:
            t0 = time.perf_counter()
            if s.path not in cache:
                full, _ = decode_pixels(s.ds, s.path)
                cache[s.path] = full.reshape((-1, s.rows, s.cols))
            t1 = time.perf_counter()
            if not _store_hu(out, k, cache[s.path][s.frame or 0], s):
                overflow.append(k)
            st.decode_s += t1 - t0
            st.hu_s += time.perf_counter() - t1
        except SeriesError as exc:
            failures[k] = exc
        if bar is not None:
            bar.update(1)


def _order(slices: List[_Slice]) -> Tuple[List[_Slice], geo.StackGeometry, List[Tuple[int, _Slice]]]:
    """Sort along the normal; set aside planes that share a position with an earlier one.

    Returns (one plane per position, in order; their geometry; ``(index of the kept plane,
    plane at the same position)`` for every collision). Whether a collision is a duplicate is
    decided from its pixels after decoding (:func:`_resolve_collisions`), never from its UID.
    """
    iop = slices[0].iop
    spacing = slices[0].spacing
    sg = geo.stack_geometry(np.array([s.ipp for s in slices]), iop, spacing)
    ordered = [slices[i] for i in sg.order]
    keep = [0]
    extras: List[Tuple[int, _Slice]] = []
    for m in range(1, len(ordered)):
        prev = keep[-1]
        if (abs(sg.w_mm[m] - sg.w_mm[prev]) < 1e-3 and abs(sg.b_px[m] - sg.b_px[prev]) < 1e-3
                and abs(sg.a_px[m] - sg.a_px[prev]) < 1e-3):
            extras.append((len(keep) - 1, ordered[m]))
            continue
        keep.append(m)
    if not extras:
        return ordered, sg, extras
    kept = [ordered[m] for m in keep]
    return kept, geo.stack_geometry(np.array([s.ipp for s in kept]), iop, spacing), extras


def _resolve_collisions(extras: List[Tuple[int, _Slice]], slices: List[_Slice], hu: np.ndarray,
                        failures: Dict[int, SeriesError], gid: str, warnings: List[str]) -> None:
    """Decide each plane that shares a position with ``slices[k]`` from its pixels.

    Identical HU: a duplicate, dropped with a warning naming both files (same or different UID).
    Different HU: :class:`MixedSeriesError` naming both files (two images cannot share one voxel
    row; which one is meant is the user's call). When the kept plane failed to decode, the other
    takes its place (warned).
    """
    buf = np.empty((1,) + hu.shape[1:], dtype=hu.dtype)
    for k, s in extras:
        kept = slices[k]
        try:
            ok = _store_hu(buf, 0, _decode_one(s), s)
        except SeriesError as exc:
            warnings.append(f"{s.name}: skipped: {exc.problem} (second image at the position of {kept.name})")
            continue
        except Exception as exc:  # decoders raise many types; keep it typed and named
            warnings.append(f"{s.name}: skipped: pixel data cannot be decoded ({type(exc).__name__}: {exc}) "
                            f"(second image at the position of {kept.name})")
            continue
        if k in failures:
            if ok:
                hu[k] = buf[0]
                warnings.append(f"{kept.name}: skipped: {failures.pop(k).problem}; {s.name} at the same "
                                "position used instead")
                slices[k] = s
            continue
        if ok and np.array_equal(buf[0], hu[k]):
            same = ("duplicate SOPInstanceUID " + s.sop_uid if s.sop_uid == kept.sop_uid
                    else f"duplicate image (SOPInstanceUID {s.sop_uid} vs {kept.sop_uid})")
            warnings.append(f"{s.name}: skipped: {same} at the same position with identical pixels (kept {kept.name})")
            continue
        diff = float(np.max(np.abs(buf[0].astype(np.float64) - hu[k]))) if ok else float("nan")
        pos = ", ".join(f"{v:.2f}" for v in (kept.ipp or ()))
        raise MixedSeriesError(
            f"series {gid}: {s.name} and {kept.name} are different images at the same position ({pos}) "
            f"(max |HU difference| {diff:g}; SOPInstanceUID {'shared' if s.sop_uid == kept.sop_uid else 'differs'})",
            s.path or gid, "the input holds two versions of this slice (another reconstruction, an edited copy or "
            "a re-encoding): remove the one not meant, or give the files their own SeriesInstanceUID")


def _check_gaps(slices: List[_Slice], sg: geo.StackGeometry, group: _Group, allow_gaps: bool,
                warnings: List[str], skipped: Sequence[Tuple[str, SeriesError]] = ()) -> None:
    """Refuse (or, with ``allow_gaps``, warn about) missing slice positions. ``skipped``: the files
    of the source the scan could not use - named in the error, as they may be the missing slices."""
    gaps = geo.find_gaps(sg.w_mm, [s.thickness for s in slices])
    if not gaps:
        return
    k, gap, thr = gaps[0]
    name = lambda i: Path(slices[i].path).name if slices[i].path else f"slice {i}"  # noqa: E731
    msg = (f"{len(gaps)} gap(s) in slice positions, first {gap:.2f} mm between {name(k)} and {name(k + 1)} "
           f"(> {thr:.2f} mm = 1.5 x reference spacing)")
    if skipped:
        listing = "; ".join(f"{Path(p).name}: {e.problem}" for p, e in skipped[:3])
        more = f" (+{len(skipped) - 3} more)" if len(skipped) > 3 else ""
        msg += f"; {len(skipped)} file(s) of the source could not be used and may be the missing slices: {listing}{more}"
    if not allow_gaps:
        hint = "slices are missing: re-send the complete series, or pass allow_gaps=True"
        raise MissingSlicesError(msg, slices[k].path or group.uid,
                                 ("repair or re-export the unusable file(s); " + hint) if skipped else hint)
    warnings.append(f"series {group.uid}: missing slices: {msg}")


def _load_group(group: _Group, warnings: List[str], *, allow_tilt: bool, allow_gaps: bool,
                workers: Optional[int], progress: bool, single: bool, decode: str = "auto",
                clock: Optional[_Clock] = None,
                alloc: Optional[Callable[[Tuple[int, ...], Any], np.ndarray]] = None,
                skipped: Sequence[Tuple[str, SeriesError]] = ()) -> Volume:
    clock = clock or _Clock()
    slices = list(group.slices)
    warnings.extend(group.errors)
    for s in slices:
        warnings.extend(s.notes)
    warnings.extend(_identity_warnings(group.uid, slices))
    # geometry needs IOP + IPP on every plane (one plane may fall back to identity)
    lacking = [s for s in slices if s.iop is None or s.ipp is None]
    if lacking:
        if len(slices) == 1:
            s = slices[0]
            s.iop = s.iop or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
            s.ipp = s.ipp or (0.0, 0.0, 0.0)
            warnings.append(f"{s.path or s.sop_uid}: no ImageOrientation/PositionPatient; assumed axial at the origin")
        else:
            raise GeometryError(f"{len(lacking)} of {len(slices)} images lack ImagePositionPatient or "
                                "ImageOrientationPatient, so slices cannot be ordered",
                                lacking[0].path or group.uid, "re-export the series with full image plane headers")
    # order and check gaps from the headers alone (fail fast), then decode in slice order
    slices, sg, extras = _order(slices)
    _check_gaps(slices, sg, group, allow_gaps, [], skipped)
    # never more workers than planes (``decode="processes"`` forks workers - 1 children up front)
    n_workers = min(workers if workers is not None else default_workers(decode), len(slices))
    mode = _decode_mode(slices, decode, n_workers)
    shape = (len(slices), slices[0].rows, slices[0].cols)
    hu = parallel.shared_empty(shape, _hu_dtype(slices)) if mode == "processes" else (alloc or np.empty)(shape, _hu_dtype(slices))
    if not (isinstance(hu, np.ndarray) and hu.shape == shape and hu.dtype == _hu_dtype(slices)):
        raise ConfigError(f"alloc({shape}, {_hu_dtype(slices)}) returned {type(hu).__name__} of shape "
                          f"{getattr(hu, 'shape', None)}, dtype {getattr(hu, 'dtype', None)}; it must return an "
                          "ndarray of exactly that shape and dtype")
    clock.lap("geometry")
    stats = DecodeStats()
    failures, overflow = _decode_into(slices, hu, n_workers, progress, mode, stats)
    clock.split(stats)
    log.debug("series %s: %d planes decoded (%s, %d workers) in %.0f ms", group.uid, len(slices), stats.mode,
              n_workers if stats.mode != "serial" else 1, stats.wall_s * 1000.0)
    if overflow and not failures:
        # an integer rescale left int16: redo as float32 (rare; stored values are decoded again)
        warnings.append(f"series {group.uid}: HU exceed int16; stored as float32")
        hu = hu.astype(np.float32)
        failures, _ = _redo_float(slices, hu, workers)
        clock.lap("hu")
    _resolve_collisions(extras, slices, hu, failures, group.uid, warnings)
    clock.lap("decode")
    if failures:
        for k in sorted(failures):
            r = failures[k]
            warnings.append(f"{r.path}: skipped: {r.problem}" + (f" ({r.hint})" if r.hint else ""))
        bad = [failures[k] for k in sorted(failures)]
        if len(bad) == len(slices):
            _raise_undecodable(bad, group, warnings, single)
        keep = [k for k in range(len(slices)) if k not in failures]
        hu = hu[keep]
        slices = [slices[k] for k in keep]
        sg = geo.stack_geometry(np.array([s.ipp for s in slices]), slices[0].iop, slices[0].spacing)
    undecoded = [(r.path or "", r) for _, r in sorted(failures.items())]
    _check_gaps(slices, sg, group, allow_gaps, warnings, list(skipped) + undecoded)
    d = np.diff(sg.w_mm)
    if d.size > 1 and not np.allclose(d, np.median(d), rtol=0.01, atol=0.01):
        warnings.append(f"series {group.uid}: uneven slice spacing {d.min():.3f}-{d.max():.3f} mm "
                        "(z_mm keeps the true positions)")
    iop = slices[0].iop
    dy, dx = slices[0].spacing
    r, c, n = geo.frame(iop)
    header_tilt = _header_tilt(slices[0].ds)
    tilt = sg.tilt_deg if sg.sheared else 0.0
    origin0 = np.asarray(slices[0].ipp, dtype=np.float64)
    if sg.sheared:
        hu, origin0 = _correct_tilt(hu, sg, origin0, (r, c), (dy, dx), group, slices, allow_tilt, warnings)
    if header_tilt and abs(header_tilt) > 0.05 and not sg.sheared:
        warnings.append(f"series {group.uid}: header GantryDetectorTilt {header_tilt:g} deg but the slice "
                        "positions show no shear: nothing to correct (meta.gantry_tilt_deg = 0)")
    canon = geo.canonicalise(hu, origin0, r, c, n, sg.w_mm, (dy, dx), inplace=True)   # hu is ours alone
    files = [slices[i].path for i in canon.z_order]
    meta = _meta(group, slices, tilt, header_tilt)
    vol = Volume(hu=canon.hu, z_mm=canon.z_mm, pixel_spacing_mm=canon.pixel_spacing_mm, origin=canon.origin,
                 direction=canon.direction, meta=meta, warnings=tuple(warnings), files=tuple(files))
    clock.lap("geometry")
    return vol


def _correct_tilt(hu: np.ndarray, sg: geo.StackGeometry, origin0: np.ndarray, rc: Tuple[np.ndarray, np.ndarray],
                  spacing_yx: Tuple[float, float], group: _Group, slices: List[_Slice], allow_tilt: bool,
                  warnings: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Shear every slice onto one orthogonal grid grown to hold all of them (nothing is cut).

    Returns (float32 stack, LPS position of its pixel (0, 0)). Raises GantryTiltError when
    ``allow_tilt`` is False, GeometryError when the grid would grow beyond MAX_SHEAR_GROWTH x.
    """
    shift = float(max(np.max(np.abs(sg.a_px)), np.max(np.abs(sg.b_px))))
    if not allow_tilt:
        raise GantryTiltError(f"gantry tilt {sg.tilt_deg:.2f} deg (slices shifted in-plane up to {shift:.1f} px)",
                              slices[0].path or group.uid, "pass allow_tilt=True to correct it by shearing")
    rows, cols = hu.shape[1:]
    grid = geo.shear_grid(sg.a_px, sg.b_px, rows, cols)
    if grid.rows * grid.cols > geo.MAX_SHEAR_GROWTH * rows * cols:
        raise GeometryError(f"slices are offset in-plane by up to {shift:.0f} px (tilt {sg.tilt_deg:.1f} deg): "
                            f"holding every slice needs a {grid.rows}x{grid.cols} grid for {rows}x{cols} images",
                            slices[0].path or group.uid, "this is not a gantry tilt; check ImagePositionPatient")
    out = geo.shear_correct(hu, sg.a_px, sg.b_px, float(hu.min()), grid)
    r, c = rc
    dy, dx = spacing_yx
    grown = "" if (grid.rows, grid.cols) == (rows, cols) else (
        f"; grid grown from {rows}x{cols} to {grid.rows}x{grid.cols} so that no pixel is cut")
    warnings.append(f"series {group.uid}: gantry tilt {sg.tilt_deg:.2f} deg corrected by shearing each slice "
                    f"in-plane (up to {shift:.1f} px){grown}; HU interpolated linearly")
    return out, origin0 + grid.col0 * dx * r + grid.row0 * dy * c


def _redo_float(slices: List[_Slice], hu: np.ndarray, workers: Optional[int]) -> Tuple[Dict[int, SeriesError], List[int]]:
    """Re-read pixel data (it was dropped after the first decode) and fill a float32 volume."""
    for s in slices:
        if s.frame is None and s.path:
            s.ds, _ = _read(s.path)
    return _decode_into(slices, hu, workers, False, "threads")   # hu is private memory: no processes


def _raise_undecodable(bad: List[SeriesError], group: _Group, warnings: List[str], single: bool) -> None:
    """Every plane of the chosen series failed to decode: raise the most specific error."""
    first = bad[0]
    if len(bad) > 1 and not single:
        names = ", ".join(Path(f.path or "").name or "?" for f in bad[:6])
        raise type(first)(f"none of the {len(bad)} images of series {group.uid} could be decoded ({names}); "
                          f"first: {first.problem}", first.path, first.hint)
    others = [w.split(": skipped: ")[0] for w in warnings if ": skipped: " in w and (first.path or "") not in w]
    if others:
        raise type(first)(
            f"{first.problem}; no other usable image either ({len(others)} skipped: "
            + ", ".join(Path(o).name for o in others[:8]) + ("..." if len(others) > 8 else "") + ")",
            first.path, first.hint)
    raise first


def _header_tilt(ds: Any) -> Optional[float]:
    try:
        v = getattr(ds, "GantryDetectorTilt", None)
        return None if v in (None, "") else float(v)
    except (TypeError, ValueError):
        return None


def _contrast(ds: Any) -> str:
    parts = []
    for kw in ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusIngredient", "ContrastBolusVolume"):
        v = getattr(ds, kw, None)
        if v not in (None, ""):
            parts.append(f"{kw}={v}")
    seq = getattr(ds, "ContrastBolusAgentSequence", None)
    if seq:
        parts.append("ContrastBolusAgentSequence=" + ",".join(str(getattr(i, "CodeMeaning", "?")) for i in seq))
    return "; ".join(parts)


def _meta(group: _Group, slices: List[_Slice], tilt: float, header_tilt: Optional[float]) -> SeriesMeta:
    ds = slices[0].ds

    def s(kw: str) -> str:
        v = getattr(ds, kw, "")
        return "" if v is None else str(v)

    kvp = getattr(ds, "KVP", None)
    try:
        kvp_f = float(kvp) if kvp not in (None, "") else None
    except (TypeError, ValueError):
        kvp_f = None
    kernel = getattr(ds, "ConvolutionKernel", "")
    if not isinstance(kernel, str):
        kernel = "\\".join(str(k) for k in kernel)
    return SeriesMeta(
        modality=group.modality or "CT", manufacturer=s("Manufacturer"), model=s("ManufacturerModelName"),
        kvp=kvp_f, kernel=kernel, slice_thickness_mm=group.thickness, slice_thickness_range_mm=group.thickness_range,
        contrast_agent=_contrast(ds),
        series_description=s("SeriesDescription"), body_part=s("BodyPartExamined"), study_uid=s("StudyInstanceUID"),
        series_uid=group.uid, frame_of_reference_uid=s("FrameOfReferenceUID"),
        transfer_syntaxes=tuple(sorted({x.syntax for x in slices})), image_type=slices[0].image_type,
        gantry_tilt_deg=float(tilt), gantry_tilt_header_deg=header_tilt, n_files=len({x.path or id(x.ds) for x in slices}),
        identity=StudyIdentity.from_dataset(ds),
    )


def describe_syntaxes(uids: Iterable[str]) -> List[str]:
    """``["1.2.840.10008.1.2.4.70 (JPEG Lossless SV1)", ...]`` for display."""
    return [f"{u} ({syntax_name(u)})" for u in uids]

"""Fast header scan of a single-frame DICOM image file (the common CT case), with pydicom's values.

Why: the reader's scan is the serial part of loading a series. ``pydicom.dcmread`` builds every
element of every file (covid-P001: ~0.5 ms a file, 148 files, one core while the other waits), and
the reader needs ~25 of them. :func:`scan_header` walks the element headers with ``struct``, keeps
the raw bytes of the elements the reader uses, notes where the Pixel Data value starts, and
converts a kept element with pydicom's own converter (``pydicom.values.convert_value``) the first
time it is read - so every value is pydicom's value by construction.

:class:`HeaderDataset` is what :func:`sdk.io.reader._read` returns for such a file: it answers the
reader's and the imagecodecs decoder's questions from the scan, and anything else (a keyword it did
not keep, a pydicom-based decoder that needs a real ``Dataset``) by reading the whole file with
``pydicom.dcmread`` once (:meth:`HeaderDataset.dataset`) and delegating to it.

Only the plain case takes this path; :func:`scan_header` returns None (the caller then uses pydicom,
with its errors and warnings) for: no 128-byte preamble + ``DICM``, a transfer syntax outside
:data:`FAST_SYNTAXES` (the lossless ones the imagecodecs decoder reads at the Pixel Data offset; any
other syntax needs pydicom's whole dataset to decode anyway), multi-frame or
enhanced images, DICOMDIRs, a kept element with an unexpected VR or an undefined length, no Pixel
Data, or any structure the walk does not recognise (truncated files included).
"""
from __future__ import annotations

import struct
from typing import Any, Dict, Iterator, Optional, Tuple

from .decoders import IMAGECODECS_SYNTAXES

#: syntaxes the fast scan takes: those the imagecodecs plugin decodes from the Pixel Data offset
#: (the lossless JPEG / JPEG-LS / J2K archive syntaxes; all encapsulated, so explicit VR little
#: endian). Other syntaxes would need pydicom's whole dataset to decode anyway.
FAST_SYNTAXES = frozenset(IMAGECODECS_SYNTAXES)

__all__ = ["FAST_SYNTAXES", "HeaderDataset", "KEPT", "scan_header"]

#: VRs with a 2-byte reserved field and a 4-byte length in explicit VR
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

#: the elements kept from the dataset: tag -> (keyword, VRs accepted). The reader's scan, the slice
#: geometry and the imagecodecs decoder read only these.
KEPT: Dict[int, Tuple[str, Tuple[str, ...]]] = {
    0x00080008: ("ImageType", ("CS",)),
    0x00080016: ("SOPClassUID", ("UI",)),
    0x00080018: ("SOPInstanceUID", ("UI",)),
    0x00080060: ("Modality", ("CS",)),
    0x00180050: ("SliceThickness", ("DS",)),
    0x0020000E: ("SeriesInstanceUID", ("UI",)),
    0x00200012: ("AcquisitionNumber", ("IS",)),
    0x00200013: ("InstanceNumber", ("IS",)),
    0x00200032: ("ImagePositionPatient", ("DS",)),
    0x00200037: ("ImageOrientationPatient", ("DS",)),
    0x00280002: ("SamplesPerPixel", ("US",)),
    0x00280004: ("PhotometricInterpretation", ("CS",)),
    0x00280006: ("PlanarConfiguration", ("US",)),
    0x00280010: ("Rows", ("US",)),
    0x00280011: ("Columns", ("US",)),
    0x00280030: ("PixelSpacing", ("DS",)),
    0x00280100: ("BitsAllocated", ("US",)),
    0x00280101: ("BitsStored", ("US",)),
    0x00280102: ("HighBit", ("US",)),
    0x00280103: ("PixelRepresentation", ("US",)),
    0x00281052: ("RescaleIntercept", ("DS",)),
    0x00281053: ("RescaleSlope", ("DS",)),
}
_KEYWORDS = {kw: tag for tag, (kw, _) in KEPT.items()}
#: elements whose presence sends the file to pydicom (multi-frame / enhanced images, DICOMDIRs);
#: so a HeaderDataset never holds one, and answers "absent" for their keywords without the file
_REFUSE = {0x00280008: "NumberOfFrames", 0x52009229: "SharedFunctionalGroupsSequence",
           0x52009230: "PerFrameFunctionalGroupsSequence", 0x00041220: "DirectoryRecordSequence"}
_ABSENT = frozenset(_REFUSE.values())
_FILE_META = {0x00020002: "MediaStorageSOPClassUID", 0x00020003: "MediaStorageSOPInstanceUID",
              0x00020010: "TransferSyntaxUID"}
#: bytes read first; a header longer than this is read whole
_HEAD_BYTES = 1 << 16


class _Refuse(Exception):
    """The walk met something it does not handle: pydicom reads the file."""


class _NeedMore(_Refuse):
    """The walk ran past the bytes read so far (the whole file may still be plain)."""


def _element(buf: bytes, pos: int) -> Tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the explicit-VR-LE element at ``pos``."""
    if pos + 8 > len(buf):
        raise _NeedMore("element header past the bytes read")
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE:   # item / delimiters: no VR
        return tag, b"", struct.unpack_from("<I", buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _NeedMore("element header past the bytes read")
        return tag, vr, struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    if not vr.isalpha() or not vr.isupper():
        raise _Refuse(f"not an explicit VR at offset {pos}")
    return tag, vr, struct.unpack_from("<H", buf, pos + 6)[0], pos + 8


def _skip_sequence(buf: bytes, pos: int) -> int:
    """Offset after an undefined-length sequence whose items start at ``pos``."""
    while True:
        tag, _, length, pos = _element(buf, pos)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Refuse("unexpected element in a sequence")
        pos = pos + length if length != _UNDEFINED else _skip_item(buf, pos)


def _after(buf: bytes, vr: bytes, length: int, start: int) -> int:
    """Offset after the element whose value (``length`` bytes, or an undefined-length sequence)
    starts at ``start``."""
    if length == _UNDEFINED:
        if vr != b"SQ":
            raise _Refuse("undefined length outside a sequence")
        return _skip_sequence(buf, start)
    if start + length > len(buf):
        raise _NeedMore("element runs past the bytes read")
    return start + length


def _skip_item(buf: bytes, pos: int) -> int:
    """Offset after an undefined-length item whose elements start at ``pos``."""
    while True:
        tag, vr, length, pos = _element(buf, pos)
        if tag == _ITEM_END:
            return pos
        pos = _after(buf, vr, length, pos)


def _walk(buf: bytes, pos: int, stop_group: Optional[int] = None) -> Iterator[Tuple[int, bytes, int, int]]:
    """Top-level elements (tag, VR, length, value offset) from ``pos``; stops before the first
    element of another group than ``stop_group`` (the file meta), or after Pixel Data."""
    while pos < len(buf):
        if stop_group is not None and pos + 2 <= len(buf) and struct.unpack_from("<H", buf, pos)[0] != stop_group:
            return   # the dataset starts: its encoding may not be explicit VR (the syntax says)
        tag, vr, length, start = _element(buf, pos)
        yield tag, vr, length, start
        if tag == _PIXEL_DATA:
            return
        pos = _after(buf, vr, length, start)


def _read_all(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _scan(path: str, buf: bytes) -> Optional["HeaderDataset"]:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    meta: Dict[str, str] = {}
    pos = 132
    for tag, _vr, length, start in _walk(buf, 132, stop_group=0x0002):
        if tag in _FILE_META:
            meta[_FILE_META[tag]] = buf[start:start + length].decode("ascii", "replace").rstrip("\0 ").strip()
        pos = start + length
    syntax = meta.get("TransferSyntaxUID", "")
    if syntax not in FAST_SYNTAXES:
        return None
    kept: Dict[int, Tuple[str, bytes]] = {}
    pixel: Optional[Tuple[int, int]] = None
    for tag, vr, length, start in _walk(buf, pos):
        if tag in _REFUSE:
            return None
        if tag == _PIXEL_DATA:
            pixel = (start, length)
        elif tag in KEPT:
            if length == _UNDEFINED or vr.decode("ascii") not in KEPT[tag][1]:
                return None
            kept[tag] = (vr.decode("ascii"), buf[start:start + length])
    if pixel is None:
        raise _NeedMore("no Pixel Data in the bytes read")
    return HeaderDataset(path, meta, kept, pixel[0], pixel[1])


def scan_header(path: str) -> Optional["HeaderDataset"]:
    """:class:`HeaderDataset` of the file at ``path``, or None when it is not the plain case (see
    the module docstring); never raises for a file's content (an unreadable file raises OSError)."""
    with open(path, "rb") as fh:
        buf = fh.read(_HEAD_BYTES)
        more = len(buf) == _HEAD_BYTES
    try:
        try:
            return _scan(path, buf)
        except _NeedMore:
            if not more:
                return None                        # the file ends there: truncated or no Pixel Data
        return _scan(path, _read_all(path))    # the header did not fit in the first read
    except (_Refuse, struct.error, UnicodeDecodeError, ValueError):
        return None


class _FileMeta:
    """The three file-meta values the reader uses (``in`` and attribute access, as pydicom's)."""

    def __init__(self, values: Dict[str, str]) -> None:
        self._values = values

    def __contains__(self, keyword: str) -> bool:
        return keyword in self._values

    def __getattr__(self, keyword: str) -> Any:
        try:
            return self.__dict__["_values"][keyword]
        except KeyError:
            raise AttributeError(keyword) from None


class _DeferredPixelData:
    """What ``Dataset.get_item(PixelData, keep_deferred=True)`` gives for a deferred value."""

    value = None

    def __init__(self, value_tell: int, length: int) -> None:
        self.value_tell, self.length = value_tell, length


class HeaderDataset:
    """A file's header from :func:`scan_header`, read like a pydicom ``Dataset`` (see the module
    docstring). Attributes of kept elements come from the scan; every other attribute, ``in`` test
    or item comes from the whole file read once by pydicom (:meth:`dataset`)."""

    def __init__(self, path: str, meta: Dict[str, str], kept: Dict[int, Tuple[str, bytes]], pixel_tell: int,
                 pixel_length: int) -> None:
        self.filename = path
        self.file_meta = _FileMeta(meta)
        self._kept = kept
        self._values: Dict[str, Any] = {}
        self._pixel = (pixel_tell, pixel_length)
        self._full: Any = None

    # --- the whole file, when needed -------------------------------------------------------------
    def dataset(self) -> Any:
        """The pydicom ``Dataset`` of the file (``dcmread(defer_size=2048)``, read once)."""
        if self._full is None:
            import warnings

            import pydicom

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._full = pydicom.dcmread(self.filename, defer_size=2048)
        return self._full

    @property
    def materialized(self) -> bool:
        """True once the whole file has been read by pydicom."""
        return self._full is not None

    # --- Dataset-like access ----------------------------------------------------------------------
    def _value(self, keyword: str) -> Any:
        if keyword not in self._values:
            from pydicom.dataelem import RawDataElement
            from pydicom.values import convert_value

            tag = _KEYWORDS[keyword]
            vr, raw = self._kept[tag]
            elem = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
            self._values[keyword] = convert_value(vr, elem) if raw else (None if vr in ("US", "DS", "IS") else "")
        return self._values[keyword]

    def __getattr__(self, keyword: str) -> Any:
        if keyword.startswith("_"):
            raise AttributeError(keyword)
        if self._full is None and keyword in _KEYWORDS:
            if _KEYWORDS[keyword] not in self._kept:
                raise AttributeError(keyword)
            return self._value(keyword)
        if self._full is None and keyword in _ABSENT:
            raise AttributeError(keyword)
        return getattr(self.dataset(), keyword)

    def __contains__(self, keyword: Any) -> bool:
        if self._full is None and keyword == "PixelData":
            return True
        if self._full is None and keyword in _KEYWORDS:
            return _KEYWORDS[keyword] in self._kept
        if self._full is None and keyword in _ABSENT:
            return False   # the scan refused every file that has one
        return keyword in self.dataset()

    def get(self, keyword: str, default: Any = None) -> Any:
        try:
            return self.__getattr__(keyword)
        except AttributeError:
            return default

    def get_item(self, tag: Any, *, keep_deferred: bool = False) -> Any:
        if self._full is None and int(tag) == _PIXEL_DATA and keep_deferred:
            return _DeferredPixelData(*self._pixel)
        return self.dataset().get_item(tag, keep_deferred=keep_deferred)

    def __delattr__(self, keyword: str) -> None:
        if keyword == "PixelData" and self._full is None:
            return   # nothing held: the scan never read the pixel bytes
        delattr(self.dataset(), keyword)

    def __repr__(self) -> str:
        return f"HeaderDataset({self.filename!r}, {len(self._kept)} kept elements)"

"""Pluggable pixel-data decoders (in the manner of pydicom's decoder plugins).

Each transfer syntax has an ordered chain of plugins. A plugin declares ``is_available(uid)`` and
``REQUIRES`` (pip names); an unavailable plugin stays in the chain so that the error can say what
to install. :func:`decode_pixels` tries the available plugins in order, collects ``"name: error"``
from each failure and raises one typed error:

- no plugin can handle the syntax -> :class:`~sdk.errors.UnsupportedTransferSyntaxError` naming the
  syntax UID, its name and the packages to install;
- every available plugin failed -> :class:`~sdk.errors.CorruptFileError` with each failure.

Default chain: ``imagecodecs`` first for the lossless JPEG, JPEG-LS and lossless JPEG 2000 / HTJ2K
syntaxes (libjpeg-turbo 3 / CharLS / OpenJPEG called on each frame; it releases the GIL, so the
reader's decode threads run in parallel; :class:`ImagecodecsPlugin`), then
``native`` for uncompressed syntaxes (incl. deflate and big endian), then
``pylibjpeg`` (pydicom's pylibjpeg plugins: libjpeg, openjpeg, rle), then ``gdcm`` (python-gdcm
through pydicom), then pydicom's own ``rle`` decoder. python-gdcm is the fallback for JPEG files
libjpeg rejects. python-gdcm and pylibjpeg hold the GIL while they decode (measured,
docs/benchmarks/ingest.md); imagecodecs does not.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ..errors import CorruptFileError, UnsupportedTransferSyntaxError

# --- transfer syntaxes --------------------------------------------------------------------------
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
}
JPEG_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1 (Process 14, Selection Value 1)",
}
JPEGLS_SYNTAXES = {
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
}
J2K_SYNTAXES = {
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
}
RLE_SYNTAXES = {"1.2.840.10008.1.2.5": "RLE Lossless"}
RETIRED_SYNTAXES = {
    "1.2.840.10008.1.2.4.52": "JPEG Extended (Process 3 & 5) (retired)",
    "1.2.840.10008.1.2.4.53": "JPEG Spectral Selection, Non-Hierarchical (Process 6 & 8) (retired)",
    "1.2.840.10008.1.2.4.54": "JPEG Spectral Selection, Non-Hierarchical (Process 7 & 9) (retired)",
    "1.2.840.10008.1.2.4.55": "JPEG Full Progression, Non-Hierarchical (Process 10 & 12) (retired)",
    "1.2.840.10008.1.2.4.56": "JPEG Full Progression, Non-Hierarchical (Process 11 & 13) (retired)",
    "1.2.840.10008.1.2.4.58": "JPEG Lossless, Non-Hierarchical (Process 15) (retired)",
    "1.2.840.10008.1.2.4.59": "JPEG Extended, Hierarchical (Process 16 & 18) (retired)",
}
ALL_SYNTAXES: Dict[str, str] = {
    **NATIVE_SYNTAXES, **JPEG_SYNTAXES, **JPEGLS_SYNTAXES, **J2K_SYNTAXES, **RLE_SYNTAXES, **RETIRED_SYNTAXES,
}


def syntax_name(uid: str) -> str:
    """Human name of a transfer syntax UID (pydicom's registry first, then ours)."""
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        if name and name != uid:
            return name
    except Exception:  # pragma: no cover - pydicom always importable in core
        pass
    return ALL_SYNTAXES.get(uid, "unknown transfer syntax")


# --- plugins ------------------------------------------------------------------------------------
def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class DecoderPlugin:
    """One way to decode pixel data.

    Attributes:
        name: label used in messages and in ``decoder_chain``.
        syntaxes: transfer syntax UIDs this plugin handles.
        requires: pip packages per syntax group (reported when missing).
        modules: import names that must be importable for the plugin to work.
        pydicom_plugin: the ``decoding_plugin`` name passed to ``pydicom.pixels.pixel_array``
            ("" = pydicom's native decoder).
    """

    name: str
    syntaxes: Tuple[str, ...]
    requires: Tuple[str, ...]
    modules: Tuple[str, ...]
    pydicom_plugin: str

    def handles(self, uid: str) -> bool:
        return uid in self.syntaxes

    def is_available(self, uid: str) -> bool:
        """True when the plugin handles ``uid`` and its packages are importable."""
        return self.handles(uid) and all(_has(m) for m in self.modules)

    def decode(self, ds) -> np.ndarray:
        """Stored values (no rescale) as an ndarray: (rows, cols) or (frames, rows, cols)."""
        from pydicom.pixels import pixel_array

        return pixel_array(as_dataset(ds), decoding_plugin=self.pydicom_plugin, raw=False)


def as_dataset(ds):
    """A pydicom ``Dataset`` for ``ds``: ``ds`` itself, or the whole file behind a header-only
    :class:`sdk.io.header.HeaderDataset` (read by pydicom on this first call)."""
    read_all = getattr(type(ds), "dataset", None)
    return read_all(ds) if callable(read_all) else ds


def _libjpeg_syntaxes() -> Tuple[str, ...]:
    return tuple(JPEG_SYNTAXES) + tuple(JPEGLS_SYNTAXES)


_PLUGINS: Dict[str, DecoderPlugin] = {}
_ORDER: List[str] = []


def register_decoder(plugin: DecoderPlugin, *, first: bool = False) -> None:
    """Add (or replace) a decoder plugin; ``first`` puts it at the head of the chain."""
    if plugin.name in _PLUGINS:
        _ORDER.remove(plugin.name)
    _PLUGINS[plugin.name] = plugin
    if first:
        _ORDER.insert(0, plugin.name)
    else:
        _ORDER.append(plugin.name)


register_decoder(DecoderPlugin("native", tuple(NATIVE_SYNTAXES), (), ("pydicom",), ""))
register_decoder(DecoderPlugin(
    "pylibjpeg", _libjpeg_syntaxes() + tuple(J2K_SYNTAXES) + tuple(RLE_SYNTAXES),
    ("pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3", "pylibjpeg-rle>=2.0"),
    ("pylibjpeg",), "pylibjpeg",
))
register_decoder(DecoderPlugin(
    "gdcm", _libjpeg_syntaxes() + tuple(J2K_SYNTAXES)[:2], ("python-gdcm>=3.0.22",), ("gdcm",), "gdcm",
))
register_decoder(DecoderPlugin("rle", tuple(RLE_SYNTAXES), (), ("pydicom",), "pydicom"))
#: JPEG Lossless (process 14 and its SV1 form, the usual CT archive syntax): python-gdcm decodes it
#: bit-identically to pylibjpeg with ~30 % less CPU (docs/benchmarks/ingest.md), so it goes first for
#: these two syntaxes only; pylibjpeg stays the first choice everywhere else and the fallback here.
JPEG_LOSSLESS_SYNTAXES = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
register_decoder(DecoderPlugin(
    "gdcm-jpeg-lossless", JPEG_LOSSLESS_SYNTAXES, ("python-gdcm>=3.0.22",), ("gdcm",), "gdcm",
), first=True)


#: JPEG-LS (CharLS) and the lossless JPEG 2000 / HTJ2K syntaxes (OpenJPEG) that imagecodecs decodes.
IMAGECODECS_SYNTAXES = JPEG_LOSSLESS_SYNTAXES + tuple(JPEGLS_SYNTAXES) + (
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202")


@dataclass(frozen=True)
class ImagecodecsPlugin(DecoderPlugin):
    """Lossless JPEG / JPEG-LS / lossless JPEG 2000 through ``imagecodecs`` (libjpeg-turbo 3, CharLS,
    OpenJPEG), called directly on each frame's codestream.

    Why first in the chain for these syntaxes: imagecodecs releases the GIL while it decodes and
    libjpeg-turbo's lossless decoder is ~4x faster than libjpeg / GDCM on 12-bit CT (covid-P001,
    148 slices, one thread: 0.26 s against 1.1-1.5 s; two threads 0.15 s), so decoding finally runs
    in parallel on threads. Lossless syntaxes only, so every decoder must return the same stored
    values (tests compare it with pylibjpeg / GDCM on every such file of ../shared/data); lossy
    syntaxes stay with pydicom's plugins. The sign of the stored values follows pydicom: codestream
    samples are read as unsigned ``BitsStored``-bit values and sign-extended when
    ``PixelRepresentation`` is 1. Anything unusual (colour, several samples per pixel, a codestream
    whose size disagrees with the header) raises, and the next plugin in the chain decodes the file.
    """

    def decode(self, ds) -> np.ndarray:
        import imagecodecs

        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise ValueError("imagecodecs plugin decodes single-sample (monochrome) data only")
        uid = str(ds.file_meta.TransferSyntaxUID)
        fn = (imagecodecs.jpeg8_decode if uid in JPEG_LOSSLESS_SYNTAXES
              else imagecodecs.jpegls_decode if uid in JPEGLS_SYNTAXES else imagecodecs.jpeg2k_decode)
        rows, cols = int(ds.Rows), int(ds.Columns)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        planes = [np.asarray(fn(f)) for f in encapsulated_frames(ds, n)]
        if len(planes) != n or any(p.shape != (rows, cols) for p in planes):
            raise ValueError(f"codestream gives {len(planes)} frame(s) of {planes[0].shape if planes else '?'}, "
                             f"header says {n} of {(rows, cols)}")
        return _stored_values(np.stack(planes) if n > 1 else planes[0], ds)


#: (FFFE,E000) Item and (FFFE,E0DD) Sequence Delimitation Item tags of encapsulated pixel data
_ITEM, _SEQ_END = (0xFFFE, 0xE000), (0xFFFE, 0xE0DD)


def encapsulated_frames(ds, n_frames: int) -> List[bytes]:
    """The codestream of each frame of ``ds``'s encapsulated Pixel Data.

    A single frame - the CT case - is read without pydicom's Python-level machinery: the value of a
    deferred Pixel Data element straight from ``ds.filename`` at its recorded offset, then the item
    headers walked with ``struct`` (Basic Offset Table skipped, the fragments joined). That is
    what ``pydicom.encaps.generate_frames`` returns, in ~1/5 of the time the decode threads hold
    the GIL for it (covid-P001: 55 -> 11 ms per series). Anything else - several frames, a value
    already in memory with odd items, no file to read - goes through ``generate_frames``.
    """
    from pydicom.encaps import generate_frames

    if n_frames == 1:
        data = _single_frame(ds)
        if data is not None:
            return [data]
    return list(generate_frames(ds.PixelData, number_of_frames=n_frames))


def _single_frame(ds) -> Optional[bytes]:
    """The one frame's codestream by the fast path of :func:`encapsulated_frames`, or None when
    the element is not what that path reads (the caller then uses pydicom). Encapsulated transfer
    syntaxes are explicit VR little endian, so the item headers are little endian."""
    import struct

    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    value = getattr(raw, "value", None)
    in_memory = isinstance(value, (bytes, bytearray))   # pydicom keeps the items, not the delimiter
    if in_memory:
        buf = bytes(value)
    elif value is None and isinstance(getattr(ds, "filename", None), str) and getattr(raw, "value_tell", None) is not None:
        with open(ds.filename, "rb") as fh:
            fh.seek(int(raw.value_tell))
            buf = fh.read()
    else:
        return None
    pos, frags, first = 0, [], True
    while pos + 8 <= len(buf):
        group, elem, length = struct.unpack_from("<HHI", buf, pos)
        pos += 8
        if (group, elem) == _SEQ_END:
            return b"".join(frags) if frags else None
        if (group, elem) != _ITEM or length == 0xFFFFFFFF or pos + length > len(buf):
            return None
        if not first:                                  # the first item is the Basic Offset Table
            frags.append(buf[pos:pos + length])
        first, pos = False, pos + length
    if in_memory and pos == len(buf) and frags:
        return b"".join(frags)
    return None                                        # truncated: let pydicom say what is wrong


def _stored_values(arr: np.ndarray, ds) -> np.ndarray:
    """Decoded samples -> the stored-value array pydicom gives: (u)int of ``BitsAllocated`` bits,
    sign-extended from ``BitsStored`` when ``PixelRepresentation`` is 1."""
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc))
    if bits_alloc not in (8, 16, 32):
        raise ValueError(f"BitsAllocated {bits_alloc} is not handled by this plugin")
    udt = np.dtype(f"uint{bits_alloc}")
    if arr.dtype.kind == "i":                      # codecs that already return signed samples
        arr = arr.astype(np.dtype(f"int{bits_alloc}"), copy=False).view(udt)
    v = arr.astype(udt, copy=False)
    if int(ds.get("PixelRepresentation", 0)) != 1:
        return v
    sdt = np.dtype(f"int{bits_alloc}")
    if bits_stored >= bits_alloc:
        return v.view(sdt)
    shift = bits_alloc - bits_stored                # sign-extend the BitsStored-bit value
    return ((v << shift).view(sdt) >> shift).astype(sdt, copy=False)


register_decoder(ImagecodecsPlugin(
    "imagecodecs", IMAGECODECS_SYNTAXES, ("imagecodecs>=2024.1",), ("imagecodecs",), "",
), first=True)


def unregister_decoder(name: str) -> None:
    """Remove a plugin added with :func:`register_decoder` (no error when absent)."""
    if name in _PLUGINS:
        del _PLUGINS[name]
        _ORDER.remove(name)


def decoder_chain(uid: str) -> List[DecoderPlugin]:
    """Every registered plugin that handles ``uid``, in order (available or not)."""
    return [_PLUGINS[n] for n in _ORDER if _PLUGINS[n].handles(uid)]


def available_decoders(uid: str) -> List[str]:
    """Names of the plugins that can decode ``uid`` here."""
    return [p.name for p in decoder_chain(uid) if p.is_available(uid)]


def _unsupported(uid: str, path: str) -> UnsupportedTransferSyntaxError:
    chain = decoder_chain(uid)
    name = syntax_name(uid)
    if chain:
        needs = "; ".join(f"{p.name} - requires {', '.join(p.requires) or 'pydicom'}" for p in chain)
        hint = f"install one of: {needs} (pip install 'ctsdk' pulls them in)"
    elif uid in RETIRED_SYNTAXES or ".4.5" in uid:
        hint = ("no Python decoder (pydicom, pylibjpeg, python-gdcm) supports this retired JPEG process; "
                "convert the file first, e.g. `dcmdjpeg in.dcm out.dcm` (DCMTK) or `gdcmconv --raw`")
    else:
        hint = "no installed decoder knows this syntax; re-export the series uncompressed or as JPEG-LS / JPEG 2000"
    return UnsupportedTransferSyntaxError(
        f"cannot decode transfer syntax {uid} ({name})", path, hint)


def decode_pixels(ds, path: str = "", *, chain: Optional[List[str]] = None) -> Tuple[np.ndarray, str]:
    """Decode ``ds``'s pixel data with the first plugin that works.

    Args:
        ds: pydicom Dataset with pixel data.
        path: file name used in error messages.
        chain: plugin names to try instead of the registered order.

    Returns:
        (stored values as ndarray in native byte order, name of the plugin that decoded it).

    Raises:
        UnsupportedTransferSyntaxError: no installed plugin handles the syntax.
        CorruptFileError: every available plugin failed (message lists each failure).
    """
    uid = str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else ""
    if not uid:
        raise CorruptFileError("no Transfer Syntax UID in the file meta", path,
                               "read the file with force=True and set file_meta.TransferSyntaxUID")
    plugins = decoder_chain(uid) if chain is None else [_PLUGINS[n] for n in chain if _PLUGINS[n].handles(uid)]
    usable = [p for p in plugins if p.is_available(uid)]
    if not usable:
        raise _unsupported(uid, path)
    failures: List[str] = []
    for plugin in usable:
        try:
            arr = plugin.decode(ds)
        except NotImplementedError:
            raise _unsupported(uid, path) from None
        except Exception as exc:  # collect and try the next plugin
            failures.append(f"{plugin.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr, plugin.name
    raise CorruptFileError(
        f"pixel data ({syntax_name(uid)}) could not be decoded: " + "; ".join(failures), path,
        "the file is probably truncated or corrupt; re-export it from the PACS")


DecodeFn = Callable[[object, str], Tuple[np.ndarray, str]]

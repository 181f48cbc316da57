"""A tiny NRRD reader (raw or gzip, 3-D scalar volumes) for reference lung masks.

Only what the evaluation needs: ``read_nrrd(path) -> NrrdVolume`` with the data as (z, y, x)
(NRRD stores the first ``sizes`` axis fastest, i.e. x), ``space directions`` and ``space origin``.
pynrrd is not needed.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np

from ..errors import ConfigError

_TYPES = {
    "short": "i2", "int16": "i2", "signed short": "i2", "short int": "i2",
    "unsigned short": "u2", "uint16": "u2", "ushort": "u2",
    "int": "i4", "int32": "i4", "signed int": "i4",
    "unsigned int": "u4", "uint32": "u4", "uint": "u4",
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1",
    "char": "i1", "signed char": "i1", "int8": "i1",
    "float": "f4", "double": "f8",
}


@dataclass(frozen=True)
class NrrdVolume:
    """``data`` (z, y, x); ``spacing`` (z, y, x) mm from the direction vectors' norms."""

    data: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    directions: np.ndarray          # 3x3, rows = index axes x, y, z in NRRD order
    header: Dict[str, str]


def _vectors(text: str) -> np.ndarray:
    vecs = re.findall(r"\(([^)]*)\)", text)
    return np.array([[float(v) for v in vec.split(",")] for vec in vecs], dtype=np.float64)


def read_nrrd(path: Union[str, Path]) -> NrrdVolume:
    """Read a 3-D NRRD file (attached header, raw or gzip encoding).

    Raises:
        ConfigError: not NRRD, detached data, unsupported encoding / type / dimension.
    """
    p = Path(path)
    blob = p.read_bytes()
    if not blob.startswith(b"NRRD"):
        raise ConfigError(f"{p}: not an NRRD file (no 'NRRD000x' magic)")
    end = blob.find(b"\n\n")
    if end < 0:
        raise ConfigError(f"{p}: NRRD header has no blank line before the data")
    header: Dict[str, str] = {}
    for line in blob[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, val = line.split(":", 1)
        header[key.strip().lower()] = val.strip().lstrip("=").strip()
    if "data file" in header or "datafile" in header:
        raise ConfigError(f"{p}: detached NRRD data is not supported; use an attached-header .nrrd")
    dtype_name = header.get("type", "").lower()
    if dtype_name not in _TYPES:
        raise ConfigError(f"{p}: NRRD type {dtype_name!r} is not supported (supported: {sorted(set(_TYPES))})")
    sizes = [int(s) for s in header.get("sizes", "").split()]
    if len(sizes) != 3:
        raise ConfigError(f"{p}: expected a 3-D NRRD, got sizes {sizes}")
    enc = header.get("encoding", "raw").lower()
    raw = blob[end + 2 :]
    if enc in ("gzip", "gz"):
        raw = gzip.decompress(raw)
    elif enc != "raw":
        raise ConfigError(f"{p}: NRRD encoding {enc!r} is not supported (raw, gzip)")
    endian = "<" if header.get("endian", "little") == "little" else ">"
    dt = np.dtype(endian + _TYPES[dtype_name])
    n = sizes[0] * sizes[1] * sizes[2]
    if len(raw) < n * dt.itemsize:
        raise ConfigError(f"{p}: NRRD data has {len(raw)} bytes, expected {n * dt.itemsize}")
    data = np.frombuffer(raw[: n * dt.itemsize], dtype=dt).reshape(sizes[2], sizes[1], sizes[0])
    dirs = _vectors(header["space directions"]) if "space directions" in header else np.eye(3)
    norms = np.linalg.norm(dirs, axis=1)
    origin = tuple(_vectors(header["space origin"])[0]) if "space origin" in header else (0.0, 0.0, 0.0)
    return NrrdVolume(
        data=data.astype(dt.newbyteorder("=")),
        spacing=(float(norms[2]), float(norms[1]), float(norms[0])),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        directions=dirs,
        header=header,
    )

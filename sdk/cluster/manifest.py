"""``--manifest CSV``: triage a list of series folders/files instead of walking one archive root.

The CSV has a header row with a ``path`` column (other columns are ignored, so a PACS export or a
study list can be used as is). Each path is a series folder, a folder of several series, or one
file; relative paths are resolved against the CSV's folder. Each entry is discovered with the
integration engine's :func:`sdk.integration.batch.discover_series`, so grouping, error refs and
non-DICOM skipping are the same as for ``triage-batch ROOT``.

Keys stay stable and readable: ``<entry>::<SeriesInstanceUID>`` for a series directly in the entry
folder (the same key ``triage-batch ROOT`` gives when the entry is relative to ROOT),
``<entry>/<sub>::<uid>`` below it, and the file path for an unreadable file. Rows that name the same
series (one row per file, or a folder listed twice) are merged into one series.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple, Union

from ..errors import ConfigError
from ..tables import read_csv_table

PathLike = Union[str, Path]

__all__ = ["read_manifest", "discover_manifest", "discover_source"]


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the file system refuses (too long, a NUL byte)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def read_manifest(csv_path: PathLike) -> List[Tuple[str, Path]]:
    """The ``(entry as written, resolved path)`` pairs of a manifest, in file order.

    Raises:
        ConfigError: the file is missing, has no ``path`` column, or names paths that do not exist.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise ConfigError(f"--manifest {p}: no such file; give a CSV with a 'path' column")
    fieldnames, rows = read_csv_table(p, f"--manifest {p}", "a 'path' column")
    fields = [f.strip().lower() for f in fieldnames]
    if "path" not in fields:
        raise ConfigError(f"--manifest {p}: no 'path' column in the header (found {fieldnames}); "
                          f"the first row must name the columns, one of them 'path'")
    col = fieldnames[fields.index("path")]
    entries: List[Tuple[str, Path]] = []
    missing: List[str] = []
    for row in rows:
        raw = (row.get(col) or "").strip()
        if not raw or raw.startswith("#"):
            continue
        path = Path(raw) if Path(raw).is_absolute() else (p.parent / raw)
        if not _exists(path):
            missing.append(raw)
            continue
        entries.append((raw, path))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"--manifest {p}: {len(missing)} path(s) do not exist: {shown} "
                          f"(relative paths are resolved against the CSV's folder)")
    if not entries:
        raise ConfigError(f"--manifest {p}: no paths listed")
    return entries


def _join_key(entry: PurePosixPath, key: str) -> str:
    """Prefix a key of ``discover_series(entry)`` with the manifest entry."""
    folder, sep, rest = key.partition("::")
    if not sep:  # an error ref: a file path relative to the entry
        return str(entry / key)
    return (str(entry) if folder in (".", "") else str(entry / folder)) + "::" + rest


def discover_manifest(csv_path: PathLike) -> Tuple[List, int]:
    """Series refs of every manifest entry (sorted by key) and the count of non-DICOM files skipped."""
    from ..integration.batch import discover_series

    merged: Dict[str, object] = {}
    skipped = 0
    for raw, path in read_manifest(csv_path):
        entry = PurePosixPath(raw.replace("\\", "/"))
        if path.is_file():
            entry = entry.parent
        refs, n_skipped = discover_series(path)
        skipped += n_skipped
        for ref in refs:
            key = _join_key(entry, ref.key)
            prev = merged.get(key)
            if prev is None:
                merged[key] = replace(ref, key=key)
            elif ref.error is None and prev.error is None:  # type: ignore[attr-defined]
                files = tuple(sorted(set(prev.files) | set(ref.files)))  # type: ignore[attr-defined]
                merged[key] = replace(prev, files=files)  # type: ignore[arg-type]
    refs_out = [merged[k] for k in sorted(merged)]
    return refs_out, skipped


def discover_source(root: Optional[PathLike], manifest: Optional[PathLike]) -> Tuple[List, int]:
    """Refs from exactly one of ROOT or ``--manifest`` (the CLI's rule)."""
    from ..integration.batch import discover_series

    if (root is None) == (manifest is None):
        raise ConfigError("give either ROOT (an archive folder) or --manifest CSV, not both and not neither")
    if manifest is not None:
        return discover_manifest(manifest)
    return discover_series(root)  # type: ignore[arg-type]

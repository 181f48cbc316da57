"""Label tables: image CSVs, series CSVs and per-slice label rows (torch-free).

One owner for reading labels, shared by training (``sdk.train``) and evaluation
(``sdk.evaluate``): which label strings are positive, the ``images_index.csv`` format, the series
CSV with optional slice labels, and :func:`align_slice_labels`, the one place that decides in which
order a label row runs against our z order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import ConfigError
from .tables import read_csv_rows

PathLike = Union[str, Path]
#: label words, compared lower-case with "_" read as "-": the positive class and the negatives
POSITIVE = frozenset({"covid", "covid-19", "covid19"})
NEGATIVE = frozenset({"non-covid", "noncovid", "normal", "cap"})
LABEL_WORDS = "covid (or covid-19, covid19) = positive; non-covid, normal or cap = negative"


def _word(label: str) -> str:
    return str(label).strip().lower().replace("_", "-")


def is_known_label(label: str) -> bool:
    """``label`` is one of :data:`POSITIVE` / :data:`NEGATIVE`."""
    return _word(label) in POSITIVE | NEGATIVE


def is_positive(label: str) -> int:
    """1 for a positive label, 0 for a negative one; ConfigError for any other word (a typo or
    another vocabulary, e.g. "positive", would otherwise count silently as negative)."""
    word = _word(label)
    if word in POSITIVE:
        return 1
    if word in NEGATIVE:
        return 0
    raise ConfigError(f"unknown label {label!r}: expected {LABEL_WORDS}")


def _is_file(p: Path) -> bool:
    """``p.is_file()``, False for a name the file system refuses (too long, a NUL byte)."""
    try:
        return p.is_file()
    except (OSError, ValueError):
        return False


def _shown(p: Path) -> str:
    """``p`` resolved for a message (as given when the file system refuses the name)."""
    try:
        return str(p.resolve())
    except (OSError, ValueError):
        return repr(str(p)[:120])


def _load_label_table(csv_path: Path, series: Path, fp: Path) -> np.ndarray:
    """The ``slice_labels`` array of a series CSV row: a numeric .npy of 0/1 with one row per case."""
    where = f"{csv_path}: row {series}: slice_labels file {fp}"
    try:
        table = np.load(fp)
    except (OSError, ValueError, EOFError) as exc:  # not .npy, truncated, pickled / object data
        raise ConfigError(f"{where} is not a readable NumPy .npy array ({str(exc)[:120]}); save the labels with "
                          f"numpy.save (rows = cases, columns = slices, values 0/1)") from exc
    if not isinstance(table, np.ndarray) or table.ndim < 1:
        kind = "a .npz archive" if not isinstance(table, np.ndarray) else "a single number"
        raise ConfigError(f"{where} holds {kind}; give a .npy array written by numpy.save (rows = cases, "
                          f"columns = slices, values 0/1)")
    if not (np.issubdtype(table.dtype, np.number) or table.dtype == np.bool_):
        raise ConfigError(f"{where} holds {table.dtype} values; slice labels are numbers 0/1")
    return table


def _check_labels(path: Path, rows: List[Dict[str, str]], what: str) -> None:
    """Every row's label is a known word, else one ConfigError naming the CSV, the rows and the words."""
    bad = [(i + 2, r["label"]) for i, r in enumerate(rows) if not is_known_label(r["label"])]
    if bad:
        shown = ", ".join(f"line {n}: {lab!r}" for n, lab in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise ConfigError(f"{path}: {len(bad)} {what} row(s) with an unknown label - {shown}; expected {LABEL_WORDS}")


def read_images_csv(path: PathLike, split: Optional[str] = None, data_root: Optional[PathLike] = None) -> List[Dict[str, str]]:
    """Rows of an images CSV with ``abspath`` added (relative to data_root or the CSV's folder)."""
    path = Path(path)
    rows = read_csv_rows(path, ("path", "label"), "images CSV (format of images_index.csv: path,label,source,split,patient)")
    _check_labels(path, rows, "image")
    if split is not None:
        if "split" not in rows[0]:
            raise ConfigError(f"{path}: --split {split!r} given but the CSV has no 'split' column")
        available = sorted({r["split"] or "" for r in rows})   # a short row has no split (None)
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise ConfigError(f"{path}: no rows with split {split!r}; splits present: {available}")
    root = Path(data_root) if data_root is not None else path.parent
    for r in rows:
        p = Path(r["path"])
        r["abspath"] = str(p if p.is_absolute() else root / p)
    missing = [r["abspath"] for r in rows if not _is_file(Path(r["abspath"]))]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} image(s) not found, first {missing[0]} (paths are relative to "
                          f"{'--data-root' if data_root else 'the CSV folder'}; pass --data-root)")
    return rows


def read_series_csv(path: PathLike) -> List[Tuple[Path, str]]:
    """``path,label`` rows -> [(series path, label)], paths relative to the CSV's folder."""
    path = Path(path)
    rows = read_csv_rows(path, ("path", "label"), "series CSV")
    _check_labels(path, rows, "series")
    out = []
    for r in rows:
        p = Path(r["path"])
        out.append((p if p.is_absolute() else path.parent / p, r["label"]))
    return out


LABEL_ORDERS = ("z", "reversed")


def align_slice_labels(row: np.ndarray, n_slices: int, order: str = "z") -> np.ndarray:
    """Per-slice 0/1 labels of a series of ``n_slices`` slices in our z order (ascending slice
    location, ``Volume.z_mm``) from one label row padded beyond ``n_slices`` (e.g. to 200).

    ``order="z"``: the row already runs in our z order (``row[:n]``). ``order="reversed"``: the
    row runs the other way (head -> feet, InstanceNumber order), as COVID-CT-MD's slice-level
    label files do (checked on anatomy: read as stored, P001's right upper lobe lies below its
    right lower lobe) -> ``row[:n][::-1]``. The one owner of this alignment: training, the
    domain-gap check and ``ctsdk evaluate`` all call it.
    """
    if order not in LABEL_ORDERS:
        raise ConfigError(f"slice label order must be one of {LABEL_ORDERS}, not {order!r}")
    lab = np.asarray(row).astype(np.int64).reshape(-1)
    if lab.size < n_slices:
        raise ConfigError(f"slice labels have {lab.size} entries for a series of {n_slices} slices")
    if lab[n_slices:].any():
        raise ConfigError(f"slice labels mark slices beyond the series' {n_slices} slices: wrong row or series?")
    lab = lab[:n_slices]
    return (lab[::-1] if order == "reversed" else lab).copy()


def read_series_rows(path: PathLike) -> List[Dict[str, Any]]:
    """Series CSV rows with optional slice labels.

    Columns: ``path,label`` and, optionally, ``slice_labels`` (a ``.npy`` of per-slice 0/1 labels,
    rows = cases, columns = slices in ascending slice location, i.e. our z order; relative to the
    CSV's folder) and ``slice_labels_row`` (the row of this series), ``slice_labels_order``
    (``z`` - default - or ``reversed``: see :func:`align_slice_labels`; COVID-CT-MD's files are
    ``reversed``), and ``bundle`` (a bundle
    folder that scores this row instead of the command's bundle - e.g. the leave-one-series-out
    fold model that never saw this series; relative to the CSV's folder). Returns dicts with
    ``path`` (Path), ``label``, ``slice_labels`` (1-D int array or None), ``bundle`` (Path or None).
    """
    path = Path(path)
    items = read_series_csv(path)
    raw = read_csv_rows(path, ("path", "label"), "series CSV")
    out: List[Dict[str, Any]] = []
    for (p, label), r in zip(items, raw):
        labels = None
        f = (r.get("slice_labels") or "").strip()
        if f:
            fp = Path(f) if Path(f).is_absolute() else path.parent / f
            row = (r.get("slice_labels_row") or "").strip()
            if not _is_file(fp):
                raise ConfigError(f"{path}: row {p}: slice_labels file not found: {_shown(fp)} (relative paths are "
                                  f"read from the CSV's folder, {path.parent.resolve()})")
            if not row.lstrip("-").isdigit():
                raise ConfigError(f"{path}: row {p}: slice_labels_row must be the integer row of this series in "
                                  f"{fp.name}, got {row!r}")
            table = _load_label_table(path, p, fp)
            if not -len(table) <= int(row) < len(table):
                raise ConfigError(f"{path}: row {p}: slice_labels_row {row} is outside {fp.name}'s {len(table)} rows")
            values = np.asarray(table[int(row)]).reshape(-1)
            if not np.isin(values, (0, 1)).all():
                raise ConfigError(f"{path}: row {p}: slice_labels row {row} of {fp.name} holds values other than 0/1 "
                                  f"(e.g. {values[~np.isin(values, (0, 1))][0].item()!r}); slice labels are 0 or 1")
            labels = values.astype(np.int64)
        order = (r.get("slice_labels_order") or "z").strip() or "z"
        if order not in LABEL_ORDERS:
            raise ConfigError(f"{path}: row {p}: slice_labels_order must be one of {LABEL_ORDERS}, not {order!r}")
        bundle = None
        bcol = (r.get("bundle") or "").strip()
        if bcol:
            bundle = Path(bcol) if Path(bcol).is_absolute() else path.parent / bcol
            if not _is_file(bundle / "manifest.json"):
                raise ConfigError(f"{path}: row {p}: bundle {bundle} is not a bundle folder (no manifest.json)")
        out.append({"path": p, "label": label, "slice_labels": labels, "slice_labels_order": order, "bundle": bundle})
    return out

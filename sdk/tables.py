"""Reading the CSV tables ctsdk takes as input (images, series, predictions, manifests), and
:func:`json_safe`, the one converter of results to plain JSON types."""
from __future__ import annotations

import csv
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple, Union

import numpy as np

from .errors import ConfigError

PathLike = Union[str, Path]


def read_csv_table(path: Path, subject: str, columns: str) -> Tuple[List[str], List[Dict[str, str]]]:
    """(header, rows as dicts) of a UTF-8 CSV file (a byte-order mark - Excel's "CSV UTF-8" - is
    dropped). ConfigError ``"<subject> is not UTF-8 text ..."`` / ``"... not a readable CSV ..."``
    (saying it needs ``columns``) for anything else: a decoding error is never passed on."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{subject} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as a UTF-8 CSV "
                          f"with {columns}") from exc
    except csv.Error as exc:
        raise ConfigError(f"{subject} is not a readable CSV ({exc}); give a comma-separated file with {columns}") from exc


def read_csv_rows(path: PathLike, required: Iterable[str], what: str) -> List[Dict[str, str]]:
    """All rows of a CSV as dicts, after checking the file exists and has the ``required`` columns.
    UTF-8 text; a byte-order mark (Excel's "CSV UTF-8") is dropped.

    Raises ConfigError naming the file, ``what`` it should be, and the columns found - also for a
    file that is not UTF-8 text or not CSV (a decoding error is never passed on).
    """
    path = Path(path)
    need = list(required)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found (columns: {','.join(need)})")
    _, rows = read_csv_table(path, f"{path}: {what}", f"the columns {','.join(need)}")
    if not rows or not set(need) <= set(rows[0]):
        found = sorted(rows[0]) if rows else "(no rows)"
        raise ConfigError(f"{path}: {what} needs the columns {','.join(need)}; found {found}")
    return rows


def json_safe(o: Any) -> Any:
    """Plain JSON types for any result, config or report: dataclasses become dicts, NumPy scalars
    Python numbers, paths and other objects strings; NaN / inf (e.g. AUC of a one-class subset)
    become None."""
    if is_dataclass(o) and not isinstance(o, type):
        o = asdict(o)
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float):
        return o if np.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    return str(o)

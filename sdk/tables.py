"""Reading the CSV tables ctsdk takes as input (images, series, predictions, manifests)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, Iterable, List, Union

from .errors import ConfigError

PathLike = Union[str, Path]


def read_csv_rows(path: PathLike, required: Iterable[str], what: str) -> List[Dict[str, str]]:
    """All rows of a CSV as dicts, after checking the file exists and has the ``required`` columns.

    Raises ConfigError naming the file, ``what`` it should be, and the columns found.
    """
    path = Path(path)
    need = list(required)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found (columns: {','.join(need)})")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not set(need) <= set(rows[0]):
        found = sorted(rows[0]) if rows else "(no rows)"
        raise ConfigError(f"{path}: {what} needs the columns {','.join(need)}; found {found}")
    return rows

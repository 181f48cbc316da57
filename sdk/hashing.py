"""Streamed sha256 of a file: the one hash helper for bundles, exports and engine-cache keys (a
leaf module, so the runtime can use it without importing :mod:`sdk.bundle`)."""
from __future__ import annotations

import hashlib
import os
from typing import Union


def sha256_file(path: Union[str, "os.PathLike[str]"], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

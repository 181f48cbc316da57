"""Where ctsdk finds the shared data folder (one owner; training, calibration, export samples,
evaluation defaults and the GPU report all ask here).

Order: ``$CTSDK_SHARED_DATA``; else ``../shared/data`` beside a source checkout (the folder that
holds this ``sdk`` package and a ``pyproject.toml``); else ``../shared/data`` beside the current
directory. An installed copy (``pip install --target DIR .``) is not a checkout: run it with
``CTSDK_SHARED_DATA`` set, or from a directory beside ``shared/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

ENV = "CTSDK_SHARED_DATA"


def source_checkout() -> "Path | None":
    """The source checkout holding this package (its ``pyproject.toml`` beside ``sdk/``), or None
    for an installed copy."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def shared_data_candidates() -> List[Path]:
    """The places :func:`shared_data_root` looks, in order."""
    env = os.environ.get(ENV)
    if env:
        return [Path(env).expanduser().resolve()]
    out = []
    checkout = source_checkout()
    if checkout is not None:
        out.append((checkout.parent / "shared" / "data").resolve())
    out.append((Path.cwd().parent / "shared" / "data").resolve())
    return out


def shared_data_root() -> Path:
    """The shared data folder: the first existing candidate, else the first candidate (so that
    messages name where it was expected)."""
    cands = shared_data_candidates()
    return next((c for c in cands if c.is_dir()), cands[0])


__all__ = ["ENV", "shared_data_candidates", "shared_data_root", "source_checkout"]

"""Model-free hooks for commissioning a cluster (``--triage-fn sdk.cluster.probe:paths_check``).

A cluster triages an archive only if every node sees it at the same path (a shared file system:
NFS, a CSI volume, an S3/GCS FUSE mount). :func:`paths_check` runs on the actors, stats every file
of a series and reports the host that did it, without loading models; a batch with it measures
Ray's own per-series cost (the hook only stats files).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Dict, Sequence

from ..errors import SeriesError

__all__ = ["paths_check", "crash_if_marked", "CRASH_MARKER"]


def paths_check(files: Sequence[Path]) -> Dict[str, Any]:
    """Check that this node can see (and stat) every file of the series.

    Returns:
        A result dict with ``label`` ``"not_triaged"``, the host, the file count and total bytes.

    Raises:
        SeriesError: a file is missing or unreadable on this node (names the first one and the host).
    """
    host = socket.gethostname()
    total = 0
    for f in files:
        p = Path(f)
        try:
            total += p.stat().st_size
        except OSError as exc:
            raise SeriesError(f"not visible from node {host} ({exc.strerror})", p,
                              "every Ray node must mount the archive at the same path") from exc
        if not os.access(p, os.R_OK):
            raise SeriesError(f"not readable from node {host}", p, "check the mount's permissions for the Ray user")
    return {"label": "not_triaged", "probabilities": {}, "eligible": None,
            "reasons": ["paths_check: no model was run"], "host": host, "n_files": len(files), "bytes": total}


#: A series folder holding a file of this name makes :func:`crash_if_marked` kill its worker.
CRASH_MARKER = "CTSDK_CRASH.txt"


def crash_if_marked(files: Sequence[Path]) -> Dict[str, Any]:
    """Fault injection (``--triage-fn sdk.cluster.probe:crash_if_marked``): commissioning only.

    Behaves like :func:`paths_check`, except that a series whose folder holds a file named
    ``CTSDK_CRASH.txt`` kills the worker process (``os._exit``), as an out-of-memory kill or a
    native decoder crash would. Use it to see, on your own cluster, that such a series ends as one
    ``ClusterTaskError`` line after the bounded retries while the other series finish.
    """
    if files and (Path(files[0]).parent / CRASH_MARKER).exists():
        os._exit(86)
    return paths_check(files)

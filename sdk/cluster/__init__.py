"""Triage beyond one machine on a Ray cluster (issue #10; optional extra ``ctsdk[cluster]``).

    from sdk.cluster import run_batch_ray, RayDispatcher

- :func:`run_batch_ray` - ``ctsdk triage-batch --engine ray``: Ray Data maps the archive's series
  (paths, never pixels) over an actor pool (one :class:`sdk.triage.Triage` per actor); the driver
  writes the same JSON lines as the local engine through the same writer, plus ``ray_node_id``.
- :class:`RayDispatcher` - ``ctsdk listen --engine ray``: a triage factory for
  :class:`sdk.integration.listener.Listener` whose triage functions run on cluster actors.
- :func:`discover_manifest` / :func:`discover_source` - ``--manifest CSV`` (a ``path`` column).
- :func:`paths_check` - a model-free hook that checks every node sees the archive (commissioning).

Nothing here imports ray at import time: ``import sdk`` and the core install stay ray-free, and
without ray the Ray entry points raise one line, "install ctsdk[cluster]" (exit code 2 in the CLI).
See docs/scale.md.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

_LAZY = {
    "run_batch_ray": ".batch", "RayOptions": ".batch",
    "TriageActor": ".batch",
    "ClusterBatchSummary": ".batch",
    "build_triage_fn": ".batch",
    "RayDispatcher": ".dispatch",
    "discover_manifest": ".manifest",
    "discover_source": ".manifest",
    "read_manifest": ".manifest",
    "paths_check": ".probe",
    "require_ray": "._ray",
    "ray_session": "._ray",
    "RAY_REQUIREMENT": "._ray",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

"""Scanner and PACS integration: DICOM listener, DICOM results, batch triage (issue #8).

    from sdk.integration import Listener, ListenerConfig, run_batch, discover_series, JsonlWriter
    from sdk.integration import write_dicom_results

- :mod:`.storage` - path-safe, durable storage of received instances and per-series state.
- :mod:`.listener` - pynetdicom C-STORE SCP, quiet-period scheduler, bounded triage workers.
- :mod:`.results` - highdicom Comprehensive SR + Secondary Capture heat maps, C-STORE forward.
- :mod:`.batch` - series discovery, the JSONL writer, ``ctsdk triage-batch``.
- :mod:`.triage_fns` - the triage hooks (real Triage, model-free inventory / ingest checks).

pynetdicom and highdicom are optional (extra ``dicomnet``) and imported on first use.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

_LAZY = {
    "SeriesStore": ".storage",
    "safe_key": ".storage",
    "is_valid_uid": ".storage",
    "atomic_write_bytes": ".storage",
    "Listener": ".listener",
    "ListenerConfig": ".listener",
    "ForwardTarget": ".listener",
    "parse_forward": ".listener",
    "write_dicom_results": ".results",
    "forward_files": ".results",
    "discover_series": ".batch",
    "SeriesRef": ".batch",
    "JsonlWriter": ".batch",
    "make_record": ".batch",
    "error_record": ".batch",
    "run_batch": ".batch", "BatchOptions": ".batch",
    "BatchSummary": ".batch",
    "Overlay": ".triage_fns",
    "TriageOutput": ".triage_fns",
    "make_triage_fn": ".triage_fns",
    "inventory": ".triage_fns",
    "ingest_check": ".triage_fns",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

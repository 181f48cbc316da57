"""Per-series state of the listener, in process: quiet period, re-sends, late instances, failures."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig  # noqa: E402
from sdk.integration.results import forward_files  # noqa: E402
from sdk.integration.triage_fns import inventory  # noqa: E402


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    from sdk.phantom import write_phantom_series

    root = tmp_path_factory.mktemp("ph")
    return (write_phantom_series(root / "a", n_slices=5, size=32, series_uid="1.2.826.0.1.1"),
            write_phantom_series(root / "b", n_slices=3, size=32, series_uid="1.2.826.0.1.2"))


def _ledger(out: Path):
    p = out / "triage-log.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def test_resend_late_instance_and_failure_isolation(two_series, tmp_path):
    a, b = two_series
    calls = []

    def triage(files):
        calls.append(len(files))
        if any("1.2.826.0.1.2" in pydicom.dcmread(str(f), stop_before_pixels=True).SeriesInstanceUID for f in files):
            raise RuntimeError("model exploded on series b")
        return inventory(files)

    out = tmp_path / "out"
    # quiet period 1.2 s: series b's C-STOREs and the 0.2 s sleep below must fit inside it (0.6 s was
    # exceeded on a loaded 2-core machine, and series a was already DONE at the check)
    lst = Listener(ListenerConfig(out=out, port=0, quiet_seconds=1.2, workers=2, queue_size=1), lambda: triage).start()
    try:
        target = ForwardTarget(*lst.address, "CTSDK")
        forward_files(a[:4], target, calling_ae="S")
        forward_files(b, target, calling_ae="S")
        time.sleep(0.2)
        assert not (out / "series" / "1.2.826.0.1.1" / "DONE").exists()  # still inside the quiet period
        assert lst.wait_idle(30)
        forward_files(a[:4], target, calling_ae="S")  # a re-send changes nothing
        time.sleep(1.8)
        assert lst.wait_idle(30)
        assert [r["series_key"] for r in _ledger(out)].count("1.2.826.0.1.1") == 1
        forward_files(a[4:], target, calling_ae="S")  # a late instance re-opens the series once
        time.sleep(0.2)
        assert lst.wait_idle(30)
    finally:
        lst.stop()
    ledger = _ledger(out)
    runs_a = [r for r in ledger if r["series_key"] == "1.2.826.0.1.1"]
    assert [r["n_instances"] for r in runs_a] == [4, 5] and [r["state"] for r in runs_a] == ["done", "done"]
    marker = json.loads((out / "series" / "1.2.826.0.1.1" / "DONE").read_text())
    assert marker["revision"] == 2 and marker["n_instances"] == 5
    failed = json.loads((out / "series" / "1.2.826.0.1.2" / "FAILED").read_text())
    assert failed["error"] == {"type": "RuntimeError", "message": "model exploded on series b",
                               "traceback": failed["error"]["traceback"]}
    assert [r["state"] for r in ledger if r["series_key"] == "1.2.826.0.1.2"] == ["failed"]  # not retried
    assert lst.counts["duplicates"] == 4 and lst.counts["received"] == 8

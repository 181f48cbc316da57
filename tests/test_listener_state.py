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
    # the ledger says which revision and which instance set each run covered
    assert [r["revision"] for r in runs_a] == [1, 2] and runs_a[-1]["instances_digest"] == marker["instances_digest"]
    assert runs_a[0]["instances_digest"] != marker["instances_digest"]
    failed = json.loads((out / "series" / "1.2.826.0.1.2" / "FAILED").read_text())
    assert failed["error"] == {"type": "RuntimeError", "message": "model exploded on series b",
                               "traceback": failed["error"]["traceback"]}
    assert [r["state"] for r in ledger if r["series_key"] == "1.2.826.0.1.2"] == ["failed"]  # not retried
    assert lst.counts["duplicates"] == 4 and lst.counts["received"] == 8


def _rewrite(paths, **values):
    """Rewrite elements of every file (values: name -> callable(k) giving file k's value)."""
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(str(p))
        for name, value in values.items():
            setattr(ds, name, value(k))
            if name == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value(k)
        ds.save_as(str(p))


def test_placeholder_sop_uid_keeps_every_slice(tmp_path):
    """An anonymiser wrote one SOPInstanceUID into every file: each position is its own slice on
    disk (not written over the first), the series is triaged once with all of them, and a re-send
    replaces files instead of adding any."""
    from sdk.io import load_series
    from sdk.phantom import write_phantom_series

    paths = write_phantom_series(tmp_path / "src", n_slices=6, size=32, series_uid="1.2.826.0.1.7")
    _rewrite(paths, SOPInstanceUID=lambda k: "1.2.826.0.1.7.1")
    out = tmp_path / "out"
    lst = Listener(ListenerConfig(out=out, port=0, quiet_seconds=0.8, workers=1), lambda: inventory).start()
    try:
        target = ForwardTarget(*lst.address, "CTSDK")
        forward_files(paths, target, calling_ae="S")
        assert lst.wait_idle(30)
        forward_files(paths, target, calling_ae="S")  # a re-send of all six
        time.sleep(1.2)
        assert lst.wait_idle(30)
    finally:
        lst.stop()
    stored = sorted((out / "series" / "1.2.826.0.1.7" / "instances").glob("*.dcm"))
    assert len(stored) == 6 and sum("~p" in p.name for p in stored) == 5
    assert lst.counts["uid_reused"] == 5 and lst.counts["received"] == 6 and lst.counts["duplicates"] == 6
    runs = [r for r in _ledger(out) if r["series_key"] == "1.2.826.0.1.7"]
    assert [(r["state"], r["n_instances"]) for r in runs] == [("done", 6)]  # the re-send re-opened nothing
    vol = load_series(stored)
    ref = load_series(paths)
    assert vol.shape == ref.shape == (6, 32, 32) and (vol.hu == ref.hu).all()


def test_series_uid_regenerated_per_file_is_triaged_once(tmp_path):
    """An anonymiser gave every file its own SeriesInstanceUID: the single-instance series are held
    until they are all quiet, moved into one series folder and triaged once as one series; a real
    series sent beside them is untouched, and fewer than MIN_SPLIT_SERIES such files are not merged."""
    from sdk.io import load_series
    from sdk.io.reader import MIN_SPLIT_SERIES
    from sdk.phantom import write_phantom_series

    n = MIN_SPLIT_SERIES + 2
    split = write_phantom_series(tmp_path / "split", n_slices=n, size=32)
    _rewrite(split, SeriesInstanceUID=lambda k: f"1.2.826.0.1.8.{k + 1}")
    whole = write_phantom_series(tmp_path / "whole", n_slices=4, size=32, series_uid="1.2.826.0.1.9")
    out = tmp_path / "out"
    lst = Listener(ListenerConfig(out=out, port=0, quiet_seconds=0.8, workers=1), lambda: inventory).start()
    try:
        target = ForwardTarget(*lst.address, "CTSDK")
        forward_files(split[: n // 2], target, calling_ae="S")
        forward_files(whole, target, calling_ae="S")
        forward_files(split[n // 2:], target, calling_ae="S")
        assert lst.wait_idle(30)
    finally:
        lst.stop()
    runs = {r["series_key"]: r for r in _ledger(out)}
    assert sorted(runs) == ["1.2.826.0.1.9", "merged-1.2.826.0.1.8.1"], sorted(runs)
    assert runs["merged-1.2.826.0.1.8.1"]["n_instances"] == n and runs["1.2.826.0.1.9"]["n_instances"] == 4
    assert lst.counts["series_merged"] == 1
    assert sorted(p.name for p in (out / "series").iterdir()) == ["1.2.826.0.1.9", "merged-1.2.826.0.1.8.1"]
    vol = load_series(sorted((out / "series" / "merged-1.2.826.0.1.8.1" / "instances").glob("*.dcm")))
    assert vol.shape == load_series(split).shape == (n, 32, 32)

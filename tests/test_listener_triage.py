"""The real :class:`sdk.triage.Triage` behind the listener and the batch driver.

A phantom series is C-STOREd (pynetdicom SCU, so no dcmtk needed) to an in-process listener whose
workers run the default bundle; its results are forwarded (``--forward``) to a second listener.
Skipped (with the reason) only when a package the default bundle or the network needs is not
installed; a Triage that fails to construct fails the test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from sdk.integration.batch import BatchOptions, JsonlWriter, run_batch  # noqa: E402
from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig  # noqa: E402
from sdk.integration.results import forward_files  # noqa: E402
from sdk.integration.triage_fns import inventory, make_triage_fn  # noqa: E402


@pytest.fixture(scope="module")
def triage_fn():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the default bundle's classifier)")
    pytest.importorskip("xgboost", reason="xgboost is not installed (the default bundle's aggregator)")
    return make_triage_fn()


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from sdk.phantom import write_phantom_series

    return write_phantom_series(tmp_path_factory.mktemp("ph") / "cur", n_slices=48, size=192, spacing=(2.0, 1.8, 1.8),
                                noise_hu=10.0, seed=5, ground_glass=True, consolidation=True)


def test_listener_triages_with_the_real_model_and_forwards(triage_fn, series, tmp_path):
    pacs = Listener(ListenerConfig(out=tmp_path / "pacs", port=0, ae_title="PACS", allow_ae=("CTSDK",),
                                   quiet_seconds=0.5), lambda: inventory).start()
    try:
        host, pacs_port = pacs.address
        node = Listener(ListenerConfig(out=tmp_path / "node", port=0, ae_title="CTSDK", allow_ae=("SCANNER",),
                                       quiet_seconds=1.0, forward=ForwardTarget(host, pacs_port, "PACS")),
                        lambda: triage_fn).start()
        try:
            sent = forward_files(series, ForwardTarget(*node.address, "CTSDK"), calling_ae="SCANNER")
            assert sent == len(series)
            assert node.wait_idle(120), node.summary()
        finally:
            node.stop()
        (d,) = [p for p in (tmp_path / "node" / "series").iterdir()]
        marker = json.loads((d / "DONE").read_text())
        result = json.loads((d / "results" / "result.json").read_text())
        # the phantom's lungs (~1.1 l) are below the 1500 ml bar: "indeterminate" with that reason (sdk.decision)
        assert result["eligible"] is True
        assert result["label"] in result["probabilities"] or (result["label"] == "indeterminate" and result["reasons"])
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        sr = pydicom.dcmread(str(d / "results" / "sr.dcm"))
        values = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        assert values["Finding"].ConceptCodeSequence[0].CodeValue == result["label"]
        assert values["Algorithm Name"].TextValue == result["bundle"]["name"]
        for cls, p in result["probabilities"].items():
            assert float(values[f"Probability of {cls}"].MeasuredValueSequence[0].NumericValue) == pytest.approx(p)
        scs = sorted((d / "results").glob("sc-*.dcm"))
        assert len(scs) == min(3, len(result["slice_scores"]))
        # independent reference: the facade's own PNG overlays of the same series (top 3 slices)
        import cv2

        from sdk.triage import Triage

        ref_result = Triage().run([str(f) for f in series])
        pngs = ref_result.save_heatmaps(tmp_path / "png", top=3)
        z_of = {s.index: round(s.z_mm, 3) for s in ref_result.slice_scores}
        expected = {z_of[int(p.stem.split("_")[1])]: cv2.imread(str(p))[..., ::-1] for p in pngs}
        src_by_uid = {pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID: f for f in series}
        for sc_path in scs:
            sc = pydicom.dcmread(str(sc_path))
            ref = pydicom.dcmread(str(src_by_uid[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]))
            z = round(float(ref.ImagePositionPatient[2]), 3)
            assert z in expected, (z, sorted(expected))  # the SC references the slice it shows
            np.testing.assert_array_equal(sc.pixel_array, expected[z])
        assert marker["forwarded_to"] == f"{host}:{pacs_port}:PACS" and "forward_error" not in marker
        assert pacs.wait_idle(30)
    finally:
        pacs.stop()
    got = {pydicom.dcmread(str(p)).SOPInstanceUID for p in (tmp_path / "pacs").glob("series/*/instances/*.dcm")}
    written = sorted((d / "results").glob("*.dcm"))
    # the HU opacity: TID 1500 measurements and the SEG of the planted ground glass / consolidation
    assert {"sr.dcm", "measurements.dcm", "seg.dcm"} <= {p.name for p in written}
    assert pydicom.dcmread(str(d / "results" / "seg.dcm")).SegmentationType == "BINARY"
    want = {pydicom.dcmread(str(p)).SOPInstanceUID for p in written}
    assert got == want  # the PACS received exactly the SR, the measurements, the SCs and the SEG


def test_batch_with_the_real_model(triage_fn, series, tmp_path):
    root = tmp_path / "archive"
    (root / "s").mkdir(parents=True)
    for f in series:
        (root / "s" / f.name).symlink_to(f)
    (root / "broken.dcm").write_bytes(b"\0" * 10)
    out = tmp_path / "r.jsonl"
    summary = run_batch(root, out, BatchOptions(triage_fn="sdk.integration.triage_fns:make_triage_fn", progress=False))
    recs = {r["key"]: r for r in JsonlWriter.read(out)}
    assert summary.processed == 2 and set(recs) == {"broken.dcm", f"s::{pydicom.dcmread(str(series[0])).SeriesInstanceUID}"}
    good = recs[f"s::{pydicom.dcmread(str(series[0])).SeriesInstanceUID}"]
    assert good["error"] is None and good["timings_ms"]["total"] > 0
    assert good["label"] in good["probabilities"] or (good["label"] == "indeterminate" and good["reasons"])
    assert recs["broken.dcm"]["error"]["type"] == "NotDicomError"

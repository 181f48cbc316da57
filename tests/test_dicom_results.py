"""DICOM result objects: Comprehensive SR + Secondary Capture heat maps (highdicom).

Checked by re-reading with pydicom against the inputs (labels, probabilities, references, pixels)
and with dciodvfy (dicom3tools) where installed: any "Error" line fails the test; warnings are
listed in docs/integration.md.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import shared_path

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from sdk.integration.results import patient_orientation, write_dicom_results  # noqa: E402
from sdk.integration.triage_fns import RESEARCH_ONLY, Overlay  # noqa: E402

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
RESULT = {
    "label": "covid",
    "probabilities": {"non_covid": 0.2345, "covid": 0.7655},
    "eligible": True,
    "reasons": [],
    "bundle": {"name": "ctsdk-default", "version": "0.1.0-test", "positive_class": "covid"},
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> List[Path]:
    from sdk.phantom import write_phantom_series

    return write_phantom_series(tmp_path_factory.mktemp("ph") / "s", n_slices=12, size=96, ground_glass=True)


def _overlay(src: Path, seed: int) -> Overlay:
    """A real heat-map overlay (sdk.heatmap) on the source slice's HU."""
    from sdk.heatmap import overlay, window_to_unit

    ds = pydicom.dcmread(str(src))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rng = np.random.default_rng(seed)
    heat = rng.random(hu.shape).astype(np.float32)
    bgr = overlay(window_to_unit(hu, (-1350, 150)), heat, alpha=0.5)
    return Overlay(np.ascontiguousarray(bgr[..., ::-1]), src, f"test heat map {seed}")


def _content(sr) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "TEXT":
            out[name] = item.TextValue
        elif item.ValueType == "CODE":
            out[name] = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def dciodvfy(path: Path) -> List[str]:
    """dciodvfy output lines; the test fails on any line starting with 'Error'."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not found: apt-get install -y dicom3tools")
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = [l for l in (res.stdout + res.stderr).splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("Error")]
    assert not errors, f"{path.name}: dciodvfy errors:\n" + "\n".join(errors)
    return lines


def test_sr_and_sc_content_match_inputs(phantom, tmp_path):
    overlays = [_overlay(phantom[5], 1), _overlay(phantom[7], 2)]
    paths = write_dicom_results(phantom, RESULT, overlays, tmp_path)
    assert [p.name for p in paths] == ["sr.dcm", "sc-001.dcm", "sc-002.dcm"]
    sources = [pydicom.dcmread(str(p)) for p in phantom]

    sr = pydicom.dcmread(str(paths[0]))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    c = _content(sr)
    assert c["Comment"] == RESEARCH_ONLY
    assert c["Algorithm Name"] == "ctsdk-default" and c["Algorithm Version"] == "0.1.0-test"
    assert c["Finding"] == "covid"
    for cls, p in RESULT["probabilities"].items():
        assert c[f"Probability of {cls}"] == pytest.approx(p, abs=1e-9)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.PatientID == sources[0].PatientID
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert evidence == {str(s.SOPInstanceUID) for s in sources}
    refd_series = {se.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence for se in s.ReferencedSeriesSequence}
    assert refd_series == {sources[0].SeriesInstanceUID}

    for ov, path in zip(overlays, paths[1:]):
        sc = pydicom.dcmread(str(path))
        src = pydicom.dcmread(str(ov.source_file))
        assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.PhotometricInterpretation == "RGB"
        np.testing.assert_array_equal(sc.pixel_array, ov.rgb)  # exact pixels, no re-encoding loss
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in src.PixelSpacing]
        assert list(sc.PatientOrientation) == list(patient_orientation(src)) == ["L", "P"]
        assert RESEARCH_ONLY in sc.ImageComments


def test_result_uids_are_deterministic(phantom, tmp_path):
    a = write_dicom_results(phantom, RESULT, [], tmp_path / "a")
    b = write_dicom_results(phantom, RESULT, [], tmp_path / "b")
    uids = lambda ps: [pydicom.dcmread(str(p)).SOPInstanceUID for p in ps]  # noqa: E731
    assert uids(a) == uids(b)  # a re-run after a crash replaces, never duplicates, in a PACS
    c = write_dicom_results(phantom[:-1], RESULT, [], tmp_path / "c")
    assert set(uids(c)).isdisjoint(uids(a))  # a different instance set is a different result


def test_key_image_when_no_heat_map(phantom, tmp_path):
    paths = write_dicom_results(phantom, {"label": "not_eligible", "eligible": False, "reasons": ["too thick"]},
                                [], tmp_path)
    sc = pydicom.dcmread(str(paths[1]))
    mid = pydicom.dcmread(str(phantom[len(phantom) // 2]))
    hu = mid.pixel_array * float(mid.RescaleSlope) + float(mid.RescaleIntercept)
    grey = np.round(np.clip((hu + 1350.0) / 1500.0, 0, 1) * 255.0).astype(np.uint8)
    assert np.abs(sc.pixel_array[..., 0].astype(int) - grey).max() <= 1
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == mid.SOPInstanceUID
    c = _content(pydicom.dcmread(str(paths[0])))
    assert c["Triage eligibility"] == "not eligible: too thick"


def test_dciodvfy_phantom(phantom, tmp_path):
    paths = write_dicom_results(phantom, RESULT, [_overlay(phantom[3], 3)], tmp_path)
    for p in paths:
        dciodvfy(p)


def test_real_series_header_p001(tmp_path):
    """Anonymised real headers (no PatientName): Type 2 attributes are added empty, never invented."""
    folder = shared_path("dicom", "covid-ct-md", "covid-P001")
    files = sorted(folder.glob("*.dcm"))[:6]
    paths = write_dicom_results(files, RESULT, [], tmp_path)
    src = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    assert "PatientName" not in src
    for p in paths:
        ds = pydicom.dcmread(str(p))
        assert ds.PatientName == "" and ds.StudyInstanceUID == src.StudyInstanceUID
        dciodvfy(p)

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


# --- opacity: TID 1500 measurements and the SEG ------------------------------------------------
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def opacity_case(phantom):
    """A real sdk.opacity measurement of the phantom (planted ground glass) and its label map."""
    from scipy import ndimage

    from sdk.integration.triage_fns import OpacityMap
    from sdk.io import load_series
    from sdk.opacity import OpacityConfig, measure_opacity

    vol = load_series(phantom)
    # the phantom's lungs: -850 HU (ground glass -600 included), vessel holes filled per slice
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in (vol.hu > -900) & (vol.hu < -500)])
    op = measure_opacity(vol.hu, lungs, vol.spacing, config=OpacityConfig(base_exclusion=0.0, apex_exclusion=0.0))
    zs = [z for z in range(vol.shape[0]) if op.label_map[z].any()]
    labels = np.stack([op.full_slice(z) for z in zs])
    labels[0, :4, :4] = 2                        # plus a known consolidation patch on the first slice
    result = dict(RESULT, lung_opacity=op.to_dict())
    return result, OpacityMap(np.asarray(vol.z_mm)[zs], labels), vol


def _measurements(sr) -> Dict[str, Dict[str, float]]:
    """{tracking identifier: {concept meaning: value}} of a TID 1500 report."""
    out: Dict[str, Dict[str, float]] = {}
    root = sr.ContentSequence
    for item in root:
        if item.ConceptNameCodeSequence[0].CodeValue != "126010":  # Imaging Measurements
            continue
        for group in item.ContentSequence:
            vals, ident = {}, None
            for c in group.ContentSequence:
                meaning = c.ConceptNameCodeSequence[0].CodeMeaning
                if c.ValueType == "TEXT" and meaning == "Tracking Identifier":
                    ident = c.TextValue
                elif c.ValueType == "NUM":
                    vals[meaning] = float(c.MeasuredValueSequence[0].NumericValue)
            out[ident] = vals
    return out


def test_opacity_measurements_sr_tid1500(phantom, opacity_case, tmp_path):
    result, _, _ = opacity_case
    paths = write_dicom_results(phantom, result, [], tmp_path)
    assert [p.name for p in paths] == ["sr.dcm", "sc-001.dcm", "measurements.dcm"]
    sr = pydicom.dcmread(str(paths[-1]))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    m = _measurements(sr)
    op = result["lung_opacity"]
    assert m["ground glass, both lungs"]["Ground glass fraction of lung"] == pytest.approx(100 * op["ggo_fraction"], abs=1e-3)
    assert m["ground glass, both lungs"]["Ground glass volume"] == pytest.approx(op["ggo_fraction"] * op["lung_ml"], abs=1e-2)
    assert m["consolidation, left lung"]["Consolidation fraction of lung"] == pytest.approx(
        100 * op["per_lung"]["left"]["consolidation_fraction"], abs=1e-3)
    assert m["ground glass, peripheral zone"]["Ground glass fraction of lung"] == pytest.approx(
        100 * op["per_zone"]["peripheral"]["ggo_fraction"], abs=1e-3)
    assert m["opacity pattern"]["Bilateral opacity index"] == pytest.approx(op["pattern"]["bilateral_index"], abs=1e-6)
    assert len(m) == 2 * 7 + 1
    dciodvfy(paths[-1])


def test_opacity_seg_frames_match_the_map(phantom, opacity_case, tmp_path):
    import highdicom as hd

    result, omap, vol = opacity_case
    paths = write_dicom_results(phantom, result, [], tmp_path, opacity=omap)
    assert paths[-1].name == "seg.dcm"
    seg = hd.seg.segread(str(paths[-1]))
    assert seg.SOPClassUID == SEGMENTATION and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel.split(" ")[0] for s in seg.SegmentSequence] == ["ground", "consolidation"]
    # independent reference: the source instance at each map slice's z (read from its own header)
    by_z = {round(float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2]), 3):
            str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in phantom}
    for z, lab in zip(omap.z_mm, omap.labels):
        uid = by_z[round(float(z), 3)]
        for number in (1, 2):
            want = (lab == number).astype(np.uint8)
            if not want.any():
                continue
            got = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[number],
                                                    assert_missing_frames_are_empty=True)[0, ..., 0]
            np.testing.assert_array_equal(got, want)
    assert seg.StudyInstanceUID == pydicom.dcmread(str(phantom[0]), stop_before_pixels=True).StudyInstanceUID
    dciodvfy(paths[-1])


def test_every_object_carries_the_package_version(phantom, opacity_case, tmp_path):
    """SoftwareVersions = the ctsdk package on every object; the bundle's version stays the
    algorithm's (SR Algorithm Version, the measurements' device model name)."""
    from sdk import __version__

    result, omap, _ = opacity_case
    paths = write_dicom_results(phantom, result, [_overlay(phantom[3], 4)], tmp_path, opacity=omap)
    assert [p.name for p in paths] == ["sr.dcm", "sc-001.dcm", "measurements.dcm", "seg.dcm"]
    for p in paths:
        ds = pydicom.dcmread(str(p))
        assert ds.SoftwareVersions == __version__, p.name
        assert ds.Manufacturer == "ctsdk"
    assert _content(pydicom.dcmread(str(paths[0])))["Algorithm Version"] == RESULT["bundle"]["version"]
    assert RESULT["bundle"]["version"] != __version__


def test_opacity_map_off_the_series_is_refused(phantom, opacity_case, tmp_path):
    from sdk.errors import ResultWriteError
    from sdk.integration.triage_fns import OpacityMap

    result, omap, _ = opacity_case
    bad = OpacityMap(omap.z_mm + 1000.0, omap.labels)
    with pytest.raises(ResultWriteError, match="no source instance"):
        write_dicom_results(phantom, result, [], tmp_path, opacity=bad)


def test_header_warnings_are_logged_not_shown(phantom, tmp_path, caplog):
    """A source PatientName highdicom warns about (as lung-pet-ct-dx's 'Lung_Dx-A0002') reaches the
    log once at INFO, naming the folder, not the user's terminal as a UserWarning; files are written."""
    import logging
    import warnings

    src = tmp_path / "src"
    src.mkdir()
    files = []
    for p in phantom:
        ds = pydicom.dcmread(str(p))
        ds.PatientName = "Lung_Dx-A0002"
        ds.save_as(str(src / p.name))
        files.append(src / p.name)
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO, "sdk.integration.results"):
        warnings.simplefilter("always")
        paths = write_dicom_results(files, {"label": "not_eligible", "eligible": False, "reasons": ["x"]},
                                    [], tmp_path / "out")
    assert [p.name for p in paths] == ["sr.dcm", "sc-001.dcm"] and shown == []
    lines = [r.getMessage() for r in caplog.records if "while building the DICOM results" in r.getMessage()]
    assert lines and all(str(tmp_path / "out") in l for l in lines) and any("Lung_Dx-A0002" in l for l in lines)
    assert len(lines) == len(set(lines))


def test_damaged_instance_numbers_do_not_stop_the_results(phantom, tmp_path):
    """InstanceNumber only breaks position ties: a UID or a word written there (a fuzzer's find:
    ValueError from the writer and from inventory mode) orders by position alone."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from sdk.integration.triage_fns import instance_number, inventory

    damaged = []
    for i, src in enumerate(phantom):
        ds = pydicom.dcmread(str(src))
        raw = b"1.2.3.abc " if i % 2 else b"7\\8 "
        ds[Tag(0x00200013)] = RawDataElement(Tag(0x00200013), "IS", len(raw), raw, 0, False, True)
        damaged.append(tmp_path / "src" / src.name)
        damaged[-1].parent.mkdir(exist_ok=True)
        ds.save_as(damaged[-1])
    assert [instance_number(pydicom.dcmread(str(p))) for p in damaged[:2]] == [None, None]
    clean = write_dicom_results(phantom, {"label": "not_eligible", "eligible": False, "reasons": ["x"]}, [], tmp_path / "a")
    paths = write_dicom_results(damaged, {"label": "not_eligible", "eligible": False, "reasons": ["x"]}, [], tmp_path / "b")
    key = lambda p: pydicom.dcmread(str(p)).SourceImageSequence[0].ReferencedSOPInstanceUID  # noqa: E731
    assert key(paths[1]) == key(clean[1])   # the same middle slice as the key image
    inv = inventory(damaged)
    assert inv["n_instances"] == len(phantom) and inv["instance_numbers"] == []
    assert inventory(phantom)["instance_numbers"] == [1, len(phantom)]

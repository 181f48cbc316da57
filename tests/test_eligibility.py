"""Eligibility criteria (paper 000) on phantoms and hand-built volumes; references are NumPy counts."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sdk.eligibility import MIN_SLICES, check, contrast_given, lung_fraction
from sdk.io import load_series
from sdk.phantom import make_phantom_hu, write_phantom_series
from sdk.volume.core import SeriesMeta, Volume


def _volume(hu, dz=2.0, **meta) -> Volume:
    m = SeriesMeta(modality="CT", slice_thickness_mm=dz, **meta)
    return Volume(hu=hu, z_mm=np.arange(hu.shape[0]) * dz, pixel_spacing_mm=(0.7, 0.7), meta=m)


@pytest.fixture(scope="module")
def phantom_hu():
    return make_phantom_hu(32, 96, (2.0, 0.9, 0.9))


def test_phantom_series_is_eligible(tmp_path):
    write_phantom_series(tmp_path, n_slices=32, size=96, spacing=(2.0, 0.9, 0.9))
    res = check(load_series(tmp_path))
    assert res.eligible, res.reasons
    assert res.reasons == [] and all(c["ok"] for c in res.checks.values())


def test_lung_fraction_matches_numpy_count(phantom_hu):
    body = phantom_hu > -1000                      # phantom: air outside is exactly -1000
    lung = (phantom_hu >= -950) & (phantom_hu <= -500)
    ref = lung.sum() / body.sum()
    assert lung_fraction(phantom_hu) == pytest.approx(ref, abs=0.02)
    assert ref > 0.2


def test_thick_slices(tmp_path):
    write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(5.0, 0.9, 0.9))
    res = check(load_series(tmp_path))
    assert not res.eligible
    assert res.checks["slice_thickness_mm"] == {"ok": False, "value": 5.0, "limit": 3.0}
    assert any("thickness 5.0 mm > 3 mm" in r for r in res.reasons)


def test_mixed_thickness_is_judged_by_the_thickest_slice(tmp_path):
    """A quarter of the slices 5 mm thick (median 2 mm): not eligible, and the reason gives the
    range, the median and the thickest slice instead of a median no slice has."""
    import pydicom

    paths = write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(2.0, 0.9, 0.9))
    for p in paths[-6:]:
        ds = pydicom.dcmread(str(p))
        ds.SliceThickness = 5.0
        ds.save_as(str(p))
    vol = load_series(tmp_path)
    assert vol.meta.slice_thickness_mm == 2.0 and vol.meta.slice_thickness_range_mm == (2.0, 5.0)
    res = check(vol)
    assert not res.eligible
    assert res.checks["slice_thickness_mm"] == {"ok": False, "value": 5.0, "limit": 3.0, "range": [2.0, 5.0], "median": 2.0}
    assert any("slice thickness 2-5 mm (median 2 mm), thickest 5 mm > 3 mm" in r for r in res.reasons)


def test_contrast(tmp_path, phantom_hu):
    write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(2.0, 0.9, 0.9), contrast_agent="OMNIPAQUE 350")
    vol = load_series(tmp_path)
    assert "ContrastBolusAgent=OMNIPAQUE 350" in vol.meta.contrast_agent
    res = check(vol)
    assert not res.eligible and res.reasons == [r for r in res.reasons if "contrast" in r]
    assert check(_volume(phantom_hu, contrast_agent="ContrastBolusAgent=NONE")).checks["contrast"]["ok"] is True


@pytest.mark.parametrize("agent,desc,expected", [
    ("ContrastBolusAgent=C-", "", False), ("ContrastBolusAgent=NONE", "", False),
    ("ContrastBolusAgent=CE", "", True), ("ContrastBolusRoute=IV", "", True), ("", "Body 1.0 CE", True),
    ("", "CHEST 2.5 MM", False), ("ContrastBolusIngredient=IODINE", "", True), ("", "", False),
])
def test_contrast_rules(agent, desc, expected):
    assert contrast_given(agent, desc) is expected


def test_too_few_slices_not_ct_non_axial_no_lungs(phantom_hu):
    few = check(_volume(phantom_hu[: MIN_SLICES - 1]))
    assert not few.eligible and any("too few slices" in r for r in few.reasons)
    mr = check(replace(_volume(phantom_hu), meta=SeriesMeta(modality="MR", slice_thickness_mm=2.0)))
    assert not mr.eligible and any("not CT" in r for r in mr.reasons)
    cor = check(replace(_volume(phantom_hu), direction=np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])))
    assert cor.checks["orientation"]["value"] == "coronal" and not cor.eligible
    head = np.where(phantom_hu < -500, np.where(phantom_hu == -1000, -1000, 40), phantom_hu).astype(np.int16)
    nolung = check(_volume(head))
    assert not nolung.eligible and any("without lungs" in r for r in nolung.reasons)
    assert nolung.checks["lung_fraction"]["value"] == 0.0
    assert check(_volume(phantom_hu)).eligible


def test_header_criteria_and_a_given_lung_fraction(phantom_hu):
    """header_eligible is check() without the voxel criterion; a lung fraction computed elsewhere
    gives the same result as computing it here."""
    from sdk.eligibility import header_eligible

    vol = _volume(phantom_hu)
    assert header_eligible(vol) and not header_eligible(_volume(phantom_hu[: MIN_SLICES - 1]))
    head = np.where(phantom_hu < -500, np.where(phantom_hu == -1000, -1000, 40), phantom_hu).astype(np.int16)
    nolung = _volume(head)
    assert header_eligible(nolung)                 # only the voxels make it ineligible
    for v in (vol, nolung):
        assert check(v, lung_fraction_value=lung_fraction(v.hu)) == check(v)


def test_triage_overlaps_the_lung_fraction_and_still_reports_ineligible(phantom_hu, monkeypatch):
    """sdk.Triage runs the lung fraction beside the lung segmentation: a series without lungs
    (header criteria pass) is not eligible with check()'s reasons, even when the segmenter fails
    on it; on an eligible series the segmenter's error is raised."""
    import sdk

    engine = sdk.Triage(device="cpu", precision="fp32", threads=1)
    head = np.where(phantom_hu < -500, np.where(phantom_hu == -1000, -1000, 40), phantom_hu).astype(np.int16)
    nolung = _volume(head)
    r = engine.run(nolung)
    assert r.label == "not_eligible" and r.reasons == check(nolung).reasons

    def broken(volume):
        raise RuntimeError("segmenter failed")

    monkeypatch.setattr(engine, "_segment", broken)
    assert engine.run(nolung).reasons == check(nolung).reasons
    with pytest.raises(RuntimeError, match="segmenter failed"):
        engine.run(_volume(phantom_hu))


def test_kernel_path_overlaps_the_lung_fraction_and_still_reports_ineligible(phantom_hu, monkeypatch):
    """The kernel path (here its CPU harness) runs the lung fraction beside the device work, the same
    way: a series without lungs is not eligible with check()'s reasons (also when the path fails on
    it), an eligible series gets the path's result, and its error is raised."""
    import sdk

    engine = sdk.Triage(device="cpu", precision="fp32", threads=1, kernels="cpu-harness")
    head = np.where(phantom_hu < -500, np.where(phantom_hu == -1000, -1000, 40), phantom_hu).astype(np.int16)
    nolung = _volume(head)
    r = engine.run(nolung)
    assert r.label == "not_eligible" and r.reasons == check(nolung).reasons
    assert r.timings_ms["eligibility"] > 0
    seen = []
    real = engine._kpath.triage

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[0])
        return out

    monkeypatch.setattr(engine._kpath, "triage", spy)
    eligible = _volume(phantom_hu)
    assert check(eligible).eligible
    assert engine.run(eligible) is seen[-1]                 # the path's own result
    dropped = engine.run(nolung)                            # the path ran, its result was dropped
    assert len(seen) == 2 and dropped is not seen[-1] and dropped.reasons == check(nolung).reasons

    def broken(*args, **kwargs):
        raise RuntimeError("kernel path failed")

    monkeypatch.setattr(engine._kpath, "triage", broken)
    assert engine.run(nolung).reasons == check(nolung).reasons
    with pytest.raises(RuntimeError, match="kernel path failed"):
        engine.run(eligible)


@pytest.mark.parametrize("change, message", [
    (dict(pixel_spacing_mm=(0.0, 0.7)), r"pixel_spacing_mm must be two finite positive numbers .* not \(0.0, 0.7\)"),
    (dict(pixel_spacing_mm=(float("nan"), 0.7)), r"pixel_spacing_mm must be two finite positive"),
    (dict(pixel_spacing_mm=(0.7,)), r"pixel_spacing_mm must be two"),
    (dict(z_mm=np.arange(8.0)[::-1].copy()), r"z_mm must ascend strictly .* z_mm\[0\] = 7 and z_mm\[1\] = 6"),
    (dict(z_mm=np.array([0, 2, 2, 4, 6, 8, 10, 12.0])), r"z_mm\[1\] = 2 and z_mm\[2\] = 2; sort the slices"),
    (dict(z_mm=np.array([0, 2, np.nan, 4, 6, 8, 10, 12.0])), r"z_mm holds NaN / inf \(slice 2\)"),
    (dict(z_mm=np.arange(7.0)), r"z_mm has 7 positions for 8 slices"),
    (dict(hu=np.zeros((8, 4, 4), bool)), r"Volume.hu must hold HU numbers, not bool"),
    (dict(hu=np.zeros((4, 4), np.int16)), r"Volume.hu must be 3-D"),
])
def test_a_volume_that_breaks_its_contract_is_a_typed_error(change, message):
    """A caller's own Volume (the reader's meet the contract by construction): a VolumeError - a
    CtsdkError and still a ValueError - instead of ZeroDivisionError / a misleading 'no lung found'."""
    from sdk.errors import CtsdkError, VolumeError

    args = dict(hu=np.zeros((8, 4, 4), np.int16), z_mm=np.arange(8.0), pixel_spacing_mm=(0.7, 0.7))
    args.update(change)
    with pytest.raises(VolumeError, match=message) as err:
        Volume(**args)
    assert isinstance(err.value, CtsdkError) and isinstance(err.value, ValueError)
    Volume(hu=np.zeros((8, 4, 4), np.float32), z_mm=np.array([0, 1, 2.5, 4, 6, 7, 9, 12.0]), pixel_spacing_mm=(0.7, 0.7))  # uneven is fine

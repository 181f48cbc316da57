"""Slice selection: paper 002's rule (restated in HU / mm) against a direct per-pixel reference,
the lung-area rule, and coverage of the COVID-CT-MD slice-level infection labels."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_path
from sdk.errors import ConfigError
from sdk.slices import DARK_HU, paper002_dark_area, select_slices
from sdk.volume.core import Volume


def _volume(hu: np.ndarray, spacing=(0.7, 0.7)) -> Volume:
    return Volume(hu=hu, z_mm=np.arange(hu.shape[0]) * 2.0, pixel_spacing_mm=spacing)


def test_paper_box_is_the_papers_at_512_and_0p7mm() -> None:
    hu = np.zeros((2, 512, 512), np.int16)
    _, _, det = paper002_dark_area(hu, (0.7, 0.7))
    assert det["box_px"] == {"y": [240, 340], "x": [120, 370]}
    assert DARK_HU == 300 - 1024


def test_paper_rule_matches_direct_count() -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 400, size=(12, 256, 256)).astype(np.int16)
    hu[3:7, 100:200, 40:220] = -900        # dark "open lung" on a few slices
    spacing = (1.4, 1.4)                   # 256 px at 1.4 mm: same physical box as 512 @ 0.7 mm
    area, keep, det = paper002_dark_area(hu, spacing)
    # direct reference: paper box 120..370 x 240..340 of a 512 image at 0.7 mm, halved
    ref_count = np.array([(s[240 // 2 : 340 // 2, 120 // 2 : 370 // 2] < -724).sum() for s in hu])
    np.testing.assert_allclose(area, ref_count * 1.4 * 1.4)
    thr = (area.max() - area.min()) / 1.5
    np.testing.assert_array_equal(keep, area > thr)
    assert set(np.nonzero(keep)[0]) == {3, 4, 5, 6}


def test_lung_rule_threshold_and_gap_filling() -> None:
    z = 20
    hu = np.full((z, 64, 64), -1000, np.int16)
    mask = np.zeros((z, 64, 64), bool)
    for k in range(3, 17):
        mask[k, 10:10 + k, 10:40] = True   # area grows with k
    mask[9] = False                        # a one-slice gap inside the lung range
    vol = _volume(hu, (1.0, 1.0))
    sel = select_slices(vol, mask, rule="lung", min_area_fraction=0.5, min_area_mm2=0.0, max_gap=2)
    areas = mask.reshape(z, -1).sum(1).astype(float)
    expected = set(np.nonzero(areas >= 0.5 * areas.max())[0]) | {9}   # 9 filled (gap of 1)
    expected = {k for k in expected if k >= min(expected)}
    assert set(sel.indices.tolist()) == expected
    np.testing.assert_allclose(sel.lung_area_mm2, areas)
    np.testing.assert_allclose(sel.z_mm, sel.indices * 2.0)
    few = select_slices(vol, mask, max_slices=3, min_area_fraction=0.5, min_area_mm2=0.0)
    assert len(few) == 3 and set(few.indices) <= set(sel.indices)
    assert few.indices[0] == sel.indices[0] and few.indices[-1] == sel.indices[-1]
    # the segmenter's own per-slice counts give the same selection without counting again
    given = select_slices(vol, mask, rule="lung", min_area_fraction=0.5, min_area_mm2=0.0, max_gap=2,
                          lung_voxels=mask.reshape(z, -1).sum(1))
    np.testing.assert_array_equal(given.indices, sel.indices)
    np.testing.assert_array_equal(given.lung_area_mm2, sel.lung_area_mm2)


def test_select_slices_validates() -> None:
    vol = _volume(np.zeros((3, 8, 8), np.int16))
    with pytest.raises(ConfigError, match="rule"):
        select_slices(vol, np.zeros((3, 8, 8), bool), rule="best")
    with pytest.raises(ConfigError, match="shape"):
        select_slices(vol, np.zeros((2, 8, 8), bool))
    with pytest.raises(ConfigError, match="lung_voxels"):
        select_slices(vol, np.zeros((3, 8, 8), bool), lung_voxels=np.zeros(4, np.int64))


@pytest.fixture(scope="module")
def labelled_series():
    from sdk.lungs import segment
    from sdk.lungs.evaluate import load_dicom_volume

    labels = np.load(shared_path("dicom", "covid-ct-md", "labels", "Slice-level-labels-updated-1.npy"))
    out = {}
    for folder, row in (("covid-P001", 0), ("cap-cap001", 55)):
        vol = load_dicom_volume(str(shared_path("dicom", "covid-ct-md", folder)))
        seg = segment(vol, "classical")
        np.testing.assert_array_equal(seg.slice_voxels, np.count_nonzero(seg.mask.reshape(vol.shape[0], -1), axis=1))
        out[folder] = (vol, seg.mask, labels[row, : vol.shape[0]])
    return out


@pytest.mark.parametrize("folder", ["covid-P001", "cap-cap001"])
def test_lung_rule_covers_every_infected_slice(labelled_series, folder: str) -> None:
    vol, mask, lab = labelled_series[folder]
    sel = select_slices(vol, mask)
    infected = np.nonzero(lab)[0]
    assert infected.size > 0
    assert np.isin(infected, sel.indices).all()
    assert (np.diff(sel.indices) == 1).all()                 # one contiguous lung range
    assert len(sel) < vol.shape[0]                           # and not simply every slice
    assert sel.details["n_lung_ok"] <= len(sel)


@pytest.mark.parametrize("folder, min_cov", [("covid-P001", 0.85), ("cap-cap001", 0.7)])
def test_paper_rule_coverage_reported(labelled_series, folder: str, min_cov: float) -> None:
    vol, mask, lab = labelled_series[folder]
    sel = select_slices(vol, mask, rule="paper002")
    both = select_slices(vol, mask, rule="both")
    infected = np.nonzero(lab)[0]
    cov = np.isin(infected, sel.indices).mean()
    assert min_cov <= cov < 1.0      # the paper's rule alone drops some infected slices
    assert set(both.indices) <= set(sel.indices)

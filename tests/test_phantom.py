"""The synthetic phantom: HU content, real DICOM headers, speed."""
from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from sdk.errors import ConfigError
from sdk.phantom import HU_CONSOLIDATION, HU_GGO, Opacity, PhantomOptions, make_phantom_hu, write_phantom_series


def test_hu_content():
    hu = make_phantom_hu(32, 96)
    assert hu.shape == (32, 96, 96) and hu.dtype == np.int16
    values, counts = np.unique(hu, return_counts=True)
    assert set(values) == {-1000, -850, 40, 400}
    assert hu[0, 0, 0] == -1000 and hu[16, 48, 48] == 40            # air corner, mediastinum
    assert (hu[16] == -850).sum() > 0.15 * hu[16].size               # two lungs
    # right lung (low x) and left lung (high x) both present on the mid slice
    assert (hu[16, :, :48] == -850).any() and (hu[16, :, 48:] == -850).any()
    assert (hu[16] == 40).sum() > (hu[16] == 400).sum() > 0          # body > spine


def test_lesions_and_extra_opacities():
    base = make_phantom_hu(32, 96)
    hu = make_phantom_hu(32, 96, ground_glass=True, consolidation=True)
    assert (hu == HU_GGO).sum() > 50 and (hu == HU_CONSOLIDATION).sum() > 50
    changed = hu != base
    assert np.isin(base[changed], [-850, 40]).all()                 # lesions only inside the lungs
    extra = make_phantom_hu(32, 96, opacities=[Opacity((0.5, 0.45, 0.3), 8.0, -300.0)])
    assert (extra == -300).sum() > 50
    noisy = make_phantom_hu(8, 32, noise_hu=10, seed=1)
    assert np.array_equal(noisy, make_phantom_hu(8, 32, noise_hu=10, seed=1))
    assert not np.array_equal(noisy, make_phantom_hu(8, 32, noise_hu=10, seed=2))


def test_writes_valid_ct_dicom_fast(tmp_path):
    t0 = time.perf_counter()
    paths = write_phantom_series(tmp_path, PhantomOptions(n_slices=64, size=128))
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"64x128x128 phantom took {elapsed:.2f} s"
    assert len(paths) == 64 and [p.name for p in paths] != sorted(p.name for p in paths)
    ds = pydicom.dcmread(paths[5])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
        assert UID(uid).is_valid
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.RescaleType == "HU" and float(ds.RescaleIntercept) == -1024.0
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(-100.0 + 5 * 2.0)
    assert len({pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}) == 64
    hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, make_phantom_hu(64, 128)[5])


def test_tilt_headers(tmp_path):
    paths = write_phantom_series(tmp_path, PhantomOptions(n_slices=4, size=32, tilt_deg=20))
    a, b = (pydicom.dcmread(p, stop_before_pixels=True) for p in paths[:2])
    assert float(a.GantryDetectorTilt) == 20
    iop = np.array([float(v) for v in a.ImageOrientationPatient])
    np.testing.assert_allclose(iop[3:], [0, np.cos(np.radians(20)), -np.sin(np.radians(20))], atol=1e-6)
    step = np.array([float(v) for v in b.ImagePositionPatient]) - np.array([float(v) for v in a.ImagePositionPatient])
    normal = np.cross(iop[:3], iop[3:])
    assert step @ normal == pytest.approx(2.0, abs=1e-5)             # slice spacing along the normal


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="valid:"):
        write_phantom_series(tmp_path, PhantomOptions(transfer_syntax="1.2.840.10008.1.2.4.50"))
    with pytest.raises(ConfigError, match="unknown phantom option.*n_slice.*valid:"):
        write_phantom_series(tmp_path, n_slice=4)
    with pytest.raises(ConfigError):
        make_phantom_hu(4, 4)
    with pytest.raises(ConfigError):
        make_phantom_hu(4, 32, (0.0, 1.0, 1.0))


def test_options_and_keyword_overrides_write_the_same_files(tmp_path):
    """``options`` + keyword overrides = dataclasses.replace(options, ...); files are byte-identical
    (seeded names, UIDs and noise), in a compressed syntax too."""
    from dataclasses import replace

    base = PhantomOptions(n_slices=5, size=24, noise_hu=10, seed=3, transfer_syntax="rle", tilt_deg=10)
    a = write_phantom_series(tmp_path / "a", base, flip_y=True, missing=(2,))
    b = write_phantom_series(tmp_path / "b", replace(base, flip_y=True, missing=(2,)))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 4
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))

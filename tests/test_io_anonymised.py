"""Anonymiser damage: every distinct slice loads, with a warning; only a true duplicate is dropped.

A duplicate is the same image at the same position with identical pixels; instance UIDs are never
trusted to tell slices apart (anonymisers blank them or write one placeholder into every file).
Outcomes are documented in docs/ingest.md ("Anonymised and damaged instance identity").
References: the analytic phantom (sdk.phantom.make_phantom_hu) and, for the real series, the load of
the untouched files.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable, List

import numpy as np
import pydicom
import pytest

from conftest import shared_path
from sdk.errors import MixedSeriesError
from sdk.io import list_series, load_series
from sdk.phantom import PhantomOptions, make_phantom_hu, write_phantom_series

N, S = 16, 32
SP = (2.0, 0.7, 0.7)
PLACEHOLDER = "1.2.826.0.1.3680043.8.498.1"
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),   # pydicom on the bad UIDs we write
              pytest.mark.filterwarnings("ignore:The value length")]


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return make_phantom_hu(N, S, SP)


def _series(d: Path) -> List[Path]:
    return write_phantom_series(d, PhantomOptions(n_slices=N, size=S, spacing=SP))


def _rewrite(paths: List[Path], edit: Callable[[int, pydicom.Dataset], None]) -> None:
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        edit(k, ds)
        ds.save_as(p)


def _text(vol) -> str:
    return "\n".join(vol.warnings)


def test_missing_sop_instance_uid(tmp_path, truth):
    paths = _series(tmp_path)
    _rewrite(paths, lambda k, ds: ds.__delattr__("SOPInstanceUID"))
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert f"{N} of {N} files have no SOPInstanceUID; used the file meta's MediaStorageSOPInstanceUID" in _text(vol)


def test_one_placeholder_in_file_meta_for_all_files(tmp_path, truth):
    """The reported case: no SOPInstanceUID, one placeholder MediaStorageSOPInstanceUID everywhere."""
    paths = _series(tmp_path)

    def edit(k, ds):
        del ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDER

    _rewrite(paths, edit)
    vol = load_series(tmp_path)
    assert vol.shape[0] == N
    np.testing.assert_array_equal(vol.hu, truth)
    text = _text(vol)
    assert f"{N} files share SOPInstanceUID {PLACEHOLDER} at {N} distinct position(s): kept as distinct slices" in text
    assert "skipped" not in text
    info = list_series(tmp_path)[0]
    assert info.n_files == N and any("share SOPInstanceUID" in e for e in info.errors)


def test_one_placeholder_in_dataset_and_meta(tmp_path, truth):
    paths = _series(tmp_path)

    def edit(k, ds):
        ds.SOPInstanceUID = PLACEHOLDER
        ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDER

    _rewrite(paths, edit)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert "share SOPInstanceUID" in _text(vol)


def test_duplicated_uids_at_different_positions(tmp_path, truth):
    paths = _series(tmp_path)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]

    def edit(k, ds):   # slice k takes the UID of slice k mod 4: four UIDs, each on N/4 positions
        ds.SOPInstanceUID = uids[k % 4]
        ds.file_meta.MediaStorageSOPInstanceUID = uids[k % 4]

    _rewrite(paths, edit)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert _text(vol).count(f"{N // 4} files share SOPInstanceUID") == 3          # 3 listed ...
    assert "1 more SOPInstanceUIDs are shared by several files" in _text(vol)     # ... and the rest counted


@pytest.mark.parametrize("bad_uid", ["ANONYMIZED", "1.2.03.4", "1.2.3." + "9" * 70, "1.2..3", "1.2.3.4a"])
def test_non_conforming_uid_strings(tmp_path, truth, bad_uid):
    paths = _series(tmp_path)

    def edit(k, ds):
        uid = bad_uid if k % 2 else f"{bad_uid}.{k}"
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid

    _rewrite(paths, edit)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert "carry a non-conforming instance UID" in _text(vol)


def test_no_instance_number(tmp_path, truth):
    paths = _series(tmp_path)
    _rewrite(paths, lambda k, ds: ds.__delattr__("InstanceNumber"))
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert f"{N} of {N} files have no InstanceNumber" in _text(vol)


def test_shuffled_file_names(tmp_path, truth):
    """Names that sort in reverse slice order, then shuffled: order comes from positions only."""
    paths = _series(tmp_path / "src")
    out = tmp_path / "named"
    out.mkdir()
    names = [f"slice_{N - k:03d}.dcm" for k in range(N)]
    random.Random(5).shuffle(names)
    for p, name in zip(paths, names):
        shutil.copy(p, out / name)
    vol = load_series(out)
    np.testing.assert_array_equal(vol.hu, truth)
    assert [Path(f).name for f in vol.files] != sorted(Path(f).name for f in vol.files)


def test_true_duplicate_is_dropped_once_and_named(tmp_path, truth):
    paths = _series(tmp_path)

    def edit(k, ds):   # the reported anonymisation, plus one file copied twice
        del ds.SOPInstanceUID
        ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDER

    _rewrite(paths, edit)
    shutil.copy(paths[5], tmp_path / "copy_of_5.dcm")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    dropped = [w for w in vol.warnings if ": skipped: " in w]
    assert len(dropped) == 1
    (w,) = dropped
    # whichever copy sorts second is dropped, naming the kept one
    assert {"copy_of_5.dcm", paths[5].name} == {Path(w.split(": skipped: ")[0]).name, Path(w.split("(kept ")[1].rstrip(")")).name}
    assert f"duplicate SOPInstanceUID {PLACEHOLDER} at the same position with identical pixels" in w


def test_same_pixels_other_uid_at_same_position_is_a_duplicate(tmp_path, truth):
    paths = _series(tmp_path)
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = "1.2.3.999"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    ds.save_as(tmp_path / "reexported.dcm")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    assert sum("duplicate image (SOPInstanceUID" in w for w in vol.warnings) == 1


@pytest.mark.parametrize("same_uid", [True, False])
def test_same_position_different_pixels_is_a_typed_error(tmp_path, same_uid):
    paths = _series(tmp_path)
    ds = pydicom.dcmread(paths[7])
    arr = ds.pixel_array.copy()
    arr[10, 10] += 100
    ds.PixelData = arr.tobytes()
    if not same_uid:
        ds.SOPInstanceUID = "1.2.3.998"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.998"
    ds.save_as(tmp_path / "edited.dcm")
    with pytest.raises(MixedSeriesError) as exc:
        load_series(tmp_path)
    msg = str(exc.value)
    assert "edited.dcm" in msg and paths[7].name in msg and "different images at the same position" in msg
    assert "max |HU difference| 100" in msg


def test_byte_identical_copy_is_called_a_copy_not_a_distinct_slice(tmp_path, truth):
    """One file copied under another name (same UID, same position): the note says copies of one
    image (never "kept as distinct slices"), the copy is dropped once, the volume is the truth."""
    paths = _series(tmp_path)
    shutil.copy(paths[3], tmp_path / "copy_of_3.dcm")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    shared = [w for w in vol.warnings if "share SOPInstanceUID" in w]
    assert len(shared) == 1 and "at one position: copies of one image" in shared[0]
    assert not any("kept as distinct slices" in w for w in vol.warnings)
    assert len([w for w in vol.warnings if ": skipped: duplicate SOPInstanceUID" in w]) == 1


@pytest.mark.parametrize("study_per_file", [False, True])
def test_series_uid_regenerated_per_file_loads_as_one_series(tmp_path, truth, study_per_file):
    """An anonymiser that generated a new SeriesInstanceUID (and maybe StudyInstanceUID) for every
    file: N single-image "series" of one geometry at distinct positions are one series again."""
    paths = _series(tmp_path)

    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.7{k}"
        if study_per_file:
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.8{k}"

    _rewrite(paths, edit)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    text = _text(vol)
    assert f"{N} single-image series with one geometry and distinct positions" in text
    assert ("a StudyInstanceUID per file" if study_per_file else "one StudyInstanceUID") in text
    infos = list_series(tmp_path)
    assert len(infos) == 1 and infos[0].n_files == N and infos[0].chosen
    assert any("SeriesInstanceUID differs on every file" in e for e in infos[0].errors)


def test_single_image_series_of_two_studies_are_not_merged(tmp_path):
    """Per-file SeriesInstanceUIDs, but two StudyInstanceUIDs each on several files (a prior and a
    current study, say): not one series - a typed error naming the tie, as before."""
    paths = _series(tmp_path)

    def edit(k: int, ds: pydicom.Dataset) -> None:
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.7{k}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.{8 + k % 2}"

    _rewrite(paths, edit)
    with pytest.raises(MixedSeriesError, match=f"{N} equally ranked series"):
        load_series(tmp_path)


def test_too_few_single_image_series_are_not_merged(tmp_path):
    from sdk.io.reader import MIN_SPLIT_SERIES

    paths = _series(tmp_path)
    for extra in paths[MIN_SPLIT_SERIES - 1:]:
        extra.unlink()
    paths = paths[:MIN_SPLIT_SERIES - 1]
    _rewrite(paths, lambda k, ds: setattr(ds, "SeriesInstanceUID", f"1.2.826.0.1.3680043.8.498.7{k}"))
    assert len(list_series(tmp_path)) == MIN_SPLIT_SERIES - 1


@pytest.mark.slow
def test_real_series_anonymised_with_placeholder_uid(tmp_path):
    """covid-P001 rewritten the way the reported 167-slice series was damaged: no SOPInstanceUID,
    one placeholder MediaStorageSOPInstanceUID, no InstanceNumber, opaque shuffled names, plus one
    byte copy. Every distinct slice loads, equal to the untouched series."""
    src = shared_path("dicom", "covid-ct-md", "covid-P001")
    files = sorted(src.glob("*.dcm"))
    ref = load_series(src)
    names = [f"{k:04x}" for k in range(len(files))]
    random.Random(0).shuffle(names)
    out: List[Path] = []
    for f, name in zip(files, names):
        ds = pydicom.dcmread(f)
        del ds.SOPInstanceUID
        del ds.InstanceNumber
        ds.file_meta.MediaStorageSOPInstanceUID = PLACEHOLDER
        ds.save_as(tmp_path / name)
        out.append(tmp_path / name)
    shutil.copy(out[0], tmp_path / "zzzz")
    vol = load_series(tmp_path)
    assert vol.shape == ref.shape == (len(files), 512, 512)
    np.testing.assert_array_equal(vol.hu, ref.hu)
    np.testing.assert_allclose(vol.z_mm, ref.z_mm)
    text = _text(vol)
    assert f"{len(files) + 1} files share SOPInstanceUID {PLACEHOLDER} at {len(files)} distinct position(s)" in text
    assert sum(": skipped: " in w for w in vol.warnings) == 1


@pytest.mark.slow
def test_real_series_with_uids_regenerated_per_file(tmp_path):
    """covid-P001 with a new SeriesInstanceUID and StudyInstanceUID in every file: one series again,
    equal to the untouched files."""
    from pydicom.uid import generate_uid

    src = shared_path("dicom", "covid-ct-md", "covid-P001")
    ref = load_series(src)
    for k, f in enumerate(sorted(src.glob("*.dcm"))):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
        ds.save_as(tmp_path / f"{k:04d}.dcm")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, ref.hu)
    np.testing.assert_allclose(vol.z_mm, ref.z_mm)
    assert sum("SeriesInstanceUID differs on every file" in w for w in vol.warnings) == 1

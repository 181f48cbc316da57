"""Damaged numeric header elements get a typed error naming the file, the element and the value.

Found by fuzzing the reader (one element of one file set to garbage, a byte run overwritten): a
multi-valued NumberOfFrames or RescaleSlope raised TypeError, a SliceThickness of 'abc' ValueError,
a RescaleSlope of 1e12 OverflowError in the int16 fast path. Phantom series (sdk.phantom), so these
run without ../shared. Each case: the damaged element written byte for byte as a raw element (pydicom
would refuse to store such a value itself), the series loaded with sdk.io.load_series.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from sdk.errors import CorruptFileError, CtsdkError, MissingSlicesError


def _series(tmp_path: Path) -> List[Path]:
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path, n_slices=24, size=32, seed=0)
    return sorted(tmp_path.glob("*.dcm"))


def _damage(path: Path, keyword: str, text: str) -> None:
    """Write ``text`` as the raw value of ``keyword`` (explicit VR little endian, as the phantom)."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(path)
    tag = Tag(tag_for_keyword(keyword))
    raw = text.encode("latin-1")
    raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(raw), raw, 0, False, True)
    ds.save_as(path)


def _sorted_by_z(files: List[Path]) -> List[Path]:
    import pydicom

    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.mark.parametrize("keyword, text, shown", [
    ("NumberOfFrames", "1\\2", "NumberOfFrames '1\\2' is not one finite number"),
    ("RescaleSlope", "1\\2", "RescaleSlope '1\\2' is not one finite number"),
    ("RescaleIntercept", "abc", "RescaleIntercept 'abc' is not one finite number"),
    ("RescaleSlope", "inf", "RescaleSlope 'inf' is not one finite number"),
    ("RescaleSlope", "1e12", "RescaleSlope 1e+12 / RescaleIntercept -1024 are no CT's"),
])
def test_a_damaged_essential_element_names_file_element_and_value(tmp_path, keyword, text, shown) -> None:
    files = _series(tmp_path)
    for f in files:  # every file: nothing usable is left
        _damage(f, keyword, text)
    from sdk.io import load_series

    with pytest.raises(CorruptFileError) as err:
        load_series(tmp_path)
    msg = str(err.value)
    assert f"no usable CT image file among {len(files)}" in msg and shown in msg and files[0].name in msg


def test_one_damaged_file_in_the_middle_is_named_in_the_gap_error(tmp_path) -> None:
    """The file that cannot be used leaves a gap; the gap error says which file and why (it said only
    'slices are missing: re-send the complete series')."""
    from sdk.io import load_series

    files = _sorted_by_z(_series(tmp_path))
    _damage(files[10], "RescaleSlope", "1\\2")
    with pytest.raises(MissingSlicesError) as err:
        load_series(tmp_path)
    msg = str(err.value)
    assert "1 gap(s) in slice positions" in msg
    assert f"1 file(s) of the source could not be used and may be the missing slices: {files[10].name}: RescaleSlope" in msg
    assert "repair or re-export the unusable file(s)" in msg
    # allow_gaps: the other 23 load, and the skipped file is a warning naming it
    vol = load_series(tmp_path, allow_gaps=True)
    assert vol.shape[0] == 23
    assert any(files[10].name in w and "skipped" in w and "RescaleSlope" in w for w in vol.warnings)


def test_one_damaged_end_file_is_skipped_with_a_warning(tmp_path) -> None:
    from sdk.io import load_series

    files = _sorted_by_z(_series(tmp_path))
    _damage(files[-1], "NumberOfFrames", "2\\3")
    vol = load_series(tmp_path)
    assert vol.shape[0] == 23
    assert any(files[-1].name in w and "NumberOfFrames '2\\3'" in w for w in vol.warnings)


def test_a_damaged_slice_thickness_is_ignored_with_a_note(tmp_path) -> None:
    """SliceThickness is optional to the reader: a garbage value reads as absent (a note), the slice stays."""
    from sdk.io import load_series

    files = _series(tmp_path)
    reference = load_series(tmp_path)
    _damage(files[3], "SliceThickness", "4\xff\xfft")   # a byte run overwritten (the fuzzer's case)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    assert any(files[3].name in w and "SliceThickness" in w and "ignored" in w for w in vol.warnings)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_header_damage_raises_only_typed_errors(tmp_path, seed) -> None:
    """A seeded sweep: one numeric element of one or all files set to a garbage value; load_series
    returns a volume or raises a CtsdkError - never another exception."""
    import random
    import shutil

    from sdk.io import load_series

    rng = random.Random(seed)
    clean = tmp_path / "clean"
    clean.mkdir()
    files = _series(clean)
    keywords = ["NumberOfFrames", "RescaleSlope", "RescaleIntercept", "SliceThickness", "PixelSpacing",
                "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "InstanceNumber",
                "SpacingBetweenSlices", "GantryDetectorTilt"]
    values = ["", "abc", "1\\2", "nan", "inf", "-inf", "1e400", "1e12", "0", "-0", "1\\2\\3\\4\\5\\6\\7"]
    for case in range(12):
        work = tmp_path / f"case{case}"
        shutil.copytree(clean, work)
        keyword, text = rng.choice(keywords), rng.choice(values)
        victims = [work / f.name for f in files] if rng.random() < 0.4 else [work / rng.choice(files).name]
        for v in victims:
            _damage(v, keyword, text)
        try:
            load_series(work)
        except CtsdkError:
            pass   # typed: what the product promises (any other exception fails the test)


def test_optional_numbers_that_cannot_be_converted_are_ignored_with_a_note(tmp_path) -> None:
    """pydicom raises OverflowError converting an IS of '-inf' (InstanceNumber, AcquisitionNumber):
    the reader needs neither (slices are ordered by position), so they read as absent with a note."""
    from sdk.io import load_series

    files = _series(tmp_path)
    reference = load_series(tmp_path)
    for f in files:
        _damage(f, "InstanceNumber", "-inf")
        _damage(f, "AcquisitionNumber", "inf")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, reference.hu)
    assert sum("InstanceNumber cannot be read; ignored" in w for w in vol.warnings) == len(files)
    assert sum("AcquisitionNumber cannot be read; ignored" in w for w in vol.warnings) == len(files)


def test_a_multi_valued_matrix_size_is_a_corrupt_file(tmp_path) -> None:
    """Rows / Columns must be one positive whole number (a list raised TypeError in int())."""
    from sdk.io import load_series

    files = _series(tmp_path)
    for f in files:
        _damage(f, "Rows", " \\ ")   # US, 4 bytes: two values
    with pytest.raises(CorruptFileError, match=r"no usable CT image file among 24: .*Rows '\d+\\\d+' is not one finite number"):
        load_series(tmp_path)

"""The fast header scan (sdk.io.header) against pydicom: the same values on every file of
../shared/data it takes, the same loaded series, and pydicom for everything it refuses."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from conftest import SHARED_DATA, shared_path
from sdk.errors import SeriesError
from sdk.io import header as H
from sdk.io import load_series
from sdk.io import reader as R

DICOM = SHARED_DATA / "dicom"


def _files():
    return sorted(p for p in DICOM.rglob("*") if p.is_file() and not p.name.startswith(".")) if DICOM.exists() else []


def _assert_same_header(fast: H.HeaderDataset, ref: Dataset, where: str) -> None:
    for tag, (kw, _) in H.KEPT.items():
        assert (kw in fast) == (kw in ref), f"{where}: presence of {kw}"
        if kw in ref:
            a, b = getattr(fast, kw), getattr(ref, kw)
            assert type(a) is type(b) and a == b, f"{where}: {kw} {a!r} != {b!r}"
            assert str(a) == str(b), f"{where}: str({kw})"
    for kw in ("TransferSyntaxUID", "MediaStorageSOPInstanceUID", "MediaStorageSOPClassUID"):
        assert (kw in fast.file_meta) == (kw in ref.file_meta)
        if kw in ref.file_meta:
            assert str(getattr(fast.file_meta, kw)) == str(getattr(ref.file_meta, kw)), f"{where}: {kw}"
    px = ref.get_item(0x7FE00010, keep_deferred=True)
    assert fast.get_item(0x7FE00010, keep_deferred=True).value_tell == px.value_tell, f"{where}: Pixel Data offset"
    assert not fast.materialized, f"{where}: the comparison should not have needed the whole file"


@pytest.mark.skipif(not DICOM.exists(), reason="../shared/data/dicom not present")
def test_every_file_the_scan_takes_has_pydicoms_values_and_the_rest_is_refused_cleanly() -> None:
    taken = refused = 0
    for f in _files():
        fast = H.scan_header(str(f))
        if fast is None:
            refused += 1
            continue
        taken += 1
        ref = pydicom.dcmread(str(f), defer_size=2048)
        assert str(ref.file_meta.TransferSyntaxUID) in H.FAST_SYNTAXES
        _assert_same_header(fast, ref, str(f))
    assert taken >= 148, f"only {taken} files took the fast scan"   # covid-P001 alone has 148
    assert refused > 0                                               # the zoo and the bad inputs


@pytest.mark.skipif(not DICOM.exists(), reason="../shared/data/dicom not present")
@pytest.mark.parametrize("series", ["covid-ct-md/covid-P001", "totalseg-j2k", "dicom-ts-zoo"])
def test_load_series_is_identical_with_and_without_the_fast_scan(series, monkeypatch) -> None:
    src = shared_path("dicom", *series.split("/"))
    if series == "dicom-ts-zoo":   # a folder of single files in many syntaxes: one lossless JPEG file
        src = next((f for f in sorted(src.iterdir()) if f.is_file() and H.scan_header(str(f)) is not None), None)
        if src is None:
            pytest.skip("no file of dicom-ts-zoo takes the fast scan")
    fast = _load(src)
    monkeypatch.setattr(R, "FAST_HEADERS", False)
    ref = _load(src)
    if isinstance(ref, Exception):   # both paths refuse it the same way
        assert type(fast) is type(ref) and str(fast) == str(ref)
        return
    np.testing.assert_array_equal(fast.hu, ref.hu)
    assert fast.hu.dtype == ref.hu.dtype
    np.testing.assert_array_equal(fast.z_mm, ref.z_mm)
    np.testing.assert_array_equal(fast.affine, ref.affine)
    assert fast.meta == ref.meta and fast.warnings == ref.warnings and fast.files == ref.files


def _load(src):
    try:
        return load_series(src)
    except Exception as exc:  # noqa: BLE001 - compared between the two paths
        return exc


def _p001_file() -> Path:
    return sorted(shared_path("dicom", "covid-ct-md", "covid-P001").glob("*.dcm"))[0]


def _nested(depth: int) -> Sequence:
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "T-D0050", "Tissue"
    if depth:
        item.ContentSequence = _nested(depth - 1)
    return Sequence([item, copy.deepcopy(item)])


@pytest.mark.skipif(not DICOM.exists(), reason="../shared/data/dicom not present")
def test_long_headers_and_undefined_length_sequences_read_like_pydicom(tmp_path) -> None:
    ds = pydicom.dcmread(_p001_file())
    ds.add_new(0x00091010, "LO", "ctsdk test")
    ds.add_new(0x00091011, "OB", bytes(range(256)) * 400)          # 100 KiB before Pixel Data
    ds.AnatomicRegionSequence = _nested(2)
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True                          # delimiters, not lengths
    out = tmp_path / "long.dcm"
    ds.save_as(out, enforce_file_format=True)
    fast = H.scan_header(str(out))
    assert fast is not None
    ref = pydicom.dcmread(out, defer_size=2048)
    _assert_same_header(fast, ref, "long header")
    arr, plugin = R.decode_pixels(fast, str(out))
    np.testing.assert_array_equal(arr, ref.pixel_array)
    assert plugin == "imagecodecs" and not fast.materialized
    assert fast.PatientID == ref.PatientID and fast.materialized    # any other keyword: the whole file


@pytest.mark.skipif(not DICOM.exists(), reason="../shared/data/dicom not present")
def test_what_the_scan_refuses_goes_to_pydicom(tmp_path, monkeypatch) -> None:
    src = _p001_file()
    raw = src.read_bytes()
    cases = {
        "truncated": raw[:600],
        "no_preamble": raw[128:],
        "garbage": b"\0" * 128 + b"DICM" + b"\xff" * 300,
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.dcm"
        p.write_bytes(data)
        assert H.scan_header(str(p)) is None, name
    ds = pydicom.dcmread(src)
    ds.NumberOfFrames = 1                                            # multi-frame attributes: pydicom
    ds.save_as(tmp_path / "frames.dcm", enforce_file_format=True)
    assert H.scan_header(str(tmp_path / "frames.dcm")) is None
    ds = pydicom.dcmread(src)
    ds.decompress()                                                   # explicit VR LE, not encapsulated
    ds.save_as(tmp_path / "native.dcm", enforce_file_format=True)
    assert H.scan_header(str(tmp_path / "native.dcm")) is None
    ds = pydicom.dcmread(src)
    ds.decompress()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    assert (tmp_path / "implicit.dcm").stat().st_size > H._HEAD_BYTES
    with monkeypatch.context() as m:                                  # refused from the file meta: the
        m.setattr(H, "_read_all", lambda path: pytest.fail("read whole"))   # 0.5 MB file is not read whole
        assert H.scan_header(str(tmp_path / "implicit.dcm")) is None
    ds = pydicom.dcmread(src)
    del ds.PixelData                                                  # no Pixel Data: pydicom says what is wrong
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    assert H.scan_header(str(tmp_path / "nopixels.dcm")) is None
    trunc = str(tmp_path / "truncated.dcm")
    ds, _ = R._read(trunc)                                            # the reader falls back to pydicom ...
    assert not isinstance(ds, H.HeaderDataset)
    with pytest.raises(SeriesError, match="Pixel Data"):              # ... and says what is wrong, as before
        R._slices_from(ds, trunc, trunc)


def test_header_dataset_answers_like_a_dataset_without_reading_the_file(tmp_path) -> None:
    meta = {"TransferSyntaxUID": "1.2.840.10008.1.2.4.70"}
    kept = {0x00280010: ("US", b"\x00\x02"), 0x00200032: ("DS", b"-1.5\\2\\3.25 "), 0x00080060: ("CS", b"CT"),
            0x00200013: ("IS", b" 12 "), 0x00281052: ("DS", b"")}
    d = H.HeaderDataset(str(tmp_path / "absent.dcm"), meta, kept, 1000, 0xFFFFFFFF)
    assert d.Rows == 512 and list(d.ImagePositionPatient) == [-1.5, 2.0, 3.25] and d.Modality == "CT"
    assert str(d.InstanceNumber) == "12" and d.RescaleIntercept is None
    assert "Rows" in d and "Columns" not in d and "PixelData" in d and "NumberOfFrames" not in d
    assert d.get("Columns", 7) == 7 and d.get("NumberOfFrames", 1) == 1
    with pytest.raises(AttributeError):
        _ = d.Columns
    assert d.get_item(0x7FE00010, keep_deferred=True).value_tell == 1000
    del d.PixelData                                                    # nothing held, nothing read
    assert not d.materialized and "TransferSyntaxUID" in d.file_meta
    with pytest.raises(FileNotFoundError):                             # anything else reads the file
        _ = d.PatientID

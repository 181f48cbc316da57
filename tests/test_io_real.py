"""Ingest on the real public DICOM in ../shared/data/dicom (skipped with a reason when absent)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import List, Union

import numpy as np
import pydicom
import pytest

from conftest import SHARED_DATA, shared_path
from sdk.errors import SeriesError, UnsupportedTransferSyntaxError
from sdk.io import list_series, load_series
from sdk.volume.core import Volume

DICOM = SHARED_DATA / "dicom"
COVID = ["covid-P001", "cap-cap001", "normal-normal001"]


@functools.lru_cache(maxsize=None)
def _outcome(path: str) -> Union[Volume, BaseException]:
    """load_series once per path for the whole module (the walk and the HU tests share it)."""
    try:
        return load_series(path)
    except BaseException as exc:  # noqa: BLE001 - the test classifies it
        return exc


def _walk_targets() -> List[str]:
    if not DICOM.exists():
        return []
    out = []
    for d in sorted(p for p in DICOM.rglob("*") if p.is_dir()):
        if not any(c.is_dir() for c in d.iterdir()):
            out.append(str(d))
    for name in ("bad-inputs", "dicom-ts-zoo", "notzaki"):
        if (DICOM / name).is_dir():  # a partial copy of ../shared/data walks what it has
            out += [str(f) for f in sorted((DICOM / name).iterdir()) if f.is_file()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", COVID)
def test_covid_hu_equals_pydicom_every_slice(case):
    folder = shared_path("dicom", "covid-ct-md", case)
    vol = _outcome(str(folder))
    assert isinstance(vol, Volume), vol
    files = sorted(folder.glob("*.dcm"))
    assert vol.shape[0] == len(files)
    assert vol.hu.dtype == np.int16
    # independent reference: pydicom decode x slope + intercept, ordered by IPP . normal
    dsets = [pydicom.dcmread(f) for f in files]
    iop = np.array([float(v) for v in dsets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dsets.sort(key=lambda d: float(np.array([float(v) for v in d.ImagePositionPatient]) @ normal))
    for k, ds in enumerate(dsets):
        ref = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(vol.hu[k], ref, err_msg=f"slice {k} ({ds.filename})")
        assert Path(vol.files[k]).name == Path(ds.filename).name
    ipp_z = [float(d.ImagePositionPatient[2]) for d in dsets]
    np.testing.assert_allclose(vol.z_mm, ipp_z, atol=1e-4)
    assert vol.spacing[0] == pytest.approx(2.0, abs=0.01)
    assert vol.pixel_spacing_mm[0] == pytest.approx(float(dsets[0].PixelSpacing[0]))
    assert vol.meta.transfer_syntaxes == ("1.2.840.10008.1.2.4.70",)
    assert "PatientName" not in vol.meta.to_dict() and "Patient" not in str(vol.meta.to_dict())


@pytest.mark.parametrize("target", _walk_targets() or ["<no shared data>"])
def test_walk_every_folder_and_file(target):
    if target == "<no shared data>":
        pytest.skip(f"shared data not found: {DICOM}")
    out = _outcome(target)
    if isinstance(out, Volume):
        assert out.hu.ndim == 3 and out.shape[0] >= 1
        assert np.isfinite(out.hu).all()
        return
    assert isinstance(out, SeriesError), f"{target}: generic {type(out).__name__}: {out}"
    assert out.path, f"{target}: error names no file: {out}"
    named = Path(out.path)
    assert named == Path(target) or Path(target) in named.parents, (target, out.path)
    assert str(out.path) in str(out)


def test_expected_outcomes_on_known_files():
    shared_path("dicom")
    expect = {
        "bad-inputs/DICOMDIR": "NotCTError",
        "bad-inputs/empty-file.dcm": "NotDicomError",
        "bad-inputs/not-dicom-text.dcm": "NotDicomError",
        "bad-inputs/jpeg-image-named.dcm": "NotDicomError",
        "bad-inputs/structured-report-sr.dcm": "NotCTError",
        "bad-inputs/segmentation-seg.dcm": "NotCTError",
        "bad-inputs/rtstruct.dcm": "NotCTError",
        "bad-inputs/truncated-in-pixel-data.dcm": "CorruptFileError",
        "bad-inputs/truncated-in-header.dcm": "CorruptFileError",
        "bad-inputs/pixel-data-too-short.dcm": "CorruptFileError",
        "bad-inputs/no-rows-tag.dcm": "CorruptFileError",
        "dicom-ts-zoo/jpeg-retired-process6-8.dcm": "UnsupportedTransferSyntaxError",
        "dicom-ts-zoo/jpeg-retired-process10-12.dcm": "UnsupportedTransferSyntaxError",
        "notzaki/MR_Implicit_Little.dcm": "NotCTError",
        "notzaki/CT_Implicit_Little_Headless_Retired.dcm": "Volume",
        "dicom-ts-zoo/jpeg-extended-12bit.dcm": "Volume",
        "totalseg-j2k": "Volume",
        "lungmask-testdata": "Volume",
    }
    expect = {k: v for k, v in expect.items() if (DICOM / k).exists()}  # a partial copy checks what it has
    if not expect:
        pytest.skip(f"none of the known files is under {DICOM} (partial copy of ../shared/data)")
    got = {k: type(_outcome(str(DICOM / k))).__name__ for k in expect}
    assert got == expect


def test_retired_jpeg_error_names_syntax_and_fix():
    f = shared_path("dicom", "dicom-ts-zoo", "jpeg-retired-process10-12.dcm")
    exc = _outcome(str(f))
    assert isinstance(exc, UnsupportedTransferSyntaxError)
    assert "1.2.840.10008.1.2.4.55" in str(exc) and "Process 10" in str(exc) and "dcmdjpeg" in str(exc)


def test_transfer_syntax_zoo_matches_uncompressed():
    """Every lossless syntax of the zoo slice gives the explicit-VR HU exactly."""
    zoo = shared_path("dicom", "dicom-ts-zoo")
    ref = _outcome(str(zoo / "explicit-vr-little-endian.dcm")).hu
    for name in ("implicit-vr-little-endian.dcm", "explicit-vr-big-endian.dcm", "deflated-explicit-vr-little-endian.dcm",
                 "rle-lossless.dcm", "jpeg-lossless-process14.dcm", "jpeg-lossless-sv1.dcm", "jpeg-ls-lossless.dcm",
                 "jpeg2000-lossless.dcm"):
        np.testing.assert_array_equal(_outcome(str(zoo / name)).hu, ref, err_msg=name)
    for name, tol in (("jpeg-extended-12bit.dcm", 40), ("jpeg-ls-near-lossless.dcm", 4)):
        diff = np.abs(_outcome(str(zoo / name)).hu.astype(np.float64) - ref)
        assert np.median(diff) <= tol, name


def test_lungmask_files_without_modality_load_with_warning():
    vol = _outcome(str(shared_path("dicom", "lungmask-testdata")))
    assert isinstance(vol, Volume) and vol.shape[0] == 2
    assert sum("no Modality" in w for w in vol.warnings) == 2


def test_totalseg_empty_uids_load():
    vol = _outcome(str(shared_path("dicom", "totalseg-j2k")))
    assert vol.shape == (20, 512, 512)
    assert any("no SOPInstanceUID" in w for w in vol.warnings)
    np.testing.assert_allclose(np.diff(vol.z_mm), 2.0, atol=1e-3)


def test_ge_tilt_matches_header_geometry():
    folder = shared_path("dicom", "dcm-qa-ct-ge-tilt")
    vol = _outcome(str(folder))
    assert isinstance(vol, Volume)
    files = sorted(folder.glob("*.dcm"))
    hdr = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    # the stack direction (IPP differences) vs the slice normal is the header's GantryDetectorTilt
    ipp = np.array([[float(v) for v in h.ImagePositionPatient] for h in hdr])
    iop = np.array([float(v) for v in hdr[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    stack = ipp[np.argmax(ipp @ normal)] - ipp[np.argmin(ipp @ normal)]
    angle = np.degrees(np.arccos(abs(stack @ normal) / np.linalg.norm(stack)))
    assert angle == pytest.approx(float(hdr[0].GantryDetectorTilt), abs=0.05)
    # reported from the geometry (signed, see sdk.io.geometry.tilt_from_offsets); header kept apart
    assert vol.meta.gantry_tilt_deg == pytest.approx(18.5, abs=0.01)
    assert vol.meta.gantry_tilt_header_deg == pytest.approx(18.5)
    # corrected slice positions along the normal: 14 x 4 mm then 7 mm steps (the slice thicknesses)
    d = np.diff(vol.z_mm)
    np.testing.assert_allclose(d[:13], 4.0, atol=0.01)
    np.testing.assert_allclose(d[-13:], 7.0, atol=0.01)
    assert vol.spacing[0] == pytest.approx(4.0, abs=0.01)
    from test_io_phantom import _check_geometry_against_headers, _lost_fraction

    _check_geometry_against_headers(vol, files, n_points=60)
    # nothing is cut by the shear: the grid grew, every source pixel above -500 HU lies inside it
    assert vol.shape[1] > 512 and vol.shape[2] == 512
    assert _lost_fraction(vol, files) == 0.0
    # uneven spacing: no affine that lies; the true positions stay available
    assert vol.affine is None and "uneven slice spacing" in vol.affine_problem
    last = vol.voxel_to_lps(np.array([0.0, 0.0, vol.shape[0] - 1]))
    np.testing.assert_allclose(last, vol.slice_origins_lps[-1])
    assert (last - np.asarray(vol.origin)) @ normal == pytest.approx(vol.z_mm[-1] - vol.z_mm[0], abs=1e-3)


def test_ge_header_tilt_without_shear_reports_zero(tmp_path):
    """The GE files with their positions moved onto the slice normal (no shear left) but the header
    still saying GantryDetectorTilt +18.5: the geometry decides, so 0, and the header is kept apart."""
    folder = shared_path("dicom", "dcm-qa-ct-ge-tilt")
    files = sorted(folder.glob("*.dcm"))
    dsets = [pydicom.dcmread(f) for f in files]
    iop = np.array([float(v) for v in dsets[0].ImageOrientationPatient])
    n = np.cross(iop[:3], iop[3:])
    p0 = np.array([float(v) for v in dsets[0].ImagePositionPatient])
    for f, ds in zip(files, dsets):
        p = np.array([float(v) for v in ds.ImagePositionPatient])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in p0 + ((p - p0) @ n) * n]
        ds.save_as(tmp_path / f.name)
    vol = load_series(tmp_path)
    assert vol.meta.gantry_tilt_deg == 0.0 and vol.meta.gantry_tilt_header_deg == pytest.approx(18.5)
    assert vol.shape == (28, 512, 512) and vol.hu.dtype == np.int16          # nothing resampled
    assert any("GantryDetectorTilt 18.5 deg but the slice positions show no shear" in w for w in vol.warnings)


def test_covid19_ny_sbu_mixed_folders_choose_axial():
    folder = shared_path("dicom", "covid19-ny-sbu", "A072894")
    infos = list_series(folder)
    assert len(infos) >= 5
    chosen = [i for i in infos if i.chosen]
    assert len(chosen) == 1 and chosen[0].orientation == "axial"
    assert {i.orientation for i in infos} >= {"axial", "coronal", "sagittal"}
    vol = _outcome(str(folder))
    assert vol.meta.series_uid == chosen[0].uid
    assert any("duplicate SOPInstanceUID" in w for w in vol.warnings) or any(i.errors for i in infos)


@pytest.mark.slow
def test_covid_parallel_decode_is_bit_identical_to_serial():
    """covid-P001 (148 JPEG Lossless slices): decoding in forked processes (where os.fork exists)
    gives the serial path's HU bit for bit."""
    folder = str(shared_path("dicom", "covid-ct-md", "covid-P001"))
    from test_io_phantom import _in_shared_mapping

    par = load_series(folder, decode="processes", workers=2)
    assert _in_shared_mapping(par.hu) == hasattr(__import__("os"), "fork")
    ser = load_series(folder, decode="serial")
    np.testing.assert_array_equal(par.hu, ser.hu)
    assert par.hu.dtype == ser.hu.dtype == np.int16 and par.files == ser.files


def _lossless_sample() -> List[Path]:
    """A few files of every lossless compressed syntax that ../shared/data holds."""
    zoo = shared_path("dicom", "dicom-ts-zoo")
    files = [zoo / n for n in ("jpeg-lossless-process14.dcm", "jpeg-lossless-sv1.dcm", "jpeg-ls-lossless.dcm",
                               "jpeg-ls-lossless-dcmtk-mr.dcm", "jpeg-ls-near-lossless.dcm", "jpeg2000-lossless.dcm")]
    for folder in ("covid-ct-md/covid-P001", "totalseg-j2k"):
        d = DICOM / folder
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file())[:4]
    return [f for f in files if f.is_file()]


def test_imagecodecs_gives_the_stored_values_of_pylibjpeg_and_gdcm():
    """The first decoder of the lossless syntaxes (imagecodecs) against two independent ones,
    value for value and dtype for dtype, signed 16-bit and unsigned 12-bit data included."""
    from sdk._lazy import available
    from sdk.io.decoders import decode_pixels

    if not available("imagecodecs"):
        pytest.skip("imagecodecs is not installed")
    files = _lossless_sample()
    assert len(files) >= 6
    signed = 0
    for f in files:
        ds = pydicom.dcmread(f)
        ours, used = decode_pixels(ds, str(f), chain=["imagecodecs"])
        assert used == "imagecodecs"
        deferred, _ = decode_pixels(pydicom.dcmread(f, defer_size=2048), str(f), chain=["imagecodecs"])
        np.testing.assert_array_equal(deferred, ours)       # the frame read straight from the file
        signed += int(ds.PixelRepresentation == 1)
        for other in ("pylibjpeg", "gdcm"):
            ref, _ = decode_pixels(pydicom.dcmread(f), str(f), chain=[other])
            assert ours.dtype == ref.dtype, (f.name, other)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{f.name} vs {other}")
    assert signed >= 3


def test_encapsulated_frames_equal_pydicoms(tmp_path):
    """The single-frame fast path (value read at the deferred element's offset, items walked with
    struct) gives pydicom's generate_frames output: real files (deferred and in memory), several
    fragments behind a filled Basic Offset Table, and a damaged item list that falls back to pydicom."""
    from pydicom.encaps import encapsulate, generate_frames

    from sdk.io.decoders import _single_frame, encapsulated_frames

    for f in _lossless_sample():
        ref = list(generate_frames(pydicom.dcmread(f).PixelData, number_of_frames=1))
        for ds in (pydicom.dcmread(f, defer_size=2048), pydicom.dcmread(f)):
            assert _single_frame(ds) == ref[0], f.name          # the fast path itself, not the fallback
            assert encapsulated_frames(ds, 1) == ref, f.name
    ds = pydicom.dcmread(_lossless_sample()[0])
    stream = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([stream], fragments_per_frame=3, has_bot=True)
    assert _single_frame(ds) == stream and encapsulated_frames(ds, 1) == [stream]
    ds.PixelData = ds.PixelData[:-5]                         # the last item cut short
    assert _single_frame(ds) is None
    assert encapsulated_frames(ds, 1) == list(generate_frames(ds.PixelData, number_of_frames=1))

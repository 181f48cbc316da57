"""Ingest end to end on synthetic DICOM phantoms (runs on a fresh clone, no shared data needed).

References are independent of sdk.io: the analytic phantom (sdk.phantom.make_phantom_hu) and
pydicom's own decode of each written file.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from sdk.errors import (
    ConfigError, CorruptFileError, GantryTiltError, MissingDependencyError, MissingSlicesError, MixedSeriesError,
    NoImageSeriesError, NotCTError, NotDicomError, SeriesError,
)
from sdk.io import (
    DecoderPlugin, decode_pixels, decoder_chain, list_series, load_series, register_decoder, unregister_decoder,
)
from sdk.phantom import PHANTOM_SYNTAXES, make_phantom_hu, write_phantom_series

N, S = 24, 64                 # small phantoms keep the suite fast
SP = (2.0, 0.7, 0.7)


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return make_phantom_hu(N, S, SP)


@pytest.fixture(scope="module")
def explicit_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("explicit")
    write_phantom_series(d, n_slices=N, size=S, spacing=SP)
    return d


def _pydicom_hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


@pytest.mark.parametrize("syntax", list(PHANTOM_SYNTAXES))
def test_round_trip_every_syntax_is_exact(tmp_path, truth, syntax):
    try:
        paths = write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, transfer_syntax=syntax)
    except MissingDependencyError as exc:  # encoder plugins are dev extras (pyjpegls, openjpeg, rle)
        pytest.skip(str(exc))
    assert all(str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax for p in paths)
    vol = load_series(tmp_path)
    assert vol.hu.dtype == np.int16
    np.testing.assert_array_equal(vol.hu, truth)
    # independent reference: pydicom decode x slope + intercept of each file, in slice order
    ref = np.stack([_pydicom_hu(p) for p in paths])
    np.testing.assert_array_equal(vol.hu, ref)
    assert vol.meta.transfer_syntaxes == (syntax,)
    np.testing.assert_allclose(vol.z_mm, -100.0 + 2.0 * np.arange(N))
    np.testing.assert_allclose(vol.spacing, SP)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-9)


def test_shuffled_inputs_give_same_volume(explicit_dir, truth):
    files = sorted(explicit_dir.glob("*.dcm"))
    random.Random(3).shuffle(files)
    vol = load_series(files)
    np.testing.assert_array_equal(vol.hu, truth)
    # file names are not in slice order, so sorting must come from the positions
    by_name = [pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber for f in sorted(explicit_dir.glob("*.dcm"))]
    assert by_name != sorted(by_name)
    assert [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in vol.files] == list(range(1, N + 1))


def test_datasets_input(explicit_dir, truth):
    dsets = [pydicom.dcmread(f) for f in explicit_dir.glob("*.dcm")]
    random.Random(1).shuffle(dsets)
    vol = load_series(dsets)
    np.testing.assert_array_equal(vol.hu, truth)


def test_per_slice_rescale_and_float_slope(tmp_path, truth):
    paths = write_phantom_series(tmp_path / "a", n_slices=N, size=S, spacing=SP, per_slice_rescale=True)
    slopes = {float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in paths}
    assert slopes == {1.0, 2.0}
    vol = load_series(tmp_path / "a")
    ref = np.stack([_pydicom_hu(p) for p in paths])
    np.testing.assert_array_equal(vol.hu, ref)
    # a non-integer slope makes HU float32, still equal to pydicom's stored x slope + intercept
    paths = write_phantom_series(tmp_path / "b", n_slices=N, size=S, spacing=SP, slope=0.5, intercept=-1000.5)
    vol = load_series(tmp_path / "b")
    assert vol.hu.dtype == np.float32
    np.testing.assert_allclose(vol.hu, np.stack([_pydicom_hu(p) for p in paths]), atol=1e-3)


def test_no_double_rescale(explicit_dir):
    """pydicom 3's pixel_array returns stored values: HU of air must be -1000, not -2024."""
    vol = load_series(explicit_dir)
    assert vol.hu.min() == -1000


@pytest.mark.parametrize("flips", [dict(flip_x=True), dict(flip_y=True), dict(flip_x=True, flip_y=True)])
def test_canonical_orientation(tmp_path, truth, flips):
    write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, **flips)
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    np.testing.assert_allclose(vol.direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(vol.origin, (-0.5 * S * 0.7 + 0.35, -0.5 * S * 0.7 + 0.35, -100.0), atol=1e-6)
    assert np.all(np.diff(vol.z_mm) > 0)


@pytest.mark.parametrize("iop", [
    ((-1, 0, 0), (0, 1, 0)),      # feet first: flip-x, flip-z
    ((1, 0, 0), (0, -1, 0)),      # flip-y, flip-z
    ((0, 1, 0), (1, 0, 0)),       # rows along P: transpose, flip-z
    ((0, -1, 0), (-1, 0, 0)),     # transpose, flip-x, flip-y, flip-z
])
def test_canonicalise_in_place_equals_the_copy(iop):
    """The in-place re-orientation (one slice of scratch memory) gives the copying result, in the
    input's own buffer, on a non-square stack."""
    from sdk.io import geometry as geo

    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, size=(5, 6, 9)).astype(np.int16)
    r, c = np.array(iop[0], float), np.array(iop[1], float)
    n = np.cross(r, c)
    args = (np.array([1.0, 2.0, 3.0]), r, c, n, np.arange(5) * 2.0, (0.5, 0.7))
    ref = geo.canonicalise(hu.copy(), *args)
    buf = hu.copy()
    got = geo.canonicalise(buf, *args, inplace=True)
    assert ref.flips and got.flips == ref.flips
    np.testing.assert_array_equal(got.hu, ref.hu)
    assert np.shares_memory(got.hu, buf) and got.hu.flags.c_contiguous
    np.testing.assert_allclose(got.origin, ref.origin)
    np.testing.assert_allclose(got.z_mm, ref.z_mm)
    np.testing.assert_array_equal(got.z_order, ref.z_order)


def test_missing_slice_detected(tmp_path, truth):
    write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, missing=[10])
    with pytest.raises(MissingSlicesError) as exc:
        load_series(tmp_path)
    assert "4.00 mm" in str(exc.value) and exc.value.path
    vol = load_series(tmp_path, allow_gaps=True)
    assert vol.shape[0] == N - 1
    assert any("missing slices" in w for w in vol.warnings)
    np.testing.assert_allclose(np.diff(vol.z_mm)[9], 4.0)
    np.testing.assert_array_equal(vol.hu, np.delete(truth, 10, axis=0))
    # one z step cannot place these slices: no affine, the reason, and the true positions instead
    assert vol.affine is None and "uneven slice spacing (2.000-4.000 mm)" in vol.affine_problem
    ipp = [[float(v) for v in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient] for f in vol.files]
    np.testing.assert_allclose(vol.slice_origins_lps, ipp, atol=1e-5)
    np.testing.assert_allclose(vol.voxel_to_lps(np.array([[0.0, 0.0, k] for k in range(len(ipp))])), ipp, atol=1e-5)


def test_affine_of_a_regular_series_matches_headers(explicit_dir):
    vol = load_series(explicit_dir)
    assert vol.affine_problem == ""
    for k, f in enumerate(vol.files):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        # voxel (x=3, y=5, z=k) = IPP + 3 dx (row direction) + 5 dy (column direction)
        expect = ipp + 3 * 0.7 * np.array([1.0, 0, 0]) + 5 * 0.7 * np.array([0, 1.0, 0])
        np.testing.assert_allclose((vol.affine @ [3, 5, k, 1])[:3], expect, atol=1e-5)
        np.testing.assert_allclose(vol.voxel_to_lps(np.array([3.0, 5.0, k])), expect, atol=1e-5)


def test_gantry_tilt_corrected_against_truth(tmp_path, truth):
    tilt = 15.0
    paths = write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, tilt_deg=tilt)
    with pytest.raises(GantryTiltError):
        load_series(tmp_path, allow_tilt=False)
    vol = load_series(tmp_path)
    assert vol.meta.gantry_tilt_deg == pytest.approx(tilt, abs=1e-3)     # from the positions
    assert vol.meta.gantry_tilt_header_deg == pytest.approx(tilt)
    # corrected slices are spaced dz along the (tilted) normal
    np.testing.assert_allclose(np.diff(vol.z_mm), 2.0, atol=1e-6)
    # the last slice is shifted up by N dz tan(t) / dy px: the grid grows by that many rows, at the top
    shift = np.arange(N) * 2.0 * np.tan(np.radians(tilt)) / 0.7
    grow = int(np.ceil(shift[-1]))
    assert vol.shape == (N, S + grow, S)
    assert any(f"grid grown from {S}x{S} to {S + grow}x{S}" in w for w in vol.warnings)
    # on the first slice's grid, compare with the analytic truth where the shifted source rows exist
    crop = vol.hu[:, grow:grow + S, :].astype(np.float64)
    raw = np.stack([_pydicom_hu(p) for p in paths])
    # raw slice k row j holds truth row j - shift_k; corrected row j' reads raw row j' + shift_k
    valid = np.zeros(truth.shape, dtype=bool)
    for k in range(N):
        valid[k, : S - 1 - int(np.ceil(shift[k])), :] = True
    err_corrected = np.abs(crop - truth)[valid].mean()
    err_raw = np.abs(raw - truth)[valid].mean()
    assert err_corrected < 0.15 * err_raw, (err_corrected, err_raw)
    assert np.median(np.abs(crop - truth)[valid]) == 0.0


def _lost_fraction(vol, paths, threshold: float = -500.0) -> float:
    """Fraction of source pixels above ``threshold`` HU whose LPS position (from their own headers)
    falls outside the volume's grid (from origin / direction / z_mm)."""
    lost = total = 0
    d = np.asarray(vol.direction)
    dy, dx = vol.pixel_spacing_mm
    for p in paths:
        ds = pydicom.dcmread(p)
        img = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        jj, ii = np.nonzero(img > threshold)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        sy, sx = (float(v) for v in ds.PixelSpacing)
        pts = ipp + ii[:, None] * sx * iop[:3] + jj[:, None] * sy * iop[3:]
        rel = (pts - np.asarray(vol.origin)) @ d                       # (x mm, y mm, z mm from origin)
        x, y = rel[:, 0] / dx, rel[:, 1] / dy
        z = rel[:, 2] + float(vol.z_mm[0])
        inside = ((x > -0.5) & (x < vol.shape[2] - 0.5) & (y > -0.5) & (y < vol.shape[1] - 0.5)
                  & (z >= vol.z_mm[0] - 1e-3) & (z <= vol.z_mm[-1] + 1e-3))
        lost += int((~inside).sum())
        total += inside.size
    return lost / max(total, 1)


def _shift_in_plane(paths, step_mm) -> None:
    """Rewrite each file's ImagePositionPatient: slice k moves by k x ``step_mm`` (x, y) in-plane."""
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [f"{ipp[0] + step_mm[0] * k:.6f}", f"{ipp[1] + step_mm[1] * k:.6f}", f"{ipp[2]:.6f}"]
        ds.save_as(p)


def test_tilt_correction_loses_nothing(tmp_path):
    """Slices whose field of view moves with the tilt (pixels unchanged, ImagePositionPatient
    shifted in-plane by 1.5 px per slice, as when the FOV follows the table): the last slices' body
    lies outside the first slice's grid. Every source pixel above -500 HU still lies inside the
    corrected volume and their count is kept (the first slice's 48x48 grid would lose ~30 %)."""
    paths = write_phantom_series(tmp_path, n_slices=20, size=48, spacing=(2.5, 0.8, 0.8))
    _shift_in_plane(paths, (0.0, 1.5 * 0.8))
    vol = load_series(tmp_path)
    assert vol.shape == (20, 48 + 29, 48)                                 # ceil(19 x 1.5) rows added
    # geometry: stack direction (0, 1.2, 2.5) mm per slice vs normal +z: atan(1.2 / 2.5), rotation
    # about patient right (n x s points to -x), so negative
    assert vol.meta.gantry_tilt_deg == pytest.approx(-np.degrees(np.arctan(1.2 / 2.5)), abs=1e-3)
    assert vol.meta.gantry_tilt_header_deg is None
    assert _lost_fraction(vol, paths) == 0.0
    src = sum(int((_pydicom_hu(p) > -500).sum()) for p in paths)
    kept = int((vol.hu > -500).sum())
    assert 0.99 * src <= kept <= 1.06 * src, (kept, src)   # half-pixel shifts smear edges a little
    _check_geometry_against_headers(vol, paths, n_points=200)


def test_offsets_too_large_for_a_gantry_tilt_are_refused(tmp_path):
    """In-plane offsets that would need a grid over 4x the slice area are not a gantry tilt: a
    GeometryError naming the offset and the grid, not a huge volume."""
    from sdk.errors import GeometryError

    paths = write_phantom_series(tmp_path, n_slices=6, size=16, spacing=(2.0, 1.0, 1.0))
    _shift_in_plane(paths, (10.0, 10.0))
    with pytest.raises(GeometryError, match=r"offset in-plane by up to 50 px .* needs a 66x66 grid for 16x16"):
        load_series(tmp_path)


@pytest.mark.parametrize("tilt", [-20.0, 20.0])
def test_tilt_sign_is_geometric(tmp_path, tilt):
    """The reported tilt does not depend on how the pixels are stored (flip_y reverses the column
    direction and the slice normal) and its sign follows the geometry."""
    a = load_series(write_phantom_series(tmp_path / "a", n_slices=6, size=32, tilt_deg=tilt)[0].parent)
    b = load_series(write_phantom_series(tmp_path / "b", n_slices=6, size=32, tilt_deg=tilt, flip_y=True)[0].parent)
    assert a.meta.gantry_tilt_deg == pytest.approx(tilt, abs=1e-3)
    assert b.meta.gantry_tilt_deg == pytest.approx(tilt, abs=1e-3)


def test_tilt_geometry_matches_headers(tmp_path):
    """Each corrected voxel's LPS position, from the Volume geometry, samples the source file at the
    in-plane point the headers put there (independent bilinear sampling of pydicom's pixels)."""
    paths = write_phantom_series(tmp_path, n_slices=12, size=48, spacing=(3.0, 0.9, 0.9), tilt_deg=20.0)
    vol = load_series(tmp_path)
    _check_geometry_against_headers(vol, paths, n_points=400)


def _check_geometry_against_headers(vol, paths, n_points: int) -> None:
    from scipy import ndimage

    headers = {str(p): pydicom.dcmread(p) for p in paths}
    rng = np.random.default_rng(0)
    dy, dx = vol.pixel_spacing_mm
    ex, ey, ez = (np.asarray(vol.direction)[:, i] for i in range(3))
    errs, n_used = [], 0
    for _ in range(n_points):
        k = int(rng.integers(0, vol.shape[0]))
        j = float(rng.integers(0, vol.shape[1]))
        i = float(rng.integers(0, vol.shape[2]))
        p = np.asarray(vol.origin) + i * dx * ex + j * dy * ey + (vol.z_mm[k] - vol.z_mm[0]) * ez
        ds = headers[vol.files[k]]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        r, c = iop[:3], iop[3:]
        sy, sx = (float(v) for v in ds.PixelSpacing)
        n = np.cross(r, c)
        assert abs((p - ipp) @ n) < 1e-4, "voxel is not in its source slice plane"
        u, v = (p - ipp) @ r / sx, (p - ipp) @ c / sy
        if not (1 <= u <= ds.Columns - 2 and 1 <= v <= ds.Rows - 2):
            continue
        img = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ref = ndimage.map_coordinates(img, [[v], [u]], order=1)[0]
        errs.append(abs(float(vol.hu[k, int(j), int(i)]) - ref))
        n_used += 1
    assert n_used > n_points // 4
    assert max(errs) < 0.05, max(errs)   # HU; position rounding in the headers (1e-6) at 900 HU/px edges


def test_bad_files_in_folder_are_skipped_with_warning(tmp_path, truth):
    write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP)
    (tmp_path / "notes.dcm").write_text("not dicom")
    (tmp_path / "empty.dcm").write_bytes(b"")
    first = sorted(tmp_path.glob("IM*.dcm"))[0]
    shutil.copy(first, tmp_path / "zz_duplicate.dcm")
    vol = load_series(tmp_path)
    np.testing.assert_array_equal(vol.hu, truth)
    text = "\n".join(vol.warnings)
    assert "notes.dcm" in text and "empty.dcm" in text and "zz_duplicate.dcm" in text
    assert "duplicate SOPInstanceUID" in text


def test_single_bad_file_raises_its_own_error(tmp_path):
    bad = tmp_path / "x.dcm"
    bad.write_text("hello")
    with pytest.raises(NotDicomError) as exc:
        load_series(bad)
    assert str(bad) in str(exc.value)
    good = write_phantom_series(tmp_path / "s", n_slices=2, size=16, spacing=SP)[0]
    data = good.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 200])
    with pytest.raises(CorruptFileError) as exc:
        load_series(cut)
    assert "cut.dcm" in str(exc.value)


def test_missing_path_is_a_source_not_found_error(tmp_path):
    """A path that does not exist: SourceNotFoundError, which is both a NotDicomError (ctsdk's
    contract) and a FileNotFoundError (the standard one), naming the path."""
    from sdk.errors import NotDicomError, SourceNotFoundError

    with pytest.raises(SourceNotFoundError, match="no such file or folder") as exc:
        load_series(tmp_path / "nope")
    assert isinstance(exc.value, NotDicomError) and isinstance(exc.value, FileNotFoundError)
    assert exc.value.path == str(tmp_path / "nope") or str(exc.value.path) == str(tmp_path / "nope")


def test_folder_of_only_bad_files(tmp_path):
    (tmp_path / "a.dcm").write_text("x")
    (tmp_path / "b.dcm").write_bytes(b"")
    with pytest.raises(NotDicomError) as exc:
        load_series(tmp_path)
    assert "a.dcm" in str(exc.value) and "b.dcm" in str(exc.value)
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(SeriesError):
        list_series(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoImageSeriesError):
        load_series(empty)


def test_not_ct(tmp_path):
    write_phantom_series(tmp_path, n_slices=3, size=16, spacing=SP, modality="MR")
    with pytest.raises(NotCTError):
        load_series(tmp_path)
    assert list_series(tmp_path)[0].modality == "MR"


def test_series_choice_and_override(tmp_path):
    write_phantom_series(tmp_path / "thick", n_slices=10, size=32, spacing=(5.0, 0.7, 0.7), series_uid="1.2.3.1")
    write_phantom_series(tmp_path / "thin", n_slices=20, size=32, spacing=(2.0, 0.7, 0.7), series_uid="1.2.3.2")
    infos = list_series(tmp_path)
    assert [i.uid for i in infos] == ["1.2.3.2", "1.2.3.1"]
    assert infos[0].chosen and not infos[1].chosen and "most planes" in infos[0].reason
    vol = load_series(tmp_path)
    assert vol.meta.series_uid == "1.2.3.2"
    # the choice among two series is a warning that names both; one series alone gets none
    assert [w.split(":")[0] for w in vol.warnings] == ["series 1.2.3.2", "series 1.2.3.1 not loaded (CT, axial, ORIGINAL\\PRIMARY, 10 planes, 5 mm)"]
    assert load_series(tmp_path / "thin").warnings == ()
    assert load_series(tmp_path, "1.2.3.1").shape == (10, 32, 32)
    with pytest.raises(NoImageSeriesError):
        load_series(tmp_path, "9.9.9")


def test_equal_series_need_a_choice(tmp_path):
    write_phantom_series(tmp_path / "a", n_slices=6, size=16, spacing=SP, series_uid="1.2.5.1")
    write_phantom_series(tmp_path / "b", n_slices=6, size=16, spacing=SP, series_uid="1.2.5.2")
    with pytest.raises(MixedSeriesError) as exc:
        load_series(tmp_path)
    assert "1.2.5.1" in str(exc.value) and "1.2.5.2" in str(exc.value)
    assert load_series(tmp_path, "1.2.5.2").meta.series_uid == "1.2.5.2"


def test_one_uid_two_geometries_is_split(tmp_path):
    write_phantom_series(tmp_path / "a", n_slices=8, size=16, spacing=SP, series_uid="1.2.7", z0_mm=0)
    write_phantom_series(tmp_path / "b", n_slices=5, size=24, spacing=SP, series_uid="1.2.7", seed=5, z0_mm=0)
    infos = list_series(tmp_path)
    assert sorted(i.uid for i in infos) == ["1.2.7#1", "1.2.7#2"]
    vol = load_series(tmp_path)
    assert vol.shape == (8, 16, 16)                       # never mixed: the larger stack wins
    assert load_series(tmp_path, [i.uid for i in infos if i.n_files == 5][0]).shape == (5, 24, 24)
    with pytest.raises(MixedSeriesError):
        load_series(tmp_path, "1.2.7")


@pytest.mark.parametrize("syntax", ["j2k", "explicit"])
def test_every_decode_mode_is_bit_identical(tmp_path, syntax):
    """serial, threads and forked processes write the same HU, bit for bit (the processes write
    into a shared mapping), and ``auto`` picks threads (no fork by default)."""
    try:
        write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, transfer_syntax=syntax, noise_hu=20)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    ref = load_series(tmp_path, decode="serial")
    for mode, workers in (("threads", 4), ("processes", 2), ("processes", 3), ("auto", 2)):
        t: dict = {}
        vol = load_series(tmp_path, decode=mode, workers=workers, timings=t, progress=mode == "threads")
        assert vol.hu.dtype == ref.hu.dtype
        np.testing.assert_array_equal(vol.hu, ref.hu, err_msg=f"{mode} x {workers}")
        assert vol.files == ref.files and vol.warnings == ref.warnings
        assert set(t) == {"scan", "decode", "hu", "geometry"}
        forked = _in_shared_mapping(vol.hu)          # only the processes mode allocates one
        assert forked == (mode == "processes")


def _load_in_child(folder: str) -> bytes:
    return load_series(folder, decode="processes", workers=2).hu.tobytes()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_processes_fall_back_to_threads_in_a_daemonic_worker(tmp_path):
    """A multiprocessing pool worker may not start children: the decode falls back to threads
    (same HU) instead of failing."""
    import multiprocessing as mp

    write_phantom_series(tmp_path, n_slices=12, size=32, spacing=SP, transfer_syntax="rle")
    ref = load_series(tmp_path, decode="serial").hu.tobytes()
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_load_in_child, (str(tmp_path),)) == ref


def _in_shared_mapping(arr: np.ndarray) -> bool:
    import mmap

    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base is not None


def test_timings_keys_and_sum(tmp_path):
    import time

    write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP, tilt_deg=10.0)
    t: dict = {}
    t0 = time.perf_counter()
    load_series(tmp_path, timings=t)
    wall_ms = (time.perf_counter() - t0) * 1000.0
    assert {"scan", "decode", "hu", "geometry"} <= set(t)
    assert all(t[k] >= 0 for k in ("scan", "decode", "hu", "geometry"))
    assert t["geometry"] > 0 and t["decode"] > 0            # tilt correction and decode both ran
    stages = t["scan"] + t["decode"] + t["hu"] + t["geometry"]
    assert 0.9 * wall_ms <= stages <= wall_ms + 1.0
    with pytest.raises(ConfigError, match="decode must be one of"):
        load_series(tmp_path, decode="gpu")


class _Broken(DecoderPlugin):
    def decode(self, ds):
        raise RuntimeError("boom")


def test_decoder_chain_falls_back_and_reports(explicit_dir):
    uid = "1.2.840.10008.1.2.4.70"
    names = [p.name for p in decoder_chain(uid)]
    assert names.index("pylibjpeg") < names.index("gdcm")
    ds = pydicom.dcmread(next(explicit_dir.glob("*.dcm")))
    register_decoder(_Broken("broken", ("1.2.840.10008.1.2.1",), ("nothing",), ("numpy",), ""), first=True)
    try:
        arr, used = decode_pixels(ds, "f.dcm")
        assert used == "native" and arr.shape == (S, S)
        with pytest.raises(CorruptFileError) as exc:
            decode_pixels(ds, "f.dcm", chain=["broken"])
        assert "broken: RuntimeError: boom" in str(exc.value) and "f.dcm" in str(exc.value)
    finally:
        unregister_decoder("broken")


def test_int16_overflow_falls_back_to_float32(tmp_path, truth):
    paths = write_phantom_series(tmp_path, n_slices=N, size=S, spacing=SP)
    ds = pydicom.dcmread(paths[3])
    ds.RescaleIntercept = "32000"            # integer rescale whose HU leave the int16 range
    ds.save_as(paths[3])
    vol = load_series(tmp_path)
    assert vol.hu.dtype == np.float32
    np.testing.assert_array_equal(vol.hu, np.stack([_pydicom_hu(p) for p in paths]))
    assert any("exceed int16" in w for w in vol.warnings)


def test_stored_values_sign_extension_by_hand():
    """12-bit signed samples in 16-bit words: 0x7FF -> 2047, 0x800 -> -2048, 0xFFF -> -1."""
    from types import SimpleNamespace

    from sdk.io.decoders import _stored_values

    raw = np.array([[0x000, 0x7FF, 0x800, 0xFFF]], np.uint16)
    ds = {"BitsStored": 12, "PixelRepresentation": 1}
    meta = SimpleNamespace(BitsAllocated=16, get=lambda k, d=None: ds.get(k, d))
    out = _stored_values(raw, meta)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[0, 2047, -2048, -1]])
    ds["PixelRepresentation"] = 0
    np.testing.assert_array_equal(_stored_values(raw, meta), raw)
    ds.update(BitsStored=16, PixelRepresentation=1)
    np.testing.assert_array_equal(_stored_values(np.array([0xFFFF], np.uint16), meta), [-1])


@pytest.mark.parametrize("dtype,lo,hi,intercept", [
    (np.uint16, 0, 4095, -1024), (np.int16, -2000, 3000, 0), (np.uint16, 0, 65535, -32768), (np.uint8, 0, 255, -100),
    (np.uint16, 30000, 40000, -1024), (np.int16, -32768, 32767, -1024), (np.int16, -100, 100, -32768),
    (np.uint16, 0, 4095, 40000)])
def test_store_hu_int16_fast_path_against_int64(dtype, lo, hi, intercept):
    """stored + intercept into an int16 volume: exact where it fits, refused (-> float32) where not."""
    from types import SimpleNamespace

    from sdk.io.reader import _store_hu

    stored = np.random.default_rng(0).integers(lo, hi + 1, size=(32, 32)).astype(dtype)
    out = np.zeros((2, 32, 32), np.int16)
    ok = _store_hu(out, 1, stored, SimpleNamespace(slope=1, intercept=intercept))
    ref = stored.astype(np.int64) + intercept
    assert ok == bool(ref.min() >= -32768 and ref.max() <= 32767)
    if ok:
        np.testing.assert_array_equal(out[1], ref)
        assert not out[0].any()


def test_default_decode_workers(monkeypatch) -> None:
    """Threads: one more than the usable cores (the codec keeps every core busy while a thread
    holds the GIL between planes), processes: the cores; at most DEFAULT_WORKERS; 1 on one core."""
    import os

    from sdk.io import reader

    for cores, threads, procs in ((1, 1, 1), (2, 3, 2), (3, 4, 3), (16, reader.DEFAULT_WORKERS, reader.DEFAULT_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert reader.default_workers() == threads and reader.default_workers("threads") == threads
        assert reader.default_workers("processes") == procs

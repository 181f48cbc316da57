"""U-Net architectures (shapes, registry) and ONNX export parity against PyTorch eager."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from sdk.models import create_model  # noqa: E402
from sdk.models.unet import UNet, unet2d_lung, unet3d_lung  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_unet2d_shapes_and_registry() -> None:
    m = create_model("unet2d_lung", base=4).eval()
    assert isinstance(m, UNet) and m.dims == 2
    with torch.no_grad():
        y = m(torch.rand(3, 1, 64, 48))
    assert tuple(y.shape) == (3, 1, 64, 48)
    # the shipped size: 4 levels, base 16
    assert sum(p.numel() for p in unet2d_lung().parameters()) == 482449


def test_unet3d_shapes() -> None:
    m = unet3d_lung(base=2).eval()
    with torch.no_grad():
        y = m(torch.rand(1, 1, 16, 16, 16))
    assert tuple(y.shape) == (1, 1, 16, 16, 16)
    assert create_model("unet3d_lung").dims == 3


def test_unet_rejects_bad_dims() -> None:
    with pytest.raises(ValueError):
        UNet(dims=4)


def test_onnx_export_parity_dynamic_batch(tmp_path: Path) -> None:
    from sdk.train.seg import export_onnx

    torch.manual_seed(0)
    m = unet2d_lung(base=4)
    # give BatchNorm non-trivial statistics so eval-mode folding is exercised
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(4, 1, 32, 32) * 2)
    diff = export_onnx(m, tmp_path / "u.onnx", size=32)  # exported at batch 1, checked at batch 3
    assert diff <= 1e-4


def test_shipped_onnx_matches_weights() -> None:
    onnx_path = REPO / "runs" / "seg" / "unet2d_lung.onnx"
    pt = REPO / "runs" / "seg" / "unet2d_lung.pt"
    if not (onnx_path.is_file() and pt.is_file()):
        pytest.skip(f"trained model not found under {onnx_path.parent} (run python -m sdk.train.seg)")
    m = unet2d_lung().eval()
    m.load_state_dict(torch.load(pt))
    x = np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})[0]
    assert np.abs(got - ref).max() <= 1e-4

"""Classifier heads: lung-mask-weighted global average pooling (paper 000) and plain GAP.

Li, Sun, Sun, "A Deep Learning Based Method For COVID-19 Classification Using Chest CT Images"
(Keya Medical): the feature map of the last convolution is pooled with weights taken from the lung
mask, down-sampled to the feature grid, Gaussian-smoothed and normalised to sum 1, so the
background contributes (almost) nothing to the pooled vector.

The arithmetic follows docs/conventions.md "Lung-mask-weighted GAP" exactly; the NumPy reference
is ``sdk.pooling`` and the CUDA kernels are ``mask_weights.cu`` / ``masked_gap.cu``:

1. mask ``(N, 1, H, W)`` in [0, 1] -> feature grid ``(h, w)`` by area averaging,
2. fixed 3x3 Gaussian, sigma 1, zero padding,
3. normalise to sum 1 per sample; a sum below 1e-6 (empty mask) gives uniform ``1 / (h*w)``,
4. ``p[n, c] = sum_yx f[n, c, y, x] * w[n, y, x]``,
5. ``cam[n, k, y, x] = sum_c W[k, c] * f[n, c, y, x] * w[n, y, x] * (h*w)``; the grid mean of a CAM
   plus the bias is the logit.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskWeightedGAP", "ClassifierHead", "gaussian_kernel3", "area_matrix", "EMPTY_MASK_EPS"]

EMPTY_MASK_EPS = 1e-6


def gaussian_kernel3(sigma: float = 1.0) -> np.ndarray:
    """The fixed 3x3 Gaussian ``g[dy, dx] ∝ exp(-(dx² + dy²) / (2 sigma²))``, normalised to sum 1."""
    d = np.arange(-1, 2, dtype=np.float64)
    g = np.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of the exact area (fractional-overlap box) down-sampling rule.

    Input sample ``j`` covers ``[j, j+1)``; output cell ``i`` covers
    ``[i * n_in / n_out, (i + 1) * n_in / n_out)``; each row sums to 1.
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"area_matrix needs positive sizes, got n_in={n_in}, n_out={n_out}")
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        a, b = i * scale, (i + 1) * scale
        for j in range(int(math.floor(a)), min(int(math.ceil(b)), n_in)):
            m[i, j] = max(0.0, min(b, j + 1) - max(a, j))
    return m / scale


def _area_resize(mask: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Area-average ``mask (N, 1, H, W)`` to ``hw``.

    Integer factors use ``adaptive_avg_pool2d`` (which is then exact block averaging and exports
    to ONNX); other factors use the exact fractional-overlap matrices (``MatMul`` in ONNX). The
    spatial input size is static in every exported graph (only the batch is dynamic).
    """
    H, W = int(mask.shape[-2]), int(mask.shape[-1])
    h, w = int(hw[0]), int(hw[1])
    if H % h == 0 and W % w == 0:
        return F.adaptive_avg_pool2d(mask, (h, w))
    ry = torch.as_tensor(area_matrix(H, h), dtype=mask.dtype, device=mask.device)
    rx = torch.as_tensor(area_matrix(W, w), dtype=mask.dtype, device=mask.device)
    return torch.matmul(torch.matmul(ry, mask), rx.t())


class MaskWeightedGAP(nn.Module):
    """Pooling weights and pooled features of the lung-mask-weighted GAP.

    Args:
        weighted: True for the mask-weighted pooling, False for plain GAP (uniform ``1/(h*w)``).
        sigma: the Gaussian's sigma in feature-grid cells (the conventions fix 1.0).

    ``weights(mask, hw)`` returns ``(N, 1, h, w)`` weights summing to 1 per sample;
    ``forward(f, mask)`` returns ``(pooled (N, C), weights (N, 1, h, w))``.
    """

    def __init__(self, weighted: bool = True, sigma: float = 1.0):
        super().__init__()
        self.weighted = bool(weighted)
        self.sigma = float(sigma)
        k = torch.as_tensor(gaussian_kernel3(sigma), dtype=torch.float32).view(1, 1, 3, 3)
        self.register_buffer("gauss", k, persistent=False)

    def weights(self, mask: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        h, w = int(hw[0]), int(hw[1])
        n = mask.shape[0]
        if not self.weighted:
            return torch.full((n, 1, h, w), 1.0 / (h * w), dtype=torch.float32, device=mask.device)
        m = _area_resize(mask.float(), (h, w))
        m = F.conv2d(m, self.gauss.to(m.dtype), padding=1)
        s = m.sum(dim=(2, 3), keepdim=True)
        uniform = torch.full_like(m, 1.0 / (h * w))
        return torch.where(s < EMPTY_MASK_EPS, uniform, m / s.clamp_min(EMPTY_MASK_EPS))

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(mask, (int(f.shape[-2]), int(f.shape[-1])))
        pooled = (f.float() * w).sum(dim=(2, 3))  # FP32 accumulation
        return pooled, w

    def extra_repr(self) -> str:
        return f"weighted={self.weighted}, sigma={self.sigma}"


class ClassifierHead(nn.Module):
    """Pooling (mask-weighted or plain GAP) -> dropout -> Linear, with the exact CAM.

    ``forward(f, mask)`` returns ``(logits (N, K), probs (N, K), cam (N, K, h, w))`` - the
    classifier ONNX interface of docs/conventions.md.
    """

    def __init__(self, in_features: int, num_classes: int, weighted: bool = True, drop_rate: float = 0.2):
        super().__init__()
        self.pool = MaskWeightedGAP(weighted=weighted)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    @property
    def weighted(self) -> bool:
        return self.pool.weighted

    def forward(self, f: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, w = self.pool(f, mask)
        logits = self.fc(self.drop(pooled))
        probs = torch.softmax(logits, dim=1)
        hw = float(f.shape[-2] * f.shape[-1])
        # cam[n,k,y,x] = sum_c W[k,c] f[n,c,y,x] w[n,y,x] (h*w): its grid mean + bias == logit
        cam = torch.einsum("kc,nchw->nkhw", self.fc.weight, f.float() * w) * hw
        return logits, probs, cam

"""Volumes in HU with geometry, and the NumPy reference resampling the CUDA kernels are held to."""
from .core import SeriesMeta, Volume

__all__ = ["SeriesMeta", "Volume"]

from .resample import (  # noqa: E402  (NumPy references: docs/conventions.md "Resampling")
    LUNG_WINDOW,
    SEGMENTER_WINDOW,
    classifier_inputs,
    resample,
    resample_volume,
    window_hu,
)

__all__ += ["LUNG_WINDOW", "SEGMENTER_WINDOW", "classifier_inputs", "resample", "resample_volume", "window_hu"]

"""Volumes in HU with geometry, and the NumPy reference resampling the CUDA kernels are held to."""
from .core import SeriesMeta, Volume

__all__ = ["SeriesMeta", "Volume"]

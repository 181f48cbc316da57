"""Inference sessions behind one interface (see base.py)."""
from .base import RuntimeInfo, Session, TensorSpec

__all__ = ["RuntimeInfo", "Session", "TensorSpec"]

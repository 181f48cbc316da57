"""Per-slice evidence score: the CNN's P(covid) fused with the slice's HU opacity fractions.

    from sdk.slice_score import SliceScoreModel
    model = SliceScoreModel.from_manifest(bundle.manifest["slice_score"])   # or bundle.slice_score_model
    s = model.score(p_cnn, ggo_fraction, consolidation_fraction)           # arrays or floats

Form (``form = "logistic"``; the coefficients come from the bundle manifest, never from code)::

    slice_score = sigmoid(a + b * logit(clip(p_cnn)) + c * g(ggo) + d * g(cons))

- ``p_cnn``: the classifier's P(positive) of the slice, clipped to ``[p_clip, 1 - p_clip]``;
- ``ggo`` / ``cons``: the share of the slice's analysed lung in ground glass / consolidation
  (:attr:`sdk.opacity.LungOpacity.slice_ggo_fraction`, fixed HU rules, nothing fitted);
- ``g``: ``"sqrt"`` (``sqrt(x)``), ``"log1p"`` (``log1p(x / scale)``) or ``"identity"``;
- a slice without analysed lung (NaN fractions: outside the mask, or the basal / apical ends the
  opacity rules leave out) gets the fractions ``missing_fraction`` (default 0: no HU evidence, the
  score is then the CNN term alone).

Where ``a, b, c, d`` came from (which data, which command) is written in the manifest block
(``source``, ``command``); docs/model_card.md gives the numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from .errors import ConfigError

__all__ = ["SliceScoreModel", "TRANSFORMS", "FORMS", "Z_CONTEXT_MM", "transform", "z_context"]

FORMS = ("logistic",)
TRANSFORMS = ("sqrt", "log1p", "identity")
ArrayLike = Union[float, np.ndarray]


def transform(x: ArrayLike, name: str, scale: float = 1.0) -> np.ndarray:
    """``g(x)`` of the score (x a fraction in [0, 1]; negative values are clipped to 0)."""
    v = np.clip(np.asarray(x, dtype=np.float64), 0.0, None)
    if name == "sqrt":
        return np.sqrt(v)
    if name == "log1p":
        return np.log1p(v / float(scale))
    if name == "identity":
        return v
    raise ConfigError(f"slice_score transform must be one of {TRANSFORMS}, not {name!r}")


@dataclass(frozen=True)
class SliceScoreModel:
    """The fixed slice-score function read from a bundle manifest's ``slice_score`` block."""

    intercept: float
    w_cnn: float
    w_ggo: float
    w_consolidation: float
    form: str = "logistic"
    transform: str = "sqrt"
    scale: float = 1.0
    p_clip: float = 1e-4
    missing_fraction: float = 0.0
    source: str = ""
    command: str = ""
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"slice_score form must be one of {FORMS}, not {self.form!r}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"slice_score transform must be one of {TRANSFORMS}, not {self.transform!r}")
        for k in ("intercept", "w_cnn", "w_ggo", "w_consolidation", "scale", "p_clip", "missing_fraction"):
            if not math.isfinite(float(getattr(self, k))):
                raise ConfigError(f"slice_score {k} must be a finite number, got {getattr(self, k)!r}")
        if not 0.0 < self.p_clip < 0.5:
            raise ConfigError(f"slice_score p_clip must be in (0, 0.5), got {self.p_clip}")
        if self.scale <= 0:
            raise ConfigError(f"slice_score scale must be positive, got {self.scale}")

    # --- manifest ---------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, block: Optional[Mapping[str, Any]], where: str = "") -> Optional["SliceScoreModel"]:
        """Parse a manifest ``slice_score`` block; None when the bundle has none. ``where``: the
        manifest file, named in the ConfigError of a malformed block.

        Block::

            {"form": "logistic", "transform": "sqrt", "scale": 1.0, "p_clip": 0.0001,
             "missing_fraction": 0.0,
             "coefficients": {"intercept": a, "cnn_logit": b, "ggo": c, "consolidation": d},
             "source": "...", "command": "...", ...}      # other keys are kept in ``extra``
        """
        if block is None:
            return None
        at = f"{where}: " if where else ""
        if not isinstance(block, Mapping):
            raise ConfigError(f"{at}manifest slice_score must be an object, got {type(block).__name__}")
        coef = block.get("coefficients")
        need = ("intercept", "cnn_logit", "ggo", "consolidation")
        if not isinstance(coef, Mapping) or any(k not in coef for k in need):
            raise ConfigError(f"{at}manifest slice_score.coefficients must hold {list(need)}")
        try:
            vals = {k: float(coef[k]) for k in need}
            known = ("form", "transform", "scale", "p_clip", "missing_fraction", "coefficients", "source", "command")
            return cls(intercept=vals["intercept"], w_cnn=vals["cnn_logit"], w_ggo=vals["ggo"],
                       w_consolidation=vals["consolidation"], form=str(block.get("form", "logistic")),
                       transform=str(block.get("transform", "sqrt")), scale=float(block.get("scale", 1.0)),
                       p_clip=float(block.get("p_clip", 1e-4)), missing_fraction=float(block.get("missing_fraction", 0.0)),
                       source=str(block.get("source", "")), command=str(block.get("command", "")),
                       extra={k: v for k, v in block.items() if k not in known})
        except ConfigError as exc:
            raise ConfigError(f"{at}manifest {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"{at}manifest slice_score: {exc}") from exc

    def to_manifest(self) -> Dict[str, Any]:
        """The manifest block (inverse of :meth:`from_manifest`)."""
        d: Dict[str, Any] = {"form": self.form, "transform": self.transform, "scale": self.scale, "p_clip": self.p_clip,
                             "missing_fraction": self.missing_fraction,
                             "coefficients": {"intercept": self.intercept, "cnn_logit": self.w_cnn, "ggo": self.w_ggo,
                                              "consolidation": self.w_consolidation},
                             "source": self.source, "command": self.command}
        d.update(self.extra)
        return d

    # --- the score ----------------------------------------------------------------------------------
    def terms(self, p_cnn: ArrayLike, ggo: ArrayLike, cons: ArrayLike) -> Dict[str, np.ndarray]:
        """The logit terms: ``intercept``, ``cnn``, ``ggo``, ``consolidation`` and their sum ``logit``."""
        p = np.clip(np.asarray(p_cnn, dtype=np.float64), self.p_clip, 1.0 - self.p_clip)
        g = np.asarray(ggo, dtype=np.float64)
        c = np.asarray(cons, dtype=np.float64)
        g = np.where(np.isfinite(g), g, self.missing_fraction)
        c = np.where(np.isfinite(c), c, self.missing_fraction)
        t_cnn = self.w_cnn * np.log(p / (1.0 - p))
        t_ggo = self.w_ggo * transform(g, self.transform, self.scale)
        t_cons = self.w_consolidation * transform(c, self.transform, self.scale)
        logit = self.intercept + t_cnn + t_ggo + t_cons
        return {"intercept": np.full_like(logit, self.intercept), "cnn": t_cnn, "ggo": t_ggo,
                "consolidation": t_cons, "logit": logit}

    def score(self, p_cnn: ArrayLike, ggo: ArrayLike, cons: ArrayLike) -> Any:
        """``sigmoid(logit)``: a float for scalar inputs, else an array."""
        z = self.terms(p_cnn, ggo, cons)["logit"]
        s = 0.5 * (1.0 + np.tanh(0.5 * z))       # the logistic function without overflow
        return float(s) if np.ndim(s) == 0 else s

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


# --- z context (issue 14) -------------------------------------------------------------------------
#: half width (mm) of the z window :func:`z_context` averages over. Fixed a priori, before any
#: real-slice value of the score was computed (git history: this constant was committed on its own):
#: COVID-19 ground-glass lesions are round / patchy opacities of about 1-5 cm, so a lesion seen on one
#: slice is on its neighbours within +-5 mm too, while a 10 mm window is narrower than any lobe and
#: keeps the extent of the involved z range; 5 mm is also the usual thick-slice reconstruction.
Z_CONTEXT_MM = 5.0


def z_context(p: ArrayLike, z_mm: ArrayLike, half_window_mm: float = Z_CONTEXT_MM, p_clip: float = 1e-4) -> np.ndarray:
    """Per-slice score with z context: for each slice, ``sigmoid(mean(logit(p_j)))`` over the slices
    ``j`` whose position is within ``half_window_mm`` of it (itself included; positions in mm, so
    uneven spacing and gaps between selected slices are respected; a slice with no neighbour in the
    window keeps its own probability).

    Args:
        p: (N,) the CNN's P(positive) of the selected slices.
        z_mm: (N,) their positions along the stack (any order).
        half_window_mm: half width of the window (> 0).
        p_clip: probabilities are clipped to ``[p_clip, 1 - p_clip]`` before the logit.

    Returns:
        (N,) float64 scores in (0, 1), in the order of ``p``.

    Raises:
        ConfigError: mismatched lengths, non-finite values or a non-positive window.
    """
    pv = np.asarray(p, dtype=np.float64).reshape(-1)
    zv = np.asarray(z_mm, dtype=np.float64).reshape(-1)
    if pv.shape != zv.shape:
        raise ConfigError(f"z_context: {pv.size} probabilities but {zv.size} positions")
    if not (np.isfinite(pv).all() and np.isfinite(zv).all()):
        raise ConfigError("z_context: probabilities and positions must be finite")
    if not (half_window_mm > 0 and math.isfinite(half_window_mm)):
        raise ConfigError(f"z_context: half_window_mm must be a positive number, got {half_window_mm!r}")
    if not 0.0 < p_clip < 0.5:
        raise ConfigError(f"z_context: p_clip must be in (0, 0.5), got {p_clip}")
    if pv.size == 0:
        return pv
    q = np.clip(pv, p_clip, 1.0 - p_clip)
    logit = np.log(q / (1.0 - q))
    order = np.argsort(zv, kind="stable")
    zs, ls = zv[order], logit[order]
    csum = np.concatenate([[0.0], np.cumsum(ls)])
    lo = np.searchsorted(zs, zs - half_window_mm - 1e-9, side="left")
    hi = np.searchsorted(zs, zs + half_window_mm + 1e-9, side="right")
    mean = (csum[hi] - csum[lo]) / (hi - lo)
    out = np.empty_like(mean)
    out[order] = 1.0 / (1.0 + np.exp(-mean))
    return out

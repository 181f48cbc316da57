"""Prior-study comparison (paper 003: images of one patient at different times carry information).

``compare(current, current_mask, prior, prior_mask)`` answers "did the lungs get worse?":

1. **Grids.** Each study's lung mask and opacity indicator (``HU > threshold_hu`` inside the lung,
   at native resolution) are area-averaged onto an isotropic ``grid_mm`` grid in the study's own
   physical frame (slice positions from ``z_mm``, so uneven z is handled).
2. **Rigid registration, prior -> current, on the lung masks.** Start from centre-of-mass
   alignment, then minimise ``1 - soft Dice`` of the two lung-fraction grids over 3 rotations
   (about the current lungs' centre, bounded by ``max_rotation_deg``) and 3 translations (bounded
   by ``max_translation_mm``) with SciPy's bounded Powell, at most ``max_evaluations`` cost
   evaluations. Registration is reported (angles, shift, Dice before/after), never hidden.
3. **Burden per lung.** Fraction of lung volume above ``threshold_hu`` (-700 HU: ground glass and
   denser), computed exactly at native resolution on each study's own mask, for the left and right
   lung (mask labels 1 = left, 2 = right as :mod:`sdk.lungs` writes them; a 0/1 mask is split
   into two components or at the x centroid; x increases towards the patient's Left).
4. **Change.** ``delta = current - prior`` (fraction of lung volume). Per lung: ``worse`` when
   ``delta > stable_band``, ``improved`` when ``delta < -stable_band``, else ``stable``. Overall:
   ``worse`` if any lung is worse, else ``improved`` if any improved, else ``stable``. The default
   band, 0.03 (3 percentage points of lung volume), sits above the burden change from breathing
   depth and vessel partial volume between two scans of unchanged lungs (documented in
   docs/integration.md, with the numbers measured by the tests).
5. **Difference map.** Registered opacity-fraction grids, ``current - prior`` inside the lungs,
   Gaussian-smoothed (``diff_smooth_mm``, 6 mm) so that the +/- pairs left by residual
   misregistration of vessels cancel: new opacity in ml (positive part), resolved opacity in ml
   (negative part) - supplementary numbers with a noise floor (docs/integration.md); the change
   label comes from the registration-independent burden of step 4 - and a PNG (coronal mean projection and the axial
   level with the largest new opacity; red = new, blue = resolved).

Requirements: both inputs must be volumes (at least ``min_slices`` slices covering
``min_extent_mm``); single slices or thick-slab localisers raise :class:`~sdk.errors.ConfigError`
rather than produce a number that means nothing.

**Is it a prior of this patient?** :func:`check_pair` reads both series' DICOM headers
(``SeriesMeta.identity``, kept out of every output) before anything is compared; ``Triage.run``
calls it and refuses (with ``check_pair(...).error()``, a :class:`~sdk.errors.PriorError` in
``TriageResult.prior``, the current result untouched) only on positive evidence:

- **another patient** (:class:`~sdk.errors.PriorPatientMismatchError`): both PatientIDs written and
  different (unless both IssuerOfPatientID are written and differ: then the IDs are not
  comparable), or PatientSex / PatientBirthDate written in both and different;
- **the prior is newer** (:class:`~sdk.errors.PriorOrderError`): the first of StudyDate(+Time),
  SeriesDate, AcquisitionDate, ContentDate written in both puts the prior after the current study.
  Refused rather than silently swapped: the result's label is the current series', and "improved"
  against a later study means the opposite; the caller passes the studies the other way round.

A missing, empty or placeholder field never refuses: the check is listed in ``not_checked``
("patient identity not checked: PatientID absent in prior"). The same StudyInstanceUID (and equal
dates) is reported as ``study: "same study"`` / ``"same series"`` with a warning, and compared: two
series of one examination, whose change measures reconstruction and segmentation, not disease.
``Triage.run(..., prior_checks=False)`` (CLI ``--prior-unchecked``) compares whatever the headers
say, and records what would have refused.
"""
from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import numpy as np

from .errors import ConfigError, PriorError, PriorOrderError, PriorPatientMismatchError, ResultWriteError

log = logging.getLogger("sdk.prior")

PathLike = Union[str, Path]
LEFT, RIGHT = 1, 2
CHANGES = ("improved", "stable", "worse")

__all__ = ["PriorConfig", "PriorComparison", "PriorChecks", "check_pair", "compare", "lung_labels", "opacity_burden",
           "classify_change", "rigid_register", "to_grid", "euler_matrix", "CHANGES"]


@dataclass(frozen=True)
class PriorConfig:
    """Parameters of the comparison (HU, fractions, mm, degrees)."""

    threshold_hu: float = -700.0
    stable_band: float = 0.03
    grid_mm: float = 4.0
    registration_grid_mm: float = 4.0
    diff_smooth_mm: float = 6.0
    max_rotation_deg: float = 10.0
    max_translation_mm: float = 40.0
    max_evaluations: int = 400
    min_slices: int = 8
    min_extent_mm: float = 60.0

    def __post_init__(self) -> None:
        if not self.stable_band >= 0:
            raise ConfigError(f"PriorConfig.stable_band must be >= 0, not {self.stable_band}")
        if not (self.grid_mm > 0 and self.registration_grid_mm > 0):
            raise ConfigError(f"PriorConfig grid sizes must be > 0, not {self.grid_mm} / {self.registration_grid_mm}")
        if self.max_evaluations < 1:
            raise ConfigError(f"PriorConfig.max_evaluations must be >= 1, not {self.max_evaluations}")


@dataclass
class PriorComparison:
    """Result of :func:`compare`. ``to_dict()`` is JSON-safe (the grids are not included)."""

    change: str
    lungs: Dict[str, Dict[str, float]]
    overall: Dict[str, float]
    new_opacity_ml: float
    resolved_opacity_ml: float
    registration: Dict[str, Any]
    config: PriorConfig
    slice_scores: Optional[Dict[str, float]] = None
    timings_ms: Dict[str, float] = field(default_factory=dict)
    heatmap_path: Optional[str] = None
    diff_grid: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def summary(self) -> str:
        parts = [f"{name} lung {d['prior_burden'] * 100:.1f}% -> {d['current_burden'] * 100:.1f}% ({d['change']})"
                 for name, d in self.lungs.items()]
        return (f"{self.change}: " + "; ".join(parts)
                + f"; new opacity {self.new_opacity_ml:.1f} ml, resolved {self.resolved_opacity_ml:.1f} ml")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "change": self.change,
            "summary": self.summary,
            "lungs": {k: {kk: _py(vv) for kk, vv in v.items()} for k, v in self.lungs.items()},
            "overall": {k: _py(v) for k, v in self.overall.items()},
            "new_opacity_ml": float(self.new_opacity_ml),
            "resolved_opacity_ml": float(self.resolved_opacity_ml),
            "registration": {k: _py(v) for k, v in self.registration.items()},
            "thresholds": {"threshold_hu": self.config.threshold_hu, "stable_band": self.config.stable_band},
            "slice_scores": self.slice_scores,
            "timings_ms": {k: round(float(v), 1) for k, v in self.timings_ms.items()},
            "heatmap_path": self.heatmap_path,
        }

    def save_heatmap(self, path: PathLike) -> Path:
        """PNG of the registered difference (coronal mean projection + axial level of most new opacity)."""
        if self.diff_grid is None:
            raise ConfigError("this comparison holds no difference grid (rebuilt from a dict?)")
        path = Path(path)
        _plot_difference(self.diff_grid, self.config.grid_mm, self.summary, path)
        self.heatmap_path = str(path)
        return path


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    return v


# --- is it a prior of this patient? (DICOM headers) ---------------------------------------------
#: PatientID values anonymisers write into every study: equal placeholders prove nothing
PLACEHOLDER_IDS = frozenset({"ANONYMOUS", "ANONYMIZED", "ANONYMISED", "ANON", "UNKNOWN", "NONE", "NULL", "N/A", "NA",
                             "0", "00000000", "PATIENT", "NOID", "NO ID"})
#: (date, time) header pairs that order two studies, first written in both wins
_WHEN = (("StudyDate", "StudyTime", "study_date", "study_time"),
         ("SeriesDate", "SeriesTime", "series_date", "series_time"),
         ("AcquisitionDate", "AcquisitionTime", "acquisition_date", "acquisition_time"),
         ("ContentDate", "ContentTime", "content_date", "content_time"))
_OVERRIDE = "prior_checks=False (ctsdk triage --prior-unchecked)"


@dataclass
class PriorChecks:
    """What :func:`check_pair` found in the two series' headers (``to_dict()`` is JSON-safe and
    holds no patient identity: a PatientID mismatch is said, not quoted; only placeholder IDs such
    as "ANONYMOUS", issuers, sex and age values are named).

    Attributes:
        patient: "same" | "different" | "not checked".
        order: "prior earlier" | "prior later" | "same time" | "not checked".
        study: "different studies" | "same study" | "same series" | "not checked".
        interval_days: current minus prior (days; whole days when a time is missing), or None.
        checked: what was compared and how it came out, one line each.
        not_checked: checks that could not be made and why ("... absent in prior").
        problems: reasons not to compare (another patient, prior newer); empty when it may be compared.
        enforced: False when the caller overrode the checks (``prior_checks=False``).
    """

    patient: str = "not checked"
    order: str = "not checked"
    study: str = "not checked"
    interval_days: Optional[float] = None
    checked: List[str] = field(default_factory=list)
    not_checked: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    enforced: bool = True
    error_type: Type[PriorError] = field(default=PriorError, repr=False)

    @property
    def refused(self) -> bool:
        """True when the checks are enforced and found a reason not to compare."""
        return self.enforced and bool(self.problems)

    def error(self) -> Optional[PriorError]:
        """The typed error that refuses the comparison (None when there is no problem): the type
        names the first problem (patient before order), the message lists all and what to do."""
        if not self.problems:
            return None
        if self.error_type is PriorOrderError and self.patient != "different":
            todo = f"pass the earlier study as prior (swap the two), or {_OVERRIDE} if the dates are known to be wrong"
        else:
            todo = (f"pass an earlier study of the same patient as prior, or {_OVERRIDE} if you know both are one "
                    "patient (e.g. IDs from two issuers)")
        return self.error_type("; ".join(self.problems) + f" - {todo}")

    def to_dict(self) -> Dict[str, Any]:
        return {"enforced": self.enforced, "patient": self.patient, "order": self.order, "study": self.study,
                "interval_days": self.interval_days, "checked": list(self.checked),
                "not_checked": list(self.not_checked), "problems": list(self.problems)}


def _parse_da(value: str) -> Optional[_dt.date]:
    v = value.strip().replace(".", "").replace("-", "")  # DA is YYYYMMDD; ACR-NEMA wrote YYYY.MM.DD
    if len(v) != 8 or not v.isdigit():
        return None
    try:
        return _dt.date(int(v[:4]), int(v[4:6]), int(v[6:]))
    except ValueError:
        return None


def _parse_tm(value: str) -> Optional[_dt.time]:
    v = value.strip().replace(":", "")  # TM is HH[MM[SS[.F{1,6}]]]; ACR-NEMA wrote HH:MM:SS
    main, _, frac = v.partition(".")
    if not main.isdigit() or len(main) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    hh, mm, ss = int(main[:2]), int(main[2:4] or 0), min(int(main[4:6] or 0), 59)  # 60: leap second
    if hh > 23 or mm > 59:
        return None
    return _dt.time(hh, mm, ss, int((frac + "000000")[:6]) if frac else 0)


def _identity(x: Any) -> Tuple[Any, Any]:
    """(SeriesMeta or None, StudyIdentity or None) of a Volume / SeriesMeta."""
    meta = getattr(x, "meta", x)
    return meta, getattr(meta, "identity", None)


def _norm_name(v: str) -> str:
    return " ".join(v.upper().replace("^", " ").split())


def check_pair(current: Any, prior: Any, *, enforce: bool = True) -> PriorChecks:
    """Is ``prior`` an earlier study of the same patient as ``current``? (Volumes or SeriesMeta.)

    Reads ``SeriesMeta.identity`` (the reader fills it from the first file's header) and the
    Study/SeriesInstanceUIDs; never raises. The policy (module docstring, docs/integration.md):
    ``problems`` holds only positive evidence - different PatientIDs, different PatientSex or
    PatientBirthDate, a prior dated after the current study; missing, empty or placeholder fields
    go to ``not_checked`` and do not stop the comparison. ``enforce=False`` records the same
    findings with ``enforced: False`` (the caller compares anyway).
    """
    out = PriorChecks(enforced=bool(enforce))
    cur_meta, cur = _identity(current)
    pri_meta, pri = _identity(prior)
    if cur is None or pri is None:
        which = " and ".join(w for w, i in (("current", cur), ("prior", pri)) if i is None)
        out.not_checked.append(f"patient identity and order not checked: no DICOM header for the {which} study "
                               "(given as an in-memory Volume?)")
        _check_study(out, cur_meta, pri_meta, False)
        return out
    for side, ident in (("current", cur), ("prior", pri)):
        if ident.identity_removed == "YES":
            out.checked.append(f"the {side} headers are de-identified (PatientIdentityRemoved YES): PatientID and dates "
                               "are checked as written (an anonymiser may have replaced or shifted them)")
    _check_patient(out, cur, pri)
    _check_study(out, cur_meta, pri_meta, _check_order(out, cur, pri))
    return out


def _check_study(out: PriorChecks, cur_meta: Any, pri_meta: Any, dates_differ: bool) -> None:
    cs, ps = (str(getattr(m, "study_uid", "") or "") for m in (cur_meta, pri_meta))
    cr, pr = (str(getattr(m, "series_uid", "") or "") for m in (cur_meta, pri_meta))
    if not cs or not ps:
        out.not_checked.append("same study not checked: StudyInstanceUID absent in "
                               + ("both" if not cs and not ps else "current" if not cs else "prior"))
    elif cs != ps:
        out.study = "different studies"
        out.checked.append("StudyInstanceUID: different studies")
    elif dates_differ:
        out.study = "different studies"
        out.checked.append("StudyInstanceUID is the same but the dates differ: the UID is not trusted "
                           "(an anonymiser's placeholder?); the two are treated as different studies")
    elif cr and cr == pr:
        out.study = "same series"
        out.checked.append(f"the prior is the current series itself (SeriesInstanceUID {cr}): a comparison with "
                           "itself, not with an earlier study")
    else:
        out.study = "same study"
        out.checked.append(f"the prior is another series of the same study (StudyInstanceUID {cs}): the change "
                           "measures reconstruction and segmentation differences, not disease change")


def _check_patient(out: PriorChecks, cur: Any, pri: Any) -> None:
    mismatch: List[str] = []
    cid, pid = cur.patient_id, pri.patient_id
    if not cid or not pid:
        where = "both" if not cid and not pid else "current" if not cid else "prior"
        out.not_checked.append(f"patient identity not checked: PatientID absent in {where}")
    elif cur.issuer_of_patient_id and pri.issuer_of_patient_id and cur.issuer_of_patient_id != pri.issuer_of_patient_id:
        out.not_checked.append(f"patient identity not checked: PatientIDs of different issuers "
                               f"({cur.issuer_of_patient_id!r} / {pri.issuer_of_patient_id!r}) are not comparable")
    elif cid.upper() in PLACEHOLDER_IDS and pid.upper() in PLACEHOLDER_IDS:
        out.not_checked.append(f"patient identity not checked: PatientID is a placeholder ({cid!r} / {pid!r})")
    elif cid == pid:
        out.patient = "same"
        out.checked.append("PatientID: the same in both")
    else:
        # the values stay out: this text lands in result JSON, listener results and logs, which the
        # product keeps free of patient identity (SeriesMeta.to_dict has none either)
        mismatch.append("PatientID differs (the IDs are not repeated here; compare the two studies' headers)")
    # supporting evidence: written in both and different is a mismatch of its own (values of sex and
    # age are named; birth dates and names are not printed)
    sex = (cur.patient_sex.upper(), pri.patient_sex.upper())
    if all(sex) and sex[0] != sex[1] and {"M", "F"} >= set(sex):  # "O" (other) is no evidence either way
        mismatch.append(f"PatientSex {sex[1]} (prior) vs {sex[0]} (current)")
    elif all(sex) and sex[0] == sex[1]:
        out.checked.append("PatientSex: the same in both")
    if cur.patient_birth_date and pri.patient_birth_date:
        if cur.patient_birth_date != pri.patient_birth_date:
            mismatch.append("PatientBirthDate differs")
        else:
            out.checked.append("PatientBirthDate: the same in both")
    names = (_norm_name(cur.patient_name), _norm_name(pri.patient_name))
    if all(names):  # spelling and component order vary between systems: a note, never a refusal
        out.checked.append("PatientName: the same in both" if names[0] == names[1]
                           else "PatientName differs (not used to refuse: spellings vary between systems)")
    if not mismatch:
        return
    if cur.patient_age and pri.patient_age and cur.patient_age != pri.patient_age:
        mismatch.append(f"PatientAge {pri.patient_age} (prior) vs {cur.patient_age} (current)")
    out.patient = "different"
    out.problems.insert(0, "the prior is another patient: " + ", ".join(mismatch))
    out.error_type = PriorPatientMismatchError


def _check_order(out: PriorChecks, cur: Any, pri: Any) -> bool:
    """Sets ``out.order``; True when the two studies are on different days."""
    absent: List[str] = []
    for da, tm, dkey, tkey in _WHEN:
        c_raw, p_raw = getattr(cur, dkey), getattr(pri, dkey)
        cd, pd = _parse_da(c_raw), _parse_da(p_raw)
        if cd is None or pd is None:
            for side, raw, parsed in (("current", c_raw, cd), ("prior", p_raw, pd)):
                if parsed is None:
                    absent.append(f"{da} {'absent' if not raw else 'not a date (' + repr(raw) + ')'} in {side}")
            continue
        ct, pt = _parse_tm(getattr(cur, tkey)), _parse_tm(getattr(pri, tkey))
        if ct is not None and pt is not None:
            c_when, p_when = _dt.datetime.combine(cd, ct), _dt.datetime.combine(pd, pt)
            days = round((c_when - p_when).total_seconds() / 86400.0, 3)
            fields, fmt = f"{da}/{tm}", "%Y-%m-%d %H:%M:%S"
        else:
            c_when, p_when = cd, pd  # type: ignore[assignment]
            days = float((cd - pd).days)
            fields, fmt = da, "%Y-%m-%d"
        when = f"prior {p_when.strftime(fmt)}, current {c_when.strftime(fmt)}"
        if p_when < c_when:
            out.order, out.interval_days = "prior earlier", days
            out.checked.append(f"{fields}: the prior is {days:g} day(s) earlier ({when})")
        elif p_when > c_when:
            out.order, out.interval_days = "prior later", days
            out.problems.append(f"the prior is newer than the current study: {fields} {when} "
                                f"({-days:g} day(s) later): the change would read backwards")
            if out.error_type is PriorError:
                out.error_type = PriorOrderError
        elif fields == da:  # the same day, a time missing (or unreadable) on one side at least
            out.order, out.interval_days = "not checked", 0.0
            missing = "both" if ct is None and pt is None else "current" if ct is None else "prior"
            out.not_checked.append(f"order not checked: both on {da} {c_when.strftime(fmt)} and {tm} absent in {missing}")
        else:
            out.order, out.interval_days = "same time", 0.0
            out.checked.append(f"{fields}: the prior has the same date and time as the current study ({when})")
        if absent:
            out.checked.append(f"order from {da} (" + "; ".join(absent) + ")")
        return cd != pd
    out.not_checked.append("order not checked: no date written in both (" + "; ".join(absent) + ")")
    return False


# --- masks and burden ---------------------------------------------------------------------------
#: slices per block for the whole-volume passes below (masks, counts): the arithmetic is the same
#: as on the whole array, but no volume-sized temporary is allocated (on the shared 2-core machine,
#: fresh 38-155 MB temporaries cost more than the arithmetic)
_SLAB = 8


def _slabs(n: int) -> List[slice]:
    return [slice(z, min(z + _SLAB, n)) for z in range(0, n, _SLAB)]


def _label(lung: np.ndarray) -> Tuple[np.ndarray, int]:
    """``scipy.ndimage.label`` into uint16 (half the memory of its int32 default; the same
    labels), int32 when there are too many components for uint16."""
    from scipy import ndimage as ndi

    out = np.empty(lung.shape, np.uint16)
    try:
        return out, int(ndi.label(lung, output=out))
    except RuntimeError:  # "insufficient bit-depth": more than 65535 components
        lab, n = ndi.label(lung)
        return lab, int(n)


def _x_counts(m: np.ndarray) -> np.ndarray:
    """Voxels per x column of a boolean (z, y, x) array (int64), slab by slab."""
    h = np.zeros(m.shape[2], np.int64)
    for sl in _slabs(m.shape[0]):
        h += m[sl].sum(axis=(0, 1))
    return h


def _cx(h: np.ndarray, xs: np.ndarray) -> float:
    """x centroid from per-column counts (integer sums: the same value as from the whole boolean array)."""
    return float((h * xs).sum() / max(int(h.sum()), 1))


def lung_labels(mask: np.ndarray) -> np.ndarray:
    """uint8 map 0 / LEFT (1) / RIGHT (2) from a labelled or binary lung mask.

    A mask containing the value 2 is taken as already labelled (sdk.lungs convention). A binary
    mask is split into its two largest connected components when the second is at least 10 % of
    the first, else at the x centroid; the component with the larger mean x is the Left lung.
    (Centroids come from per-column voxel counts and the map is written slab by slab: the same
    result as whole-array boolean masks, without their volume-sized temporaries.)
    """
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ConfigError(f"lung mask must be 3-D (z, y, x), got shape {m.shape}")
    if m.dtype != np.bool_ and (m == RIGHT).any():
        out = np.zeros(m.shape, np.uint8)
        out[m == LEFT] = LEFT
        out[m == RIGHT] = RIGHT
        return out
    lung = m if m.dtype == np.bool_ else m > 0
    xs = np.arange(m.shape[2])
    slabs = _slabs(m.shape[0])
    lab, n = _label(lung)
    if n >= 2:
        sizes = np.zeros(n + 1, np.int64)
        for sl in slabs:
            sizes += np.bincount(lab[sl].ravel(), minlength=n + 1)
        sizes = sizes[1:]
        o = np.argsort(sizes)[::-1]
        if sizes[o[1]] >= 0.1 * sizes[o[0]]:
            ia, ib = int(o[0]) + 1, int(o[1]) + 1
            ha, hb, hr = (np.zeros(m.shape[2], np.int64) for _ in range(3))
            for sl in slabs:
                a, b = lab[sl] == ia, lab[sl] == ib
                ha += a.sum(axis=(0, 1))
                hb += b.sum(axis=(0, 1))
                hr += (lung[sl] & ~a & ~b).sum(axis=(0, 1))
            near_a = None
            if hr.any():  # small islands join the nearer lung by x
                ca, cb = _cx(ha, xs), _cx(hb, xs)
                near_a = np.abs(xs - ca) <= np.abs(xs - cb)
                ha, hb = ha + np.where(near_a, hr, 0), hb + np.where(near_a, 0, hr)
            la, lb = (LEFT, RIGHT) if _cx(ha, xs) > _cx(hb, xs) else (RIGHT, LEFT)
            out = np.zeros(m.shape, np.uint8)
            for sl in slabs:
                a, b = lab[sl] == ia, lab[sl] == ib
                if near_a is not None:
                    rest = lung[sl] & ~a & ~b
                    a |= rest & near_a[None, None, :]
                    b |= rest & ~near_a[None, None, :]
                view = out[sl]
                view[a] = la
                view[b] = lb
            return out
    # one component (or a small second one): split at the x centroid of the whole lung
    h = _x_counts(lung)
    below = xs < _cx(h, xs)
    left_below = _cx(np.where(below, h, 0), xs) > _cx(np.where(below, 0, h), xs)
    side = np.where(below, LEFT if left_below else RIGHT, RIGHT if left_below else LEFT).astype(np.uint8)
    out = np.empty(m.shape, np.uint8)
    for sl in slabs:
        np.multiply(lung[sl], side[None, None, :], out=out[sl])
    return out


def opacity_burden(hu: np.ndarray, labels: np.ndarray, threshold_hu: float, voxel_ml: float) -> Dict[str, Dict[str, float]]:
    """Per lung (``left``, ``right``, ``both``): lung volume (ml), opacified volume (ml), burden fraction."""
    hu, labels = np.asarray(hu), np.asarray(labels)
    counts = {name: [0, 0] for name in ("left", "right", "both")}
    for sl in _slabs(labels.shape[0]):  # integer counts, slab by slab (no volume-sized temporaries)
        op, lab = hu[sl] > threshold_hu, labels[sl]
        for name, sel in (("left", lab == LEFT), ("right", lab == RIGHT), ("both", lab > 0)):
            counts[name][0] += int(sel.sum())
            counts[name][1] += int((op & sel).sum())
    out: Dict[str, Dict[str, float]] = {}
    for name, (n, k) in counts.items():
        out[name] = {"volume_ml": n * voxel_ml, "opacity_ml": k * voxel_ml, "burden": k / n if n else float("nan")}
    return out


def classify_change(delta: float, band: float) -> str:
    """"worse" above +band, "improved" below -band, else "stable" (NaN -> "stable" is not allowed)."""
    if not np.isfinite(delta):
        raise ConfigError("burden change is not a number (an empty lung mask in one study?)")
    if delta > band:
        return "worse"
    if delta < -band:
        return "improved"
    return "stable"


# --- grids and registration ---------------------------------------------------------------------
def _voxel_ml(volume: Any) -> float:
    dz, dy, dx = volume.spacing
    return float(dz * dy * dx) / 1000.0


def _axis_groups(pos: np.ndarray, g: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Start indices (for np.add.reduceat) of each grid cell along one axis, counts, and the origin."""
    pos = np.asarray(pos, dtype=np.float64)
    origin = float(pos[0])
    cell = np.floor((pos - origin) / g + 1e-9).astype(np.int64)
    n_cells = int(cell[-1]) + 1
    starts = np.searchsorted(cell, np.arange(n_cells), side="left")
    counts = np.diff(np.append(starts, pos.size))
    return starts, counts, origin


def _interp_axis(f: np.ndarray, pos: np.ndarray, g: float, axis: int) -> Tuple[np.ndarray, float]:
    """Linear interpolation of ``f`` along ``axis`` at cell centres ``pos[0] - step/2 + (k + 0.5) g``.

    Used where the native spacing is coarser than the grid (thick slices): averaging would leave
    empty cells. Cells outside the sampled range take the nearest slice (clamped), like the
    resampling convention in docs/conventions.md.
    """
    step = float(np.median(np.diff(pos))) if pos.size > 1 else g
    lo = float(pos[0]) - step / 2.0
    extent = float(pos[-1] - pos[0]) + step
    n_cells = max(1, int(round(extent / g)))
    centres = lo + (np.arange(n_cells) + 0.5) * g
    src = np.interp(centres, pos, np.arange(pos.size, dtype=np.float64))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, pos.size - 1)
    w = (src - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n_cells
    w = w.reshape(shape)
    out = np.take(f, i0, axis=axis) * (1 - w) + np.take(f, i1, axis=axis) * w
    return out.astype(np.float32), lo


def to_grid(field_zyx: np.ndarray, z_mm: np.ndarray, spacing_yx: Tuple[float, float], g: float) -> Tuple[np.ndarray, np.ndarray]:
    """Resample a (z, y, x) field onto an isotropic grid of ``g`` mm, axis by axis.

    Axes at least twice finer than the grid are **area-averaged** (every native voxel falls in the
    cell containing its centre; a cell's value is the mean of its voxels); coarser axes (thick
    slices) are **linearly interpolated** at the cell centres (averaging 1-2 samples per cell would
    shift each cell's centroid by up to half a cell). Returns (grid, origin_mm (z, y, x))
    where cell ``k`` spans ``[origin + k g, origin + (k+1) g)``, in the volume's own frame
    (z from ``z_mm``, y and x from the first voxel centre at 0).
    """
    f = np.asarray(field_zyx)
    if f.dtype != np.bool_:
        f = f.astype(np.float32, copy=False)
    axes_pos = [np.asarray(z_mm, np.float64), np.arange(f.shape[1]) * float(spacing_yx[0]),
                np.arange(f.shape[2]) * float(spacing_yx[1])]
    origin = []
    for axis, pos in enumerate(axes_pos):
        step = float(np.median(np.diff(pos))) if pos.size > 1 else g
        if step > g / 2.0:  # fewer than 2 samples per cell: averaging would alias (biased centroids)
            f, o = _interp_axis(f.astype(np.float32, copy=False), pos, g, axis)
            origin.append(o)
            continue
        starts, counts, o = _axis_groups(pos, g)
        if f.dtype == np.bool_:  # a mask at native resolution: no float copy of the whole volume
            f = _bool_block_mean(f, starts, counts, axis)
            origin.append(o)
            continue
        s = np.add.reduceat(f, starts, axis=axis)
        shape = [1, 1, 1]
        shape[axis] = counts.size
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(counts.reshape(shape) > 0, s / np.maximum(counts, 1).reshape(shape), 0.0).astype(np.float32)
        origin.append(o)
    return f, np.asarray(origin)


def _bool_block_mean(mask: np.ndarray, starts: np.ndarray, counts: np.ndarray, axis: int) -> np.ndarray:
    """The float path's block mean of a boolean field along ``axis``, bit for bit, without its
    full-volume float32 / float64 temporaries (a 148 x 512 x 512 mask: 155 + 2 x 155 MB, most of
    what to_grid cost - page faults on a shared machine).

    The float path sums 0/1 values (exact integers in float32), divides in float64 and rounds to
    float32; here the integer sums index a per-cell table ``float32(k / count)`` built the same way,
    so every value is the same. Empty cells (no voxel) are 0, as there.
    """
    cmax = int(counts.max()) if counts.size else 0
    sums = np.add.reduceat(mask.view(np.uint8), starts, axis=axis, dtype=np.uint8 if cmax < 256 else np.int64)
    out = np.empty(sums.shape, np.float32)
    k = np.arange(cmax + 1, dtype=np.float64)
    for i, c in enumerate(counts.tolist()):
        lut = (k / c).astype(np.float32) if c > 0 else np.zeros(k.size, np.float32)
        sel = (slice(None),) * axis + (i,)
        out[sel] = lut[sums[sel]]
    return out


def euler_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix (z, y, x index frame) from angles about the z, y and x axes, in degrees."""
    a, b, c = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])  # about z: mixes y, x
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])  # about y: mixes z, x
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])  # about x: mixes z, y
    return rz @ ry @ rx


def _centre_of_mass(grid: np.ndarray, g: float, origin: np.ndarray) -> np.ndarray:
    """Centre of mass of a grid in the volume's own frame (mm, (z, y, x))."""
    idx = np.indices(grid.shape).reshape(3, -1).astype(np.float64)
    w = grid.reshape(-1).astype(np.float64)
    total = w.sum()
    if total <= 0:
        raise ConfigError("empty lung mask: nothing to register")
    return np.asarray(origin, np.float64) + (idx @ w / total + 0.5) * g


@dataclass(frozen=True)
class GridSpec:
    """An isotropic grid in a volume's own frame: cell ``k`` spans ``[origin + k g, origin + (k+1) g)``."""

    shape: Tuple[int, int, int]
    g: float
    origin: np.ndarray


class _Warp:
    """Samples a prior grid at the current grid's cell centres under a rigid transform.

    The transform is ``p = R(angles) (c - c_cur) + c_pri + t`` in mm (each study's own frame), so
    the same parameters apply to grids of any spacing. ``where`` (a boolean mask over the current
    grid) restricts the sampled cells, e.g. to the current lungs during registration.
    """

    def __init__(self, cur: GridSpec, pri: GridSpec, c_cur: np.ndarray, c_pri: np.ndarray,
                 where: Optional[np.ndarray] = None):
        self.pri = pri
        self.c_pri = c_pri
        self.shape = cur.shape
        idx = np.indices(cur.shape).reshape(3, -1) if where is None else np.stack(np.nonzero(where))
        centres = np.asarray(cur.origin, np.float64)[:, None] + (idx + 0.5) * cur.g
        self.pts = (centres - c_cur[:, None]) / pri.g
        self.flat = where is not None

    def __call__(self, prior_grid: np.ndarray, params: np.ndarray, order: int = 1) -> np.ndarray:
        from scipy import ndimage as ndi

        r = euler_matrix(params[:3])
        shift = (self.c_pri + params[3:6] - np.asarray(self.pri.origin, np.float64)) / self.pri.g - 0.5
        coords = r @ self.pts + shift[:, None]
        out = ndi.map_coordinates(prior_grid, coords, order=order, mode="constant", cval=0.0)
        return out if self.flat else out.reshape(self.shape)


def _soft_dice(a: np.ndarray, b: np.ndarray) -> float:
    s = float(a.sum() + b.sum())
    return 2.0 * float((a * b).sum()) / s if s > 0 else 0.0


def rigid_register(cur_lung: np.ndarray, cur_spec: GridSpec, pri_lung: np.ndarray, pri_spec: GridSpec,
                   cfg: PriorConfig) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[str, Any]]:
    """Rigid prior -> current registration of two lung-fraction grids (see the module docstring).

    Returns (params = [rot_z, rot_y, rot_x (deg), t_z, t_y, t_x (mm)], c_cur, c_pri, report);
    the translation is relative to centre-of-mass alignment, centres in each study's frame (mm).
    """
    from scipy import ndimage as ndi
    from scipy.optimize import minimize

    # a little smoothing makes the cost smooth in the parameters, so Powell's line searches converge
    cur_lung = ndi.gaussian_filter(cur_lung.astype(np.float32), 1.0)
    pri_lung = ndi.gaussian_filter(pri_lung.astype(np.float32), 1.0)
    c_cur = _centre_of_mass(cur_lung, cur_spec.g, cur_spec.origin)
    c_pri = _centre_of_mass(pri_lung, pri_spec.g, pri_spec.origin)
    # rigid maps preserve volume, so the warped prior's total is the prior's own total: the soft
    # Dice needs the warped prior only where the current lung is (a third of its bounding box)
    where = cur_lung > 1e-3
    fast = _Warp(cur_spec, pri_spec, c_cur, c_pri, where)
    target = cur_lung[where]
    denom = float(cur_lung.sum() + pri_lung.sum() * (pri_spec.g / cur_spec.g) ** 3)
    x0 = np.zeros(6)
    n_eval = [0]

    def cost(p: np.ndarray) -> float:
        n_eval[0] += 1
        return 1.0 - 2.0 * float(np.dot(target, fast(pri_lung, p))) / denom

    dice_com = 1.0 - cost(x0)
    r, t = cfg.max_rotation_deg, cfg.max_translation_mm
    bounds = [(-r, r)] * 3 + [(-t, t)] * 3
    res = minimize(cost, x0, method="Powell", bounds=bounds,
                   options={"maxfev": cfg.max_evaluations, "xtol": 0.05, "ftol": 1e-4})
    params = np.asarray(res.x, dtype=np.float64)
    dice_after = 1.0 - float(res.fun)
    if dice_after < dice_com:  # never return something worse than the initial alignment
        params, dice_after = x0, dice_com
    report = {
        "method": "centre-of-mass + rigid (bounded Powell, 1 - soft Dice of the lung masks)",
        "grid_mm": cur_spec.g,
        "rotation_deg": params[:3].round(3).tolist(),
        "translation_mm": params[3:].round(3).tolist(),
        "com_offset_mm": (c_pri - c_cur).round(2).tolist(),
        "dice_com": round(dice_com, 4),
        "dice": round(dice_after, 4),
        "evaluations": int(n_eval[0]),
        "converged": bool(res.success),
    }
    return params, c_cur, c_pri, report


# --- the comparison -----------------------------------------------------------------------------
def _check_volume(volume: Any, mask: np.ndarray, which: str, cfg: PriorConfig) -> None:
    hu = getattr(volume, "hu", None)
    if hu is None or np.asarray(hu).ndim != 3:
        raise ConfigError(f"{which} study: expected an sdk.volume.Volume, got {type(volume).__name__}")
    if np.asarray(mask).shape != hu.shape:
        raise ConfigError(f"{which} study: lung mask shape {np.asarray(mask).shape} differs from the volume's {hu.shape}")
    nz = hu.shape[0]
    extent = volume.extent_mm[0]
    if nz < cfg.min_slices or extent < cfg.min_extent_mm:
        raise ConfigError(
            f"{which} study ({getattr(volume.meta, 'series_uid', '') or 'series'}): {nz} slice(s) covering "
            f"{extent:.0f} mm - a prior comparison needs a chest volume (>= {cfg.min_slices} slices, "
            f">= {cfg.min_extent_mm:.0f} mm); single slices cannot be registered or give a lung burden")
    m = np.asarray(mask)
    if not (m.any() if m.dtype == np.bool_ else (m > 0).any()):
        raise ConfigError(f"{which} study: the lung mask is empty (lung segmentation found no lung)")


def compare(
    current_volume: Any,
    current_lung_mask: np.ndarray,
    prior_volume: Any,
    prior_lung_mask: np.ndarray,
    *,
    config: Optional[PriorConfig] = None,
    heatmap_path: Optional[PathLike] = None,
    current_slice_scores: Optional[Sequence[Mapping[str, Any]]] = None,
    prior_slice_scores: Optional[Sequence[Mapping[str, Any]]] = None,
    positive_class: str = "covid",
) -> PriorComparison:
    """Compare a current study with a prior one of the same patient (see the module docstring).

    Args:
        current_volume, prior_volume: :class:`sdk.volume.Volume` (HU, canonical LPS).
        current_lung_mask, prior_lung_mask: (z, y, x) masks on each volume's grid, labelled
            (1 left, 2 right) or binary.
        config: thresholds and registration limits.
        heatmap_path: write the difference PNG there.
        current_slice_scores, prior_slice_scores: ``TriageResult.slice_scores`` dicts of both
            studies; when given, the mean ``positive_class`` probability of each is reported too.

    Raises:
        ConfigError: an input is not a volume (single slice), masks mismatch or are empty.
    """
    cfg = config or PriorConfig()
    _check_volume(current_volume, current_lung_mask, "current", cfg)
    _check_volume(prior_volume, prior_lung_mask, "prior", cfg)
    t0 = time.perf_counter()
    timings: Dict[str, float] = {}
    cur_lab, pri_lab = lung_labels(current_lung_mask), lung_labels(prior_lung_mask)
    b_cur = opacity_burden(current_volume.hu, cur_lab, cfg.threshold_hu, _voxel_ml(current_volume))
    b_pri = opacity_burden(prior_volume.hu, pri_lab, cfg.threshold_hu, _voxel_ml(prior_volume))
    timings["burden"] = (time.perf_counter() - t0) * 1000
    lungs: Dict[str, Dict[str, float]] = {}
    for name in ("left", "right", "both"):
        delta = b_cur[name]["burden"] - b_pri[name]["burden"]
        lungs[name] = {
            "prior_burden": b_pri[name]["burden"], "current_burden": b_cur[name]["burden"], "delta": delta,
            "prior_volume_ml": b_pri[name]["volume_ml"], "current_volume_ml": b_cur[name]["volume_ml"],
            "prior_opacity_ml": b_pri[name]["opacity_ml"], "current_opacity_ml": b_cur[name]["opacity_ml"],
            "change": classify_change(delta, cfg.stable_band),
        }
    overall_lungs = lungs.pop("both")
    per = [lungs["left"]["change"], lungs["right"]["change"]]
    change = "worse" if "worse" in per else "improved" if "improved" in per else "stable"

    # registration and difference map on isotropic grids (same rigid parameters in mm, so the two
    # grid sizes may differ: PriorConfig.registration_grid_mm / grid_mm)
    t1 = time.perf_counter()

    def grids(volume: Any, lab: np.ndarray) -> Tuple[np.ndarray, GridSpec, np.ndarray, np.ndarray, GridSpec]:
        """(lung grid, spec) at registration_grid_mm and (lung grid, opacity grid, spec) at grid_mm;
        each grid is computed once (the registration grid is the fine grid when the sizes agree,
        and the registration needs no opacity grid)."""
        lung_in = lab > 0
        g = cfg.grid_mm
        lung, origin = to_grid(lung_in, volume.z_mm, volume.pixel_spacing_mm, g)
        op, _ = to_grid((volume.hu > cfg.threshold_hu) & lung_in, volume.z_mm, volume.pixel_spacing_mm, g)
        spec = GridSpec(lung.shape, g, origin)
        if cfg.registration_grid_mm == g:
            return lung, spec, lung, op, spec
        r = cfg.registration_grid_mm
        lung_r, origin_r = to_grid(lung_in, volume.z_mm, volume.pixel_spacing_mm, r)
        return lung_r, GridSpec(lung_r.shape, r, origin_r), lung, op, spec

    cur_lung_r, cur_r, cur_lung_g, cur_op_g, cur_g = grids(current_volume, cur_lab)
    pri_lung_r, pri_r, pri_lung_g, pri_op_g, pri_g = grids(prior_volume, pri_lab)
    timings["grids"] = (time.perf_counter() - t1) * 1000
    t2 = time.perf_counter()
    params, c_cur, c_pri, reg = rigid_register(cur_lung_r, cur_r, pri_lung_r, pri_r, cfg)
    timings["registration"] = (time.perf_counter() - t2) * 1000
    warp = _Warp(cur_g, pri_g, c_cur, c_pri)
    pri_op_w = warp(pri_op_g, params)
    pri_lung_w = warp(pri_lung_g, params)
    reg["dice_fine_grid"] = round(_soft_dice(cur_lung_g, pri_lung_w), 4)
    inside = np.maximum(cur_lung_g, pri_lung_w) > 0.05
    diff = np.where(inside, cur_op_g - pri_op_w, 0.0).astype(np.float32)
    if cfg.diff_smooth_mm > 0:  # residual misregistration of vessels leaves +/- pairs: let them cancel
        from scipy import ndimage as ndi

        diff = ndi.gaussian_filter(diff, cfg.diff_smooth_mm / cfg.grid_mm, mode="constant").astype(np.float32)
    g = cfg.grid_mm
    cell_ml = g ** 3 / 1000.0
    new_ml = float(np.clip(diff, 0, None).sum() * cell_ml)
    resolved_ml = float(np.clip(-diff, 0, None).sum() * cell_ml)

    scores = None
    if current_slice_scores is not None and prior_slice_scores is not None:
        def mean_pos(ss: Sequence[Mapping[str, Any]]) -> float:
            vals = [float(s.get("probabilities", {}).get(positive_class, np.nan)) for s in ss]
            vals = [v for v in vals if np.isfinite(v)]
            return float(np.mean(vals)) if vals else float("nan")

        cur_m, pri_m = mean_pos(current_slice_scores), mean_pos(prior_slice_scores)
        scores = {"positive_class": positive_class, "prior_mean": pri_m, "current_mean": cur_m, "delta": cur_m - pri_m}

    timings["total"] = (time.perf_counter() - t0) * 1000
    result = PriorComparison(change=change, lungs=lungs, overall=overall_lungs, new_opacity_ml=new_ml,
                             resolved_opacity_ml=resolved_ml, registration=reg, config=cfg, slice_scores=scores,
                             timings_ms=timings, diff_grid=diff)
    if heatmap_path is not None:
        result.save_heatmap(heatmap_path)
    log.info("prior comparison: %s", result.summary)
    return result


def _plot_difference(diff: np.ndarray, g: float, title: str, path: Path) -> None:
    """Coronal mean projection (superior up, patient right on the left) + axial level of most new opacity."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    coronal = diff.mean(axis=1)[::-1]  # (z, x), z ascending = superior -> flip so superior is up
    new_per_z = np.clip(diff, 0, None).sum(axis=(1, 2))
    z_best = int(np.argmax(new_per_z)) if new_per_z.max() > 0 else diff.shape[0] // 2
    axial = diff[z_best]
    lim = max(float(np.abs(diff).max()), 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, img, name, ext in (
        (axes[0], coronal, "coronal mean (superior up)", [0, diff.shape[2] * g, 0, diff.shape[0] * g]),
        (axes[1], axial, f"axial level z={z_best * g:.0f} mm (most new opacity)", [0, diff.shape[2] * g, diff.shape[1] * g, 0]),
    ):
        im = ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, extent=ext, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("x (mm, patient left ->)")
    fig.colorbar(im, ax=axes, shrink=0.8, label="opacity fraction: current - prior (red new, blue resolved)")
    fig.suptitle(title + "\nResearch use only - not for diagnosis", fontsize=8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80)
    except OSError as exc:
        raise ResultWriteError(f"{path}: cannot write the prior difference PNG ({exc})") from exc
    finally:
        plt.close(fig)

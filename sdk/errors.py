"""Typed errors of ctsdk.

Every error derives from :class:`CtsdkError`. Messages name the file (or series UID), what was
expected, what was found, and what to do. The CLI maps any ``CtsdkError`` to exit code 2 and one
line on stderr.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, Path]


class CtsdkError(Exception):
    """Base class of every error ctsdk raises on purpose."""

    exit_code = 2


# --- ingest -------------------------------------------------------------------------------------
class SeriesError(CtsdkError):
    """A DICOM input cannot become a CT volume. ``path`` names the offending file or folder."""

    def __init__(self, message: str, path: Optional[PathLike] = None, hint: str = ""):
        self.path = None if path is None else str(path)
        self.problem = message
        self.hint = hint
        text = f"{self.path}: {message}" if self.path else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class NotDicomError(SeriesError):
    """The file is not DICOM at all (text, JPEG, empty...)."""


class SourceNotFoundError(NotDicomError, FileNotFoundError):
    """The path given as a series does not exist (a NotDicomError for callers that catch that,
    and a FileNotFoundError for those that catch the standard one)."""


class CorruptFileError(SeriesError):
    """DICOM that cannot be parsed or whose pixel data is truncated/inconsistent."""


class NotCTError(SeriesError):
    """DICOM that is not a CT image (SR, SEG, RTSTRUCT, MR, DICOMDIR...)."""


class NoImageSeriesError(SeriesError):
    """No usable CT image series was found in the input."""


class MixedSeriesError(SeriesError):
    """The input mixes series (or geometries) and none was chosen explicitly."""


class MissingSlicesError(SeriesError):
    """Gaps in slice positions larger than 1.5 x the median spacing."""


class UnsupportedTransferSyntaxError(SeriesError):
    """No installed decoder handles the file's transfer syntax."""


class GantryTiltError(SeriesError):
    """The series was acquired with gantry tilt and tilt correction was not allowed."""


class GeometryError(SeriesError):
    """Inconsistent geometry inside one series (orientation, pixel spacing or matrix differ)."""


class VolumeError(CtsdkError, ValueError):
    """An :class:`sdk.volume.Volume` breaks its contract (built by a caller, not read from DICOM):
    hu not a 3-D numeric array, z_mm not finite and strictly ascending, pixel spacing not two finite
    positive numbers. Also a ``ValueError``, as the constructor's checks always were."""


# --- models / bundles / runtime ----------------------------------------------------------------
class BundleError(CtsdkError):
    """A model bundle is missing, malformed, or a file in it does not match its sha256."""


class ModelNotFoundError(CtsdkError):
    """Unknown model name in a registry; the message lists the valid names."""

    def __init__(self, name: str, valid: Sequence[str], kind: str = "model"):
        self.name = name
        self.valid = list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid)) or '(none)'}")


class MissingDependencyError(CtsdkError):
    """An optional package is needed for this feature; the message says what to install."""

    def __init__(self, package: str, feature: str, extra: str = ""):
        self.package = package
        self.feature = feature
        install = f"pip install 'ctsdk[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs {package}: {install}")


class RuntimeUnavailableError(CtsdkError):
    """The requested device/precision cannot run here; the message lists what was tried."""


class EngineBuildError(CtsdkError):
    """TensorRT engine building failed."""


class EngineMismatchError(CtsdkError):
    """An engine was built for another GPU / TensorRT version / precision: rebuild it."""


class KernelError(CtsdkError):
    """Compiling or launching a ctsdk CUDA kernel failed."""


class ConfigError(CtsdkError):
    """Invalid arguments or configuration values."""


# --- prior-study comparison ----------------------------------------------------------------------
class PriorError(CtsdkError):
    """A prior study was given but is not compared with the current one. ``Triage.run(prior=...)``
    never raises it: the current result stands and ``TriageResult.prior`` holds
    ``{"error": "<class name>: <message>", "checks": ...}`` (see :func:`sdk.prior.check_pair`)."""


class PriorNotEligibleError(PriorError):
    """The current or the prior series failed eligibility: there is no lung burden to compare."""


class PriorPatientMismatchError(PriorError):
    """The two series' DICOM headers name different patients (PatientID, or PatientSex /
    PatientBirthDate where both are written)."""


class PriorOrderError(PriorError):
    """The "prior" is newer than the current study (its date/time is later), so the change would
    read backwards."""


# --- scanner / PACS integration ----------------------------------------------------------------
class DicomNetworkError(CtsdkError):
    """A DICOM network operation failed (association refused, C-STORE status not Success, timeout)."""


class ResultWriteError(CtsdkError):
    """A result object (JSON, DICOM SR/SC, PNG, JSONL line) could not be built or written."""


# --- argument checks shared by the API ------------------------------------------------------------
def whole_number(name: str, value: object, *, minimum: int = 1, maximum: Optional[int] = None,
                 allow_none: bool = True, what: str = "") -> Optional[int]:
    """``value`` as an int when it is a whole number from ``minimum`` to ``maximum`` (a whole float
    such as 2.0 counts; 1.5, NaN, a string or a bool do not), or None when ``allow_none``; else a
    ConfigError naming ``name``, the value and its type (``what``: what the number means). The one
    check of the API's count arguments (Triage threads / lanes / classifier_batch, load_series
    workers, save_heatmaps top, evaluate n_boot / seed, the worker counts of triage-batch and listen,
    the training configs' counts)."""
    import math
    import numbers

    if value is None and allow_none:
        return None
    whole = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if whole and int(value) >= minimum and (maximum is None or int(value) <= maximum):  # type: ignore[call-overload]
        return int(value)  # type: ignore[call-overload]
    bound = f" and <= {maximum}" if maximum is not None else ""
    meaning = f" ({what})" if what else ""
    none = ", or None" if allow_none else ""
    raise ConfigError(f"{name} must be a whole number >= {minimum}{bound}{meaning}{none}, got {value!r} "
                      f"({type(value).__name__})")


def finite_number(name: str, value: object, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
                  min_open: bool = False, max_open: bool = False, what: str = "") -> float:
    """``value`` as a float when it is a finite real number from ``minimum`` to ``maximum``
    (``min_open`` / ``max_open``: that bound itself excluded); NaN, an infinity, a string or a bool
    is not. Else a ConfigError naming ``name``, the value and its type (``what``: what the number
    means). :func:`whole_number`'s sibling for real-valued arguments (the training configs'
    learning rates, fractions and time budgets)."""
    import math
    import numbers

    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = real and math.isfinite(value)  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (minimum is None or (v > minimum if min_open else v >= minimum)) and (
            maximum is None or (v < maximum if max_open else v <= maximum))
        if ok:
            return v
    bounds = [f"{'>' if min_open else '>='} {minimum:g}" if minimum is not None else "",
              f"{'<' if max_open else '<='} {maximum:g}" if maximum is not None else ""]
    shown = " and ".join(b for b in bounds if b)
    meaning = f" ({what})" if what else ""
    raise ConfigError(f"{name} must be a finite number{' ' + shown if shown else ''}{meaning}, got {value!r} "
                      f"({type(value).__name__})")

"""DICOM result objects (highdicom) and their C-STORE forwarding.

For each triaged series:

- ``sr.dcm`` - a Comprehensive SR whose root container (LOINC 18748-4 "Diagnostic imaging
  report") holds the research-use statement, the algorithm name and version (DCM 111001/111003),
  the label (DCM 121071 "Finding", coded in the local scheme ``99CTSDK``), one NUM per class
  probability (UCUM "1"), eligibility, and the prior comparison when there is one. Its evidence
  sequence references every source instance of the series.
- ``sc-NNN.dcm`` - Secondary Capture Image(s), RGB, of the heat-map overlays (or, when the triage
  gave none, the lung-windowed key slice), in the source study, with a Source Image Sequence
  pointing at the slice each was computed on.
- ``measurements.dcm`` - when the result has a ``lung_opacity`` block: a Comprehensive 3D SR,
  TID 1500 "Imaging Measurement Report" (highdicom ``MeasurementReport``), one TID 1501
  measurement group per finding (ground glass DCM 112120, consolidation ``99CTSDK CONSOL``) and
  site (both lungs, left, right, upper / lower zone, central / peripheral) with the fraction of
  lung (UCUM %) and the volume (UCUM ml), plus one group of pattern features (UCUM 1 / %).
- ``seg.dcm`` - when the triage function gave an opacity map with any opacity: a binary DICOM
  Segmentation of the source series, segment 1 ground glass, segment 2 consolidation (algorithm
  family "Morphological operations"), frames only where a segment is present.

UIDs of result objects are derived from the source series and the set of instances triaged
(``pydicom.uid.generate_uid(entropy_srcs=...)``), so re-running a series after a crash produces
the same SOP Instance UIDs and a PACS de-duplicates instead of showing two reports.

Versions: every object carries SoftwareVersions (0018,1020) = the ctsdk package version
(``sdk.__version__``, the software that wrote it); the model bundle's name and version are the
*algorithm* (SR: DCM 111001/111003 "Algorithm Name/Version"; measurements: the device observer's
name / model name). The SEG's algorithm is ctsdk's own HU opacity code, so its Algorithm
Identification version is the package version too.
"""
from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

import numpy as np

from .._lazy import require
from ..errors import ConfigError, CorruptFileError, DicomNetworkError, NotDicomError, ResultWriteError
from .storage import atomic_write_bytes, instance_set_digest
from .triage_fns import RESEARCH_ONLY, Overlay, instance_number

log = logging.getLogger("sdk.integration.results")

#: warnings.catch_warnings swaps process-wide state: one writer at a time records them
_WARNINGS_LOCK = threading.Lock()

__all__ = ["write_dicom_results", "build_sr", "build_sc", "build_seg", "build_measurement_sr", "SEG_SERIES_NUMBER", "forward_files", "key_image_overlay",
           "patient_orientation", "SR_SERIES_NUMBER", "SC_SERIES_NUMBER"]

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SEG_SERIES_NUMBER = 9903
MANUFACTURER = "ctsdk"
LOCAL_SCHEME = "99CTSDK"
from ..preprocessing import CLASSIFIER_WINDOW as LUNG_WINDOW  # noqa: E402 - the one owner of the window


def _read_headers(files: Sequence[Path]) -> List[Any]:
    import pydicom

    out = []
    for f in files:
        try:
            out.append(pydicom.dcmread(str(f), stop_before_pixels=True))
        except Exception as exc:
            raise ResultWriteError(f"{f}: cannot re-read the source instance for the DICOM results ({exc})") from exc
    return out


#: Patient / study attributes (Type 2 in the Patient and General Study modules) that result
#: objects copy from the source; anonymised sources often lack them, and Type 2 means "present,
#: possibly empty", so a missing one is added empty (never invented).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "AccessionNumber", "ReferringPhysicianName", "StudyID")


def _with_type2(ds: Any) -> Any:
    """A shallow copy of ``ds`` with every missing :data:`_TYPE2_COPIED` attribute added empty."""
    import copy

    out = copy.copy(ds)
    for kw in _TYPE2_COPIED:
        if kw not in out:
            setattr(out, kw, "")
    return out


def _slice_order_key(ds: Any) -> Tuple[float, int]:
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
        pos = float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
    except (AttributeError, ValueError, TypeError):
        pos = 0.0
    return pos, instance_number(ds) or 0


def patient_orientation(ds: Any) -> Tuple[str, str]:
    """PatientOrientation (row direction, column direction) letters from ImageOrientationPatient.

    LPS: +x L / -x R, +y P / -y A, +z H / -z F; each direction gets its dominant axis letter.
    An image without orientation gets ("L", "P"), the axial default.
    """
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, ValueError, TypeError):
        return ("L", "P")
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(v: Sequence[float]) -> str:
        axis = int(np.argmax(np.abs(v)))
        return letters[axis][1 if v[axis] > 0 else 0]

    return (letter(iop[:3]), letter(iop[3:]))


def key_image_overlay(file: Path) -> Overlay:
    """The lung-windowed slice of ``file`` as an RGB overlay (used when no heat map exists)."""
    import pydicom

    from ..heatmap import window_to_unit

    try:
        ds = pydicom.dcmread(str(file))
        px = ds.pixel_array.astype(np.float32)
    except Exception as exc:
        raise ResultWriteError(f"{file}: cannot decode the key slice for the Secondary Capture ({exc})") from exc
    if px.ndim != 2:
        px = px.reshape(-1, *px.shape[-2:])[0]
    hu = px * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    grey = (window_to_unit(hu, LUNG_WINDOW) * 255.0 + 0.5).astype(np.uint8)
    return Overlay(np.stack([grey] * 3, axis=-1), file, "key slice, lung window (no heat map available)")


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _model_identity(result: Mapping[str, Any]) -> Tuple[str, str]:
    """(name, version) of the model bundle named in a result dict, with ctsdk's as fallback."""
    from .. import __version__

    for key in ("model", "bundle"):
        v = result.get(key)
        if isinstance(v, Mapping) and v.get("name"):
            return str(v.get("name")), str(v.get("version", "") or "unknown")
        if isinstance(v, str) and v:
            return v, str(result.get(f"{key}_version", "") or "unknown")
    rt = result.get("runtime")
    if isinstance(rt, Mapping):
        for key in ("bundle", "model"):
            v = rt.get(key)
            if isinstance(v, Mapping) and v.get("name"):
                return str(v["name"]), str(v.get("version", "") or "unknown")
            if isinstance(v, str) and v:
                return v, str(rt.get(f"{key}_version", "") or "unknown")
    return "ctsdk", __version__


def build_sr(sources: Sequence[Any], result: Mapping[str, Any], uid_seed: str) -> Any:
    """Comprehensive SR of a triage result (see the module docstring for its content tree)."""
    hd = require("highdicom", "DICOM SR results")
    from highdicom.sr import (CodeContentItem, CodedConcept, ContainerContentItem, NumContentItem,
                              TextContentItem)

    def cc(value: str, scheme: str, meaning: str) -> Any:
        return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])

    name, version = _model_identity(result)
    label = str(result.get("label", "unknown"))
    items: List[Any] = [
        TextContentItem(name=cc("121106", "DCM", "Comment"), value=RESEARCH_ONLY, relationship_type="CONTAINS"),
        TextContentItem(name=cc("111001", "DCM", "Algorithm Name"), value=name[:64], relationship_type="CONTAINS"),
        TextContentItem(name=cc("111003", "DCM", "Algorithm Version"), value=version[:64], relationship_type="CONTAINS"),
        CodeContentItem(name=cc("121071", "DCM", "Finding"), value=cc(label[:16], LOCAL_SCHEME, f"triage label {label}"),
                        relationship_type="CONTAINS"),
    ]
    probs = result.get("probabilities") or {}
    for cls, p in sorted(probs.items()):
        items.append(NumContentItem(name=cc(f"P-{cls}"[:16], LOCAL_SCHEME, f"Probability of {cls}"), value=float(p),
                                    unit=cc("1", "UCUM", "no units"), relationship_type="CONTAINS"))
    eligible = result.get("eligible")
    reasons = "; ".join(str(r) for r in (result.get("reasons") or []))
    if eligible is not None:
        text = "eligible" if eligible else "not eligible"
        items.append(TextContentItem(name=cc("ELIGIBILITY", LOCAL_SCHEME, "Triage eligibility"),
                                     value=(f"{text}: {reasons}" if reasons else text)[:1024], relationship_type="CONTAINS"))
    prior = result.get("prior")
    if isinstance(prior, Mapping) and prior.get("change"):
        items.append(TextContentItem(name=cc("PRIOR-CHANGE", LOCAL_SCHEME, "Change since prior study"),
                                     value=str(prior.get("summary") or prior["change"])[:1024], relationship_type="CONTAINS"))
    root = ContainerContentItem(name=cc("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    return _make_sr(hd.sr.ComprehensiveSR, root, sources, uid_seed, "sr", 1)


def _make_sr(sr_class: Any, content: Any, sources: Sequence[Any], uid_seed: str, sop_key: str, instance_number: int) -> Any:
    """One ctsdk SR of the results series (``sr_class``: highdicom's ComprehensiveSR or
    Comprehensive3DSR): the settings every ctsdk SR shares, the local coding scheme declared, the
    source's study kept."""
    from .. import __version__

    sr = sr_class(
        evidence=list(sources),
        content=content,
        series_instance_uid=_uid(uid_seed, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid(uid_seed, sop_key),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"ctsdk triage SR ({RESEARCH_ONLY})"[:64],
        software_versions=__version__,
    )
    _declare_local_scheme(sr)
    if not sr.get("StudyInstanceUID"):
        sr.StudyInstanceUID = sources[0].get("StudyInstanceUID", "")
    return sr


def build_sc(ref: Any, overlay: Overlay, uid_seed: str, index: int) -> Any:
    """RGB Secondary Capture of one overlay, in the source's study, referencing its source slice."""
    hd = require("highdicom", "DICOM Secondary Capture results")
    from pydicom.dataset import Dataset

    from .. import __version__

    rgb = np.ascontiguousarray(overlay.rgb)
    spacing = None
    if ref.get("PixelSpacing") is not None and (int(ref.get("Rows", 0)), int(ref.get("Columns", 0))) == rgb.shape[:2]:
        spacing = tuple(float(v) for v in ref.PixelSpacing)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_uid(uid_seed, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=_uid(uid_seed, "sc", index),
        instance_number=index,
        manufacturer=MANUFACTURER,
        pixel_spacing=spacing,
        patient_orientation=patient_orientation(ref),
        series_description=f"ctsdk heat maps ({RESEARCH_ONLY})"[:64],
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        software_versions=__version__,
    )
    src = Dataset()
    src.ReferencedSOPClassUID = ref.SOPClassUID
    src.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [src]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = overlay.description[:1024]
    sc.ImageComments = f"{RESEARCH_ONLY}. {overlay.description}"[:10240]
    sc.BurnedInAnnotation = "NO"
    if "Laterality" not in sc:  # Type 2C in General Series; a chest is both sides: present, empty
        sc.Laterality = ""
    return sc


def write_dicom_results(files: Sequence[Path], result: Mapping[str, Any], overlays: Sequence[Overlay],
                        out_dir: Path, max_sc: int = 3, opacity: Any = None) -> List[Path]:
    """Write ``sr.dcm``, ``sc-NNN.dcm`` (and ``measurements.dcm`` / ``seg.dcm`` when the result has
    opacity measurements / ``opacity`` is an :class:`~sdk.integration.triage_fns.OpacityMap` with
    any opacity) for a triaged series into ``out_dir``; return their paths.

    Python warnings that pydicom / highdicom raise about the source headers while the objects are
    built (e.g. "'Lung_Dx-A0002' is unlikely to represent the intended person name") are logged
    once each at INFO on ``sdk.integration.results``, naming ``out_dir``, instead of reaching the
    user's terminal as multi-line UserWarnings: the objects are written regardless.

    Raises:
        ResultWriteError: a source cannot be re-read, highdicom refuses the inputs (e.g. a source
            with an invalid UID), or a file cannot be written. The message names the series folder.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _write_dicom_results(files, result, overlays, out_dir, max_sc, opacity)
        finally:
            for text in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
                log.info("%s: while building the DICOM results: %s", out_dir, text)


def _write_dicom_results(files: Sequence[Path], result: Mapping[str, Any], overlays: Sequence[Overlay],
                         out_dir: Path, max_sc: int, opacity: Any) -> List[Path]:
    files = [Path(f) for f in files]
    if not files:
        raise ResultWriteError(f"{out_dir}: no source instances to reference in the DICOM results")
    sources = [_with_type2(ds) for ds in _read_headers(files)]
    by_file = {str(f.resolve()): ds for f, ds in zip(files, sources)}
    images = [(f, ds) for f, ds in zip(files, sources) if "PixelData" in ds or ds.get("Rows")]
    order = sorted(images or list(zip(files, sources)), key=lambda t: _slice_order_key(t[1]))
    seed = "|".join([str(sources[0].get("SeriesInstanceUID", "")), instance_set_digest([f.name for f in files])])
    out_dir = Path(out_dir)
    written: List[Path] = []
    try:
        sr = build_sr(sources, result, seed)
        written.append(_save(sr, out_dir / "sr.dcm"))
        chosen = list(overlays)[:max_sc]
        if not chosen:
            chosen = [key_image_overlay(order[len(order) // 2][0])]
        positions = np.array([_slice_order_key(ds)[0] for _, ds in order])
        spacing = float(np.median(np.abs(np.diff(positions)))) if len(positions) > 1 else 1.0
        for i, ov in enumerate(chosen, start=1):
            ref = by_file.get(str(Path(ov.source_file).resolve())) if ov.source_file else None
            if ref is None and ov.z_mm is not None:
                k = int(np.argmin(np.abs(positions - ov.z_mm)))
                if abs(positions[k] - ov.z_mm) <= max(spacing, 1e-3) * 0.51:
                    ref = order[k][1]
                else:
                    log.warning("%s: no source slice at z=%.2f mm; the SC references the middle slice", out_dir, ov.z_mm)
            if ref is None:
                ref = order[len(order) // 2][1]
            written.append(_save(build_sc(ref, ov, seed, i), out_dir / f"sc-{i:03d}.dcm"))
        if isinstance(result.get("lung_opacity"), Mapping):
            written.append(_save(build_measurement_sr(sources, result, seed), out_dir / "measurements.dcm"))
        if opacity is not None and np.asarray(opacity.labels).any():
            written.append(_save(build_seg([ds for _, ds in order], positions, opacity, result, seed), out_dir / "seg.dcm"))
    except ResultWriteError:
        raise
    except Exception as exc:  # highdicom validates its inputs with ValueError/TypeError
        raise ResultWriteError(f"{out_dir}: DICOM results not built: {type(exc).__name__}: {exc}") from exc
    return written


def _algorithm(result: Mapping[str, Any]) -> Any:
    from highdicom import AlgorithmIdentificationSequence
    from pydicom.sr.codedict import codes

    from .. import __version__

    return AlgorithmIdentificationSequence(name="ctsdk HU lung opacity", version=__version__,
                                           family=codes.cid7162.MorphologicalOperations,
                                           source="ctsdk sdk.opacity (HU thresholds + 2D morphology)")


def _consolidation_code() -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(value="CONSOL", scheme_designator=LOCAL_SCHEME, meaning="Lung consolidation")


def build_seg(ordered: Sequence[Any], positions: np.ndarray, opacity: Any, result: Mapping[str, Any], uid_seed: str) -> Any:
    """Binary DICOM Segmentation of the opacity map over the source series.

    ``ordered``: the source headers in slice order, ``positions`` their positions along the
    normal; each opacity slice goes to the source at its ``z_mm`` (within half a slice step).
    """
    hd = require("highdicom", "DICOM SEG results")
    from pydicom.sr.codedict import codes

    from .. import __version__

    rows, cols = int(ordered[0].Rows), int(ordered[0].Columns)
    labels = np.asarray(opacity.labels)
    if labels.shape[1:] != (rows, cols):
        raise ResultWriteError(f"opacity map slices are {labels.shape[1:]}, the source images {rows}x{cols}")
    frames = np.zeros((len(ordered), rows, cols), np.uint8)
    step = float(np.median(np.abs(np.diff(positions)))) if len(positions) > 1 else 1.0
    for z, lab in zip(np.asarray(opacity.z_mm, dtype=np.float64), labels):
        k = int(np.argmin(np.abs(positions - z)))
        if abs(positions[k] - z) > max(step, 1e-3) * 0.51:
            raise ResultWriteError(f"opacity map slice at z={z:.2f} mm has no source instance (nearest {positions[k]:.2f} mm)")
        frames[k] = lab
    algo = _algorithm(result)
    auto = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    category = codes.SCT.MorphologicallyAbnormalStructure
    descriptions = [
        hd.seg.SegmentDescription(segment_number=1, segment_label="ground glass (-750..-300 HU)",
                                  segmented_property_category=category, segmented_property_type=codes.DCM.GroundGlassOpacity,
                                  algorithm_type=auto, algorithm_identification=algo),
        hd.seg.SegmentDescription(segment_number=2, segment_label="consolidation (-300..+50 HU)",
                                  segmented_property_category=category, segmented_property_type=_consolidation_code(),
                                  algorithm_type=auto, algorithm_identification=algo),
    ]
    seg = hd.seg.Segmentation(
        source_images=list(ordered),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(uid_seed, "seg-series"),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(uid_seed, "seg"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="ctsdk",
        software_versions=__version__,
        device_serial_number="0",
        series_description=f"ctsdk HU opacity ({RESEARCH_ONLY})"[:64],
        omit_empty_frames=True,
    )
    _declare_local_scheme(seg)
    return seg


def _declare_local_scheme(ds: Any) -> None:
    from pydicom.dataset import Dataset

    scheme = Dataset()
    scheme.CodingSchemeDesignator = LOCAL_SCHEME
    scheme.CodingSchemeName = "ctsdk local codes (triage labels, probabilities, opacity measurements)"
    scheme.CodingSchemeResponsibleOrganization = "ctsdk"
    ds.CodingSchemeIdentificationSequence = [scheme]


#: (tracking name, finding site code name, laterality code name, topographical modifier code name)
_SITES = (
    ("both lungs", "Lung", None, None, None),
    ("left lung", "Lung", "Left", None, ("per_lung", "left")),
    ("right lung", "Lung", "Right", None, ("per_lung", "right")),
    ("upper zone", "UpperZoneOfLung", None, None, ("per_zone", "upper")),
    ("lower zone", "LowerZoneOfLung", None, None, ("per_zone", "lower")),
    ("central zone", "Lung", None, "Central", ("per_zone", "central")),
    ("peripheral zone", "Lung", None, "Peripheral", ("per_zone", "peripheral")),
)
_PATTERN = (
    ("bilateral_index", "BILAT-IDX", "Bilateral opacity index", "1"),
    ("peripheral_index", "PERIPH-IDX", "Peripheral opacity index", "1"),
    ("lower_index", "LOWER-IDX", "Lower zone opacity index", "1"),
    ("ggo_share", "GGO-SHARE", "Ground glass share of opacity", "1"),
    ("largest_consolidation_fraction", "LARGEST-CONS", "Largest consolidation, fraction of its lung", "%"),
    ("involved_lungs", "INVOLVED", "Lungs involved (>= 1 % opacity)", "1"),
)


def build_measurement_sr(sources: Sequence[Any], result: Mapping[str, Any], uid_seed: str) -> Any:
    """Comprehensive 3D SR, TID 1500, of ``result["lung_opacity"]`` (see the module docstring)."""
    hd = require("highdicom", "DICOM SR measurement results")
    from highdicom.sr import (CodedConcept, FindingSite, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              DeviceObserverIdentifyingAttributes, TrackingIdentifier)
    from pydicom.sr.codedict import codes

    op = result["lung_opacity"]
    name, version = _model_identity(result)
    unit = {"%": codes.UCUM.Percent, "1": codes.UCUM.NoUnits,
            "ml": CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")}

    def local(value: str, meaning: str) -> Any:
        return CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning[:64])

    def frac_concept(kind: str) -> Any:
        return local(f"{kind}-FRAC", f"{'Ground glass' if kind == 'GGO' else 'Consolidation'} fraction of lung")

    def vol_concept(kind: str) -> Any:
        return local(f"{kind}-VOL", f"{'Ground glass' if kind == 'GGO' else 'Consolidation'} volume")

    groups = []
    lung_ml_total = float(op.get("lung_ml") or 0.0)
    for kind, finding, key in (("GGO", codes.DCM.GroundGlassOpacity, "ggo_fraction"),
                               ("CONS", _consolidation_code(), "consolidation_fraction")):
        for site_name, site_code, lat, topo, path in _SITES:
            block = op if path is None else op[path[0]][path[1]]
            frac = float(block[key])
            lung_ml = lung_ml_total if path is None else float(block["lung_ml"])
            site = FindingSite(anatomic_location=getattr(codes.SCT, site_code),
                               laterality=getattr(codes.SCT, lat) if lat else None,
                               topographical_modifier=getattr(codes.SCT, topo) if topo else None)
            groups.append(MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=_uid(uid_seed, "track", kind, site_name),
                                                       identifier=f"{'ground glass' if kind == 'GGO' else 'consolidation'}, {site_name}"),
                finding_type=finding, finding_sites=[site],
                measurements=[
                    Measurement(name=frac_concept(kind), value=round(100.0 * frac, 4), unit=unit["%"]),
                    Measurement(name=vol_concept(kind), value=round(frac * lung_ml, 3), unit=unit["ml"]),
                ]))
    pattern = op.get("pattern", {})
    groups.append(MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_uid(uid_seed, "track", "pattern"), identifier="opacity pattern"),
        finding_type=codes.DCM.AbnormalOpacity, finding_sites=[FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=[Measurement(name=local(code, meaning), unit=unit[u],
                                  value=round(float(pattern[key]) * (100.0 if u == "%" else 1.0), 6))
                      for key, code, meaning, u in _PATTERN if key in pattern]))
    observer = ObserverContext(observer_type=codes.DCM.Device,
                               observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                   uid=_uid(uid_seed, "device"), name=name[:64], model_name=version[:64]))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_person_context=None, observer_device_context=observer),
        procedure_reported=CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region"),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    return _make_sr(hd.sr.Comprehensive3DSR, report, sources, uid_seed, "sr-measurements", 2)


def _save(ds: Any, path: Path) -> Path:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return atomic_write_bytes(path, buf.getvalue())


def _forward_target(target: Any) -> Any:
    """``target`` as an object with ``host``, ``port``, ``ae_title``; a ``HOST:PORT:AET`` str is parsed."""
    if isinstance(target, str):
        from .listener import parse_forward  # here, not at import: listener.py imports this module lazily too

        return parse_forward(target, what="forward target")
    if all(hasattr(target, a) for a in ("host", "port", "ae_title")):
        return target
    raise ConfigError(f"forward target {target!r}: expected 'HOST:PORT:AET' (e.g. '127.0.0.1:11112:PACS') or a "
                      "sdk.integration.listener.ForwardTarget")


def forward_files(files: Sequence[Path], target: Any, calling_ae: str = "CTSDK", timeout_s: float = 30.0) -> int:
    """C-STORE the DICOM ``files`` to ``target`` over one association; returns how many were stored.

    Args:
        files: DICOM files (each is read whole and sent in its own transfer syntax).
        target: ``"HOST:PORT:AET"`` (as ``ctsdk listen --forward``) or a
            :class:`~sdk.integration.listener.ForwardTarget`; its AE title is the *called* AE.
        calling_ae: our AE title as the peer sees it (its allow-list must accept it).
        timeout_s: ACSE, DIMSE and network timeout of the association.

    Raises:
        ConfigError: ``target`` is neither (a malformed string, another type).
        NotDicomError / CorruptFileError: a file is not DICOM / cannot be read as DICOM (the
            message names it); nothing was sent. A missing file raises FileNotFoundError.
        DicomNetworkError: the association is refused or not answered, or a C-STORE status is
            not Success (0x0000).
    """
    require("pynetdicom", "forwarding DICOM results")
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pynetdicom import AE

    target = _forward_target(target)
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f)))
        except InvalidDicomError as exc:
            raise NotDicomError("not a DICOM file, so it cannot be forwarded", path=f,
                                hint=f"forward DICOM files only ({exc})") from exc
        except OSError:
            raise
        except Exception as exc:
            raise CorruptFileError(f"cannot read it as DICOM to forward it ({type(exc).__name__}: {exc})", path=f) from exc
    if not datasets:
        return 0
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for cls, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}):
        ae.add_requested_context(cls, ts)
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        raise DicomNetworkError(f"forward to {target}: association not established "
                                f"({'rejected' if assoc.is_rejected else 'aborted or no answer'}); check the target "
                                f"and that its AE allow-list accepts calling AE {calling_ae!r}")
    sent = 0
    try:
        for f, d in zip(files, datasets):
            status = assoc.send_c_store(d)
            code = getattr(status, "Status", None)
            if code != 0x0000:
                raise DicomNetworkError(f"forward of {f} to {target}: C-STORE status "
                                        f"{'none (timeout/abort)' if code is None else hex(code)}")
            sent += 1
    finally:
        assoc.release()
    return sent

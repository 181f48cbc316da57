"""Is the prior an earlier study of the same patient? (``sdk.prior.check_pair`` and ``Triage.run(prior=...)``)

The policy (docs/integration.md, "Prior-study comparison"): refuse only on positive evidence -
different PatientIDs (or PatientSex / PatientBirthDate written in both and different), or a prior
dated after the current study - with a typed :class:`~sdk.errors.PriorError` in
``TriageResult.prior`` and the current result untouched; a missing field only notes the check that
could not be made; ``prior_checks=False`` compares anyway and records what would have refused.

Header-level rules are checked on ``SeriesMeta`` objects (no I/O); the facade on phantom series
written as DICOM and re-stamped with pydicom (``sdk.phantom`` writes PatientID "PHANTOM" and one
StudyDate); the user's case on the real covid-ct-md headers (skipped when the shared data is absent).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from conftest import shared_path
from sdk.errors import CtsdkError, PriorError, PriorNotEligibleError, PriorOrderError, PriorPatientMismatchError
from sdk.prior import check_pair
from sdk.volume.core import SeriesMeta, StudyIdentity

pydicom = pytest.importorskip("pydicom")


def _meta(study_uid: str = "1.2.3.1", series_uid: str = "1.2.3.1.1", **identity: str) -> SeriesMeta:
    ident = {"patient_id": "P-1", "patient_sex": "F", "study_date": "20260301", "study_time": "101500"}
    ident.update(identity)
    return SeriesMeta(modality="CT", study_uid=study_uid, series_uid=series_uid, identity=StudyIdentity(**ident))


CURRENT = _meta()


# --- header rules (no I/O) -----------------------------------------------------------------------
def test_same_patient_earlier_prior_passes():
    c = check_pair(CURRENT, _meta("1.2.3.0", "1.2.3.0.1", study_date="20260110", study_time="090000"))
    assert not c.problems and not c.refused and c.error() is None
    assert (c.patient, c.order, c.study) == ("same", "prior earlier", "different studies")
    assert c.interval_days == pytest.approx(50.05, abs=0.01)  # 2026-01-10 09:00 -> 2026-03-01 10:15
    assert c.not_checked == []
    json.dumps(c.to_dict(), allow_nan=False)


def test_another_patient_is_refused_naming_both_ids():
    c = check_pair(CURRENT, _meta("1.2.3.0", "1.2.3.0.1", patient_id="P-2", patient_sex="M", study_date="20260110"))
    assert c.refused and c.patient == "different"
    err = c.error()
    assert isinstance(err, PriorPatientMismatchError) and isinstance(err, PriorError) and isinstance(err, CtsdkError)
    text = str(err)
    assert "PatientID differs" in text and "P-2" not in text and "P-1" not in text  # no identity in results
    assert "PatientSex M (prior) vs F (current)" in text
    assert "prior_checks=False" in text and "--prior-unchecked" in text  # says what to do


def test_supporting_evidence_refuses_without_ids_but_names_never_do():
    # anonymised IDs, but sex written in both and different: not the same patient
    c = check_pair(_meta(patient_id=""), _meta("1.2.3.0", patient_id="", patient_sex="M", study_date="20260110"))
    assert c.patient == "different" and isinstance(c.error(), PriorPatientMismatchError)
    assert "patient identity not checked: PatientID absent in both" in c.not_checked
    # same ID, birth dates differ: refused, without printing the birth dates
    c = check_pair(_meta(patient_birth_date="19800101"),
                   _meta("1.2.3.0", patient_birth_date="19810101", study_date="20260110"))
    assert c.patient == "different" and "PatientBirthDate differs" in str(c.error()) and "1980" not in str(c.error())
    # a differently spelled name is a note, not a refusal
    c = check_pair(_meta(patient_name="DOE^JANE"), _meta("1.2.3.0", patient_name="Doe^Jane^M", study_date="20260110"))
    assert not c.problems and any("PatientName differs" in s for s in c.checked)


def test_prior_newer_than_current_is_refused_naming_both_dates():
    c = check_pair(CURRENT, _meta("1.2.3.9", "1.2.3.9.1", study_date="20260401", study_time="080000"))
    assert c.refused and c.order == "prior later" and c.patient == "same"
    err = c.error()
    assert isinstance(err, PriorOrderError)
    assert "2026-04-01 08:00:00" in str(err) and "2026-03-01 10:15:00" in str(err) and "swap" in str(err)
    # the same day: the times decide
    c = check_pair(CURRENT, _meta("1.2.3.9", study_date="20260301", study_time="111500"))
    assert c.order == "prior later" and c.interval_days == pytest.approx(-1 / 24, abs=1e-3)
    # both problems: the type names the patient, the message lists both
    c = check_pair(CURRENT, _meta("1.2.3.9", patient_id="P-2", study_date="20260401"))
    assert isinstance(c.error(), PriorPatientMismatchError) and "newer" in str(c.error())


def test_missing_or_unreadable_fields_are_noted_not_refused():
    c = check_pair(CURRENT, _meta("1.2.3.0", patient_id="", patient_sex="", study_date="", study_time=""))
    assert not c.problems and (c.patient, c.order) == ("not checked", "not checked")
    assert "patient identity not checked: PatientID absent in prior" in c.not_checked
    assert any(s.startswith("order not checked: no date written in both") and "StudyDate absent in prior" in s
               for s in c.not_checked)
    # another date field written in both orders them; an ACR-NEMA style date is read
    c = check_pair(_meta(study_date="", series_date="2026.03.01"), _meta("1.2.3.0", study_date="", series_date="20260110"))
    assert c.order == "prior earlier" and c.interval_days == 50.0
    # same day without a time: order unknown, not refused
    c = check_pair(CURRENT, _meta("1.2.3.0", study_time=""))
    assert c.order == "not checked" and not c.problems
    assert any("StudyTime absent in prior" in s for s in c.not_checked)
    # placeholder IDs and different issuers prove nothing
    c = check_pair(_meta(patient_id="ANONYMOUS"), _meta("1.2.3.0", patient_id="anonymous", study_date="20260110"))
    assert c.patient == "not checked" and any("placeholder" in s for s in c.not_checked)
    c = check_pair(_meta(issuer_of_patient_id="A"), _meta("1.2.3.0", patient_id="Q9", issuer_of_patient_id="B",
                                                          study_date="20260110"))
    assert not c.problems and any("different issuers" in s for s in c.not_checked)
    # an in-memory Volume (no header): nothing checked, nothing refused
    c = check_pair(SeriesMeta(), CURRENT)
    assert not c.problems and any("no DICOM header for the current study" in s for s in c.not_checked)


def test_same_study_and_same_series_are_said():
    c = check_pair(CURRENT, _meta(series_uid="1.2.3.1.2"))
    assert not c.problems and c.study == "same study" and c.order == "same time"
    c = check_pair(CURRENT, CURRENT)
    assert not c.problems and c.study == "same series"
    # one StudyInstanceUID on two dates: an anonymiser's placeholder, not one study
    c = check_pair(CURRENT, _meta(study_date="20260110"))
    assert c.study == "different studies" and c.order == "prior earlier" and any("not trusted" in s for s in c.checked)


def test_override_records_but_does_not_refuse():
    c = check_pair(CURRENT, _meta("1.2.3.0", patient_id="P-2"), enforce=False)
    assert not c.refused and c.problems and c.to_dict()["enforced"] is False


def test_identity_stays_out_of_outputs():
    meta = _meta(patient_name="DOE^JANE")
    assert "identity" not in meta.to_dict() and "P-1" not in repr(meta) and "DOE" not in repr(meta.identity)


# --- through the facade, on phantom DICOM ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the default bundle's classifier)")
    pytest.importorskip("xgboost", reason="xgboost is not installed (the default bundle's aggregator)")
    from sdk.triage import Triage

    return Triage(device="cpu")  # the CPU path, as in test_prior_triage.py


def _stamp(folder: Path, **values: Optional[str]) -> Path:
    """Rewrite header values of every file in ``folder`` (None deletes the element)."""
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        for kw, v in values.items():
            if v is None:
                if kw in ds:
                    delattr(ds, kw)
            else:
                setattr(ds, kw, v)
        ds.save_as(f)
    return folder


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Dict[str, Path]:
    """current (ground glass) and a clean prior with several header variants (copies of one series)."""
    from sdk.phantom import write_phantom_series

    root = tmp_path_factory.mktemp("prior-checks")
    kw = dict(n_slices=48, size=128, spacing=(2.5, 2.0, 2.0))
    write_phantom_series(root / "current", seed=2, ground_glass=True, **kw)
    _stamp(root / "current", PatientID="P-1", StudyDate="20260301", StudyTime="101500")
    write_phantom_series(root / "prior", seed=1, **kw)
    _stamp(root / "prior", PatientID="P-1", StudyDate="20260110", StudyTime="090000")
    variants = {"other": dict(PatientID="P-2"), "newer": dict(StudyDate="20260401"),
                "anon": dict(PatientID="", PatientName=None, StudyDate=None, StudyTime=None)}
    out = {"current": root / "current", "prior": root / "prior"}
    for name, values in variants.items():
        out[name] = _stamp(Path(shutil.copytree(root / "prior", root / name)), **values)
    return out


@pytest.fixture(scope="module")
def plain(engine, studies):
    return engine.run(studies["current"])


def _same_current(result: Any, plain: Any) -> None:
    assert result.label == plain.label and result.probabilities == plain.probabilities
    assert [s.to_dict() for s in result.slice_scores] == [s.to_dict() for s in plain.slice_scores]


def test_facade_same_patient_earlier_prior_is_compared(engine, studies, plain):
    r = engine.run(studies["current"], prior=studies["prior"])
    assert r.prior["change"] == "worse", r.prior  # ground glass is new in the current study
    chk = r.prior["checks"]
    assert (chk["patient"], chk["order"], chk["study"]) == ("same", "prior earlier", "different studies")
    assert chk["enforced"] and not chk["problems"] and chk["interval_days"] == pytest.approx(50.05, abs=0.01)
    assert set(r.prior["prior_series"]["timings_ms"]) == {"load", "triage"}
    _same_current(r, plain)
    json.dumps(r.to_dict(), allow_nan=False)


def test_facade_another_patient_gives_a_typed_error_and_keeps_the_result(engine, studies, plain):
    r = engine.run(studies["current"], prior=studies["other"])
    assert r.prior["error"].startswith("PriorPatientMismatchError: ") and "PatientID differs" in r.prior["error"] and "P-2" not in r.prior["error"]
    assert "change" not in r.prior and r.prior["checks"]["patient"] == "different"
    assert any(w.startswith("prior comparison skipped: the prior is another patient") for w in r.warnings)
    _same_current(r, plain)


def test_facade_newer_prior_is_refused(engine, studies, plain):
    r = engine.run(studies["current"], prior=studies["newer"])
    assert r.prior["error"].startswith("PriorOrderError: ") and "2026-04-01" in r.prior["error"]
    assert "change" not in r.prior and r.prior["checks"]["order"] == "prior later"
    _same_current(r, plain)


def test_facade_anonymised_prior_is_compared_with_notes(engine, studies):
    r = engine.run(studies["current"], prior=studies["anon"])
    assert r.prior["change"] == "worse", r.prior
    notes = r.prior["checks"]["not_checked"]
    assert "patient identity not checked: PatientID absent in prior" in notes
    assert any(n.startswith("order not checked") and "StudyDate absent in prior" in n for n in notes)


def test_facade_override_compares_and_warns(engine, studies):
    r = engine.run(studies["current"], prior=studies["other"], prior_checks=False)
    assert r.prior["change"] == "worse" and "error" not in r.prior
    assert r.prior["checks"]["enforced"] is False and "PatientID differs" in r.prior["checks"]["problems"][0]
    assert any("prior_checks=False" in w for w in r.warnings)


def test_facade_not_eligible_prior_is_a_prior_error(engine, studies, tmp_path):
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(5.0, 4.0, 4.0), slice_thickness=5.0)
    _stamp(tmp_path, PatientID="P-1", StudyDate="20260110")
    r = engine.run(studies["current"], prior=tmp_path)
    assert r.prior["error"].startswith("PriorNotEligibleError: the prior series is not eligible")
    assert issubclass(PriorNotEligibleError, PriorError) and r.prior["checks"]["patient"] == "same"


def test_cli_passes_prior_unchecked(monkeypatch, studies):
    """--prior-unchecked reaches Triage.run as prior_checks=False (the engine is a stub: wiring only)."""
    from click.testing import CliRunner

    import sdk.triage
    from sdk.cli.triage_cmd import triage as triage_cmd
    from sdk.result import TriageResult

    seen: Dict[str, Any] = {}

    class Stub:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        @staticmethod
        def _load(source: Any, series_uid: Any = None) -> Any:
            return source

        def run(self, series: Any, **kw: Any) -> TriageResult:
            seen.update(kw)
            return TriageResult(label="not_eligible", probabilities={}, eligible=False, reasons=["stub"], warnings=[],
                                series_uid="", bundle={}, threshold=0.5, runtime={}, shape=[1, 1, 1],
                                spacing_mm=[1.0, 1.0, 1.0])

    monkeypatch.setattr(sdk.triage, "Triage", Stub)
    for args, expected in (([], True), (["--prior-unchecked"], False)):
        res = CliRunner().invoke(triage_cmd, [str(studies["current"]), "--prior", str(studies["prior"]), *args])
        assert res.exit_code == 0, res.output
        assert seen["prior_checks"] is expected and seen["prior"] == str(studies["prior"])


# --- the user's case: covid-P001 with normal-normal001 as "prior" ----------------------------------
def test_real_other_patient_newer_prior_is_not_called_improved(engine, studies):
    """Two real covid-ct-md studies: other patient (98C14734-ASSH vs 99C628-ASAD, M/039Y vs F/070Y) and
    the "prior" is 37 days newer. The current pixels are a phantom carrying P001's real header
    (the refusal comes from the headers, before the prior is triaged), so the test stays fast."""
    from sdk.io import load_series

    p001 = load_series(shared_path("dicom", "covid-ct-md", "covid-P001"))
    current = dataclasses.replace(load_series(studies["current"]), meta=p001.meta)
    r = engine.run(current, prior=shared_path("dicom", "covid-ct-md", "normal-normal001"))
    assert "change" not in r.prior and "improved" not in json.dumps(r.prior)
    err = r.prior["error"]
    assert err.startswith("PriorPatientMismatchError: ") and "PatientID differs" in err and "99C628" not in err and "98C14734" not in err
    assert "2020-04-11" in err and "2020-03-05" in err  # the order problem is named too
    chk = r.prior["checks"]
    assert (chk["patient"], chk["order"]) == ("different", "prior later") and chk["interval_days"] < -36
    assert "prior_series" not in r.prior  # refused before the prior was triaged

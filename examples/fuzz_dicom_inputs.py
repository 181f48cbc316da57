"""Fuzz the DICOM side of the product: does every damaged input end in a result or a CtsdkError?

    python examples/fuzz_dicom_inputs.py bytes  --seed 0 --cases 250   # byte damage -> load_series
    python examples/fuzz_dicom_inputs.py values --seed 0 --cases 250   # one element set to garbage -> load_series
    python examples/fuzz_dicom_inputs.py results --seed 0 --cases 150  # identity elements -> Triage + SR/SEG/SC

``bytes``: a run of real files of ../shared/data (covid-P001, lung-pet-ct-dx, cip-ct64, totalseg-j2k,
the GE tilt series), one file damaged (truncated; bytes overwritten in the header or anywhere; a
range zeroed or duplicated; an element length set to garbage). ``values``: one numeric / geometric
/ identity element of one file or of all files written as a raw garbage value (multi-valued, not a
number, inf, 1e400, ...). ``results``: a phantom series with identity / descriptive elements
damaged, triaged and written as DICOM results (the ``--dicom-out`` path). Prints the exceptions
that were not a :class:`sdk.errors.CtsdkError`, grouped, with one traceback each; exit status 1
when there was one. docs/ingest.md, *Fuzzing*, has what was run and found.
"""
from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdk.paths import shared_data_root  # noqa: E402

DICOM = shared_data_root() / "dicom"
REAL = ["covid-ct-md/covid-P001", "lung-pet-ct-dx/A0002-s2-8mm-B70f", "cip-ct64", "totalseg-j2k", "dcm-qa-ct-ge-tilt"]
NUMERIC = ["SliceThickness", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope",
           "RescaleIntercept", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
           "SamplesPerPixel", "PhotometricInterpretation", "InstanceNumber", "SliceLocation", "SpacingBetweenSlices",
           "GantryDetectorTilt", "Modality", "SeriesInstanceUID", "SOPInstanceUID", "NumberOfFrames", "ImageType",
           "SOPClassUID", "AcquisitionNumber", "FrameOfReferenceUID", "PixelPaddingValue"]
IDENTITY = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
            "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID", "SeriesNumber",
            "InstanceNumber", "Manufacturer", "SeriesDescription", "FrameOfReferenceUID", "SpecificCharacterSet",
            "InstitutionName", "BodyPartExamined", "ConvolutionKernel", "KVP", "WindowCenter", "WindowWidth"]
GARBAGE = [b"", b"abc", b"1\\2", b"nan", b"inf", b"-inf", b"0", b"-1", b"1e400", b"1e12", b"1\\2\\3\\4\\5\\6\\7",
           b"9" * 40, b"\xff\xfe\x00\x01", b"x" * 200, b"1.2.3.abc", b"A^B^C^D^E^F", b" \\ "]


def set_raw(path: Path, keyword: str, raw: bytes) -> None:
    """Write ``raw`` as the value of ``keyword`` (pydicom would refuse most of these values itself)."""
    import pydicom
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(path)
    tag = Tag(tag_for_keyword(keyword))
    raw = raw + b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(raw), raw, 0, False, True)
    try:
        ds.save_as(path)
    except Exception:  # pydicom cannot write it (e.g. a charset it cannot look up): the case is skipped
        pass


def damage_bytes(path: Path, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    kind = rng.choice(["trunc", "flip_head", "flip_any", "zero", "dup_range", "tag_len"])
    if kind == "trunc":
        raw = raw[: rng.randrange(1, len(raw))]
    elif kind in ("flip_head", "flip_any"):
        hi = min(len(raw), 2000) if kind == "flip_head" else len(raw)
        for _ in range(rng.randint(1, 8 if kind == "flip_head" else 20)):
            raw[rng.randrange(min(128, hi - 1), hi)] = rng.randrange(256)
    elif kind == "zero":
        i = rng.randrange(len(raw))
        j = min(len(raw), i + rng.randint(1, 400))
        raw[i:j] = bytes(j - i)
    elif kind == "dup_range":
        i = rng.randrange(len(raw))
        raw[i:i] = raw[i:min(len(raw), i + rng.randint(1, 200))]
    else:
        i = rng.randrange(132, min(len(raw) - 4, 1500))
        raw[i:i + 4] = bytes([0xFF, 0xFF, rng.randrange(256), rng.randrange(256)])
    path.write_bytes(bytes(raw))
    return kind


def real_case(work: Path, rng: random.Random, n: int = 24) -> List[Path]:
    src = DICOM / rng.choice(REAL)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith((".xml", ".csv", "LICENSE")))
    k = min(n, len(files))
    start = rng.randrange(0, len(files) - k + 1)
    out = []
    for f in files[start:start + k]:
        shutil.copy(f, work / f.name)
        out.append(work / f.name)
    return out


def case_bytes(work: Path, rng: random.Random) -> Tuple[str, Callable[[], Any]]:
    from sdk.io import load_series

    files = real_case(work, rng)
    kind = damage_bytes(rng.choice(files), rng)
    return kind, lambda: load_series(work, workers=1)


def case_values(work: Path, rng: random.Random) -> Tuple[str, Callable[[], Any]]:
    from sdk.io import load_series

    files = real_case(work, rng, 30)
    keyword, raw = rng.choice(NUMERIC), rng.choice(GARBAGE)
    victims = files if rng.random() < 0.5 else [rng.choice(files)]
    for f in victims:
        set_raw(f, keyword, raw)
    return f"{keyword}={raw[:12]!r} x{len(victims)}", lambda: load_series(work, workers=1)


_PHANTOM: Dict[str, Path] = {}


def case_results(work: Path, rng: random.Random) -> Tuple[str, Callable[[], Any]]:
    from sdk.phantom import write_phantom_series

    if "clean" not in _PHANTOM:
        _PHANTOM["clean"] = Path(tempfile.mkdtemp(prefix="ctsdk-fuzz-clean-"))
        write_phantom_series(_PHANTOM["clean"], n_slices=40, size=64, spacing=(2.5, 4.0, 4.0), ground_glass=True, seed=1)
    shutil.rmtree(work)
    shutil.copytree(_PHANTOM["clean"], work)
    files = sorted(work.glob("*.dcm"))
    keyword, raw = rng.choice(IDENTITY), rng.choice(GARBAGE)
    victims = files if rng.random() < 0.6 else [rng.choice(files)]
    for f in victims:
        set_raw(f, keyword, raw)

    def run() -> None:
        from sdk.integration.results import write_dicom_results
        from sdk.integration.triage_fns import opacity_from_result, overlays_from_result
        from sdk.io import load_series

        vol = load_series(work)
        res = _triage().run(vol)
        write_dicom_results(sorted({Path(f) for f in vol.files if f}), res.to_dict(), overlays_from_result(res),
                            work / "out", opacity=opacity_from_result(res))
    return f"{keyword}={raw[:12]!r} x{len(victims)}", run


def _triage() -> Any:
    if "triage" not in _PHANTOM:
        from sdk import Triage

        _PHANTOM["triage"] = Triage(device="cpu", heatmaps=True)  # type: ignore[assignment]
    return _PHANTOM["triage"]


MODES = {"bytes": case_bytes, "values": case_values, "results": case_results}


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=100)
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from sdk.errors import CtsdkError

    rng = random.Random(a.seed)
    escapes: collections.Counter = collections.Counter()
    examples: Dict[Tuple[str, str], str] = {}
    typed = 0
    for i in range(a.cases):
        work = Path(tempfile.mkdtemp(prefix=f"ctsdk-fuzz-{a.mode}-"))
        try:
            what, run = MODES[a.mode](work, rng)
            try:
                run()
            except CtsdkError:
                typed += 1
            except Exception as exc:  # what the product must never let out
                key = (type(exc).__name__, what)
                escapes[key] += 1
                examples.setdefault(key, traceback.format_exc()[-1500:])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if (i + 1) % 25 == 0:
            print(f"{i + 1}/{a.cases} cases: {typed} typed errors, {sum(escapes.values())} escapes", file=sys.stderr, flush=True)
    print(f"{a.mode}: {a.cases} cases, {typed} ended in a CtsdkError, {sum(escapes.values())} in another exception")
    for key, tb in examples.items():
        print(f"===== {key} x{escapes[key]}\n{tb}")
    return 1 if escapes else 0


if __name__ == "__main__":
    raise SystemExit(main())

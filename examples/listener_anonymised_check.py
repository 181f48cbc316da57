"""Send a real series with anonymiser damage to the DICOM listener; check every slice arrives, once.

The series must come out of the listener's store whole and be triaged once (docs/integration.md,
docs/ingest.md).

Cases: ``placeholder_sop`` (one SOPInstanceUID in every file, meta included) and
``series_uid_per_file`` (a new SeriesInstanceUID and StudyInstanceUID in every file). For each,
the damaged copy is C-STOREd (pynetdicom, one association) to an in-process ``Listener`` with the
model-free ``inventory`` triage function; the stored instances are then loaded and compared with
the untouched series. Prints one line per case; exits 1 when a case loses a slice.

    .venv/bin/python examples/listener_anonymised_check.py [SERIES] [--work DIR]   # ~15 s for covid-P001
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from sdk.paths import shared_data_root

DEFAULT = shared_data_root() / "dicom" / "covid-ct-md" / "covid-P001"
CASES = ("placeholder_sop", "series_uid_per_file")


def damage(files, out: Path, case: str) -> None:
    """Write a copy of ``files`` into ``out`` with the anonymiser damage ``case``."""
    import pydicom

    out.mkdir(parents=True)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        if case == "placeholder_sop":
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
        else:
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.{k + 1}"
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.11.{k + 1}"
        ds.save_as(str(out / f.name))


def run_case(files, ref, work: Path, case: str) -> bool:
    from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig
    from sdk.integration.results import forward_files
    from sdk.integration.triage_fns import inventory
    from sdk.io import load_series

    src, out = work / case, work / f"out_{case}"
    for d in (src, out):
        shutil.rmtree(d, ignore_errors=True)
    damage(files, src, case)
    t0 = time.perf_counter()
    lst = Listener(ListenerConfig(out=out, port=0, quiet_seconds=2.0, workers=1), lambda: inventory).start()
    try:
        forward_files(sorted(src.glob("*.dcm")), ForwardTarget(*lst.address, "CTSDK"), calling_ae="CHECK")
        idle = lst.wait_idle(300)
    finally:
        lst.stop()
    folders = sorted(p.name for p in (out / "series").iterdir())
    vol = load_series(sorted((out / "series" / folders[0] / "instances").glob("*.dcm")))
    same = vol.shape == ref.shape and bool((vol.hu == ref.hu).all())
    counts = {k: lst.counts[k] for k in ("received", "duplicates", "uid_reused", "series_merged", "triaged")}
    print(f"{case}: {len(files)} files sent -> {len(folders)} series folder(s) ({folders[0][:48]}), "
          f"first one loads {vol.shape[0]} slices, HU equal to the untouched series: {same}; {counts}; "
          f"{time.perf_counter() - t0:.1f} s")
    return idle and same and len(folders) == 1 and counts["triaged"] == 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--work", type=Path, default=Path("runs/listener_anonymised"))
    args = ap.parse_args()
    from sdk.io import load_series

    files = sorted(p for p in args.series.rglob("*") if p.is_file() and not p.name.startswith("."))
    ref = load_series(args.series)
    ok = [run_case(files, ref, args.work, case) for case in CASES]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()

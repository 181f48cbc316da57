#!/usr/bin/env python
"""Embed ctsdk in an integrator's service: triage every series folder under a root.

    python examples/triage_folder.py ../shared/data/dicom/covid-ct-md --out results/ [--heatmaps] [--workers 2]

What an integrator needs to get right, shown here:
- create ONE ``sdk.Triage`` (it loads, verifies and warms up the models) and reuse it;
- ``Triage.run`` is thread-safe: a small thread pool overlaps DICOM decoding with inference;
- a series that cannot be read raises a ``SeriesError`` (bad file, not CT, mixed series...):
  record it and go on; a non-eligible series is a *result* (label "not_eligible" + reasons);
- any other ``CtsdkError`` (bundle tampered, runtime missing) is a configuration problem: stop;
- write one JSON per series and a summary; never let one series block the others.

Research use only - not for diagnosis.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

import sdk
from sdk.errors import CtsdkError, SeriesError

log = logging.getLogger("triage_folder")


def series_folders(root: Path) -> List[Path]:
    """Leaf folders that contain files (each is treated as one series source)."""
    if any(p.is_file() for p in root.iterdir()):
        return [root]
    out = []
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        if any(c.is_file() for c in d.iterdir()) and not any(c.is_dir() for c in d.iterdir()):
            out.append(d)
    return out


def triage_one(engine: "sdk.Triage", folder: Path, out: Path, heatmaps: bool) -> Dict[str, Any]:
    """Triage one folder; never raises for a bad series (the error is the record)."""
    key = folder.name
    try:
        result = engine.run(folder)
    except SeriesError as exc:  # the input is not a usable CT series: record and continue
        record = {"series": key, "path": str(folder), "error": {"type": type(exc).__name__, "message": str(exc)}}
    else:
        record = {"series": key, "path": str(folder), **result.to_dict()}
        if heatmaps and result.eligible:
            record["heatmaps"] = [str(p) for p in result.save_heatmaps(out / f"{key}_heatmaps", top=8)]
    (out / f"{key}.json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="folder of series folders (or one series folder)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the packaged bundle)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--heatmaps", action="store_true", help="write PNG overlays of the top 8 slices")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

    try:
        engine = sdk.Triage(args.bundle, device=args.device, heatmaps=args.heatmaps)
    except CtsdkError as exc:  # bundle missing/tampered, runtime unavailable: a deployment problem
        log.error("cannot start: %s", exc)
        return 2
    log.info("%r", engine)
    args.out.mkdir(parents=True, exist_ok=True)
    folders = series_folders(args.root)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        records = list(pool.map(lambda f: triage_one(engine, f, args.out, args.heatmaps), folders))
    summary = {"n": len(records), "labels": {}, "errors": 0}
    for r in records:
        if "error" in r:
            summary["errors"] += 1
            log.warning("%s: %s", r["series"], r["error"]["message"])
        else:
            summary["labels"][r["label"]] = summary["labels"].get(r["label"], 0) + 1
            log.info("%s: %s %s (%.0f ms)", r["series"], r["label"],
                     {k: round(v, 3) for k, v in r["probabilities"].items()}, r["timings_ms"]["total"])
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

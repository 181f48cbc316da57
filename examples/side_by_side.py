"""Before / after in one process: an old copy of the package (``sdk_base``) against this checkout.

    mkdir -p /tmp/base && git archive <old-commit> sdk | tar -x -C /tmp/base && mv /tmp/base/sdk /tmp/base/sdk_base
    grep -rl '"sdk\.\|from sdk\.\|from sdk import' /tmp/base/sdk_base --include=*.py \
        | xargs sed -i 's/"sdk\./"sdk_base./g; s/from sdk\./from sdk_base./g; s/from sdk import/from sdk_base import/g'
    .venv/bin/python examples/side_by_side.py --base /tmp/base [--rounds 5] [--threads 2]

Both versions triage the same series alternately (order flipped every round, so load on a
shared machine hits both alike): ``Triage.run`` from the files and from a decoded Volume, and
``sdk.lungs.segment`` alone. Reported: median wall ms and median process CPU ms (all threads; less
sensitive to other users of the machine) per stage, the ratio old / new, and whether the lung
masks are bitwise identical and the labels / series probabilities agree (max |dp|).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_root() / "dicom"


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def main(argv: List[str] | None = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="folder holding the old package as sdk_base/")
    ap.add_argument("--series", default="covid-ct-md/covid-P001")
    ap.add_argument("--check", nargs="*", default=["covid-ct-md/covid-P001", "covid-ct-md/cap-cap001", "covid-ct-md/normal-normal001", "cip-ct64"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(a.base))
    import sdk
    import sdk_base  # type: ignore[import-not-found]

    if not sdk_base.Triage.__module__.startswith("sdk_base"):
        raise SystemExit("sdk_base.Triage resolves to the new package: rewrite the old copy's absolute 'sdk.' names (see the docstring)")
    import sdk_base.io  # type: ignore[import-not-found]
    from sdk.io import load_series

    loaders = {"old": sdk_base.io.load_series, "new": load_series}  # each Triage takes its own Volume class
    new = sdk.Triage(device="cpu", heatmaps=False, threads=a.threads)
    old = sdk_base.Triage(device="cpu", heatmaps=False, threads=a.threads)
    pairs = {"old": old, "new": new}
    report: Dict[str, Any] = {"runtime": new.runtime, "check": {}}
    # 1. same results: masks bitwise, labels, |dp|
    for s in a.check:
        vols = {k: loaders[k](DATA / s) for k in pairs}
        seg = {k: t._segment(vols[k]) for k, t in pairs.items()}
        res = {k: t.run(vols[k]) for k, t in pairs.items()}
        dp = max((abs(res["old"].probabilities[c] - res["new"].probabilities[c]) for c in res["old"].probabilities), default=0.0)
        report["check"][s] = {"mask_identical": bool(np.array_equal(seg["old"].labels, seg["new"].labels)),
                              "lung_ml": [seg["old"].lung_volume_ml, seg["new"].lung_volume_ml],
                              "label": [res["old"].label, res["new"].label], "max_abs_dp": dp}
    # 2. timings, alternating
    src = DATA / a.series
    vols = {k: loaders[k](src) for k in pairs}
    for t in pairs.values():
        t.run(src)
    rec: Dict[str, Dict[str, List[float]]] = {k: {} for k in pairs}
    for r in range(a.rounds):
        for k in (list(pairs) if r % 2 == 0 else list(pairs)[::-1]):
            t = pairs[k]
            res, wall, cpu = _timed(lambda: t.run(src))
            rec[k].setdefault("run_files_wall", []).append(wall)
            rec[k].setdefault("run_files_cpu", []).append(cpu)
            for st, ms in res.timings_ms.items():
                rec[k].setdefault(f"stage_{st}", []).append(ms)
            res, wall, cpu = _timed(lambda: t.run(vols[k]))
            rec[k].setdefault("run_volume_wall", []).append(wall)
            rec[k].setdefault("run_volume_cpu", []).append(cpu)
            _, wall, cpu = _timed(lambda: t._segment(vols[k]))
            rec[k].setdefault("lungs_wall", []).append(wall)
            rec[k].setdefault("lungs_cpu", []).append(cpu)
    med = {k: {m: float(np.median(v)) for m, v in d.items()} for k, d in rec.items()}
    report["median_ms"] = med
    report["ratio_old_over_new"] = {m: med["old"][m] / med["new"][m] for m in med["new"] if m in med["old"] and med["new"][m] > 0}
    print(json.dumps(report["check"], indent=1))
    print(f"{'metric':28s} {'old':>9s} {'new':>9s} {'old/new':>8s}")
    for m in med["new"]:
        if m in med["old"]:
            print(f"{m:28s} {med['old'][m]:9.0f} {med['new'][m]:9.0f} {report['ratio_old_over_new'].get(m, float('nan')):8.2f}")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

"""How far each series is from each HU rule of the series decision (issue 14; nothing fitted).

For every series given (default: the three COVID-CT-MD series), triages it with the default bundle
and prints, for each HU term of ``sdk.decision`` (no_opacity, lobar_consolidation, unilateral,
covid_typical), the measured values of its conditions next to their bars, whether it fired, and
the smallest change of one feature that would flip it - i.e. how stable the label is against the
HU measurement (which depends on the lung mask: docs/triage.md, *HU lung opacity*).

    .venv/bin/python examples/decision_margins.py [SERIES ...]      # ~10 s for the three series
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sdk.paths import shared_data_root

DEFAULT = [shared_data_root() / "dicom" / "covid-ct-md" / n for n in ("covid-P001", "cap-cap001", "normal-normal001")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="*", type=Path, default=DEFAULT)
    args = ap.parse_args()
    import sdk
    from sdk.decision import condition_holds, hu_conditions

    triage = sdk.Triage(heatmaps=False)
    for path in args.series:
        r = triage.run(path)
        print(f"{path.name}: {r.label} (P(covid) {r.probabilities.get('covid', float('nan')):.3f})")
        if not r.lung_opacity:
            continue
        for term, conds in hu_conditions(r.lung_opacity).items():
            ok = [condition_holds(c) for c in conds]
            failing = [c for c, k in zip(conds, ok) if not k]
            if all(ok):
                margin = min(abs(v - b) for _, v, _, b in conds)
                state = f"fires; nearest bar {margin:.4f} away"
            elif len(failing) == 1:
                name, v, o, b = failing[0]
                state = f"does not fire; one condition short: {name} {v:.4f} (needs {o} {b}), {abs(v - b):.4f} away"
            else:
                state = f"does not fire; {len(failing)} conditions short"
            print(f"  {term:20s} {state}")
            print("    " + ", ".join(f"{n} {v:.4f} {o} {b}" + ("" if k else " (no)") for (n, v, o, b), k in zip(conds, ok)))


if __name__ == "__main__":
    main()

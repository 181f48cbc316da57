"""`ctsdk inspect SOURCE` - list the series in a DICOM source and describe the chosen one."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ..errors import MixedSeriesError
from ._common import emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk inspect ../shared/data/dicom/covid-ct-md/covid-P001
  ctsdk inspect ../shared/data/dicom/covid-ct-md/covid-P001 --json
  ctsdk inspect SERIES_DIR --series-uid SERIES_UID --allow-gaps
  (SERIES_DIR: a DICOM folder or file; SERIES_UID: one of the UIDs it lists)

\b
Exit codes: 0 a series was described; 2 no usable series, an ambiguous choice (the listing is
printed first) or bad input (one line on stderr)."""


def _mm(values: Any, digits: int = 2) -> str:
    """``[a, b, ...]`` rounded for people (``-52.10000000000002`` -> ``-52.1``)."""
    return "[" + ", ".join(f"{round(float(v), digits):g}" for v in values) + "]"


def inspect_source(source: str, series_uid: Optional[str] = None, *, allow_gaps: bool = False) -> Dict[str, Any]:
    """Everything `ctsdk inspect` prints, as one JSON-safe dict."""
    from ..eligibility import check
    from ..io.reader import inspect_and_load
    from ..io.decoders import syntax_name
    from ..io.geometry import orientation_label

    try:
        infos, vol = inspect_and_load(source, series_uid, allow_gaps=allow_gaps)
    except MixedSeriesError as exc:
        if series_uid is not None:
            raise
        return _listing_only(source, exc)
    elig = check(vol)
    summary = vol.summary()
    d = vol.direction
    iop = [float(v) for v in (*d[:, 0], *d[:, 1])]
    chosen = next((i for i in infos if i.uid == vol.meta.series_uid), None)
    return {
        "source": str(source),
        "series": [{k: v for k, v in i.to_dict().items() if k != "skipped"} for i in infos],
        "skipped": list(infos[0].skipped) if infos else [],
        "chosen": vol.meta.series_uid,
        "reason": (f"selected by series_uid {series_uid}" if series_uid else (chosen.reason if chosen else "")),
        "shape": summary["shape"],
        "spacing_mm": summary["spacing_mm"],
        "uniform_z": summary["uniform_z"],
        "z_range_mm": summary["z_range_mm"],
        "orientation": orientation_label(iop),
        "origin": summary["origin"],
        "direction": summary["direction"],
        "transfer_syntaxes": [f"{u} ({syntax_name(u)})" for u in vol.meta.transfer_syntaxes],
        "hu_dtype": summary["hu_dtype"],
        "hu_range": summary["hu_range"],
        "meta": summary["meta"],
        "eligible": elig.eligible,
        "eligibility": elig.to_dict(),
        "warnings": list(vol.warnings),
    }


def _listing_only(source: str, exc: Exception) -> Dict[str, Any]:
    """Payload when no series can be chosen (a tie): the listing, no volume, and the error."""
    from ..io import list_series

    infos = list_series(source)
    return {
        "source": str(source),
        "series": [{k: v for k, v in i.to_dict().items() if k != "skipped"} for i in infos],
        "skipped": list(infos[0].skipped) if infos else [],
        "chosen": None, "reason": str(exc), "shape": None, "spacing_mm": None, "eligible": False,
        "error": str(exc), "_error": exc,
    }


def _human(p: Dict[str, Any]) -> str:
    lines = [f"source: {p['source']}", f"series found: {len(p['series'])}"]
    for s in p["series"]:
        mark = "*" if s["uid"] == p["chosen"] else " "
        lines.append(f" {mark} {s['uid']}  {s['modality'] or '?'} {s['orientation']} {s['n_files']} planes "
                     f"{'x'.join(str(v) for v in s['shape'][1:])}  {s['description']!r}")
    if p["chosen"] is None:
        lines.append(f"no series chosen: {p['reason']}")
        return "\n".join(lines)
    lines += [
        f"chosen: {p['chosen']} ({p['reason']})",
        f"shape (z, y, x): {tuple(p['shape'])}   spacing (z, y, x) mm: {tuple(round(float(v), 4) for v in p['spacing_mm'])}"
        f"{'' if p['uniform_z'] else '  (uneven z)'}",
        f"orientation: {p['orientation']} (canonical LPS)   z range mm: {_mm(p['z_range_mm'])}",
        f"transfer syntax: {', '.join(p['transfer_syntaxes'])}",
        f"HU range: {p['hu_range']} ({p['hu_dtype']})",
        f"eligible: {'yes' if p['eligible'] else 'no'}",
    ]
    lines += [f"  - {r}" for r in p["eligibility"]["reasons"]]
    if p["warnings"]:
        lines.append(f"warnings ({len(p['warnings'])}):")
        lines += [f"  - {w}" for w in p["warnings"]]
    return "\n".join(lines)


@click.command("inspect", epilog=EXAMPLES)
@click.argument("source", type=click.Path(exists=True))
@click.option("--series-uid", default=None, help="Describe this series instead of the default choice.")
@click.option("--allow-gaps", is_flag=True, help="Load series with missing slices (warning instead of error).")
@json_option
@handle_errors
def inspect(source: str, series_uid: Optional[str], allow_gaps: bool, as_json: bool) -> None:
    """List the series in SOURCE (folder or file) and describe the chosen one."""
    payload = inspect_source(source, series_uid, allow_gaps=allow_gaps)
    error = payload.pop("_error", None)
    emit(payload, as_json, _human)
    if error is not None:
        raise error  # listing printed; exit 2 with the one-line reason

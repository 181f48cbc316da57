"""Batch triage of an archive folder into JSON lines (``ctsdk triage-batch``).

Three reusable pieces (a cluster engine writes the same lines through the same writer):

- :func:`discover_series` walks ROOT and returns one :class:`SeriesRef` per series: the DICOM files
  of each folder grouped by SeriesInstanceUID (a folder of mixed files becomes its series), and
  one error ref per file that is not readable DICOM.
- :class:`JsonlWriter` appends one JSON object per line, flushed and fsynced per line, so an
  interrupted run loses at most the line being written; :meth:`JsonlWriter.done_keys` reads the
  keys already written (``--resume``), ignoring a torn last line.
- :func:`make_record` / :func:`error_record` build the line for a series.

:func:`run_batch` ties them together with a process pool (one triage engine per worker process,
paths travel, never volumes; the driver alone writes the file), a tqdm bar with rate and ETA, and
a :class:`BatchSummary` (table + label-distribution PNG).
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

from ..errors import ConfigError, CorruptFileError, CtsdkError, NotDicomError, ResultWriteError, whole_number

log = logging.getLogger("sdk.integration.batch")

PathLike = Union[str, Path]

__all__ = ["SeriesRef", "discover_series", "JsonlWriter", "make_record", "error_record", "run_batch", "BatchOptions",
           "triage_one", "failing_fn", "check_workers", "MAX_WORKERS",
           "BatchSummary", "NON_DICOM_SUFFIXES"]

#: Files with these suffixes are documentation or companion data, not candidate DICOM: they are
#: counted as skipped, not reported as bad inputs.
NON_DICOM_SUFFIXES = frozenset({".md", ".txt", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".npy", ".npz", ".nrrd",
                                ".nii", ".gz", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".py", ".zip", ".html",
                                ".yaml", ".yml", ".log", ".ini", ".cfg"})
#: Extension-less documentation files found in archives (licences, readmes): skipped, not errors.
NON_DICOM_NAMES = frozenset({"license", "licence", "readme", "notice", "copying", "authors", "changelog"})
_HEADER_TAGS = ["SeriesInstanceUID", "SOPClassUID", "Modality", "SeriesDescription"]


@dataclass(frozen=True)
class SeriesRef:
    """One unit of batch work: a series (its files) or an unreadable file (``error`` set)."""

    key: str
    path: str
    files: Tuple[str, ...]
    uid: str = ""
    modality: str = ""
    error: Optional[Dict[str, str]] = None


def _header(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            raise NotDicomError("empty file (0 bytes)", path, "not a DICOM instance")
        return pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        try:  # ACR-NEMA style files have no preamble; accept them when they parse as a data set
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        except Exception as exc:
            raise NotDicomError(f"not DICOM ({exc})", path, "no DICM prefix and no parsable data set") from exc
        if len(ds) == 0 or not any(k in ds for k in ("Rows", "SOPClassUID", "Modality", "SeriesInstanceUID")):
            raise NotDicomError("not DICOM (no preamble/DICM prefix and no DICOM elements)", path,
                                "is it a text, image or other file named like DICOM?")
        return ds
    except CtsdkError:
        raise
    except Exception as exc:
        raise CorruptFileError(f"cannot parse the DICOM header ({type(exc).__name__}: {exc})", path,
                               "the file is truncated or damaged") from exc


def _regroup_split_series(groups: Dict[str, List[str]], info: Dict[str, Tuple[str, str]]) -> None:
    """Single-file groups of one folder that the reader reads as one series (an anonymiser gave
    every file its own SeriesInstanceUID: :func:`sdk.io.reader._merge_split_series`) become one
    group, keyed by the reader's id, so the batch triages the series once instead of each file.
    Only asked where a folder holds at least ``MIN_SPLIT_SERIES`` single-file groups; a folder the
    reader cannot group keeps the header grouping."""
    from ..io import regroup_single_files

    singles = {groups[k][0]: k for k, files in groups.items() if len(files) == 1}
    for uid, files in regroup_single_files(list(singles)):
        modality = info[singles[files[0]]][1]
        for f in files:
            key = singles[f]
            del groups[key], info[key]
        groups[uid] = list(files)
        info[uid] = (uid, modality)


def discover_series(root: PathLike) -> Tuple[List[SeriesRef], int]:
    """Every series under ``root`` (sorted, stable keys) and the number of non-DICOM files skipped.

    Keys: ``<folder relative to root>::<SeriesInstanceUID>`` for series (``::no-uid-<sop class>``
    when the files carry no SeriesInstanceUID) and ``<file relative to root>`` for files that are
    not readable DICOM. Keys do not depend on file order or time, so ``--resume`` matches them.
    """
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: no such folder; give the archive root to triage")
    if root.is_file():
        folders = [(root.parent, [root.name])]
        base = root.parent
    else:
        base = root
        folders = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            folders.append((Path(dirpath), sorted(f for f in filenames if not f.startswith("."))))
    refs: List[SeriesRef] = []
    skipped = 0
    for folder, names in sorted(folders, key=lambda t: str(t[0])):
        rel_folder = folder.relative_to(base).as_posix() or "."
        groups: Dict[str, List[str]] = {}
        info: Dict[str, Tuple[str, str]] = {}
        for name in names:
            path = folder / name
            if (path.suffix.lower() in NON_DICOM_SUFFIXES or path.name.lower() in NON_DICOM_NAMES
                    or not path.is_file()):
                skipped += 1
                continue
            try:
                ds = _header(path)
            except CtsdkError as exc:
                refs.append(SeriesRef(key=path.relative_to(base).as_posix(), path=str(path), files=(str(path),),
                                      error={"type": type(exc).__name__, "message": str(exc)}))
                continue
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            gkey = uid if uid else "no-uid-" + hashlib.sha256(str(ds.get("SOPClassUID", "")).encode()).hexdigest()[:8]
            groups.setdefault(gkey, []).append(str(path))
            info.setdefault(gkey, (uid, str(ds.get("Modality", "") or "")))
        _regroup_split_series(groups, info)
        for gkey in sorted(groups):
            uid, modality = info[gkey]
            refs.append(SeriesRef(key=f"{rel_folder}::{gkey}", path=str(folder), files=tuple(groups[gkey]),
                                  uid=uid, modality=modality))
    refs.sort(key=lambda r: r.key)
    return refs, skipped


class JsonlWriter:
    """Append-only JSONL file: one record per line, flushed and fsynced per line.

    Use as a context manager. Safe against torn writes: a partial last line from an interrupted
    run is left alone (isolated by a newline) and ignored by :meth:`done_keys`.
    """

    def __init__(self, path: PathLike, key_field: str = "key"):
        self.path = Path(path)
        self.key_field = key_field
        self._fh: Any = None

    @staticmethod
    def read(path: PathLike) -> List[Dict[str, Any]]:
        """Every complete, valid JSON line of ``path`` (torn or invalid lines are skipped)."""
        p = Path(path)
        if not p.exists():
            return []
        out = []
        with open(p, "r", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    continue  # torn last line
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def done_keys(self) -> Set[str]:
        return {str(r[self.key_field]) for r in self.read(self.path) if self.key_field in r}

    def open(self) -> "JsonlWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+b")
        self._fh.seek(0, os.SEEK_END)
        if self._fh.tell() > 0:
            self._fh.seek(-1, os.SEEK_END)
            if self._fh.read(1) != b"\n":  # torn line from a killed run: isolate it
                self._fh.write(b"\n")
        return self

    def write(self, record: Dict[str, Any]) -> None:
        if self._fh is None:
            raise ResultWriteError(f"{self.path}: writer is not open (use it as a context manager)")
        if self.key_field not in record:
            raise ResultWriteError(f"{self.path}: record lacks the key field {self.key_field!r}")
        line = self.encode(record) + "\n"
        try:
            self._fh.write(line.encode("utf-8"))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise ResultWriteError(f"{self.path}: cannot append a result line ({exc})") from exc

    @staticmethod
    def encode(record: Dict[str, Any]) -> str:
        """One result line (compact JSON, NumPy values converted), without the newline."""
        from .storage import json_default

        return json.dumps(record, default=json_default, separators=(",", ":"), allow_nan=True)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "JsonlWriter":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _base_record(ref: SeriesRef) -> Dict[str, Any]:
    return {"key": ref.key, "path": ref.path, "n_files": len(ref.files), "uid": ref.uid, "modality": ref.modality}


def make_record(ref: SeriesRef, result: Dict[str, Any], wall_ms: float) -> Dict[str, Any]:
    """The JSONL line of a triaged series (``result`` is ``TriageResult.to_dict()`` or similar)."""
    rec = _base_record(ref)
    rec.update({
        "label": result.get("label"),
        "probabilities": result.get("probabilities", {}),
        "eligible": result.get("eligible"),
        "reasons": result.get("reasons", []),
        "timings_ms": result.get("timings_ms", {}),
        "wall_ms": round(float(wall_ms), 1),
        "runtime": result.get("runtime", {}),
        "warnings": len(result.get("warnings", []) or []),
        "error": None,
    })
    if result.get("series_uid"):
        rec["uid"] = result["series_uid"]
    return rec


def error_record(ref: SeriesRef, exc_type: str, message: str, wall_ms: float = 0.0) -> Dict[str, Any]:
    """The JSONL line of a series (or file) that could not be triaged."""
    rec = _base_record(ref)
    rec.update({"label": None, "probabilities": {}, "eligible": None, "reasons": [], "timings_ms": {},
                "wall_ms": round(float(wall_ms), 1), "error": {"type": exc_type, "message": message}})
    return rec


# --- workers ------------------------------------------------------------------------------------
#: Most workers one run may start: ``triage-batch --workers`` (local processes or Ray actors) and
#: ``listen --workers`` (threads or Ray actors). Every worker loads its own triage model (~0.5 GB
#: resident with the default bundle, docs/benchmarks/cpu.md), so 1024 workers already need ~0.5 TB
#: - more than one machine has, and a Ray pool is capped at what the cluster hosts anyway; a larger
#: number is a typo that would spawn processes / threads until memory or the process table ran out.
MAX_WORKERS = 1024
_WORKER_FN: Optional[Callable[..., Any]] = None


def check_workers(workers: Any) -> int:
    """``workers`` as an int, or a ConfigError naming ``--workers``, the value and 1 to
    :data:`MAX_WORKERS`: the one check of the worker count of :func:`run_batch`,
    :func:`sdk.cluster.run_batch_ray` and :class:`sdk.integration.listener.ListenerConfig`."""
    return int(whole_number("--workers", workers, maximum=MAX_WORKERS, allow_none=False,  # type: ignore[arg-type]
                            what="worker processes, Ray actors or listener threads, one model each"))


def _init_worker(factory_spec: Optional[str], log_level: int) -> None:
    global _WORKER_FN
    logging.getLogger("sdk").setLevel(log_level)
    from .listener import load_triage_factory

    try:
        _WORKER_FN = load_triage_factory(factory_spec)()
    except Exception as exc:  # reported per series, so every line says why
        _WORKER_FN = failing_fn(exc)


def failing_fn(exc: BaseException) -> Callable[..., Any]:
    def fn(files: Sequence[Path]) -> Any:
        raise exc

    return fn


def triage_one(ref: SeriesRef, fn: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Run one ref through the worker's triage function; never raises (errors become lines)."""
    from .triage_fns import normalise_output

    fn = fn or _WORKER_FN
    if ref.error is not None:
        return error_record(ref, ref.error["type"], ref.error["message"])
    t0 = time.perf_counter()
    try:
        if fn is None:
            raise ConfigError("batch worker has no triage function (initialiser did not run)")
        out = normalise_output(fn([Path(f) for f in ref.files]))
        return make_record(ref, out.result, (time.perf_counter() - t0) * 1000)
    except Exception as exc:
        return error_record(ref, type(exc).__name__, str(exc), (time.perf_counter() - t0) * 1000)


# --- summary ------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    """Counts of a batch run (this run's lines plus, for the table, every line in the file)."""

    out: str
    discovered: int
    processed: int
    skipped_resume: int
    skipped_non_dicom: int
    labels: Dict[str, int]
    errors: Dict[str, int]
    wall_s: float
    mean_series_ms: Optional[float]
    png: Optional[str] = None
    interrupted: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def table(self) -> str:
        rows = [("series discovered", self.discovered), ("processed this run", self.processed),
                ("skipped (already in file, --resume)", self.skipped_resume),
                ("non-DICOM files ignored", self.skipped_non_dicom)]
        rows += [(f"label {k}", v) for k, v in sorted(self.labels.items())]
        rows += [(f"error {k}", v) for k, v in sorted(self.errors.items())]
        rows += [("wall time (s)", f"{self.wall_s:.1f}"),
                 ("mean per processed series (ms)", "-" if self.mean_series_ms is None else f"{self.mean_series_ms:.0f}")]
        w = max(len(r[0]) for r in rows)
        lines = [f"{name:<{w}}  {val}" for name, val in rows]
        if self.png:
            lines.append(f"label distribution: {self.png}")
        lines.append(f"results: {self.out}")
        if self.interrupted:
            lines.append("INTERRUPTED: rerun with --resume to finish")
        return "\n".join(lines)


def label_png(records: Sequence[Dict[str, Any]], path: Path, title: str) -> Path:
    """Bar chart of labels (errors as ``error:<type>``) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    counts = Counter(_outcome(r) for r in records)
    names = sorted(counts)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.5))
    bars = ax.bar(range(len(names)), [counts[n] for n in names],
                  color=["#c0392b" if n.startswith("error") else "#2c7fb8" for n in names])
    ax.bar_label(bars)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("series")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=90)
    except OSError as exc:
        raise ResultWriteError(f"{path}: cannot write the label distribution PNG ({exc})") from exc
    finally:
        plt.close(fig)
    return path


def _outcome(r: Dict[str, Any]) -> str:
    if r.get("error"):
        return f"error:{r['error'].get('type', '?')}"
    return str(r.get("label"))


# --- driver -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchOptions:
    """What every batch engine shares (local processes: :func:`run_batch`; Ray:
    :func:`sdk.cluster.run_batch_ray`).

    Attributes:
        resume: skip series whose key is already in ``out``.
        overwrite: start ``out`` afresh when it exists (else an existing file needs ``resume``).
        triage_fn: ``module:attr`` of a triage function or factory (None: :class:`sdk.triage.Triage`).
        progress: tqdm bar on stderr (rate, ETA).
        png: write the label PNG beside ``out`` (``<stem>.labels.png``).
    """

    resume: bool = False
    overwrite: bool = False
    triage_fn: Optional[str] = None
    progress: bool = True
    png: bool = True

    def prepare_output(self, out: PathLike) -> Path:
        """Check ``out`` against resume / overwrite (ConfigError) and remove it for a fresh start."""
        out = Path(out)
        if out.exists() and out.stat().st_size > 0 and not (self.resume or self.overwrite):
            raise ConfigError(f"{out} exists; pass --resume to continue it or --overwrite to start again")
        if self.overwrite and not self.resume and out.exists():
            out.unlink()
        return out


def run_batch(
    root: PathLike,
    out: PathLike,
    options: BatchOptions = BatchOptions(),
    *,
    workers: int = 1,
    discovered: Optional[Tuple[List[SeriesRef], int]] = None,
) -> BatchSummary:
    """Triage every series under ``root`` into the JSONL file ``out``.

    Args:
        root: archive folder (or one file).
        out: JSONL path; the PNG goes beside it as ``<stem>.labels.png``.
        options: resume / overwrite / triage function / progress / PNG (:class:`BatchOptions`,
            shared with the Ray engine).
        workers: worker processes (1: in this process, no pool), at most :data:`MAX_WORKERS`.
        discovered: ``(refs, skipped)`` found elsewhere (``--manifest``:
            :func:`sdk.cluster.manifest.discover_manifest`); ``root`` is then not walked.

    Raises:
        ConfigError: bad arguments, or ``out`` exists and neither ``resume`` nor ``overwrite``.
    """
    from tqdm import tqdm

    workers = check_workers(workers)
    resume, triage_fn, progress, png = options.resume, options.triage_fn, options.progress, options.png
    out = options.prepare_output(out)
    t0 = time.perf_counter()
    refs, skipped_files = discovered if discovered is not None else discover_series(root)
    writer = JsonlWriter(out)
    done = writer.done_keys() if resume else set()
    todo = [r for r in refs if r.key not in done]
    if not triage_fn:
        from .triage_fns import BATCH_TRIAGE_FN

        triage_fn = BATCH_TRIAGE_FN
    skipped_resume = len(refs) - len(todo)
    log.info("%d series under %s, %d already done, %d to triage", len(refs), root, skipped_resume, len(todo))
    processed: List[Dict[str, Any]] = []
    interrupted = False
    bar = tqdm(total=len(todo), unit="series", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               desc="triage-batch")
    pool: Optional[cf.ProcessPoolExecutor] = None
    with writer:
        try:
            if workers == 1:
                from .listener import load_triage_factory

                try:
                    fn = load_triage_factory(triage_fn)()
                except Exception as exc:
                    fn = failing_fn(exc)
                for ref in todo:
                    rec = triage_one(ref, fn)
                    writer.write(rec)
                    processed.append(rec)
                    bar.update(1)
            else:
                ctx = multiprocessing.get_context("spawn")
                pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                              initargs=(triage_fn, logging.getLogger("sdk").level))
                # bounded in flight: at most 2 x workers submitted, so memory stays flat on big archives
                pending: Set[cf.Future] = set()
                it = iter(todo)
                exhausted = False
                while pending or not exhausted:
                    while not exhausted and len(pending) < 2 * workers:
                        try:
                            ref = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        fut = pool.submit(triage_one, ref)
                        fut.ref = ref  # type: ignore[attr-defined]
                        pending.add(fut)
                    if not pending:
                        break
                    finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for fut in finished:
                        try:
                            rec = fut.result()
                        except Exception as exc:  # a worker process died (e.g. out of memory)
                            rec = error_record(fut.ref, type(exc).__name__, f"worker failed: {exc}")  # type: ignore[attr-defined]
                        writer.write(rec)
                        processed.append(rec)
                        bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: %d series written; rerun with --resume", len(processed))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=not interrupted, cancel_futures=True)
    all_records = JsonlWriter.read(out)
    labels = Counter(str(r.get("label")) for r in all_records if not r.get("error"))
    errors = Counter(str(r["error"].get("type")) for r in all_records if r.get("error"))
    walls = [float(r.get("wall_ms", 0.0)) for r in processed if not r.get("error")]
    summary = BatchSummary(out=str(out), discovered=len(refs), processed=len(processed), skipped_resume=skipped_resume,
                           skipped_non_dicom=skipped_files, labels=dict(labels), errors=dict(errors),
                           wall_s=time.perf_counter() - t0, mean_series_ms=(sum(walls) / len(walls)) if walls else None,
                           interrupted=interrupted)
    if png and all_records:
        p = out.with_name(out.stem + ".labels.png")
        summary.png = str(label_png(all_records, p, f"{len(all_records)} series in {out.name} (research use only)"))
    return summary

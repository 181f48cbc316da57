"""Durable, path-safe storage of received DICOM instances and the per-series triage state.

Layout under the listener's ``--out`` folder::

    OUT/series/<series-key>/instances/<sop-key>.dcm   one file per SOP instance (idempotent)
    OUT/series/<series-key>/instances/<sop-key>~p<hash>.dcm   the same SOPInstanceUID at another
                                                      position (an anonymiser's placeholder UID)
    OUT/series/<series-key>/results/                  result.json, sr.dcm, sc-*.dcm, heat-map PNGs
    OUT/series/<series-key>/DONE | FAILED             state marker (JSON), written atomically last
    OUT/triage-log.jsonl                              one line per triage run (audit ledger: the
                                                      marker's fields, revision, instances_digest)

Every name on disk is derived from a network value only after validation: a UID that matches the
DICOM UID grammar (PS3.5 9.1: dot-separated numbers without leading zeros, at most 64 characters)
is used as is; anything else becomes ``h-`` + a SHA-256 prefix, so a crafted value such as
``../../x`` can never name a path outside ``OUT``.

One SOPInstanceUID is one instance - a re-send replaces its file - *at one position*: anonymisers
write one placeholder UID into every file of a series, and a file that arrives with a UID already
stored at another ImagePositionPatient is a distinct slice, kept under its own name (the reader's
duplicate rule, docs/ingest.md), not written over the first.

Writes are durable before they are acknowledged: temp file in the same folder, ``fsync``, atomic
``os.replace``, then ``fsync`` of the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

from ..errors import ConfigError

PathLike = Union[str, Path]

__all__ = [
    "UID_RE",
    "is_valid_uid",
    "safe_key",
    "atomic_write_bytes",
    "atomic_write_json",
    "append_jsonl_line",
    "SeriesStore",
    "StoredInstance",
    "position_token",
    "utc_now",
]

#: DICOM UID grammar (PS3.5 section 9.1).
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

DONE_MARKER = "DONE"
FAILED_MARKER = "FAILED"
INSTANCE_SUFFIX = ".dcm"


def is_valid_uid(value: Any) -> bool:
    """True when ``value`` is a str of at most 64 characters following the DICOM UID grammar."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.match(value) is not None


def safe_key(value: Any, fallback_seed: bytes = b"") -> str:
    """A file-name-safe key for a value received from the network.

    A valid UID is returned unchanged (digits and dots only, so it cannot contain a separator or
    ``..`` as a whole component). Anything else - empty, too long, ``../../x``, NUL bytes - becomes
    ``h-<24 hex>`` of the SHA-256 of its repr (plus ``fallback_seed`` when the value is empty, so
    distinct empty-UID objects do not collide).
    """
    if is_valid_uid(value):
        return str(value)
    raw = repr(value).encode("utf-8", "surrogatepass")
    if not value:
        raw += b"|" + fallback_seed
    return "h-" + hashlib.sha256(raw).hexdigest()[:24]


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` durably: temp file in the same folder, fsync, rename, fsync dir.

    A reader never sees a partial file; after return the content survives a crash or power loss
    (as far as the file system honours fsync).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: PathLike, payload: Dict[str, Any]) -> Path:
    """:func:`atomic_write_bytes` of a pretty JSON document."""
    return atomic_write_bytes(path, (json.dumps(payload, indent=2, default=json_default) + "\n").encode())


def append_jsonl_line(path: PathLike, payload: Dict[str, Any], lock: Optional[threading.Lock] = None) -> None:
    """Append one JSON line and flush + fsync it (an interrupted writer loses at most this line)."""
    line = json.dumps(payload, default=json_default, separators=(",", ":")) + "\n"
    if "\n" in line[:-1]:  # json.dumps never emits raw newlines, but be explicit about the contract
        raise ConfigError(f"{path}: a JSONL record must be one line")
    ctx = lock if lock is not None else _NullLock()
    with ctx:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def utc_now() -> str:
    """The time now as the listener's files write it: ``YYYY-MM-DDTHH:MM:SSZ`` (UTC)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def position_token(position: Any) -> Optional[str]:
    """ImagePositionPatient as a comparable token, rounded to 0.01 mm as the reader compares
    positions; None when absent or not three numbers."""
    try:
        values = [float(v) for v in position]
    except (TypeError, ValueError):
        return None
    if len(values) != 3:
        return None
    return "\\".join(f"{v:.2f}" for v in values)


def _read_position(path: Path) -> Optional[str]:
    """The position token of a stored instance (read back after a restart), None if unreadable."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        return position_token(ds.get("ImagePositionPatient"))
    except Exception:  # an unreadable file has no position to compare: the re-send replaces it
        return None


def instance_set_digest(names: Iterable[str]) -> str:
    """Order-independent digest of a series' instance file names (what a DONE marker covers)."""
    h = hashlib.sha256()
    for n in sorted(names):
        h.update(n.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class StoredInstance:
    """Where one received instance went and whether it was new."""

    series_key: str
    path: Path
    is_new: bool
    #: True when the SOPInstanceUID was already stored at another position and this file is now
    #: kept beside it under its own name (an anonymiser's placeholder UID); False for its re-sends
    uid_reused: bool = False


class SeriesStore:
    """The on-disk state of a listener: instances grouped in series folders plus state markers.

    Thread-safe: the C-STORE handlers (one thread per association) and the triage workers share
    one store. The in-memory instance sets mirror the disk and are rebuilt from it on start.
    """

    def __init__(self, root: PathLike):
        self.root = Path(root).resolve()
        self.series_root = self.root / "series"
        self.series_root.mkdir(parents=True, exist_ok=True)
        self.ledger = self.root / "triage-log.jsonl"
        self._lock = threading.Lock()
        self._ledger_lock = threading.Lock()
        self._marker_lock = threading.Lock()  # mark() and update_marker() rewrite one marker at a time
        self._instances: Dict[str, Set[str]] = {}
        self._versions: Dict[str, int] = {}  # +1 per new instance: cheap "did anything arrive?"
        self._last_arrival: Dict[str, float] = {}
        self._positions: Dict[Tuple[str, str], Optional[str]] = {}  # (series, file) -> position token
        self._writing: Dict[str, int] = {}  # series -> writes in flight (a merge waits for none)
        self._rescan()

    # --- paths ------------------------------------------------------------------------------
    def series_dir(self, series_key: str) -> Path:
        p = (self.series_root / series_key).resolve()
        if p.parent != self.series_root:  # defence in depth: keys come from safe_key()
            raise ConfigError(f"series key {series_key!r} would leave {self.series_root}; refusing it")
        return p

    def instances_dir(self, series_key: str) -> Path:
        return self.series_dir(series_key) / "instances"

    def results_dir(self, series_key: str) -> Path:
        return self.series_dir(series_key) / "results"

    # --- receiving --------------------------------------------------------------------------
    def store(self, series_uid: Any, sop_uid: Any, encoded: bytes, position: Optional[str] = None) -> StoredInstance:
        """Durably store one encoded DICOM file (preamble + meta + data set) under its series.

        Names come from :func:`safe_key`; re-sending an instance replaces the same file (exactly
        one file per SOPInstanceUID and position). ``position`` (:func:`position_token` of the
        file's ImagePositionPatient) tells a re-send from another slice that carries the same UID:
        that one is kept under ``<sop-key>~p<hash>.dcm``. Returns only after the bytes and the
        rename are on disk.
        """
        seed = hashlib.sha256(encoded).digest()
        series_key = safe_key(series_uid, b"series")
        sop_key = safe_key(sop_uid, seed)
        folder = self.instances_dir(series_key)
        with self._lock:
            name, reused = self._claim_name(series_key, sop_key, position)
            self._writing[series_key] = self._writing.get(series_key, 0) + 1
        try:
            target = (folder / name).resolve()
            if target.parent != folder:
                raise ConfigError(f"instance name {name!r} would leave {folder}; refusing it")
            atomic_write_bytes(target, encoded)
        finally:
            with self._lock:
                self._writing[series_key] -= 1
        with self._lock:
            names = self._instances.setdefault(series_key, set())
            is_new = name not in names
            names.add(name)
            if is_new:
                self._versions[series_key] = self._versions.get(series_key, 0) + 1
                self._last_arrival[series_key] = time.monotonic()
            else:
                self._last_arrival.setdefault(series_key, time.monotonic())
        return StoredInstance(series_key, target, is_new, reused)

    def _claim_name(self, series_key: str, sop_key: str, position: Optional[str]) -> Tuple[str, bool]:
        """The file name for an instance (called under the lock; the position is recorded at once,
        so two associations storing one UID at two positions at the same time get two names)."""
        base = sop_key + INSTANCE_SUFFIX
        if position is None:
            return base, False
        key = (series_key, base)
        if key not in self._positions:
            on_disk = base in self._instances.get(series_key, ())
            self._positions[key] = _read_position(self.instances_dir(series_key) / base) if on_disk else position
        known = self._positions[key]
        if known is None or known == position:
            self._positions[key] = position
            return base, False
        alt = f"{sop_key}~p{hashlib.sha256(position.encode()).hexdigest()[:12]}{INSTANCE_SUFFIX}"
        self._positions[(series_key, alt)] = position
        return alt, alt not in self._instances.get(series_key, ())  # a re-send of it is no news

    def merge_series(self, sources: Sequence[str], into: str) -> Optional[List[str]]:
        """Move every instance of the series ``sources`` into the series ``into`` and remove the
        emptied series folders; returns the instance names of ``into``, or None (nothing moved)
        while an instance of a source is being written - ask again later.

        For series that are one series split by per-file SeriesInstanceUIDs (the listener asks
        :func:`sdk.io.series_files` first). Only for series that were never triaged: their folders
        hold instances and nothing else. A name already taken in ``into`` gets the source's key
        as a suffix; every move is an atomic rename within ``OUT``. The store's lock is held
        throughout, so no instance is written into a source while it is moved and removed.
        """
        if into in sources:
            raise ConfigError(f"cannot merge series {into!r} into itself")
        dest = self.instances_dir(into)
        with self._lock:
            if any(self._writing.get(src, 0) for src in sources):
                return None
            dest.mkdir(parents=True, exist_ok=True)
            taken = set(self._instances.get(into, ()))
            moved: Set[str] = set()
            for src in sources:
                for name in sorted(self._instances.get(src, ())):
                    target = name
                    if target in taken:
                        suffix = hashlib.sha256(src.encode()).hexdigest()[:8]
                        target = f"{name[:-len(INSTANCE_SUFFIX)]}~s{suffix}{INSTANCE_SUFFIX}"
                    os.replace(self.instances_dir(src) / name, dest / target)
                    taken.add(target)
                    moved.add(target)
            _fsync_dir(dest)
            for src in sources:
                shutil.rmtree(self.series_dir(src))
            _fsync_dir(self.series_root)
            self._instances[into] = taken
            self._versions[into] = self._versions.get(into, 0) + len(moved)
            arrivals = [self._last_arrival[s] for s in sources if s in self._last_arrival]
            self._last_arrival[into] = max(arrivals) if arrivals else time.monotonic()
            for src in sources:
                self._instances.pop(src, None)
                self._versions.pop(src, None)
                self._last_arrival.pop(src, None)
            self._positions = {k: v for k, v in self._positions.items() if k[0] not in sources}
            return sorted(taken)

    # --- state ------------------------------------------------------------------------------
    def _rescan(self) -> None:
        """Rebuild the in-memory instance sets from disk (called once at start)."""
        now = time.monotonic()
        for d in sorted(self.series_root.iterdir()) if self.series_root.exists() else []:
            inst = d / "instances"
            if not d.is_dir() or not inst.is_dir():
                continue
            names = {p.name for p in inst.iterdir() if p.name.endswith(INSTANCE_SUFFIX) and not p.name.startswith(".")}
            self._instances[d.name] = names
            # a restart restarts every quiet period: a series interrupted mid-transfer gets the
            # full quiet period for its sender to resume before it is triaged
            self._last_arrival[d.name] = now
            for tmp in inst.glob(".*.tmp"):  # partial writes of a crash were never acknowledged
                try:
                    tmp.unlink()
                except OSError:
                    pass

    def series_keys(self) -> List[str]:
        with self._lock:
            return sorted(self._instances)

    def instance_names(self, series_key: str) -> List[str]:
        with self._lock:
            return sorted(self._instances.get(series_key, ()))

    def version(self, series_key: str) -> int:
        """Counter bumped by every new instance of the series (0 after a restart)."""
        with self._lock:
            return self._versions.get(series_key, 0)

    def snapshot(self, series_key: str) -> Tuple[List[str], int]:
        """(instance names, version) read together, so a marker can say exactly what it covers."""
        with self._lock:
            return sorted(self._instances.get(series_key, ())), self._versions.get(series_key, 0)

    def instance_paths(self, series_key: str) -> List[Path]:
        folder = self.instances_dir(series_key)
        return [folder / n for n in self.instance_names(series_key)]

    def seconds_since_arrival(self, series_key: str) -> float:
        with self._lock:
            t = self._last_arrival.get(series_key)
        return float("inf") if t is None else time.monotonic() - t

    def marker(self, series_key: str) -> Optional[Dict[str, Any]]:
        """The DONE or FAILED marker of a series (with its ``state``), or None while pending."""
        d = self.series_dir(series_key)
        for name, state in ((DONE_MARKER, "done"), (FAILED_MARKER, "failed")):
            p = d / name
            if p.exists():
                try:
                    m = json.loads(p.read_text())
                except (OSError, ValueError):
                    return None  # unreadable marker = not finished (the rename is atomic, so rare)
                m["state"] = state
                return m
        return None

    def is_settled(self, series_key: str) -> bool:
        """True when a DONE/FAILED marker covers exactly the instances now on disk."""
        m = self.marker(series_key)
        if m is None:
            return False
        return m.get("instances_digest") == instance_set_digest(self.instance_names(series_key))

    def mark(self, series_key: str, state: str, names: List[str], extra: Dict[str, Any]) -> Dict[str, Any]:
        """Write the DONE (or FAILED) marker atomically, removing the other one; returns what was
        written (its ``revision`` and ``instances_digest`` go into the ledger line)."""
        if state not in ("done", "failed"):
            raise ConfigError(f"unknown series state {state!r}; expected 'done' or 'failed'")
        d = self.series_dir(series_key)
        with self._marker_lock:
            prev = self.marker(series_key)
            payload = {
                "series_key": series_key,
                "n_instances": len(names),
                "instances_digest": instance_set_digest(names),
                "revision": int(prev.get("revision", 0)) + 1 if prev else 1,
                "finished_at": utc_now(),
                **extra,
            }
            name = DONE_MARKER if state == "done" else FAILED_MARKER
            other = FAILED_MARKER if state == "done" else DONE_MARKER
            atomic_write_json(d / name, payload)
            try:
                (d / other).unlink()
                _fsync_dir(d)
            except FileNotFoundError:
                pass
            return payload

    def update_marker(self, series_key: str, changes: Dict[str, Any], remove: Sequence[str] = (),
                      expect_revision: Optional[int] = None) -> bool:
        """Rewrite the DONE marker atomically with ``changes`` set and ``remove`` dropped, keeping
        its revision and instance digest (what it covers does not change; e.g. a forward retry's
        outcome). False, nothing written, when there is no DONE marker or its revision is not
        ``expect_revision`` (the series was triaged again meanwhile)."""
        with self._marker_lock:
            m = self.marker(series_key)
            if m is None or m.get("state") != "done":
                return False
            if expect_revision is not None and int(m.get("revision", 0)) != int(expect_revision):
                return False
            m.pop("state", None)  # added by marker(), not stored
            for k in remove:
                m.pop(k, None)
            m.update({k: v for k, v in changes.items() if k not in ("revision", "instances_digest", "n_instances")})
            m["updated_at"] = utc_now()
            atomic_write_json(self.series_dir(series_key) / DONE_MARKER, m)
            return True

    def log_run(self, payload: Dict[str, Any]) -> None:
        """Append one line to the triage ledger (one line per triage run, for auditing)."""
        append_jsonl_line(self.ledger, payload, self._ledger_lock)

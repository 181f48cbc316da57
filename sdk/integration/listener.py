"""DICOM C-STORE listener (pynetdicom SCP) that triages each complete series exactly once.

Flow::

    C-STORE ─► SeriesStore.store (fsync + atomic rename) ─► 0x0000 Success to the sender
    scheduler (every ``tick_s``): a series whose newest instance is ``quiet_seconds`` old and whose
        DONE/FAILED marker does not cover exactly the instances on disk ─► bounded queue
    N workers: triage_fn(instance files) ─► results/result.json, sr.dcm, sc-*.dcm
        ─► optional C-STORE forward ─► DONE marker (atomic, written last) + ledger line
        + one INFO line per finished series
    forwarder (with ``forward``): results whose forward failed are re-sent from disk - never
        re-triaged - after each delay of ``forward_retry_s``, and again at the next start

A restart rebuilds the state from disk: series without a matching marker are triaged after a fresh
quiet period, series with one are never redone. Instances that arrive after a series was triaged
re-open it (a new revision), which is the only way a series is triaged twice.

Anonymiser damage (docs/ingest.md): a file whose SOPInstanceUID is already stored at another
position is kept as its own slice (:meth:`SeriesStore.store`); single-instance series that the
reader reads as one series - an anonymiser gave every file its own SeriesInstanceUID - are held
until no such single has arrived for a quiet period, then moved into one series folder
(:meth:`SeriesStore.merge_series`) and triaged once.

Security: calling AE titles must be on the allow-list (else A-ASSOCIATE-RJ, "calling AE title not
recognised", and a WARNING log line); opt-in, the called AE title must be ours
(``require_called_ae``); an optional source-address allow-list closes the TCP connection of any
other peer before any DICOM is read; optional TLS (server certificate, and client certificates
when a CA is given).
"""
from __future__ import annotations

import importlib
import logging
import queue
import ssl
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .._lazy import require
from ..errors import ConfigError, CtsdkError
from .batch import check_workers
from .storage import SeriesStore, atomic_write_json, instance_set_digest, position_token, utc_now
from .triage_fns import TriageFn, TriageOutput, normalise_output

log = logging.getLogger("sdk.integration.listener")

__all__ = ["ListenerConfig", "Listener", "ForwardTarget", "parse_forward", "parse_retry_schedule",
           "forward_pending", "load_triage_factory"]

# Status codes (PS3.4 Annex B / PS3.7 C.4.2)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

#: a single-instance series waits for other singles to go quiet (they may be one series split by
#: per-file SeriesInstanceUIDs) at most this many quiet periods after its own arrival
SPLIT_HOLD_MAX_PERIODS = 6.0

#: default delays (seconds) between forward attempts of one series' results in a running listener:
#: after the first failure 30 s, then 2 min, then 10 min; then no more tries until the next start
DEFAULT_FORWARD_RETRY_S: Tuple[float, ...] = (30.0, 120.0, 600.0)

#: forward attempts kept in a DONE marker (``forward.attempts``; ``forward.n_attempts`` counts all)
MAX_ATTEMPTS_KEPT = 10


@dataclass(frozen=True)
class ForwardTarget:
    """Where DICOM results are C-STOREd after each series: ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


def parse_forward(text: str, what: str = "--forward") -> ForwardTarget:
    """Parse ``HOST:PORT:AET`` (e.g. ``127.0.0.1:11112:PACS``); ``what`` names the value in errors."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT:AET, e.g. 127.0.0.1:11112:PACS")
    try:
        port = int(parts[1])
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {parts[1]!r} is not an integer") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what} {text!r}: port {port} outside 1-65535")
    if len(parts[2]) > 16:
        raise ConfigError(f"{what} {text!r}: AE title longer than 16 characters")
    return ForwardTarget(parts[0], port, parts[2])


def parse_retry_schedule(text: str) -> Tuple[float, ...]:
    """Parse ``--forward-retry``: comma-separated delays in seconds (``30,120,600``); ``none`` or
    an empty string: no retry while running (the next start still retries)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        delays = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--forward-retry {text!r}: expected delays in seconds separated by commas, "
                          "e.g. 30,120,600 (or none)") from None
    _check_retry_schedule(delays)
    return delays


def _check_retry_schedule(delays: Sequence[float]) -> None:
    try:
        bad = len(delays) > 20 or any(not 0 <= float(d) < float("inf") for d in delays)  # "not <=" also refuses NaN
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise ConfigError(f"--forward-retry {','.join(str(d) for d in delays)}: expected at most 20 delays, "
                          "each >= 0 seconds, e.g. 30,120,600")


def forward_pending(marker: Optional[Dict[str, Any]]) -> bool:
    """True when a DONE marker says the series' results were meant to be forwarded and were not
    delivered yet (``forward.state == "pending"``; a marker written before retries existed: a
    ``forward_error`` without ``forwarded_to``)."""
    if not marker or marker.get("state", "done") != "done":
        return False
    fwd = marker.get("forward")
    if isinstance(fwd, dict):
        return fwd.get("state") == "pending"
    return "forward_error" in marker and "forwarded_to" not in marker


@dataclass
class _ForwardDue:
    """A series whose results wait for a forward retry in this run."""

    at: float        # time.monotonic() of the next attempt
    failures: int    # failed attempts in this run (indexes ``forward_retry_s``)
    revision: int    # the DONE marker revision the results belong to


@dataclass
class ListenerConfig:
    """Everything ``ctsdk listen`` configures (see ``docs/integration.md``)."""

    out: Path
    port: int = 11112
    ae_title: str = "CTSDK"
    bind: str = "127.0.0.1"
    allow_ae: Tuple[str, ...] = ()
    allow_ip: Tuple[str, ...] = ()
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    tls_ca: Optional[Path] = None
    quiet_seconds: float = 10.0
    workers: int = 1
    queue_size: int = 8
    forward: Optional[ForwardTarget] = None
    #: delays (s) between forward attempts while running; after the last, the next start retries
    forward_retry_s: Tuple[float, ...] = DEFAULT_FORWARD_RETRY_S
    #: reject associations whose called AE title is not ``ae_title`` (off: senders often get it wrong)
    require_called_ae: bool = False
    dicom_results: bool = True
    max_associations: int = 16
    tick_s: float = 0.25

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port}: expected 0-65535")
        if not self.ae_title or len(self.ae_title) > 16:
            raise ConfigError(f"--ae-title {self.ae_title!r}: expected 1-16 characters")
        for aet in self.allow_ae:
            if not aet.strip() or len(aet) > 16:
                raise ConfigError(f"--allow-ae {aet!r}: expected 1-16 characters")
        if not 0 <= self.quiet_seconds < float("inf"):   # "not 0 <= x" also refuses NaN
            raise ConfigError(f"--quiet-seconds {self.quiet_seconds}: must be a finite number >= 0")
        check_workers(self.workers)
        if self.queue_size < 1:
            raise ConfigError(f"--queue-size {self.queue_size}: must be >= 1")
        _check_retry_schedule(tuple(self.forward_retry_s))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both to enable TLS")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-ca needs --tls-cert/--tls-key (the CA verifies client certificates)")
        for p in (self.tls_cert, self.tls_key, self.tls_ca):
            if p is not None and not Path(p).is_file():
                raise ConfigError(f"{p}: TLS file not found")


def load_triage_factory(spec: Optional[str]) -> Callable[[], TriageFn]:
    """Resolve ``--triage-fn module:attr`` to a factory that builds one triage function per worker.

    ``attr`` is either a factory (a callable taking no arguments and returning the triage function;
    mark it with ``is_factory = True``) or the triage function itself. ``None`` means the real
    :class:`sdk.triage.Triage` (:func:`sdk.integration.triage_fns.make_triage_fn`).
    """
    if not spec:
        from .triage_fns import make_triage_fn

        return make_triage_fn
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--triage-fn {spec!r}: expected module:function, e.g. sdk.integration.triage_fns:inventory")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--triage-fn {spec!r}: cannot import it ({exc})") from exc
    if getattr(obj, "is_factory", False):
        return obj
    return lambda: obj


class Listener:
    """A running C-STORE SCP plus its scheduler and triage workers.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``triage_factory`` builds one
    triage function per worker thread (a model is loaded once per worker, not per series).
    """

    def __init__(self, config: ListenerConfig, triage_factory: Callable[[], TriageFn]):
        config.validate()
        self.cfg = config
        self.store = SeriesStore(config.out)
        self._factory = triage_factory
        self._queue: "queue.Queue[str]" = queue.Queue(maxsize=config.queue_size)
        self._inflight: Set[str] = set()
        self._settled: Dict[str, int] = {}  # series key -> store version its marker covers
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._server: Any = None
        #: ``received``: new unique instances; ``triaged`` / ``failed``: triage runs (a series
        #: re-opened by late instances counts once per run); ``forwarded`` / ``forward_failed``:
        #: forward attempts that delivered every result / that failed (first tries and retries)
        self.counts = {"received": 0, "duplicates": 0, "refused": 0, "rejected_associations": 0,
                       "refused_connections": 0, "triaged": 0, "failed": 0, "uid_reused": 0,
                       "series_merged": 0, "forwarded": 0, "forward_failed": 0}
        self._singles_checked: frozenset = frozenset()
        self._forward_due: Dict[str, _ForwardDue] = {}  # results waiting for a forward retry
        self._forward_given_up: Set[str] = set()  # no more tries in this run (the next start retries)
        self._reused_seen: Dict[str, int] = {}  # series -> reused-UID files logged (first at WARNING)
        self._load_settled()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    # --- lifecycle ----------------------------------------------------------------------------
    def _load_settled(self) -> None:
        unforwarded: List[str] = []
        now = time.monotonic()
        for key in self.store.series_keys():
            m = self.store.marker(key)
            names, version = self.store.snapshot(key)
            if m is not None and m.get("instances_digest") == instance_set_digest(names):
                self._settled[key] = version
                if forward_pending(m):  # a restart retries every forward that never got through
                    unforwarded.append(key)
                    if self.cfg.forward is not None:
                        self._forward_due[key] = _ForwardDue(now, 0, int(m.get("revision", 0)))
        pending = [k for k in self.store.series_keys() if not self._is_settled(k)]
        if pending:
            log.info("resuming %d pending series from %s: %s", len(pending), self.store.root, ", ".join(pending[:5]))
        if unforwarded and self.cfg.forward is not None:
            log.info("%d finished series have results not yet forwarded; sending them to %s now: %s",
                     len(unforwarded), self.cfg.forward, ", ".join(unforwarded[:5]))
        elif unforwarded:
            log.warning("%d finished series have results that were never forwarded (start with --forward to "
                        "send them): %s", len(unforwarded), ", ".join(unforwarded[:5]))

    @property
    def address(self) -> Tuple[str, int]:
        """(host, port) actually bound (useful with ``port=0``)."""
        if self._server is None:
            raise ConfigError("the listener is not started; call start() first")
        return self._server.server_address[:2]

    def start(self) -> "Listener":
        pynetdicom = require("pynetdicom", "the DICOM listener")
        self._server = self._make_server(pynetdicom)
        t = threading.Thread(target=self._server.serve_forever, name="ctsdk-scp", daemon=True)
        t.start()
        self._threads.append(t)
        for i in range(self.cfg.workers):
            w = threading.Thread(target=self._worker, name=f"ctsdk-triage-{i}", daemon=True)
            w.start()
            self._threads.append(w)
        s = threading.Thread(target=self._scheduler, name="ctsdk-scheduler", daemon=True)
        s.start()
        self._threads.append(s)
        if self.cfg.forward is not None:
            f = threading.Thread(target=self._forwarder, name="ctsdk-forward", daemon=True)
            f.start()
            self._threads.append(f)
        host, port = self.address
        log.info("listening on %s:%d as %s (TLS %s); storing under %s%s", host, port, self.cfg.ae_title,
                 "on" if self.cfg.tls_cert else "off", self.store.root,
                 f"; forwarding results to {self.cfg.forward} as {self.cfg.ae_title}" if self.cfg.forward else "")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, let running triage finish (bounded by ``timeout_s``), then return."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every series on disk is settled and nothing is queued/running (tests, batch)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._inflight)
            if not busy and all(self._is_settled(k) for k in self.store.series_keys()):
                return True
            time.sleep(0.05)
        return False

    def summary(self) -> Dict[str, Any]:
        """Counters of this run (see ``counts``) plus ``series`` / ``settled`` on disk and
        ``forward_pending``: finished series whose results still wait for a forward."""
        keys = self.store.series_keys()
        with self._lock:
            counts = dict(self.counts)
            pending = len(set(self._forward_due) | self._forward_given_up)
        return {
            "out": str(self.store.root),
            "series": len(keys),
            "settled": sum(self._is_settled(k) for k in keys),
            **counts,
            "forward_pending": pending,
        }

    # --- network side -------------------------------------------------------------------------
    def _ssl_context(self) -> Optional[ssl.SSLContext]:
        if self.cfg.tls_cert is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.cfg.tls_cert), str(self.cfg.tls_key))
        if self.cfg.tls_ca is not None:
            ctx.load_verify_locations(str(self.cfg.tls_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _make_server(self, pynetdicom: Any) -> Any:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
        from pynetdicom.transport import ThreadedAssociationServer

        allow_ip = set(self.cfg.allow_ip)
        listener = self

        class _Server(ThreadedAssociationServer):  # type: ignore[misc, valid-type]
            def verify_request(self, request: Any, client_address: Any) -> bool:
                ip = client_address[0] if isinstance(client_address, tuple) else str(client_address)
                if allow_ip and ip not in allow_ip:
                    listener._count("refused_connections")
                    log.warning("refused connection from %s: address not in --allow-ip", ip)
                    return False
                return True

        ae = AE(ae_title=self.cfg.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.cfg.allow_ae:
            ae.require_calling_aet = list(self.cfg.allow_ae)
        ae.require_called_aet = bool(self.cfg.require_called_ae)
        ae.maximum_associations = self.cfg.max_associations
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 120
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        server = ae.make_server((self.cfg.bind, self.cfg.port), ssl_context=self._ssl_context(),
                                evt_handlers=handlers, server_class=_Server)
        ae._servers.append(server)  # as AE.start_server does; server.shutdown() removes it again
        return server

    def _on_accepted(self, event: Any) -> None:
        rq = event.assoc.requestor
        # DEBUG: some senders open one association per instance; the finished-series line says what arrived
        log.debug("association accepted from %s (%s)", rq.ae_title, rq.address)

    def _on_rejected(self, event: Any) -> None:
        rq = event.assoc.requestor
        self._count("rejected_associations")
        log.warning("rejected association from calling AE %r at %s: %s", rq.ae_title, rq.address,
                    self._rejection_reason(rq))

    def _rejection_reason(self, rq: Any) -> str:
        """Why pynetdicom rejected an association (the event does not say): the checks it made."""
        allowed = [a.strip() for a in self.cfg.allow_ae]
        if allowed and str(rq.ae_title).strip() not in allowed:
            return f"not in --allow-ae ({', '.join(self.cfg.allow_ae)})"
        called = getattr(getattr(rq, "primitive", None), "called_ae_title", None)
        if self.cfg.require_called_ae and called is not None and str(called).strip() != self.cfg.ae_title.strip():
            return f"called AE title {str(called).strip()!r} is not ours ({self.cfg.ae_title!r}; --require-called-ae)"
        return (f"refused by the association negotiation (at most {self.cfg.max_associations} associations at once; "
                "the pynetdicom log says more)")

    def _on_store(self, event: Any) -> int:
        """C-STORE handler: durable write first, then Success; never raises into pynetdicom."""
        try:
            ds = event.dataset
            sop_uid = ds.get("SOPInstanceUID", None) or getattr(event.request, "AffectedSOPInstanceUID", "")
            series_uid = ds.get("SeriesInstanceUID", "")
            position = position_token(ds.get("ImagePositionPatient"))
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # a data set pydicom cannot parse
            self._count("refused")
            log.warning("refused an instance from %s: cannot decode it (%s)", event.assoc.requestor.ae_title, exc)
            return STATUS_CANNOT_UNDERSTAND
        try:
            stored = self.store.store(str(series_uid), str(sop_uid), encoded, position)
        except (OSError, CtsdkError) as exc:
            self._count("refused")
            log.error("could not store instance %r of series %r: %s", str(sop_uid)[:80], str(series_uid)[:80], exc)
            return STATUS_OUT_OF_RESOURCES
        if stored.uid_reused:  # the first per series at WARNING, the rest at DEBUG; the count is in its finished line
            with self._lock:
                self.counts["uid_reused"] += 1
                nth = self._reused_seen[stored.series_key] = self._reused_seen.get(stored.series_key, 0) + 1
            log.log(logging.WARNING if nth == 1 else logging.DEBUG,
                    "series %s: SOPInstanceUID %s arrived again at another position (%s): kept as a distinct slice "
                    "(%s), not written over the first (an anonymiser's placeholder UID?)%s",
                    stored.series_key, str(sop_uid)[:80], position, stored.path.name,
                    "; further ones in this series are logged at DEBUG and counted in its finished line"
                    if nth == 1 else "")
        if stored.is_new:  # bumps the series version: a settled series re-opens
            self._count("received")
        else:
            self._count("duplicates")
        return STATUS_SUCCESS

    # --- scheduling ---------------------------------------------------------------------------
    def _is_settled(self, key: str) -> bool:
        with self._lock:
            version = self._settled.get(key)
        return version is not None and version == self.store.version(key)

    def _scheduler(self) -> None:
        while not self._stop.is_set():
            singles = self._pending_singles()
            hold = bool(singles) and min(self.store.seconds_since_arrival(k) for k in singles) < self.cfg.quiet_seconds
            if singles and not hold:
                self._merge_split_series(singles)
            for key in self.store.series_keys():
                with self._lock:
                    if key in self._inflight:
                        continue
                since = self.store.seconds_since_arrival(key)
                if self._is_settled(key) or since < self.cfg.quiet_seconds:
                    continue
                if hold and key in singles and since < SPLIT_HOLD_MAX_PERIODS * self.cfg.quiet_seconds:
                    continue  # another single is still arriving: they may be one split series
                with self._lock:  # claimed before it is queued: the forwarder never holds it at the same time
                    if key in self._inflight:
                        continue
                    self._inflight.add(key)
                try:
                    self._queue.put_nowait(key)
                except queue.Full:
                    with self._lock:
                        self._inflight.discard(key)
                    break  # bounded: the series stays pending on disk and is offered next tick
            self._stop.wait(self.cfg.tick_s)

    def _pending_singles(self) -> Set[str]:
        """Series of one instance that were never triaged and are not queued: the pieces of a series
        whose SeriesInstanceUID an anonymiser regenerated per file, if there are enough of them."""
        out: Set[str] = set()
        for key in self.store.series_keys():
            with self._lock:
                if key in self._inflight or key in self._settled:
                    continue
            if len(self.store.instance_names(key)) == 1 and self.store.marker(key) is None:
                out.add(key)
        return out

    def _merge_split_series(self, singles: Set[str]) -> None:
        """Move quiet single-instance series that the reader groups as one series into one series
        folder (named after the first of them), so that it is triaged once, as a whole."""
        from ..io import regroup_single_files

        if frozenset(singles) == self._singles_checked:
            return
        self._singles_checked = frozenset(singles)
        by_path = {str(self.store.instance_paths(k)[0]): k for k in sorted(singles)}
        for _, files in regroup_single_files(list(by_path)):
            keys = [by_path[f] for f in files]
            into = f"merged-{keys[0]}"
            names = self.store.merge_series(keys, into)
            if names is None:  # an instance of one of them is being written: look again next tick
                self._singles_checked = frozenset()
                continue
            self._count("series_merged")
            log.warning("%d single-instance series look like one series whose SeriesInstanceUID differs on "
                        "every file (an anonymiser that regenerated UIDs per file?): moved into series %s "
                        "(%d instances) and triaged as one", len(keys), into, len(names))

    def _worker(self) -> None:
        try:
            triage_fn = self._factory()
        except Exception as exc:  # model loading failed: every series this worker takes fails openly
            err = exc
            log.error("triage worker could not start: %s", exc)

            def triage_fn(paths: Sequence[Path]) -> TriageOutput:  # type: ignore[misc]
                raise err

        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process_series(key, triage_fn)
            finally:
                with self._lock:
                    self._inflight.discard(key)
                self._queue.task_done()

    def process_series(self, key: str, triage_fn: TriageFn) -> Dict[str, Any]:
        """Triage one series now, write its results, forward them, write its marker and its
        ledger line, log one line; never raises."""
        from .results import write_dicom_results

        names, version = self.store.snapshot(key)
        paths = [self.store.instances_dir(key) / n for n in names]
        results_dir = self.store.results_dir(key)
        results_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._reused_seen.pop(key, None)  # instances arriving from now on re-open the series: log afresh
        n_reused = sum("~p" in n for n in names)  # files kept beside one with their SOPInstanceUID
        t0 = time.perf_counter()
        record: Dict[str, Any] = {"series_key": key, "n_instances": len(names), "uid_reused": n_reused}
        forwarded: Optional[bool] = None  # None: nothing to forward
        try:
            out = normalise_output(triage_fn(paths))
            record["triage_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            result = dict(out.result)
            result["listener"] = {"series_key": key, "n_instances": len(names), "triage_ms": record["triage_ms"],
                                  "uid_reused": n_reused}
            atomic_write_json(results_dir / "result.json", result)
            files: List[Path] = []
            if self.cfg.dicom_results:
                try:
                    files = write_dicom_results(paths, result, out.overlays, results_dir, opacity=out.opacity)
                except CtsdkError as exc:
                    record["dicom_results_error"] = str(exc)
                    log.error("series %s: DICOM results not written: %s", key, exc)
            record["results"] = [p.name for p in files]
            if self.cfg.forward is not None and files:
                forwarded, entry = self._forward_once(files)
                set_fields, _ = _forward_fields([], entry, forwarded)
                record.update(set_fields)
            record["label"] = result.get("label")
            record["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            marker = self.store.mark(key, "done", names, record)
            self._count("triaged")
            state = "done"
        except Exception as exc:  # recorded, never blocks other series
            record["error"] = {"type": type(exc).__name__, "message": str(exc)}
            if not isinstance(exc, CtsdkError):
                record["error"]["traceback"] = traceback.format_exc(limit=8)
            record["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            marker = self.store.mark(key, "failed", names, record)
            self._count("failed")
            state = "failed"
            forwarded = None
            log.error("series %s failed after %.0f ms (%d instances): %s: %s", key, record["total_ms"], len(names),
                      type(exc).__name__, exc)
        revision = int(marker["revision"])  # as written just now: no read-back
        with self._lock:
            self._settled[key] = version  # instances that arrived during the run re-open the series
            self._forward_due.pop(key, None)  # this run's results replace any older ones waiting
            self._forward_given_up.discard(key)
        self.store.log_run({**record, "state": state, "revision": revision,
                            "instances_digest": marker["instances_digest"],
                            "at": utc_now()})
        if state == "done":  # one line: INFO, or WARNING / ERROR when the forward failed (the failure's only line)
            level = logging.INFO
            if forwarded is None:
                fwd_text = "not forwarded (no --forward)" if self.cfg.forward is None else \
                    "not forwarded (no DICOM results)"
            elif forwarded:
                fwd_text = f"forwarded to {self.cfg.forward}"
            else:
                text, gave_up = self._after_forward_failure(key, revision, 1, str(record["forward_error"]),
                                                            int(record["forward"]["n_attempts"]))
                fwd_text = f"results not forwarded: {text}"
                level = logging.ERROR if gave_up else logging.WARNING
            log.log(level, "series %s done: %s, %d instances%s, %.0f ms (triage %.0f ms), %s",
                    key, record.get("label"), len(names),
                    f" ({n_reused} with a reused SOPInstanceUID, kept as distinct slices)" if n_reused else "",
                    record["total_ms"], record["triage_ms"], fwd_text)
        return record

    # --- forwarding -------------------------------------------------------------------------------
    def _forward_once(self, files: Sequence[Path]) -> Tuple[bool, Dict[str, Any]]:
        """One C-STORE of ``files`` to the forward target: (delivered, the attempt's record)."""
        from .results import forward_files

        target = self.cfg.forward
        entry: Dict[str, Any] = {"at": utc_now(), "target": str(target)}
        try:
            entry["sent"] = forward_files(files, target, calling_ae=self.cfg.ae_title)
        except Exception as exc:  # a forward failure never fails the series
            text = str(exc) if isinstance(exc, CtsdkError) else f"{type(exc).__name__}: {exc}"
            entry["error"] = text if str(target) in text else f"forward to {target}: {text}"
            self._count("forward_failed")
            return False, entry
        self._count("forwarded")
        return True, entry

    def _after_forward_failure(self, key: str, revision: int, failures: int, error: str,
                               n_attempts: int) -> Tuple[str, bool]:
        """Schedule the next try of a failed forward (``failures``: failed attempts in this run):
        (the text for the one log line of this failure, True when no try is left in this run)."""
        delays = tuple(self.cfg.forward_retry_s)
        with self._lock:
            if failures <= len(delays):
                delay = float(delays[failures - 1])
                self._forward_due[key] = _ForwardDue(time.monotonic() + delay, failures, revision)
                return f"{error} (attempt {n_attempts}; next try in {delay:g} s)", False
            self._forward_due.pop(key, None)
            self._forward_given_up.add(key)
        return f"{error} (attempt {n_attempts}; no more tries until the listener restarts)", True

    def _forwarder(self) -> None:
        """Retry the forwards that failed, one series at a time, from the results on disk."""
        while not self._stop.is_set():
            now = time.monotonic()
            key = None
            with self._lock:
                for k, due in sorted(self._forward_due.items(), key=lambda kv: kv[1].at):
                    if due.at <= now and k not in self._inflight:
                        key = k
                        self._inflight.add(k)  # triage of this series waits for the retry, and vice versa
                        break
            if key is None:
                self._stop.wait(self.cfg.tick_s)
                continue
            try:
                self._retry_forward(key)
            except Exception as exc:  # a bug here must not end the retries of the other series
                log.error("series %s: forward retry failed unexpectedly: %s: %s", key, type(exc).__name__, exc)
                with self._lock:
                    self._forward_due.pop(key, None)
                    self._forward_given_up.add(key)
            finally:
                with self._lock:
                    self._inflight.discard(key)

    def _retry_forward(self, key: str) -> None:
        with self._lock:
            due = self._forward_due.get(key)
        if due is None:
            return
        m = self.store.marker(key)
        if not self._is_settled(key) or not forward_pending(m) or int(m.get("revision", 0)) != due.revision:
            with self._lock:  # re-opened, re-triaged or delivered meanwhile: nothing of this revision to send
                self._forward_due.pop(key, None)
            return
        results_dir = self.store.results_dir(key)
        files = [results_dir / n for n in (m.get("results") or [])]
        fwd = m.get("forward") if isinstance(m.get("forward"), dict) else {}
        n_before = int(fwd.get("n_attempts", 0) or 0) or (1 if "forward_error" in m else 0)  # older markers: 1 try
        ok, entry = self._forward_once(files)
        if ok:  # delivered: no longer due - dropped before the marker says "sent", so whoever reads that
            with self._lock:  # marker and then summary() never sees the series still pending
                self._forward_due.pop(key, None)
        set_fields, remove = _forward_fields(fwd.get("attempts") or [], entry, ok, n_before)
        if not self.store.update_marker(key, set_fields, remove, expect_revision=due.revision):
            with self._lock:
                self._forward_due.pop(key, None)
            return
        n = int(set_fields["forward"]["n_attempts"])
        if ok:
            log.info("series %s: results forwarded to %s (%d objects, attempt %d)", key, self.cfg.forward,
                     entry["sent"], n)
            return
        text, gave_up = self._after_forward_failure(key, due.revision, due.failures + 1, entry["error"], n)
        log.log(logging.ERROR if gave_up else logging.WARNING, "series %s: results not forwarded: %s", key, text)


def _forward_fields(attempts: Sequence[Dict[str, Any]], entry: Dict[str, Any], ok: bool,
                    n_before: int = 0) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """The DONE marker fields after a forward attempt, and the fields to drop: ``forwarded_to``
    (delivered) or ``forward_error`` (the last error), and ``forward`` = {target, state "sent" /
    "pending", n_attempts, attempts (the last :data:`MAX_ATTEMPTS_KEPT`)}."""
    kept = [*attempts, entry][-MAX_ATTEMPTS_KEPT:]
    fwd = {"target": entry["target"], "state": "sent" if ok else "pending",
           "n_attempts": max(n_before, len(attempts)) + 1, "attempts": kept}
    if ok:
        return {"forwarded_to": entry["target"], "forward": fwd}, ("forward_error",)
    return {"forward_error": entry["error"], "forward": fwd}, ("forwarded_to",)

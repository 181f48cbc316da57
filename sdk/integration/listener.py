"""DICOM C-STORE listener (pynetdicom SCP) that triages each complete series exactly once.

Flow::

    C-STORE ─► SeriesStore.store (fsync + atomic rename) ─► 0x0000 Success to the sender
    scheduler (every ``tick_s``): a series whose newest instance is ``quiet_seconds`` old and whose
        DONE/FAILED marker does not cover exactly the instances on disk ─► bounded queue
    N workers: triage_fn(instance files) ─► results/result.json, sr.dcm, sc-*.dcm
        ─► optional C-STORE forward ─► DONE marker (atomic, written last) + ledger line

A restart rebuilds the state from disk: series without a matching marker are triaged after a fresh
quiet period, series with one are never redone. Instances that arrive after a series was triaged
re-open it (a new revision), which is the only way a series is triaged twice.

Anonymiser damage (docs/ingest.md): a file whose SOPInstanceUID is already stored at another
position is kept as its own slice (:meth:`SeriesStore.store`); single-instance series that the
reader reads as one series - an anonymiser gave every file its own SeriesInstanceUID - are held
until no such single has arrived for a quiet period, then moved into one series folder
(:meth:`SeriesStore.merge_series`) and triaged once.

Security: calling AE titles must be on the allow-list (else A-ASSOCIATE-RJ, "calling AE title not
recognised", and a WARNING log line); an optional source-address allow-list closes the TCP
connection of any other peer before any DICOM is read; optional TLS (server certificate, and
client certificates when a CA is given).
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
from .storage import SeriesStore, atomic_write_json, instance_set_digest, position_token
from .triage_fns import TriageFn, TriageOutput, normalise_output

log = logging.getLogger("sdk.integration.listener")

__all__ = ["ListenerConfig", "Listener", "ForwardTarget", "parse_forward", "load_triage_factory"]

# Status codes (PS3.4 Annex B / PS3.7 C.4.2)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210

#: a single-instance series waits for other singles to go quiet (they may be one series split by
#: per-file SeriesInstanceUIDs) at most this many quiet periods after its own arrival
SPLIT_HOLD_MAX_PERIODS = 6.0


@dataclass(frozen=True)
class ForwardTarget:
    """Where DICOM results are C-STOREd after each series: ``HOST:PORT:AET``."""

    host: str
    port: int
    ae_title: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.ae_title}"


def parse_forward(text: str) -> ForwardTarget:
    """Parse ``HOST:PORT:AET`` (e.g. ``127.0.0.1:11112:PACS``)."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ConfigError(f"--forward {text!r}: expected HOST:PORT:AET, e.g. 127.0.0.1:11112:PACS")
    try:
        port = int(parts[1])
    except ValueError:
        raise ConfigError(f"--forward {text!r}: port {parts[1]!r} is not an integer") from None
    if not 0 < port < 65536:
        raise ConfigError(f"--forward {text!r}: port {port} outside 1-65535")
    if len(parts[2]) > 16:
        raise ConfigError(f"--forward {text!r}: AE title longer than 16 characters")
    return ForwardTarget(parts[0], port, parts[2])


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
        if self.quiet_seconds < 0:
            raise ConfigError(f"--quiet-seconds {self.quiet_seconds}: must be >= 0")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: must be >= 1")
        if self.queue_size < 1:
            raise ConfigError(f"--queue-size {self.queue_size}: must be >= 1")
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
        self.counts = {"received": 0, "duplicates": 0, "refused": 0, "rejected_associations": 0,
                       "refused_connections": 0, "triaged": 0, "failed": 0, "uid_reused": 0,
                       "series_merged": 0}
        self._singles_checked: frozenset = frozenset()
        self._load_settled()

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    # --- lifecycle ----------------------------------------------------------------------------
    def _load_settled(self) -> None:
        for key in self.store.series_keys():
            m = self.store.marker(key)
            names, version = self.store.snapshot(key)
            if m is not None and m.get("instances_digest") == instance_set_digest(names):
                self._settled[key] = version
        pending = [k for k in self.store.series_keys() if not self._is_settled(k)]
        if pending:
            log.warning("resuming %d pending series from %s: %s", len(pending), self.store.root, ", ".join(pending[:5]))

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
        host, port = self.address
        log.warning("listening on %s:%d as %s (TLS %s); storing under %s", host, port, self.cfg.ae_title,
                    "on" if self.cfg.tls_cert else "off", self.store.root)
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
        keys = self.store.series_keys()
        return {
            "out": str(self.store.root),
            "series": len(keys),
            "settled": sum(self._is_settled(k) for k in keys),
            **self.counts,
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
        log.info("association accepted from %s (%s)", rq.ae_title, rq.address)

    def _on_rejected(self, event: Any) -> None:
        rq = event.assoc.requestor
        self._count("rejected_associations")
        log.warning("rejected association from calling AE %r at %s: not in --allow-ae (%s)",
                    rq.ae_title, rq.address, ", ".join(self.cfg.allow_ae))

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
        if stored.uid_reused:
            self._count("uid_reused")
            log.warning("series %s: SOPInstanceUID %s arrived again at another position (%s): kept as a "
                        "distinct slice (%s), not written over the first (an anonymiser's placeholder UID?)",
                        stored.series_key, str(sop_uid)[:80], position, stored.path.name)
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
                try:
                    self._queue.put_nowait(key)
                except queue.Full:
                    break  # bounded: the series stays pending on disk and is offered next tick
                with self._lock:
                    self._inflight.add(key)
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
        """Triage one series now, write its results and its marker; never raises."""
        from .results import forward_files, write_dicom_results

        names, version = self.store.snapshot(key)
        paths = [self.store.instances_dir(key) / n for n in names]
        results_dir = self.store.results_dir(key)
        results_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        record: Dict[str, Any] = {"series_key": key, "n_instances": len(names)}
        try:
            out = normalise_output(triage_fn(paths))
            record["triage_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            result = dict(out.result)
            result["listener"] = {"series_key": key, "n_instances": len(names), "triage_ms": record["triage_ms"]}
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
                try:
                    forward_files(files, self.cfg.forward, calling_ae=self.cfg.ae_title)
                    record["forwarded_to"] = str(self.cfg.forward)
                except CtsdkError as exc:
                    record["forward_error"] = str(exc)
                    log.error("series %s: forward to %s failed: %s", key, self.cfg.forward, exc)
            record["label"] = result.get("label")
            self.store.mark(key, "done", names, record)
            self._count("triaged")
            state = "done"
        except Exception as exc:  # recorded, never blocks other series
            record["error"] = {"type": type(exc).__name__, "message": str(exc)}
            if not isinstance(exc, CtsdkError):
                record["error"]["traceback"] = traceback.format_exc(limit=8)
            self.store.mark(key, "failed", names, record)
            self._count("failed")
            state = "failed"
            log.error("series %s failed: %s: %s", key, type(exc).__name__, exc)
        with self._lock:
            self._settled[key] = version  # instances that arrived during the run re-open the series
        self.store.log_run({**record, "state": state, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return record

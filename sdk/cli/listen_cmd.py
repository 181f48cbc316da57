"""``ctsdk listen``: DICOM C-STORE listener that triages each complete series exactly once."""
from __future__ import annotations

import errno
import logging
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click

from ._common import FiniteFloat, check_output_dir, check_triage_fn, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk listen --port 11112 --ae-title CTSDK --out /tmp/ctsdk-listener
  ctsdk listen --port 0 --out /tmp/ctsdk-listener --triage-fn sdk.integration.triage_fns:inventory
  ctsdk listen --port 11112 --bind 0.0.0.0 --allow-ae SCANNER1 --out /tmp/ctsdk-listener \\
      --tls-cert SERVER_CERT_PEM --tls-key SERVER_KEY_PEM
  ctsdk listen --port 11112 --out /tmp/ctsdk-listener --forward 10.0.0.7:104:PACS
  (--port 0: any free port, written to OUT/listener.json; SERVER_CERT_PEM / SERVER_KEY_PEM: your
  PEM certificate and private key. Stop with Ctrl-C or SIGTERM.)

\b
Logging (stderr): the listener's INFO lines are shown - the start, one line per finished series
(label, instances, time, forwarded or not); --quiet shows warnings and errors only; ctsdk -vv
listen adds DEBUG.

\b
Exit codes: 0 stopped by SIGINT/SIGTERM; 2 bad arguments, --out cannot be written, or the
address cannot be listened on (port in use, bad --bind, unreadable TLS files)."""

#: what to do when the listening socket cannot be opened, by errno
_BIND_HINTS = {
    errno.EADDRINUSE: "another program listens there: stop it or choose another --port (0 = any free port)",
    errno.EACCES: "ports below 1024 need privileges: choose --port 1024 or above",
    errno.EADDRNOTAVAIL: "--bind must be an address of this machine (127.0.0.1, 0.0.0.0 or one of its interfaces)",
}


def _start(listener: Any, bind: str, port: int, tls_cert: Optional[str], tls_key: Optional[str]) -> None:
    """Open the listening socket; a bad address, a busy port or unreadable TLS files become one
    ConfigError naming the option and what to do (exit 2), not a traceback."""
    from ..errors import ConfigError

    try:
        listener.start()
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert {tls_cert} / --tls-key {tls_key}: cannot load the certificate and key ({exc}); "
                          "give a PEM certificate and its matching PEM private key") from exc
    except socket.gaierror as exc:
        raise ConfigError(f"--bind {bind}: not a usable address ({exc.strerror or exc}); give an IP address of this "
                          "machine, e.g. 127.0.0.1 or 0.0.0.0") from exc
    except OSError as exc:
        if exc.filename is not None:
            raise  # a file problem: the CLI names the file
        hint = _BIND_HINTS.get(exc.errno or 0, "check --bind and --port")
        raise ConfigError(f"cannot listen on {bind}:{port} ({exc.strerror or exc}); {hint}") from exc


def _check_addresses(bind: str, allow_ip: Tuple[str, ...]) -> None:
    """ConfigError for an empty --bind (the socket would listen on every interface, not on none) and
    an --allow-ip that is no IP address (a sender's address is compared with it as written, so a host
    name or a network would silently refuse every sender)."""
    import ipaddress

    from ..errors import ConfigError

    if not bind.strip():
        raise ConfigError("--bind '': an empty address would listen on every interface; give an address of this "
                          "machine, e.g. 127.0.0.1 (or 0.0.0.0 to listen on every interface on purpose)")
    for ip in allow_ip:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"--allow-ip {ip!r}: not an IP address; give the sender's address as it connects, e.g. "
                              "10.0.0.7 (host names and networks are not matched)") from None


def _human(d: Dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in d.items())


@click.command("listen", epilog=EXAMPLES)
@click.option("--port", type=int, default=11112, show_default=True, help="TCP port (0: any free port, see OUT/listener.json).")
@click.option("--ae-title", default="CTSDK", show_default=True, help="Our AE title: the called AE for senders, the calling AE when forwarding.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Storage root: series/<uid>/instances, results, DONE/FAILED markers, triage-log.jsonl.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--allow-ae", multiple=True, help="Calling AE title allowed to send (repeatable); others are rejected. Default: any.")
@click.option("--allow-ip", multiple=True, help="Source IP address allowed to connect (repeatable). Default: any.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="Server certificate (PEM): enables TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="Server private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CA bundle (PEM): require and verify client certificates (mutual TLS).")
@click.option("--quiet-seconds", type=FiniteFloat(min=0), default=10.0, show_default=True,
              help="A series is complete when no new instance arrived for this long.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Triage worker threads or Ray actors (one model per worker); 1 to 1024 (checked before it listens).")
@click.option("--queue-size", type=int, default=8, show_default=True, help="Complete series waiting for a worker (bounded).")
@click.option("--forward", default=None,
              help="After each series, C-STORE every DICOM result (SR, measurements SR, SCs, SEG) to HOST:PORT:AET, "
                   "calling as --ae-title (the receiver must accept that AE title). A failed forward is retried "
                   "from disk, without re-triaging (--forward-retry), and again at the next start.")
@click.option("--forward-retry", "forward_retry", default="30,120,600", show_default=True, metavar="SECONDS,...",
              help="Delays between forward attempts while running; after the last, the next start retries. "
                   "'none': no retry until the next start.")
@click.option("--require-called-ae", is_flag=True,
              help="Reject associations whose called AE title is not --ae-title (default: any called AE is accepted).")
@click.option("--triage-fn", default=None,
              help="module:function triage hook (default: sdk.integration.triage_fns:make_triage_fn, the real "
                   "sdk.triage.Triage with the default bundle; sdk.integration.triage_fns:inventory runs no model, "
                   "for commissioning).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker threads here; ray: each worker's triage runs on a Ray actor (needs ctsdk[cluster]).")
@click.option("--ray-address", default=None, help="--engine ray: 'auto', HOST:PORT of a head node, or none for a private Ray.")
@click.option("--cpus-per-worker", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True, help="--engine ray: logical CPUs per actor.")
@click.option("--gpus-per-worker", type=FiniteFloat(min=0), default=0.0, show_default=True, help="--engine ray: GPUs per actor.")
@click.option("--no-dicom-results", is_flag=True, help="Write result.json only (no SR / SC objects).")
@click.option("--quiet", "-q", is_flag=True, help="Log warnings and errors only (no INFO line per series).")
@json_option
@handle_errors
def listen(port: int, ae_title: str, out_dir: str, bind: str, allow_ae: Tuple[str, ...], allow_ip: Tuple[str, ...],
           tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str], quiet_seconds: float, workers: int,
           queue_size: int, forward: Optional[str], forward_retry: str, require_called_ae: bool,
           triage_fn: Optional[str], engine: str, ray_address: Optional[str],
           cpus_per_worker: float, gpus_per_worker: float,
           no_dicom_results: bool, quiet: bool, as_json: bool) -> None:
    """Receive CT series over DICOM, store them durably, triage each complete series once.

    Runs until SIGINT/SIGTERM; with --json prints a summary object when it stops. A restart on the
    same --out resumes pending series, never redoes finished ones and retries forwards that did
    not get through. Research use only.
    """
    _check_addresses(bind, allow_ip)
    check_output_dir(out_dir, "--out")  # before the socket opens: received series must be storable
    if engine == "local":
        check_triage_fn(triage_fn)  # (a Ray cluster imports it on its nodes)
    from ..integration.listener import ListenerConfig, parse_forward, parse_retry_schedule

    cfg = ListenerConfig(
        out=Path(out_dir), port=port, ae_title=ae_title, bind=bind, allow_ae=tuple(allow_ae), allow_ip=tuple(allow_ip),
        tls_cert=Path(tls_cert) if tls_cert else None, tls_key=Path(tls_key) if tls_key else None,
        tls_ca=Path(tls_ca) if tls_ca else None, quiet_seconds=quiet_seconds, workers=workers, queue_size=queue_size,
        forward=parse_forward(forward) if forward else None, forward_retry_s=parse_retry_schedule(forward_retry),
        require_called_ae=require_called_ae, dicom_results=not no_dicom_results,
    )
    cfg.validate()  # every value (--workers, --queue-size, ...) before a Ray cluster or the socket starts
    # the operator's log: INFO of the listener by default (ctsdk's own default is WARNING, -v INFO,
    # -vv DEBUG); --quiet: warnings only. Put back on return (in-process callers, tests).
    listener_log = logging.getLogger("sdk.integration.listener")
    previous_level = listener_log.level
    if quiet:
        listener_log.setLevel(logging.WARNING)
    elif listener_log.getEffectiveLevel() > logging.INFO:
        listener_log.setLevel(logging.INFO)
    try:
        _serve(cfg, tls_cert, tls_key, triage_fn, engine, ray_address, cpus_per_worker, gpus_per_worker, as_json)
    finally:
        listener_log.setLevel(previous_level)


def _serve(cfg: Any, tls_cert: Optional[str], tls_key: Optional[str], triage_fn: Optional[str], engine: str,
           ray_address: Optional[str], cpus_per_worker: float, gpus_per_worker: float, as_json: bool) -> None:
    """Run the listener until SIGINT/SIGTERM, keep OUT/listener.json current, print the summary."""
    import os

    from ..integration.listener import Listener, load_triage_factory
    from ..integration.storage import atomic_write_json, utc_now as now

    dispatcher = None
    if engine == "ray":
        from ..cluster import RayDispatcher  # imports Ray only here (and says what to install)

        factory = dispatcher = RayDispatcher(ray_address, triage_fn=triage_fn, cpus_per_worker=cpus_per_worker,
                                             gpus_per_worker=gpus_per_worker)
    else:
        factory = load_triage_factory(triage_fn)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    listener = None
    status: Optional[Dict[str, Any]] = None
    status_file = Path(cfg.out) / "listener.json"
    try:
        listener = Listener(cfg, factory)
        _start(listener, cfg.bind, cfg.port, tls_cert, tls_key)
        host, bound_port = listener.address
        status = {"pid": os.getpid(), "host": host, "port": bound_port, "ae_title": cfg.ae_title,
                  "running": True, "started_at": now()}
        atomic_write_json(status_file, status)
        while not stop.wait(0.5):
            pass
    finally:
        if listener is not None:  # stop() is safe after a failed start (nothing to stop)
            listener.stop()
        if dispatcher is not None:
            dispatcher.close()
        for s, handler in previous.items():  # a failed start leaves the caller's handlers as they were
            signal.signal(s, handler)
        if status is not None:  # stopped cleanly: the file says so (a kill leaves "running": true)
            atomic_write_json(status_file, {**status, "running": False, "stopped_at": now()})
    emit(listener.summary(), as_json, _human)

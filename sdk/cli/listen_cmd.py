"""``ctsdk listen``: DICOM C-STORE listener that triages each complete series exactly once."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click

from ._common import emit, handle_errors, json_option


def _human(d: Dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in d.items())


@click.command("listen")
@click.option("--port", type=int, default=11112, show_default=True, help="TCP port (0: any free port, see OUT/listener.json).")
@click.option("--ae-title", default="CTSDK", show_default=True, help="Our AE title (called AE).")
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
@click.option("--quiet-seconds", type=float, default=10.0, show_default=True,
              help="A series is complete when no new instance arrived for this long.")
@click.option("--workers", type=int, default=1, show_default=True, help="Triage worker threads (one model per worker).")
@click.option("--queue-size", type=int, default=8, show_default=True, help="Complete series waiting for a worker (bounded).")
@click.option("--forward", default=None, help="C-STORE the SR and SC results to HOST:PORT:AET.")
@click.option("--triage-fn", default=None,
              help="module:function triage hook (default: sdk.triage.Triage; "
                   "sdk.integration.triage_fns:inventory runs no model, for commissioning).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker threads here; ray: each worker's triage runs on a Ray actor (needs ctsdk[cluster]).")
@click.option("--ray-address", default=None, help="--engine ray: 'auto', HOST:PORT of a head node, or none for a private Ray.")
@click.option("--cpus-per-worker", type=float, default=1.0, show_default=True, help="--engine ray: logical CPUs per actor.")
@click.option("--gpus-per-worker", type=float, default=0.0, show_default=True, help="--engine ray: GPUs per actor.")
@click.option("--no-dicom-results", is_flag=True, help="Write result.json only (no SR / SC objects).")
@json_option
@handle_errors
def listen(port: int, ae_title: str, out_dir: str, bind: str, allow_ae: Tuple[str, ...], allow_ip: Tuple[str, ...],
           tls_cert: Optional[str], tls_key: Optional[str], tls_ca: Optional[str], quiet_seconds: float, workers: int,
           queue_size: int, forward: Optional[str], triage_fn: Optional[str], engine: str, ray_address: Optional[str],
           cpus_per_worker: float, gpus_per_worker: float,
           no_dicom_results: bool, as_json: bool) -> None:
    """Receive CT series over DICOM, store them durably, triage each complete series once.

    Runs until SIGINT/SIGTERM; with --json prints a summary object when it stops. A restart on the
    same --out resumes pending series and never redoes finished ones. Research use only.
    """
    from ..integration.listener import Listener, ListenerConfig, load_triage_factory, parse_forward
    from ..integration.storage import atomic_write_json

    cfg = ListenerConfig(
        out=Path(out_dir), port=port, ae_title=ae_title, bind=bind, allow_ae=tuple(allow_ae), allow_ip=tuple(allow_ip),
        tls_cert=Path(tls_cert) if tls_cert else None, tls_key=Path(tls_key) if tls_key else None,
        tls_ca=Path(tls_ca) if tls_ca else None, quiet_seconds=quiet_seconds, workers=workers, queue_size=queue_size,
        forward=parse_forward(forward) if forward else None, dicom_results=not no_dicom_results,
    )
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

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    listener = Listener(cfg, factory).start()
    import os
    import time

    host, bound_port = listener.address
    atomic_write_json(Path(out_dir) / "listener.json", {
        "pid": os.getpid(), "host": host, "port": bound_port, "ae_title": ae_title,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    try:
        while not stop.wait(0.5):
            pass
    finally:
        listener.stop()
        if dispatcher is not None:
            dispatcher.close()
    emit(listener.summary(), as_json, _human)

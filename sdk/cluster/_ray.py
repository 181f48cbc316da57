"""Ray import guard and driver connection (the only place ``sdk.cluster`` imports ray eagerly).

``import sdk`` and the core install never import ray: every function here imports it on call.
Without ray, :func:`require_ray` raises :class:`~sdk.errors.MissingDependencyError` whose one-line
message says "install ctsdk[cluster]"; the CLI turns it into exit code 2.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from types import ModuleType
from typing import Any, Dict, Iterator, Optional

from ..errors import ConfigError, MissingDependencyError, RuntimeUnavailableError

log = logging.getLogger("sdk.cluster")

__all__ = ["RAY_REQUIREMENT", "require_ray", "ray_session", "check_address", "cluster_resources"]

#: The ray versions this code was tested with (keep in step with the ``cluster`` extra).
RAY_REQUIREMENT = "ray[data]>=2.60,<2.61"
_TESTED = ((2, 60), (2, 60))


def missing_ray_error(feature: str = "--engine ray", cause: Optional[BaseException] = None) -> MissingDependencyError:
    """The one-line error for a core install without ray (``install ctsdk[cluster]``)."""
    err = MissingDependencyError("ray[data]", feature, "cluster")
    why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    # one line, and the literal fix users grep for
    err.args = (f"{feature} needs Ray, which is not installed{why}: install ctsdk[cluster] "
                f"(pip install 'ctsdk[cluster]', i.e. {RAY_REQUIREMENT})",)
    return err


def require_ray(feature: str = "--engine ray") -> ModuleType:
    """Import ``ray`` (and ``ray.data``) or raise the "install ctsdk[cluster]" error."""
    try:
        import ray
        import ray.data  # noqa: F401  (the batch engine needs Ray Data, not only Ray Core)
    except ImportError as exc:
        raise missing_ray_error(feature, exc) from exc
    _warn_untested(getattr(ray, "__version__", "0"))
    return ray


def _warn_untested(version: str) -> None:
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return
    if not _TESTED[0] <= (major, minor) <= _TESTED[1]:
        log.warning("ray %s is outside the tested range (%s); results should be the same, "
                    "fault-tolerance options may behave differently", version, RAY_REQUIREMENT)


def check_address(address: Optional[str]) -> Optional[str]:
    """Validate ``--ray-address``: None (start a local Ray), ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    if address is None or address == "":
        return None
    a = address.strip()
    if a in ("auto", "local"):
        return a
    rest = a[len("ray://"):] if a.startswith("ray://") else a
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {address!r}: expected auto, HOST:PORT (the head's GCS port, "
                          f"6379 by default) or ray://HOST:PORT (Ray Client)")
    return a


@contextlib.contextmanager
def ray_session(address: Optional[str], *, num_cpus: Optional[int] = None, quiet: bool = True) -> Iterator[ModuleType]:
    """Connect this process to a Ray cluster as the driver, or start a local one.

    Args:
        address: None starts a private local Ray on this machine (stopped on exit); ``auto`` joins
            the cluster this node belongs to (``ray start`` ran here, or ``RAY_ADDRESS`` is set);
            ``HOST:PORT`` joins that head node.
        num_cpus: logical CPUs of a private local Ray (None: every core).
        quiet: keep worker log lines off the driver's stderr (they stay in Ray's session logs).

    Yields:
        The ``ray`` module, initialised. A session this function started is shut down on exit;
        one that was already initialised in this process is left running.
    """
    ray = require_ray()
    address = check_address(address)
    started = False
    # Ray's driver-side threads print cluster events ("(raylet) Raylet is terminated ...") with
    # print(): keep them on stderr, stdout carries the command's --json object only.
    with contextlib.redirect_stdout(sys.stderr):
        if not ray.is_initialized():
            _probe_gcs(address)
            kwargs: Dict[str, Any] = dict(address=address, include_dashboard=False, logging_level=logging.WARNING,
                                          log_to_driver=not quiet, configure_logging=True)
            if address is None:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:
                raise RuntimeUnavailableError(
                    f"--ray-address {address}: no Ray cluster reachable there ({exc}); start one with "
                    f"`ray start --head` or give the head's HOST:PORT") from exc
            except Exception as exc:  # Ray raises several types for bad addresses / version mismatch
                raise RuntimeUnavailableError(
                    f"--ray-address {address or '(local)'}: cannot start or join Ray ({type(exc).__name__}: {exc}); "
                    f"check that the cluster runs the same ray and Python versions as this driver") from exc
            started = True
        try:
            yield ray
        finally:
            if started:
                ray.shutdown()


def _probe_gcs(address: Optional[str], timeout_s: float = 5.0) -> None:
    """Fail in seconds, with one line, when HOST:PORT does not accept TCP (ray.init waits ~a minute)."""
    import socket

    if address is None or address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RuntimeUnavailableError(
            f"--ray-address {address}: nothing accepts connections there ({exc.strerror or exc}); start the head "
            f"with `ray start --head --port {port}` or give the head's GCS HOST:PORT (see docs/scale.md)") from exc


def cluster_resources() -> Dict[str, float]:
    """Total logical resources of the connected cluster (``CPU``, ``GPU``, ``memory``...)."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``; Linux reports KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def cpu_threads(num_cpus: float) -> int:
    """Intra-op threads for an actor given its logical CPUs (at least 1, at most the host's cores)."""
    return max(1, min(int(num_cpus), os.cpu_count() or 1))

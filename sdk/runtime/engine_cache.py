"""TensorRT engine cache: keys, sidecar metadata, file locks (pure Python, no TensorRT needed).

An engine is only valid on the GPU model (compute capability) and TensorRT version it was built
with. Every engine ctsdk writes has a sidecar ``<engine>.json`` holding its :class:`EngineKey`;
loading checks that key against this machine and raises
:class:`~sdk.errors.EngineMismatchError` ("... rebuild with ctsdk build-engine ...") on any
difference. Cached engines live under ``<cache_dir>/<onnx stem>.<precision>.<digest>.engine``
where the digest hashes the whole key, and are written atomically under a file lock so two
processes building the same engine do not corrupt each other.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from ..errors import ConfigError, EngineMismatchError

PathLike = Union[str, os.PathLike]
PRECISIONS: Tuple[str, ...] = ("fp32", "fp16", "int8")
SIDECAR_SUFFIX = ".json"
KEY_VERSION = 1


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Two engines with equal keys are interchangeable."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str
    trt_version: str
    precision: str
    batch: Tuple[int, int, int] = (1, 1, 1)
    key_version: int = KEY_VERSION

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"engine precision must be one of {PRECISIONS}, got {self.precision!r}")
        if len(self.onnx_sha256) != 64:
            raise ConfigError(f"onnx_sha256 must be a 64-hex sha256, got {self.onnx_sha256!r}")

    def digest(self, n: int = 16) -> str:
        """Short stable hash of the key (file-name part)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:n]

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["batch"] = list(self.batch)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "EngineKey":
        known = {f.name for f in fields(cls)}
        missing = sorted(known - {"key_version"} - set(d))
        if missing:
            raise ConfigError(f"engine key misses {missing}")
        kw = {k: v for k, v in d.items() if k in known}
        kw["batch"] = tuple(int(b) for b in kw.get("batch", (1, 1, 1)))
        return cls(**kw)

    def mismatches(self, other: "EngineKey") -> List[str]:
        """Human-readable differences ``field: built X, here Y`` (empty when equal)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: engine {a[k]!r}, wanted {b[k]!r}" for k in a if a[k] != b[k]]


def rebuild_hint(onnx: str, precision: str, batch: Tuple[int, int, int]) -> str:
    b = ",".join(str(v) for v in batch)
    return f"rebuild with ctsdk build-engine --model {onnx} --precision {precision} --batch {b}"


def check_engine_key(engine_path: PathLike, built: EngineKey, gpu_name: str, compute_capability: str,
                     trt_version: str, precision: Optional[str] = None) -> None:
    """Raise EngineMismatchError unless ``built`` matches this GPU / TensorRT (/ precision).

    The GPU name is compared as well as the compute capability: same-capability GPUs can differ
    in SM count and memory, which changes the tactics TensorRT picked.
    """
    problems = []
    if built.gpu_name != gpu_name:
        problems.append(f"GPU {built.gpu_name!r} (here {gpu_name!r})")
    if built.compute_capability != compute_capability:
        problems.append(f"compute capability {built.compute_capability} (here {compute_capability})")
    if built.trt_version != trt_version:
        problems.append(f"TensorRT {built.trt_version} (here {trt_version})")
    if precision is not None and built.precision != precision:
        problems.append(f"precision {built.precision} (requested {precision})")
    if problems:
        raise EngineMismatchError(
            f"{engine_path}: engine was built for " + ", ".join(problems) + "; TensorRT engines are not portable: "
            + rebuild_hint("<model.onnx>", precision or built.precision, built.batch)
        )


def sidecar_path(engine_path: PathLike) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(engine_path: PathLike, key: EngineKey, extra: Optional[Dict[str, Any]] = None) -> Path:
    side = sidecar_path(engine_path)
    payload = {"key": key.to_dict(), "digest": key.digest(), **(extra or {})}
    _atomic_write(side, json.dumps(payload, indent=1, sort_keys=True).encode())
    return side


def read_sidecar(engine_path: PathLike) -> Tuple[EngineKey, Dict[str, Any]]:
    """The key (and the rest of the sidecar) of an engine ctsdk built."""
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise EngineMismatchError(
            f"{engine_path}: no {side.name} beside the engine, so its GPU / TensorRT version cannot be checked; "
            "rebuild with ctsdk build-engine (engines from other tools are not loaded)"
        )
    try:
        payload = json.loads(side.read_text())
        return EngineKey.from_dict(payload["key"]), payload
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise EngineMismatchError(f"{side}: unreadable engine key ({exc}); rebuild with ctsdk build-engine") from exc


@contextlib.contextmanager
def file_lock(path: PathLike, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive advisory lock on ``<path>.lock`` (fcntl on POSIX, msvcrt on Windows)."""
    lock_path = Path(str(path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+b")
    t0 = time.monotonic()
    try:
        while True:
            try:
                if sys.platform.startswith("win"):  # pragma: no cover
                    import msvcrt

                    msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                else:
                    import fcntl

                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() - t0 > timeout_s:
                    raise ConfigError(f"{lock_path}: still locked after {timeout_s:.0f} s by another build; remove it if no build runs")
                time.sleep(0.1)
        yield
    finally:
        try:
            if not sys.platform.startswith("win"):
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        finally:
            fh.close()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class EngineCache:
    """Engines on disk, keyed by :class:`EngineKey`.

    ``get(key)`` returns the engine path when a valid one is cached; ``put(key, data)`` writes the
    engine and its sidecar atomically under a lock; ``lock(key)`` serialises builders.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)

    def path_for(self, key: EngineKey, stem: str = "model") -> Path:
        return self.root / f"{stem}.{key.precision}.{key.digest()}.engine"

    def get(self, key: EngineKey, stem: str = "model") -> Optional[Path]:
        p = self.path_for(key, stem)
        if not p.is_file():
            return None
        try:
            built, _ = read_sidecar(p)
        except EngineMismatchError:
            return None
        return p if built == key else None

    @contextlib.contextmanager
    def lock(self, key: EngineKey, stem: str = "model") -> Iterator[Path]:
        p = self.path_for(key, stem)
        with file_lock(p):
            yield p

    def put(self, key: EngineKey, data: bytes, stem: str = "model", extra: Optional[Dict[str, Any]] = None,
            locked: bool = False) -> Path:
        p = self.path_for(key, stem)
        ctx = contextlib.nullcontext() if locked else file_lock(p)
        with ctx:
            _atomic_write(p, data)
            write_sidecar(p, key, extra)
        return p

    def entries(self) -> List[Tuple[Path, EngineKey]]:
        out = []
        for p in sorted(self.root.glob("*.engine")):
            try:
                out.append((p, read_sidecar(p)[0]))
            except EngineMismatchError:
                continue
        return out


__all__ = ["EngineCache", "EngineKey", "PRECISIONS", "check_engine_key", "file_lock", "read_sidecar", "rebuild_hint",
           "sidecar_path", "write_sidecar"]

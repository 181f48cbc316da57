"""sdk.runtime.base.session_or_cached: one session per (kind, path) in a process, opened once."""
from __future__ import annotations

import threading
from pathlib import Path

from sdk.runtime.base import session_or_cached


def test_given_session_wins_and_path_is_opened_once(tmp_path: Path) -> None:
    opened = []

    def opener(path: str) -> object:
        opened.append(path)
        return object()

    given = object()
    assert session_or_cached(given, tmp_path / "a.onnx", tmp_path / "d.onnx", opener, "t1") is given
    assert opened == []
    a = session_or_cached(None, tmp_path / "a.onnx", tmp_path / "d.onnx", opener, "t1")
    assert session_or_cached(None, str(tmp_path / "a.onnx"), tmp_path / "d.onnx", opener, "t1") is a
    d = session_or_cached(None, None, tmp_path / "d.onnx", opener, "t1")
    other_kind = session_or_cached(None, tmp_path / "a.onnx", tmp_path / "d.onnx", opener, "t2")
    assert d is not a and other_kind is not a
    assert opened == [str(tmp_path / "a.onnx"), str(tmp_path / "d.onnx"), str(tmp_path / "a.onnx")]


def test_threads_share_one_session(tmp_path: Path) -> None:
    opened = []
    gate = threading.Barrier(8)

    def opener(path: str) -> object:
        opened.append(path)
        return object()

    got = []

    def worker() -> None:
        gate.wait()
        got.append(session_or_cached(None, tmp_path / "x.onnx", tmp_path / "x.onnx", opener, "t3"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1 and len({id(s) for s in got}) == 1

"""Operating the listener, in process: forward retries (running and after a restart, never
re-triaging), the operator's log lines, OUT/listener.json, ``forward_files`` arguments.

The forward target that refuses is a closed port (nothing listens there yet); the PACS that
later accepts is a second in-process Listener started on that port. Retry delays are configured
short (``forward_retry_s``) so that each test takes a second or two.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from sdk.errors import ConfigError, DicomNetworkError, NotDicomError  # noqa: E402
from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig, parse_retry_schedule  # noqa: E402
from sdk.integration.results import forward_files  # noqa: E402
from sdk.integration.triage_fns import inventory  # noqa: E402

LOGGER = "sdk.integration.listener"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from sdk.phantom import write_phantom_series

    return write_phantom_series(tmp_path_factory.mktemp("ph") / "s", n_slices=4, size=32, series_uid="1.2.826.0.1.44")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def _marker(out: Path) -> dict:
    return json.loads((out / "series" / "1.2.826.0.1.44" / "DONE").read_text())


def _ledger(out: Path) -> list:
    return [json.loads(line) for line in (out / "triage-log.jsonl").read_text().splitlines()]


def _pacs(out: Path, port: int) -> Listener:
    """The receiving end: accepts calling AE CTSDK only, on ``port``."""
    return Listener(ListenerConfig(out=out, port=port, ae_title="PACS", allow_ae=("CTSDK",), quiet_seconds=0.2,
                                   dicom_results=False), lambda: inventory).start()


def _failure_lines(caplog):
    return [r for r in caplog.records if r.name == LOGGER and "not forwarded:" in r.getMessage()]


def test_failed_forward_is_retried_by_the_running_listener_without_triage(series, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = _free_port()  # closed: the first forward fails
    target = ForwardTarget("127.0.0.1", port, "PACS")
    calls = []

    def triage(files):
        calls.append(len(files))
        return inventory(files)

    node = Listener(ListenerConfig(out=tmp_path / "node", port=0, quiet_seconds=0.2, forward=target,
                                   forward_retry_s=(0.5, 0.5, 0.5)), lambda: triage).start()
    pacs = None
    try:
        forward_files(series, ForwardTarget(*node.address, "CTSDK"), calling_ae="SCANNER")
        assert _wait(lambda: (tmp_path / "node" / "series" / "1.2.826.0.1.44" / "DONE").exists())
        first = _marker(tmp_path / "node")
        assert first["forward"]["state"] == "pending" and first["forward"]["n_attempts"] == 1
        assert "association not established" in first["forward_error"] and "forwarded_to" not in first
        # the retry is scheduled just after the DONE marker is written (it needs the marker's revision)
        assert _wait(lambda: node.summary()["forward_pending"] == 1)
        pacs = _pacs(tmp_path / "pacs", port)  # the PACS comes up (before the first retry, or the second)
        assert _wait(lambda: "forwarded_to" in _marker(tmp_path / "node"))  # the PACS stored them before Success
        summary = node.summary()
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()
    m = _marker(tmp_path / "node")
    assert m["forwarded_to"] == str(target) and "forward_error" not in m
    n = m["forward"]["n_attempts"]
    assert m["forward"]["state"] == "sent" and 2 <= n <= 4 and m["revision"] == 1
    assert [("error" in a, a.get("sent")) for a in m["forward"]["attempts"]] == \
        [(True, None)] * (n - 1) + [(False, len(m["results"]))]
    assert calls == [4] and len(_ledger(tmp_path / "node")) == 1  # re-sent from disk, never re-triaged
    assert summary["forwarded"] == 1 and summary["forward_failed"] == n - 1 and summary["forward_pending"] == 0
    got = {str(pydicom.dcmread(str(p)).SOPInstanceUID) for p in (tmp_path / "pacs").glob("series/*/instances/*.dcm")}
    want = {str(pydicom.dcmread(str(tmp_path / "node" / "series" / "1.2.826.0.1.44" / "results" / n)).SOPInstanceUID)
            for n in m["results"]}
    assert got == want and len(want) == 2  # sr.dcm, sc-001.dcm
    # one line per failure, the target named once; the finished line says what happened
    fails = _failure_lines(caplog)
    assert len(fails) == n - 1 and all(r.levelno == logging.WARNING for r in fails)
    assert all(r.getMessage().count(str(target)) == 1 and "next try in 0.5 s" in r.getMessage() for r in fails)
    assert "series 1.2.826.0.1.44 done: not_triaged, 4 instances" in fails[0].getMessage()
    assert any(r.levelno == logging.INFO and "results forwarded to" in r.getMessage() for r in caplog.records)


def test_given_up_forward_is_retried_at_the_next_start_without_triage(series, tmp_path, caplog):
    """The schedule runs out (three failed attempts, one line each), the marker keeps the series
    pending; a restart - here with a marker as written before retries existed - sends the results
    on disk and does not triage again."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = _free_port()
    target = ForwardTarget("127.0.0.1", port, "PACS")
    out = tmp_path / "node"
    cfg = dict(out=out, port=0, quiet_seconds=0.2, forward=target, forward_retry_s=(0.1, 0.1))
    node = Listener(ListenerConfig(**cfg), lambda: inventory).start()
    try:
        forward_files(series, ForwardTarget(*node.address, "CTSDK"), calling_ae="SCANNER")
        assert _wait(lambda: node.summary()["forward_failed"] == 3)
        time.sleep(0.25)  # no fourth attempt
        summary = node.summary()
    finally:
        node.stop()
    assert summary["forward_failed"] == 3 and summary["forwarded"] == 0 and summary["forward_pending"] == 1
    m = _marker(out)
    assert m["forward"]["n_attempts"] == 3 and m["forward"]["state"] == "pending" and len(m["forward"]["attempts"]) == 3
    lines = _failure_lines(caplog)
    assert [r.levelno for r in lines] == [logging.WARNING, logging.WARNING, logging.ERROR]
    assert all(r.getMessage().count(str(target)) == 1 for r in lines)
    assert "no more tries until the listener restarts" in lines[-1].getMessage()
    # the marker of an older ctsdk: forward_error only
    legacy = {k: v for k, v in m.items() if k != "forward"}
    (out / "series" / "1.2.826.0.1.44" / "DONE").write_text(json.dumps(legacy))
    before = (out / "triage-log.jsonl").read_text()

    def no_triage():
        raise AssertionError("a restart must not triage a finished series")

    pacs = _pacs(tmp_path / "pacs", port)
    try:
        node = Listener(ListenerConfig(**cfg), no_triage).start()
        try:
            assert _wait(lambda: "forwarded_to" in _marker(out))
            assert node.summary()["forwarded"] == 1 and node.summary()["forward_pending"] == 0
        finally:
            node.stop()
    finally:
        pacs.stop()
    m = _marker(out)
    assert m["forward"]["state"] == "sent" and m["forward"]["n_attempts"] == 2 and m["revision"] == 1
    assert (out / "triage-log.jsonl").read_text() == before
    assert len(list((tmp_path / "pacs").glob("series/*/instances/*.dcm"))) == len(m["results"])
    assert any("finished series have results not yet forwarded" in r.getMessage() for r in caplog.records)


def test_forward_files_arguments(series, tmp_path):
    lst = Listener(ListenerConfig(out=tmp_path / "out", port=0, quiet_seconds=0.2), lambda: inventory).start()
    try:
        host, port = lst.address
        assert forward_files(series[:2], f"{host}:{port}:CTSDK", calling_ae="S") == 2  # the documented string
        with pytest.raises(ConfigError, match="HOST:PORT:AET"):
            forward_files(series, f"{host}:{port}")
        with pytest.raises(ConfigError, match="forward target"):
            forward_files(series, ("127.0.0.1", port, "CTSDK"))
        text = tmp_path / "notes.txt"
        text.write_text("not DICOM\n")
        with pytest.raises(NotDicomError, match="notes.txt") as exc:
            forward_files([series[0], text], f"{host}:{port}:CTSDK")
        assert exc.value.path == str(text)
        assert forward_files([], f"{host}:{port}:CTSDK") == 0
        assert lst.wait_idle(10)
    finally:
        lst.stop()
    with pytest.raises(DicomNetworkError, match="not established"):
        forward_files(series[:1], f"127.0.0.1:{_free_port()}:X", timeout_s=2)
    assert parse_retry_schedule("30,120,600") == (30.0, 120.0, 600.0) and parse_retry_schedule("none") == ()
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ConfigError, match="--forward-retry"):
            parse_retry_schedule(bad)


def test_finished_line_and_one_warning_per_series_for_reused_uids(tmp_path, caplog):
    """Six files with one placeholder SOPInstanceUID: one WARNING, four DEBUG lines, and the
    count in the finished INFO line, the marker, the ledger and result.json."""
    from sdk.phantom import write_phantom_series

    caplog.set_level(logging.DEBUG, logger=LOGGER)
    paths = write_phantom_series(tmp_path / "src", n_slices=6, size=32, series_uid="1.2.826.0.1.45")
    for p in paths:
        ds = pydicom.dcmread(str(p))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.45.1"
        ds.save_as(str(p))
    out = tmp_path / "out"
    lst = Listener(ListenerConfig(out=out, port=0, quiet_seconds=0.2, dicom_results=False), lambda: inventory).start()
    try:
        forward_files(paths, ForwardTarget(*lst.address, "CTSDK"), calling_ae="S")
        assert lst.wait_idle(10) and _wait(lambda: (out / "series" / "1.2.826.0.1.45" / "DONE").exists())
    finally:
        lst.stop()
    reused = [r for r in caplog.records if "arrived again at another position" in r.getMessage()]
    assert [r.levelno for r in reused] == [logging.WARNING] + [logging.DEBUG] * 4
    (done,) = [r for r in caplog.records if "series 1.2.826.0.1.45 done" in r.getMessage()]
    assert done.levelno == logging.INFO
    assert "not_triaged, 6 instances (5 with a reused SOPInstanceUID" in done.getMessage()
    assert "not forwarded (no --forward)" in done.getMessage() and " ms (triage " in done.getMessage()
    marker = json.loads((out / "series" / "1.2.826.0.1.45" / "DONE").read_text())
    (line,) = _ledger(out)
    assert marker["uid_reused"] == line["uid_reused"] == 5
    assert line["revision"] == marker["revision"] == 1 and line["instances_digest"] == marker["instances_digest"]
    result = json.loads((out / "series" / "1.2.826.0.1.45" / "results" / "result.json").read_text())
    assert result["listener"]["uid_reused"] == 5
    starts = [r for r in caplog.records if r.getMessage().startswith("listening on")]
    assert starts and all(r.levelno == logging.INFO for r in starts)


def test_listen_cli_logs_info_by_default_and_records_a_clean_stop(tmp_path):
    """`ctsdk listen` without -v shows the listener's INFO lines; --quiet hides them; a clean stop
    rewrites OUT/listener.json with running false and stopped_at."""
    from click.testing import CliRunner

    from sdk.cli import cli

    out = tmp_path / "out"
    status = out / "listener.json"

    def stop_when_running() -> None:
        if _wait(lambda: status.exists() and json.loads(status.read_text()).get("running") is True, 20):
            os.kill(os.getpid(), signal.SIGTERM)  # the command's own handler (installed before the file): a clean stop

    level_before = logging.getLogger(LOGGER).level
    for extra, shows_info in (([], True), (["--quiet"], False)):
        if status.exists():
            status.unlink()
        t = threading.Thread(target=stop_when_running)
        t.start()
        res = CliRunner().invoke(cli, ["listen", "--port", "0", "--out", str(out), "--json", "--forward",
                                       "127.0.0.1:1:PACS", "--triage-fn", "sdk.integration.triage_fns:inventory",
                                       *extra], prog_name="ctsdk")
        t.join()
        assert res.exit_code == 0, res.output
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert summary["forwarded"] == summary["forward_failed"] == summary["forward_pending"] == 0
        assert ("INFO sdk.integration.listener: listening on" in res.stderr) is shows_info, res.stderr
        assert "WARNING" not in res.stderr, res.stderr
        st = json.loads(status.read_text())
        assert st["running"] is False and st["pid"] == os.getpid() and st["stopped_at"] >= st["started_at"]
    assert logging.getLogger(LOGGER).level == level_before  # the command put the level back

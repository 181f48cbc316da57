"""Listener security and storage safety, in process (no dcmtk needed).

- names derived from network values never leave the storage root (UID grammar, hashes);
- writes are atomic and durable (no partial file is ever visible under the final name);
- the source-address allow-list closes strangers' connections; the AE allow-list rejects them;
- TLS with client certificates (mutual TLS) accepts a client with a certificate from the CA and
  refuses one without.
"""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom")

from sdk.errors import ConfigError, DicomNetworkError  # noqa: E402
from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig, parse_forward  # noqa: E402
from sdk.integration.results import forward_files  # noqa: E402
from sdk.integration.storage import SeriesStore, atomic_write_bytes, is_valid_uid, safe_key  # noqa: E402
from sdk.integration.triage_fns import inventory  # noqa: E402


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from sdk.phantom import write_phantom_series

    return write_phantom_series(tmp_path_factory.mktemp("ph") / "s", n_slices=4, size=32)


@pytest.mark.parametrize("value", ["../../x", "..", "/etc/passwd", "1.2/../../3", "a\x00b", "", "1." * 40, "01.2", "C:\\x"])
def test_unsafe_values_become_hashes(value, tmp_path):
    key = safe_key(value)
    assert key.startswith("h-") and len(key) == 26 and set(key[2:]) <= set("0123456789abcdef")
    store = SeriesStore(tmp_path / "out")
    stored = store.store(value, value, b"DICM-bytes")
    assert stored.path.resolve().is_relative_to((tmp_path / "out" / "series").resolve())
    assert stored.path.read_bytes() == b"DICM-bytes"


def test_valid_uids_are_kept_and_grammar_is_strict():
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.2") and safe_key("1.2.3") == "1.2.3"
    for bad in ("1..2", "1.02", ".1", "1.", "1.2a", "1" * 65, 12, None):
        assert not is_valid_uid(bad), bad
    assert safe_key("") != safe_key("", b"other")  # empty UIDs of different objects do not collide


def test_store_is_idempotent_and_atomic(tmp_path):
    store = SeriesStore(tmp_path / "out")
    a = store.store("1.2.3", "1.2.3.4", b"first")
    b = store.store("1.2.3", "1.2.3.4", b"second")
    assert a.is_new and not b.is_new and a.path == b.path and a.path.read_bytes() == b"second"
    assert sorted(p.name for p in a.path.parent.iterdir()) == ["1.2.3.4.dcm"]  # no temp file left
    # a crash between write and rename leaves only a hidden temp file, removed on restart
    (a.path.parent / ".1.2.3.5.dcm.abc.tmp").write_bytes(b"partial")
    again = SeriesStore(tmp_path / "out")
    assert again.instance_names("1.2.3") == ["1.2.3.4.dcm"]
    assert not list(a.path.parent.glob("*.tmp"))


def test_one_uid_at_two_positions_is_two_files_across_a_restart(tmp_path):
    """The same SOPInstanceUID at another position is another slice (kept); at the same position it
    is a re-send (replaces). After a restart the first file's position is read back from disk."""
    from sdk.integration.storage import position_token
    from sdk.phantom import write_phantom_series

    files = write_phantom_series(tmp_path / "src", n_slices=2, size=16)
    pos = [position_token(pydicom.dcmread(str(f)).ImagePositionPatient) for f in files]
    assert pos[0] != pos[1] and position_token([1, 2]) is None and position_token(None) is None
    data = [f.read_bytes() for f in files]
    store = SeriesStore(tmp_path / "out")
    a = store.store("1.2.3", "1.2.3.4", data[0], pos[0])
    b = store.store("1.2.3", "1.2.3.4", data[1], pos[1])
    assert a.is_new and b.is_new and b.uid_reused and a.path != b.path and b.path.name.startswith("1.2.3.4~p")
    again = SeriesStore(tmp_path / "out")  # restart: positions are not in memory any more
    c = again.store("1.2.3", "1.2.3.4", data[1], pos[1])
    d = again.store("1.2.3", "1.2.3.4", data[0], pos[0])
    assert (c.path, c.is_new, c.uid_reused) == (b.path, False, False) and (d.path, d.is_new) == (a.path, False)
    assert [p.read_bytes() for p in (a.path, b.path)] == data and len(again.instance_names("1.2.3")) == 2


def test_merge_series_moves_every_instance_and_removes_the_pieces(tmp_path):
    store = SeriesStore(tmp_path / "out")
    store.store("1.2.3.1", "1.2.3.9", b"one")
    store.store("1.2.3.2", "1.2.3.9", b"two")  # the same instance name in two series
    store.store("1.2.3.3", "1.2.3.8", b"three")
    with pytest.raises(ConfigError, match="into itself"):
        store.merge_series(["1.2.3.1"], "1.2.3.1")
    names = store.merge_series(["1.2.3.1", "1.2.3.2", "1.2.3.3"], "merged-1.2.3.1")
    assert len(names) == 3 and names == store.instance_names("merged-1.2.3.1") and store.version("merged-1.2.3.1") == 3
    assert store.series_keys() == ["merged-1.2.3.1"]
    assert sorted(p.name for p in (tmp_path / "out" / "series").iterdir()) == ["merged-1.2.3.1"]
    folder = store.instances_dir("merged-1.2.3.1")
    assert sorted((folder / n).read_bytes() for n in names) == [b"one", b"three", b"two"]
    assert SeriesStore(tmp_path / "out").instance_names("merged-1.2.3.1") == names  # as on disk


def test_atomic_write_never_shows_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_config_validation():
    with pytest.raises(ConfigError, match="HOST:PORT:AET"):
        parse_forward("localhost:104")
    assert parse_forward("10.0.0.5:11112:PACS") == ForwardTarget("10.0.0.5", 11112, "PACS")
    with pytest.raises(ConfigError, match="--tls-cert and --tls-key"):
        ListenerConfig(out=Path("x"), tls_cert=Path("c.pem")).validate()
    with pytest.raises(ConfigError, match="--workers"):
        ListenerConfig(out=Path("x"), workers=0).validate()


def test_ip_and_ae_allow_lists(series, tmp_path):
    lst = Listener(ListenerConfig(out=tmp_path / "a", port=0, allow_ip=("10.9.9.9",), quiet_seconds=0.2),
                   lambda: inventory).start()
    try:
        with pytest.raises(DicomNetworkError, match="not established"):
            forward_files(series, ForwardTarget(*lst.address, "CTSDK"), calling_ae="ANY", timeout_s=2)
        assert lst.counts["refused_connections"] == 1
    finally:
        lst.stop()
    lst = Listener(ListenerConfig(out=tmp_path / "b", port=0, allow_ae=("GOOD",), quiet_seconds=0.2),
                   lambda: inventory).start()
    try:
        with pytest.raises(DicomNetworkError, match="rejected"):
            forward_files(series, ForwardTarget(*lst.address, "CTSDK"), calling_ae="BAD", timeout_s=5)
        assert forward_files(series, ForwardTarget(*lst.address, "CTSDK"), calling_ae="GOOD") == len(series)
        assert lst.wait_idle(30)
        assert lst.counts["rejected_associations"] == 1 and lst.counts["received"] == len(series)
    finally:
        lst.stop()
    assert not list((tmp_path / "a").glob("series/*/instances/*.dcm"))


def test_called_ae_title_is_checked_only_when_asked(series, tmp_path, caplog):
    """By default any called AE title is accepted (senders often get it wrong); with
    require_called_ae an association calling another AE title is rejected, with its own log line."""
    import logging

    lst = Listener(ListenerConfig(out=tmp_path / "a", port=0, quiet_seconds=0.2), lambda: inventory).start()
    try:
        assert forward_files(series[:1], ForwardTarget(*lst.address, "ANYTHING"), calling_ae="S") == 1
    finally:
        lst.stop()
    caplog.set_level(logging.WARNING, logger="sdk.integration.listener")
    lst = Listener(ListenerConfig(out=tmp_path / "b", port=0, quiet_seconds=0.2, require_called_ae=True),
                   lambda: inventory).start()
    try:
        with pytest.raises(DicomNetworkError, match="rejected"):
            forward_files(series[:1], ForwardTarget(*lst.address, "ANYTHING"), calling_ae="S", timeout_s=5)
        assert forward_files(series[:1], ForwardTarget(*lst.address, "CTSDK"), calling_ae="S") == 1
        assert lst.counts["rejected_associations"] == 1
    finally:
        lst.stop()
    lines = [r.getMessage() for r in caplog.records if "rejected association" in r.getMessage()]
    assert lines == ["rejected association from calling AE 'S' at 127.0.0.1: called AE title 'ANYTHING' is not ours "
                     "('CTSDK'; --require-called-ae)"]


def _make_pki(d: Path) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ctsdk-test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'127.0.0.1' if name == 'server' else 'scanner'}")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n" if name == "server" else "basicConstraints=CA:FALSE\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {k: d / k for k in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def _send_tls(files, address, ctx: ssl.SSLContext) -> int:
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate(address[0], address[1], ae_title="CTSDK", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return -1
    n = sum(assoc.send_c_store(pydicom.dcmread(str(f))).Status == 0 for f in files)
    assoc.release()
    return n


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found (needed to make test certificates)")
def test_mutual_tls(series, tmp_path):
    pki = _make_pki(tmp_path)
    lst = Listener(ListenerConfig(out=tmp_path / "out", port=0, tls_cert=pki["server.pem"], tls_key=pki["server.key"],
                                  tls_ca=pki["ca.pem"], quiet_seconds=0.2), lambda: inventory).start()
    try:
        good = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        good.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert _send_tls(series, lst.address, good) == len(series)
        no_cert = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
        assert _send_tls(series[:1], lst.address, no_cert) == -1  # no client certificate: refused
        assert lst.wait_idle(30)
    finally:
        lst.stop()
    assert len(list((tmp_path / "out").glob("series/*/instances/*.dcm"))) == len(series)

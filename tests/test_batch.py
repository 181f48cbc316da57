"""``ctsdk triage-batch``: series discovery, the JSONL writer, resume, and the whole shared folder.

The whole-folder run uses the ``ingest_check`` hook (real decoding + eligibility, no models) so
that every bad input raises the same typed error a triage would, in ~20 s; the real Triage
through the same driver is in test_listener_triage.py.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SDK_HOME, shared_path

pytest.importorskip("pydicom")

from sdk.integration.batch import BatchOptions, JsonlWriter, discover_series, run_batch  # noqa: E402

INGEST = "sdk.integration.triage_fns:ingest_check"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/a: one series; root/mixed: two series + README + an empty and a text file; root/.hidden."""
    from sdk.phantom import write_phantom_series

    root = tmp_path_factory.mktemp("archive")
    write_phantom_series(root / "a", n_slices=6, size=64, series_uid="1.2.3.4.1")
    write_phantom_series(root / "mixed", n_slices=5, size=64, series_uid="1.2.3.4.2")
    # a second series in the same folder: new file names so nothing is overwritten
    tmp = root / "tmpc"
    for p in write_phantom_series(tmp, n_slices=4, size=64, series_uid="1.2.3.4.3", z0_mm=50.0):
        p.rename(root / "mixed" / f"c_{p.name}")
    tmp.rmdir()
    (root / "mixed" / "README.md").write_text("notes\n")
    (root / "mixed" / "empty.dcm").write_bytes(b"")
    (root / "mixed" / "text.dcm").write_text("this is not DICOM\n")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "junk.dcm").write_text("ignored\n")
    return root


def test_discovery_groups_folders_by_series(tree):
    refs, skipped = discover_series(tree)
    keys = [r.key for r in refs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    by_key = {r.key: r for r in refs}
    assert set(by_key) == {"a::1.2.3.4.1", "mixed::1.2.3.4.2", "mixed::1.2.3.4.3", "mixed/empty.dcm", "mixed/text.dcm"}
    assert [len(by_key[k].files) for k in ("a::1.2.3.4.1", "mixed::1.2.3.4.2", "mixed::1.2.3.4.3")] == [6, 5, 4]
    assert by_key["mixed/empty.dcm"].error["type"] == "NotDicomError"
    assert by_key["mixed/text.dcm"].error["type"] == "NotDicomError"
    assert "empty.dcm" in by_key["mixed/empty.dcm"].error["message"]
    assert skipped == 1  # README.md; hidden folders are not walked


def test_discovery_merges_a_series_whose_uid_was_regenerated_per_file(tmp_path):
    """An anonymiser gave every file its own SeriesInstanceUID: the folder is one series for the
    batch, as for sdk.io.load_series (one record, not one per file); nine such files are not."""
    import pydicom

    from sdk.io.reader import MIN_SPLIT_SERIES
    from sdk.phantom import write_phantom_series

    n = MIN_SPLIT_SERIES + 2
    for folder, count in (("split", n), ("few", MIN_SPLIT_SERIES - 1)):
        for k, p in enumerate(write_phantom_series(tmp_path / folder, n_slices=count, size=32)):
            ds = pydicom.dcmread(p)
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.9{k}"
            ds.save_as(p)
    refs, _ = discover_series(tmp_path)
    split = [r for r in refs if r.key.startswith("split::")]
    assert len(split) == 1 and len(split[0].files) == n
    assert split[0].key.startswith("split::1.2.826.0.1.3680043.8.498.9") and split[0].key.endswith(f"+{n - 1}")
    assert sorted(split[0].files) == sorted(str(p) for p in (tmp_path / "split").iterdir())
    assert len([r for r in refs if r.key.startswith("few::")]) == MIN_SPLIT_SERIES - 1


def test_jsonl_writer_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlWriter(path) as w:
        w.write({"key": "a", "v": 1})
        w.write({"key": "b", "v": 2})
    with open(path, "ab") as fh:  # a run killed mid-line
        fh.write(b'{"key": "c", "v"')
    assert JsonlWriter(path).done_keys() == {"a", "b"}
    with JsonlWriter(path) as w:
        w.write({"key": "c", "v": 3})
    recs = JsonlWriter.read(path)
    assert [r["key"] for r in recs] == ["a", "b", "c"]
    assert path.read_bytes().count(b"\n") == 4  # the torn fragment stays isolated on its own line


def test_run_and_resume(tree, tmp_path):
    out = tmp_path / "results.jsonl"
    s1 = run_batch(tree, out, BatchOptions(triage_fn=INGEST, progress=False))
    recs = JsonlWriter.read(out)
    assert s1.processed == s1.discovered == len(recs) == 5
    by_key = {r["key"]: r for r in recs}
    assert by_key["a::1.2.3.4.1"]["error"] is None and by_key["a::1.2.3.4.1"]["eligible"] is not None
    assert by_key["mixed/text.dcm"]["error"]["type"] == "NotDicomError"
    assert s1.errors == {"NotDicomError": 2} and s1.labels == {"not_triaged": 3}
    assert Path(s1.png).is_file() and Path(s1.png).name == "results.labels.png"
    before = out.read_bytes()
    s2 = run_batch(tree, out, BatchOptions(resume=True, triage_fn=INGEST, progress=False))
    assert s2.processed == 0 and s2.skipped_resume == 5 and out.read_bytes() == before
    # an interrupted run: only 2 lines made it; resume completes it without repeating them
    lines = before.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])
    s3 = run_batch(tree, out, BatchOptions(resume=True, triage_fn=INGEST, progress=False))
    keys = [r["key"] for r in JsonlWriter.read(out)]
    assert s3.processed == 3 and s3.skipped_resume == 2
    assert sorted(keys) == sorted(by_key) and len(keys) == len(set(keys))


def test_existing_output_needs_resume_or_overwrite(tree, tmp_path):
    from sdk.errors import ConfigError

    out = tmp_path / "r.jsonl"
    out.write_text('{"key": "x"}\n')
    with pytest.raises(ConfigError, match="--resume"):
        run_batch(tree, out, BatchOptions(triage_fn=INGEST, progress=False))
    s = run_batch(tree, out, BatchOptions(overwrite=True, triage_fn=INGEST, progress=False))
    assert s.processed == 5 and "x" not in JsonlWriter(out).done_keys()


def test_worker_processes_give_the_same_lines(tree, tmp_path):
    a, b = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    run_batch(tree, a, BatchOptions(triage_fn=INGEST, progress=False, png=False), workers=1)
    run_batch(tree, b, BatchOptions(triage_fn=INGEST, progress=False, png=False), workers=2)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_ms", "timings_ms")}  # noqa: E731
    ra = sorted((strip(r) for r in JsonlWriter.read(a)), key=lambda r: r["key"])
    rb = sorted((strip(r) for r in JsonlWriter.read(b)), key=lambda r: r["key"])
    assert ra == rb


def test_cli_whole_shared_folder_and_resume(tmp_path):
    root = shared_path("dicom")
    shared_path("dicom", "bad-inputs")  # the assertions below name its files: skip on a partial copy
    out = tmp_path / "all.jsonl"
    cmd = [sys.executable, "-c", "from sdk.cli import main; main()", "triage-batch", str(root), "--out", str(out),
           "--triage-fn", INGEST, "--json"]
    res = subprocess.run(cmd, cwd=str(SDK_HOME), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert "series/s" in res.stderr  # tqdm rate (and ETA) on stderr
    recs = JsonlWriter.read(out)
    keys = [r["key"] for r in recs]
    refs, _ = discover_series(root)
    assert len(keys) == len(set(keys)) == summary["discovered"] == len(refs)  # one line per series
    by_key = {r["key"]: r for r in recs}
    p001 = [r for k, r in by_key.items() if k.startswith("covid-ct-md/covid-P001::")]
    assert len(p001) == 1 and p001[0]["error"] is None and p001[0]["n_files"] == 148
    for name in ("empty-file.dcm", "not-dicom-text.dcm", "jpeg-image-named.dcm"):
        assert by_key[f"bad-inputs/{name}"]["error"]["type"] == "NotDicomError"
    modal = {r["modality"]: r for r in recs if r["key"].startswith("bad-inputs::")}
    for m in ("SR", "SEG", "RTSTRUCT"):
        assert modal[m]["error"]["type"] == "NotCTError", modal[m]
    assert sum(summary["errors"].values()) == sum(1 for r in recs if r["error"])
    assert Path(summary["png"]).is_file()
    # --resume redoes nothing
    before = out.read_bytes()
    res2 = subprocess.run(cmd + ["--resume"], cwd=str(SDK_HOME), capture_output=True, text=True, timeout=300)
    assert res2.returncode == 0, res2.stderr[-3000:]
    s2 = json.loads(res2.stdout.strip().splitlines()[-1])
    assert s2["processed"] == 0 and s2["skipped_resume"] == summary["discovered"]
    assert out.read_bytes() == before

"""``ctsdk triage-batch --engine ray`` and ``listen`` dispatch on a two-node Ray cluster (issue #10).

A real two-node cluster (``ray.cluster_utils.Cluster``: a head and a worker raylet on this
machine, 2 logical CPUs each, so the actor pool of 2 and Ray Data's own work both fit) runs the
real Triage over an archive of phantom series, small real series from ../shared/data and the
shared bad inputs. Checks: one line per series, both nodes used, the same labels/probabilities
as the local engine (an independent run of the same CLI with ``--engine local``) within 1e-6, bad
inputs as error lines of the same types; the worker node removed mid-run -> every series exactly
once; SIGINT then ``--resume`` -> finished series not redone (counted); the listener's series
triaged on cluster actors. The core-install error path (ray blocked by a meta-path finder) and the
ray-free ``import sdk`` are fast and need no cluster.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import REPO, SDK_HOME, SHARED_DATA, subprocess_env

pytest.importorskip("pydicom")

CLI = [sys.executable, "-c", "from sdk.cli import main; main()"]
ENV = subprocess_env(RAY_DEDUP_LOGS="0")

# small real series and the shared bad inputs (symlinked into the test archive when present)
REAL_SUBSETS = ("cip-ct64", "lungmask-testdata", "bad-inputs")

BLOCK_RAY = """
import sys
class _NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray' (blocked by the test: a core install)")
        return None
sys.meta_path.insert(0, _NoRay())
"""


def _cli(args: List[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=str(SDK_HOME), env=ENV, capture_output=True, text=True, timeout=timeout)


def _lines(path: Path) -> List[Dict]:
    from sdk.integration.batch import JsonlWriter

    return JsonlWriter.read(path)


def _by_key(records: List[Dict]) -> Dict[str, Dict]:
    out: Dict[str, Dict] = {}
    for r in records:
        assert r["key"] not in out, f"series {r['key']} written twice"
        out[r["key"]] = r
    return out


# --- fast: no cluster -------------------------------------------------------------------------
def test_import_sdk_never_imports_ray():
    code = ("import sys, sdk, sdk.cluster, sdk.cluster.batch, sdk.cluster.dispatch, sdk.cluster.manifest, "
            "sdk.cluster.probe, sdk.cli.batch_cmd, sdk.cli.listen_cmd\n"
            "from sdk.cluster import run_batch_ray, RayDispatcher\n"
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(SDK_HOME), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ray imported by import sdk / sdk.cluster: {r.stdout} {r.stderr[-2000:]}"


def test_engine_ray_without_ray_exits_2_with_one_line(tmp_path):
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path / "arch" / "a", n_slices=4, size=32, series_uid="1.2.3.77.1")
    out = tmp_path / "r.jsonl"
    code = BLOCK_RAY + ("from sdk.cli import main\n"
                        f"sys.argv = ['ctsdk', 'triage-batch', {str(tmp_path / 'arch')!r}, '--engine', 'ray', "
                        f"'--out', {str(out)!r}]\nmain()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(SDK_HOME), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "install ctsdk[cluster]" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written, nothing half-done


def test_dispatcher_without_ray_raises_the_same_line():
    code = BLOCK_RAY + ("from sdk.errors import MissingDependencyError\n"
                        "from sdk.cluster import RayDispatcher\n"
                        "try:\n    RayDispatcher('auto')\nexcept MissingDependencyError as e:\n"
                        "    print(e); sys.exit(0)\nsys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(SDK_HOME), env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "install ctsdk[cluster]" in r.stdout, (r.stdout, r.stderr[-1500:])


def test_unreachable_cluster_exits_2_before_writing(tmp_path):
    import socket

    from sdk.phantom import write_phantom_series

    pytest.importorskip("ray")
    write_phantom_series(tmp_path / "arch" / "a", n_slices=4, size=32, series_uid="1.2.3.77.2")
    (tmp_path / "arch" / "junk.dcm").write_text("not DICOM\n")  # would be a driver-side error line
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "r.jsonl"
    t0 = time.monotonic()
    r = _cli(["triage-batch", str(tmp_path / "arch"), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}",
              "--out", str(out)], timeout=120)
    assert r.returncode == 2 and time.monotonic() - t0 < 60, r.stderr[-2000:]
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_manifest_keys_match_root_discovery(tmp_path):
    from sdk.cluster.manifest import discover_manifest
    from sdk.errors import ConfigError
    from sdk.integration.batch import discover_series
    from sdk.phantom import write_phantom_series

    root = tmp_path / "arch"
    write_phantom_series(root / "a", n_slices=4, size=32, series_uid="1.2.3.78.1")
    files_b = write_phantom_series(root / "deep" / "b", n_slices=3, size=32, series_uid="1.2.3.78.2")
    (root / "deep" / "b" / "broken.dcm").write_text("not dicom\n")
    man = root / "list.csv"
    # a folder, one series given file by file (merged), a folder listed twice; extra columns ignored
    rows = ["accession,path", "A1,a", *[f"B,{p.relative_to(root).as_posix()}" for p in files_b], "A1,a"]
    man.write_text("\n".join(rows) + "\n")
    refs, _ = discover_manifest(man)
    by_root = {r.key: r for r in discover_series(root)[0] if not r.error}
    got = {r.key: r for r in refs}
    assert set(got) == {"a::1.2.3.78.1", "deep/b::1.2.3.78.2"}
    for k, ref in got.items():
        assert sorted(ref.files) == sorted(by_root[k].files)
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nno/such/folder\n")
    with pytest.raises(ConfigError, match="no/such/folder"):
        discover_manifest(bad)
    (tmp_path / "nocol.csv").write_text("folder\na\n")
    with pytest.raises(ConfigError, match="'path' column"):
        discover_manifest(tmp_path / "nocol.csv")


def test_kuberay_manifest_is_a_rayjob_for_the_ray_engine():
    yaml = pytest.importorskip("yaml", reason="pyyaml comes with ctsdk[cluster]")
    doc = yaml.safe_load((REPO / "examples" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    entry = doc["spec"]["entrypoint"]
    for flag in ("triage-batch", "--engine ray", "--ray-address auto", "--resume", "--out"):
        assert flag in entry, flag
    major, minor = (int(x) for x in doc["spec"]["rayClusterSpec"]["rayVersion"].split(".")[:2])
    assert (major, minor) == (2, 60)  # the ctsdk[cluster] pin
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == groups["gpu"]["rayStartParams"]["num-gpus"]


# --- the two-node cluster ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Eligible phantom series, a series with missing slices, real small series and bad inputs."""
    from sdk.phantom import write_phantom_series

    root = tmp_path_factory.mktemp("cluster_archive")
    for i in range(6):
        write_phantom_series(root / f"phantom{i}", n_slices=28 + 2 * i, size=128, series_uid=f"1.2.826.0.1.3680043.77.{i}",
                             ground_glass=i % 2 == 1, consolidation=i % 3 == 2, noise_hu=5.0 * i, seed=i)
    write_phantom_series(root / "gappy", n_slices=30, size=128, missing=(10, 11, 12), series_uid="1.2.826.0.1.3680043.77.99")
    junk = root / "junk"
    junk.mkdir()
    (junk / "empty.dcm").write_bytes(b"")
    (junk / "notes.dcm").write_text("not DICOM\n")
    for name in REAL_SUBSETS:  # symlinks, never copies of the shared data
        src = SHARED_DATA / "dicom" / name
        if src.is_dir():
            (root / name).mkdir()
            for f in sorted(src.iterdir()):
                if f.is_file():
                    (root / name / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="ray not installed: pip install 'ctsdk[cluster]'")
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": 2, "object_store_memory": 96 * 1024 * 1024}
    c = Cluster(initialize_head=True, head_node_args=dict(node_args))
    worker = c.add_node(**node_args)
    c.wait_for_nodes()
    yield {"cluster": c, "address": c.address, "head": c.head_node.node_id, "worker": worker}
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_run(archive, tmp_path_factory) -> Dict[str, Dict]:
    out = tmp_path_factory.mktemp("local") / "local.jsonl"
    r = _cli(["triage-batch", str(archive), "--engine", "local", "--out", str(out), "--no-progress", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    return _by_key(_lines(out))


def _ray_args(archive: Path, out: Path, address: str, *extra: str) -> List[str]:
    return ["triage-batch", str(archive), "--engine", "ray", "--ray-address", address, "--workers", "2",
            "--out", str(out), "--json", *extra]


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. A shell runs background jobs with
    SIGINT ignored (``pytest ... &``), the child inherits that, and Python then installs no
    KeyboardInterrupt handler - the SIGINT the interrupt test sends would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_until(args: List[str], out: Path, ready, attempts: int = 3) -> subprocess.Popen:
    """Start ``ctsdk`` with ``args`` (writing ``out``) and return the running process once
    ``ready(lines)`` holds. The tests below act on a run *in progress* (SIGINT, a node removed);
    when a run ends before ``ready`` holds (small series finish fast; Ray places and paces the
    actors its own way), that run is discarded and a fresh one started, up to ``attempts`` times."""
    for _ in range(attempts):
        if out.exists():
            out.unlink()
        proc = subprocess.Popen(CLI + args, cwd=str(SDK_HOME), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if ready(_lines(out)):
                return proc
            time.sleep(0.1)
        proc.communicate(timeout=300)   # finished (or timed out) before it was ready: try again
    pytest.fail(f"in {attempts} runs the batch never reached the state this test acts on before it ended")


def _assert_same_as_local(ray_recs: Dict[str, Dict], local: Dict[str, Dict]) -> None:
    assert set(ray_recs) == set(local)
    for key, loc in local.items():
        got = ray_recs[key]
        assert (got["error"] or {}).get("type") == (loc["error"] or {}).get("type"), key
        assert got["label"] == loc["label"] and got["eligible"] == loc["eligible"], key
        assert got["reasons"] == loc["reasons"], key
        assert set(got["probabilities"]) == set(loc["probabilities"]), key
        for cls, p in loc["probabilities"].items():
            assert abs(got["probabilities"][cls] - p) <= 1e-6, (key, cls, got["probabilities"][cls], p)
        schema = set(loc) | {"ray_node_id"}
        assert set(got) == schema, (key, set(got) ^ schema)


@pytest.mark.slow
def test_two_nodes_same_lines_as_local(archive, cluster, local_run, tmp_path):
    out = tmp_path / "ray.jsonl"
    r = _cli(_ray_args(archive, out, cluster["address"], "--no-progress"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    recs = _by_key(_lines(out))
    _assert_same_as_local(recs, local_run)
    assert summary["processed"] == summary["discovered"] == len(recs)
    nodes = {r["ray_node_id"] for r in recs.values() if r["ray_node_id"]}
    assert nodes == {cluster["head"], cluster["worker"].node_id}, "both nodes must run series"
    eligible = [k for k, r in local_run.items() if r["eligible"]]
    assert len(eligible) >= 4, "the phantom series should be eligible (the comparison needs probabilities)"
    errors = {k for k, r in recs.items() if r["error"]}
    assert "junk/empty.dcm" in errors and "junk/notes.dcm" in errors
    assert recs["gappy::1.2.826.0.1.3680043.77.99"]["error"]["type"] == "MissingSlicesError"
    assert recs["gappy::1.2.826.0.1.3680043.77.99"]["ray_node_id"] in nodes  # failed on an actor, recorded once
    assert summary["task_failures"] == 0 and max(summary["actor_peak_rss_mb"].values()) > 50


def test_gpu_actors_on_a_cpu_cluster_are_refused(archive, cluster, tmp_path):
    out = tmp_path / "gpu.jsonl"
    r = _cli(_ray_args(archive, out, cluster["address"], "--gpus-per-worker", "1", "--no-progress"))
    assert r.returncode == 2 and "0 GPUs" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_interrupt_then_resume_redoes_nothing(archive, cluster, local_run, tmp_path):
    out = tmp_path / "resume.jsonl"
    # one actor: its results stream in one by one, so the run is still going when the first arrives;
    # SIGINT once the first series ran on the actor (the driver-side error lines come first). The
    # child gets SIGINT's default disposition back (_sigint_default): run from a background shell
    # job it would inherit "ignored" and finish every series
    args = _ray_args(archive, out, cluster["address"], "--no-progress")
    args[args.index("--workers") + 1] = "1"
    n_total = len(local_run)
    for _ in range(3):
        proc = _run_until(args, out, lambda lines: sum(1 for r in lines if r.get("ray_node_id")) >= 1)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode == 0 and len(_by_key(_lines(out))) == n_total:
            continue   # the last series finished before SIGINT landed: nothing to resume, run again
        break
    assert proc.returncode == 130, (proc.returncode, len(_lines(out)), n_total, stdout[-2000:], stderr[-3000:])
    before_bytes = out.read_bytes()
    before = _by_key(_lines(out))
    assert 3 <= len(before) < n_total
    r = _cli(_ray_args(archive, out, cluster["address"], "--no-progress", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["skipped_resume"] == len(before)
    assert summary["processed"] == n_total - len(before)  # counted: finished series were not redone
    assert out.read_bytes().startswith(before_bytes)  # first run's lines untouched
    _assert_same_as_local(_by_key(_lines(out)), local_run)


@pytest.mark.slow
def test_listener_dispatches_to_the_cluster(cluster, tmp_path):
    pytest.importorskip("pynetdicom")
    import ray

    from sdk.cluster import RayDispatcher
    from sdk.integration.listener import ForwardTarget, Listener, ListenerConfig
    from sdk.integration.results import forward_files
    from sdk.phantom import write_phantom_series
    from sdk.triage import Triage

    good = write_phantom_series(tmp_path / "good", n_slices=30, size=128, ground_glass=True,
                                series_uid="1.2.826.0.1.3680043.78.1")
    gappy = write_phantom_series(tmp_path / "gappy", n_slices=24, size=128, missing=(8, 9, 10),
                                 series_uid="1.2.826.0.1.3680043.78.2")
    dispatcher = RayDispatcher(cluster["address"])
    cfg = ListenerConfig(out=tmp_path / "store", port=0, quiet_seconds=0.5, workers=2, dicom_results=True)
    try:
        with Listener(cfg, dispatcher) as listener:
            host, port = listener.address
            forward_files(good + gappy, ForwardTarget(host, port, cfg.ae_title), calling_ae="SCANNER")
            time.sleep(1.0)
            assert listener.wait_idle(180), listener.summary()
            counts = dict(listener.counts)
            store = listener.store
            keys = store.series_keys()
            results = {k: store.results_dir(k) / "result.json" for k in keys}
            markers = {k: store.marker(k) for k in keys}
    finally:
        dispatcher.close()
    assert not ray.is_initialized()
    assert counts["triaged"] == 1 and counts["failed"] == 1, counts
    nodes = {cluster["head"], cluster["worker"].node_id}
    done = [k for k in keys if results[k].exists()]
    assert len(done) == 1
    res = json.loads(results[done[0]].read_text())
    assert res["ray_node_id"] in nodes
    ref = Triage().run([str(p) for p in good])
    assert res["label"] == ref.label
    for cls, p in ref.probabilities.items():
        assert abs(res["probabilities"][cls] - p) <= 1e-6
    assert any(p.name.startswith("sc") for p in results[done[0]].parent.iterdir()) or not ref.eligible
    failed = [k for k in keys if k not in done]
    assert json.dumps(markers[failed[0]]).count("MissingSlicesError") >= 1  # same exception type, recorded once


@pytest.mark.slow
def test_manifest_on_the_cluster_matches_root_keys(archive, cluster, local_run, tmp_path):
    """``--manifest`` rows (relative to the CSV) give the same keys as walking ROOT; paths_check runs on the nodes."""
    from sdk.cluster import RayOptions, run_batch_ray
    from sdk.integration.batch import BatchOptions

    man = archive / "subset.csv"  # inside the archive: relative paths resolve against the CSV's folder
    man.write_text("path,note\nphantom0,a\nphantom1,b\njunk,c\n")
    try:
        out = tmp_path / "man.jsonl"
        s = run_batch_ray(None, out, BatchOptions(progress=False, png=False, triage_fn="sdk.cluster.probe:paths_check"),
                          RayOptions(address=cluster["address"], workers=2), manifest=man)
    finally:
        man.unlink()
    recs = _by_key(_lines(out))
    want = {k for k in local_run if k.split("::")[0].split("/")[0] in ("phantom0", "phantom1", "junk")}
    assert set(recs) == want and s.processed == len(want) == 4
    for k in want:
        assert (recs[k]["error"] or {}).get("type") == (local_run[k]["error"] or {}).get("type")
    hosts = {r["ray_node_id"] for r in recs.values() if r["ray_node_id"]}
    assert hosts and hosts <= {cluster["head"], cluster["worker"].node_id}


@pytest.mark.slow
def test_series_that_kills_its_worker_is_bounded(cluster, tmp_path):
    """A series whose worker process dies every time ends as one ClusterTaskError line, not a hang."""
    import ray

    from sdk.cluster import RayOptions, run_batch_ray
    from sdk.integration.batch import BatchOptions
    from sdk.cluster.probe import CRASH_MARKER
    from sdk.phantom import write_phantom_series

    root = tmp_path / "arch"
    for i in range(3):
        write_phantom_series(root / f"s{i}", n_slices=2, size=16, series_uid=f"1.2.826.0.1.3680043.81.{i}")
    (root / "s1" / CRASH_MARKER).write_text("fault injection\n")
    out = tmp_path / "crash.jsonl"
    s = run_batch_ray(root, out, BatchOptions(triage_fn="sdk.cluster.probe:crash_if_marked", progress=False, png=False),
                      RayOptions(address=cluster["address"], workers=2, max_task_retries=1, retry_rounds=1))
    assert not ray.is_initialized()  # the driver disconnected; the cluster stays up
    recs = _by_key(_lines(out))
    assert len(recs) == 3 == s.processed
    bad = recs["s1::1.2.826.0.1.3680043.81.1"]
    assert bad["error"]["type"] == "ClusterTaskError" and "s1" in bad["error"]["message"]
    assert all(recs[f"s{i}::1.2.826.0.1.3680043.81.{i}"]["error"] is None for i in (0, 2))
    assert s.task_failures == 1 and s.resubmitted == 1


@pytest.mark.slow
def test_worker_node_lost_mid_run_every_series_once(archive, cluster, local_run, tmp_path):
    """Runs last: removes the worker node (the module's cluster is not used afterwards)."""
    c, worker = cluster["cluster"], cluster["worker"]
    out = tmp_path / "lost.jsonl"
    # two actors (one per node, as test_ray_matches_local checks); the node goes once it has
    # delivered a series, while the run goes on
    proc = _run_until(_ray_args(archive, out, cluster["address"], "--no-progress"), out,
                      lambda lines: any(r.get("ray_node_id") == worker.node_id for r in lines))
    n_before = len(_lines(out))
    c.remove_node(worker, allow_graceful=False)  # the node dies: its raylet, object store and actor
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout)
    recs = _by_key(_lines(out))  # raises on a duplicate
    assert n_before < len(recs) == summary["discovered"]
    _assert_same_as_local(recs, local_run)  # nothing lost, nothing turned into an error by the node loss
    assert summary["task_failures"] == 0
    after = [r["ray_node_id"] for r in _lines(out)[n_before:] if r["ray_node_id"]]
    assert after and set(after) <= {cluster["head"], worker.node_id}
    assert cluster["head"] in after  # the surviving node finished the run

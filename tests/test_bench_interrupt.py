"""An interrupted ``ctsdk bench`` keeps what it measured.

In-process: a progress callback raises KeyboardInterrupt at a chosen phase; ``run_bench`` raises
BenchInterrupted carrying the partial report (completed calls only, ``"interrupted"`` at the top,
unfinished sections listed, the goal "not judged"), which ``write_outputs`` writes as usual.
End to end: ``ctsdk bench`` gets SIGINT in its measured rounds (exit 130, one stderr line, the
partial report on stdout with --json and in --out) and SIGTERM while a fresh-process cold start
child runs (exit 143, the child stopped, runtimes without a measured call have no p50).
All on a tiny phantom (16 slices of 64x64), one thread, ONNX Runtime only (no torch).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import SDK_HOME, subprocess_env

pytest.importorskip("onnxruntime", reason="the bench's CPU runtimes run ONNX Runtime")

TINY = ["--warmup", "0", "--batch-sizes", "none", "--phantom-slices", "16", "--phantom-size", "64", "--threads", "1"]
CLI = [sys.executable, "-c", "from sdk.cli import main; main()"]


def _config(**kw: Any):
    from sdk.bench import BenchConfig

    base = dict(runtimes=["ort-fp32", "ort-int8"], repeat=4, warmup=0, batch_sizes=[1], scaling=[], threads=1,
                phantom_slices=16, phantom_size=64, cold_fresh=False)
    base.update(kw)
    return BenchConfig(**base)


def _interrupt_on(prefix: str, seen: List[str]):
    def progress(msg: str) -> None:
        seen.append(msg)
        if msg.startswith(prefix):
            raise KeyboardInterrupt
    return progress


def test_interrupt_after_a_measured_round_keeps_the_completed_calls(tmp_path: Path) -> None:
    from sdk.bench import run_bench, write_outputs
    from sdk.bench.harness import BenchInterrupted
    from sdk.bench.report import goal_text
    from sdk.cli.bench_cmd import _human

    seen: List[str] = []
    with pytest.raises(BenchInterrupted) as info:
        run_bench(_config(), progress=_interrupt_on("round 2/", seen))
    exc = info.value
    assert isinstance(exc, KeyboardInterrupt) and exc.signal_name == "SIGINT" and exc.exit_code == 130
    report = exc.report
    # the progress line of round 2 comes once its calls finished: the phase is still round 2's last call
    assert report is not None and exc.at.startswith("measuring round 2/4 ("), exc.at
    assert report["interrupted"]["at"] == exc.at and report["interrupted"]["signal"] == "SIGINT"
    assert list(report)[:2] == ["schema", "interrupted"]  # said at the top
    series = report["series"][0]
    assert series["unfinished"] == ["rounds", "batches"]
    for name in ("ort-fp32", "ort-int8"):
        rt = series["runtimes"][name]
        assert rt["status"] == "ok", rt
        assert rt["warm"]["total"]["n"] == 2 and len(rt["warm_totals_ms"]) == 2  # rounds 1 and 2 finished
        assert rt["throughput"] == {}  # the batch sweep never started
    goal = series["goal"]
    assert goal["judged"] is False and goal["status"] == "not judged: the run was interrupted"
    assert goal["met"] is None and goal["default_met"] is None and "by_runtime" not in goal
    assert "not judged: the run was interrupted" in goal_text(goal)

    paths = write_outputs(report, tmp_path)
    saved = json.loads(Path(paths["json"]).read_text())
    assert saved["interrupted"] == report["interrupted"]
    assert saved["series"][0]["runtimes"]["ort-fp32"]["warm_totals_ms"] == series["runtimes"]["ort-fp32"]["warm_totals_ms"]
    md = Path(paths["markdown"]).read_text()
    head = "\n".join(md.splitlines()[:4])
    assert f"Interrupted during {exc.at}: partial results; percentiles are over the calls completed" in head
    assert "Goal not judged: the run was interrupted" in md and "**met**" not in md
    assert "Unfinished when the run was interrupted: measured rounds, batch sizes" in md
    assert (tmp_path / "stages_0.png").is_file()  # the chart of what exists
    assert not list(tmp_path.glob(".*.tmp"))  # written via temporary files, renamed into place
    text = _human(report)
    assert text.startswith("Interrupted during measuring round 2/4") and "not judged" in text


def test_interrupt_before_any_measured_call_gives_no_p50() -> None:
    from sdk.bench import run_bench
    from sdk.bench.harness import BenchInterrupted
    from sdk.bench.report import to_markdown

    with pytest.raises(BenchInterrupted) as info:
        run_bench(_config(runtimes=["ort-fp32", "ort-int8"], batch_sizes=[], scaling=[20]),
                  progress=_interrupt_on("measuring:", []))
    report = info.value.report
    series = report["series"][0]
    assert series["unfinished"] == ["rounds", "scaling"] and "scaling" not in series  # no point measured
    for name in ("ort-fp32", "ort-int8"):
        rt = series["runtimes"][name]
        assert rt["status"] == "interrupted" and "warm" not in rt and "no warm p50" in rt["reason"]
        assert rt["cold"]["total_ms"] > 0  # the cold start did finish
    assert series["goal"]["judged"] is False and "best_runtime" not in series["goal"]
    md = to_markdown(report)
    assert "No runtime finished a measured call" in md and "**ort-fp32** (interrupted)" in md


def test_a_met_goal_is_not_judged_once_interrupted() -> None:
    """A verdict that would be "met" on complete numbers is withheld from a partial run."""
    from sdk.bench.harness import goal_not_judged
    from sdk.bench.report import goal_text
    from test_bench_units import _rt, _series

    goal = _series({"naive-paper": _rt(13870.0), "ort-fp32": _rt(1203.0, paper=13870.0, rss=593.0)})["goal"]
    assert goal["met"] is True
    partial = goal_not_judged(goal, "the run was interrupted")
    assert partial["met"] is None and partial["target_total_ms"] == goal["target_total_ms"]
    text = goal_text(partial)
    assert text.startswith("Goal not judged: the run was interrupted") and "**met**" not in text


# --- end to end: the console script and a real signal ---------------------------------------------------
def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default (a shell's background job ignores it,
    the child would inherit that and Python would install no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: List[str]) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["bench"] + args, cwd=str(SDK_HOME), env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 120.0) -> List[str]:
    """stderr lines up to and including the first that holds ``marker`` (fails if the bench ends first)."""
    lines: List[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    proc.communicate()
    pytest.fail(f"the bench never printed {marker!r}:\n" + "".join(lines))


def _finish(proc: subprocess.Popen) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    return {"rc": proc.returncode, "stdout": out, "stderr": err}


def test_sigint_in_the_measured_rounds_exits_130_with_the_partial_report(tmp_path: Path) -> None:
    out = tmp_path / "b"
    proc = _start(["--runtimes", "ort-fp32", "--repeat", "100000", "--no-cold-fresh", *TINY, "--out", str(out), "--json"])
    _read_until(proc, "round 1/100000:")  # a round finished; it would go on for minutes
    proc.send_signal(signal.SIGINT)
    res = _finish(proc)
    assert res["rc"] == 130, res["stderr"]
    last = res["stderr"].strip().splitlines()[-1]
    assert last.startswith("ctsdk: bench interrupted during measuring round ") and last.endswith(
        f"; partial report: {out / 'bench.json'}"), res["stderr"]
    assert "Traceback" not in res["stderr"]
    printed = json.loads(res["stdout"])  # --json: stdout is still one JSON object, the partial report
    saved = json.loads((out / "bench.json").read_text())
    assert printed["interrupted"] == saved["interrupted"] and saved["interrupted"]["signal"] == "SIGINT"
    assert saved["interrupted"]["at"] in last
    rt = saved["series"][0]["runtimes"]["ort-fp32"]
    assert rt["status"] == "ok" and rt["warm"]["total"]["n"] >= 1
    assert saved["series"][0]["goal"]["status"] == "not judged: the run was interrupted"
    assert (out / "bench.md").read_text().splitlines()[2].startswith("**Interrupted during measuring round ")


def test_sigterm_during_a_fresh_process_cold_start_stops_the_child_and_exits_143(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil", reason="psutil lists the bench's child process")
    out = tmp_path / "b"
    proc = _start(["--runtimes", "ort-fp32", "--repeat", "2", *TINY, "--out", str(out)])
    _read_until(proc, "ort-fp32: cold start in a fresh process")
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    kids: List[Any] = []
    while not kids and time.monotonic() < deadline:
        kids = [c for c in parent.children() if "sdk.bench.cold" in " ".join(c.cmdline())]
        time.sleep(0.01)
    assert kids, "the fresh-process cold start child never appeared"
    proc.send_signal(signal.SIGTERM)  # to the bench only, as a CI timeout may: the bench must stop its child
    # stopped at once, not left to finish its cold start (~2 s more here; it has only just started)
    gone, alive = psutil.wait_procs(kids, timeout=1.5)
    assert not alive, f"child {alive} still running after the bench was stopped"
    res = _finish(proc)
    assert res["rc"] == 143, res["stderr"]
    assert res["stderr"].strip().splitlines()[-1] == (
        f"ctsdk: bench interrupted during fresh-process cold start of ort-fp32; partial report: {out / 'bench.json'}")
    saved = json.loads((out / "bench.json").read_text())
    assert saved["interrupted"] == {**saved["interrupted"], "at": "fresh-process cold start of ort-fp32", "signal": "SIGTERM"}
    series = saved["series"][0]
    assert series["unfinished"] == ["cold_fresh", "rounds"]
    rt = series["runtimes"]["ort-fp32"]
    assert rt["status"] == "interrupted" and "warm" not in rt and rt["cold"]["fresh_process"] is None
    # the human summary went to stdout (no --json) and says it first
    assert res["stdout"].startswith("Interrupted during fresh-process cold start of ort-fp32")

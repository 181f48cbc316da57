"""`ctsdk bench` end to end on a small synthetic phantom (one real run, shared by the tests):
JSON schema, ratios recomputed from the raw numbers, skipped runtimes with reasons, scaling,
and the markdown / PNG outputs."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Dict

import pytest
from click.testing import CliRunner

from sdk.bench import STAGES
from sdk.cli import cli

ALL = "naive,ort-fp32,ort-int8,ort-cuda-fp16,trt-fp16,trt-int8"
SCALING = (20, 24)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> Dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    # one thread per library: on a shared 2-core machine two spinning torch threads can be 50x slower
    args = ["bench", "--runtimes", ALL, "--repeat", "1", "--warmup", "0", "--batch-sizes", "1,4", "--batch-repeat", "1",
            "--phantom-slices", "24", "--phantom-size", "96", "--scaling", ",".join(map(str, SCALING)),
            "--threads", "1", "--out", str(out), "--json"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    return {"report": report, "out": out}


def _ok(report: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in report["series"][0]["runtimes"].items() if v["status"] == "ok"}


def test_schema_per_stage_percentiles_for_every_usable_runtime(bench_run) -> None:
    r = bench_run["report"]
    assert r["schema"] == "ctsdk.bench/1"
    assert r["stages"] == list(STAGES)
    series = r["series"][0]
    assert set(series["runtimes"]) == set(ALL.split(","))
    ok = _ok(r)
    assert "ort-fp32" in ok, series["runtimes"]["ort-fp32"]
    for name, rt in ok.items():
        for stage in list(STAGES) + ["total"]:
            st = rt["warm"][stage]
            assert st["n"] == 1
            assert 0.0 <= st["min"] <= st["p50"] <= st["p95"] <= st["max"], (name, stage, st)
        # the stages account for the wall time of the call (nothing large is left untimed)
        stage_sum = sum(rt["warm"][s]["mean"] for s in STAGES) + rt["warm"].get("other", {}).get("mean", 0.0)
        total = rt["warm"]["total"]["mean"]
        assert stage_sum <= total * 1.001 + 1.0, (name, stage_sum, total)
        assert stage_sum >= 0.7 * total, (name, stage_sum, total)
        cold = rt["cold"]
        assert cold["total_ms"] == pytest.approx(cold["setup_ms"] + cold["first_call_ms"], abs=0.2)
        fresh = cold["fresh_process"]
        assert "error" not in fresh, fresh
        assert fresh["total_ms"] == pytest.approx(fresh["setup_ms"] + fresh["first_call_ms"], abs=0.2)
        assert fresh["max_rss_mb"] > 50.0 and fresh["label"] == rt["result"]["label"]
        assert rt["memory"]["peak_rss_mb"] > 50.0
        assert rt["memory"]["delta_rss_mb"] >= 0.0


def test_skipped_runtimes_carry_reasons(bench_run) -> None:
    from sdk._lazy import available
    from sdk.runtime.gpu import gpu_info

    runtimes = bench_run["report"]["series"][0]["runtimes"]
    for name, rt in runtimes.items():
        if rt["status"] != "ok":
            assert rt["status"] == "skipped" and len(rt["reason"]) > 10, (name, rt)
    if gpu_info() is None:
        for name in ("ort-cuda-fp16", "trt-fp16", "trt-int8"):
            assert runtimes[name]["status"] == "skipped" and "GPU" in runtimes[name]["reason"]
    if not available("tensorrt"):
        assert "tensorrt" in runtimes["trt-int8"]["reason"]
    if not available("torch"):
        assert "torch" in runtimes["naive"]["reason"]


def test_ratios_and_throughput_recomputed_from_raw_numbers(bench_run) -> None:
    ok = _ok(bench_run["report"])
    if "naive" not in ok:
        pytest.skip("naive baseline did not run (no torch)")
    naive = ok["naive"]
    assert naive["throughput"]["1"]["series_per_min"] == pytest.approx(60000.0 / naive["warm"]["total"]["p50"], rel=1e-2)
    for name, rt in ok.items():
        if name == "naive":
            continue
        sp = rt["speedup_vs_naive"]
        assert sp["total_p50"] == pytest.approx(naive["warm"]["total"]["p50"] / rt["warm"]["total"]["p50"], rel=1e-2)
        for stage, ratio in sp["stages_p50"].items():
            a, b = naive["warm"][stage]["p50"], rt["warm"][stage]["p50"]
            if ratio is not None and min(a, b) >= 1.0:  # the report rounds stage times to 0.01 ms
                assert ratio == pytest.approx(a / b, rel=2e-2)
        for b in ("1", "4"):
            tp = rt["throughput"][b]
            assert tp["series_per_min"] == pytest.approx(60000.0 / tp["total_p50_ms"], rel=1e-2)
    goal = bench_run["report"]["series"][0]["goal"]
    assert goal["best_runtime"] in ok and goal["target_speedup"] == 10.0 and goal["target_total_ms"] == 1500.0
    fresh = (ok[goal["best_runtime"]]["cold"].get("fresh_process") or {}).get("max_rss_mb")
    assert goal["peak_rss_mb"] == fresh and goal["small_enough"] == (None if fresh is None else fresh <= 800.0)
    assert goal["speedup"] == ok[goal["best_runtime"]]["speedup_vs_naive"]["total_p50"]


def test_scaling_points_for_each_runtime(bench_run) -> None:
    sc = bench_run["report"]["series"][0]["scaling"]
    assert sc["slice_counts"] == list(SCALING)
    for name in _ok(bench_run["report"]):
        pts = sc["runtimes"][name]
        assert [p["n_slices"] for p in pts] == list(SCALING), pts
        for p in pts:
            assert "error" not in p, p
            assert p["total_ms"] > 0 and p["peak_rss_mb"] > 0


def _png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_outputs_markdown_json_and_valid_pngs(bench_run) -> None:
    import matplotlib.image as mpimg

    out: Path = bench_run["out"]
    report = json.loads((out / "bench.json").read_text())
    assert report["series"][0]["runtimes"].keys() == bench_run["report"]["series"][0]["runtimes"].keys()
    md = (out / "bench.md").read_text()
    for name in ALL.split(","):
        assert name in md
    assert "stages_0.png" in md and "scaling.png" in md
    for png in ("stages_0.png", "scaling.png"):
        w, h = _png_size(out / png)
        assert w > 300 and h > 200
        img = mpimg.imread(out / png)
        assert img.shape[:2] == (h, w) and img.std() > 0.01  # decodes, and is not blank
    m = report["machine"]
    assert m["cpu_model"] and m["usable_cores"] >= 1 and m["ram_gb"] > 0 and "numpy" in m["libraries"]


def test_bad_arguments_exit_2_with_one_line() -> None:
    res = CliRunner().invoke(cli, ["bench", "--runtimes", "naive,warp-drive", "--json"])
    assert res.exit_code == 2
    assert "warp-drive" in res.output and "valid:" in res.output
    res = CliRunner().invoke(cli, ["bench", "--repeat", "0"])
    assert res.exit_code == 2 and "--repeat" in res.output


def test_runtimes_did_the_same_work(bench_run) -> None:
    """On the phantom every runtime finds lungs and classifies slices, so the ratios compare like
    with like (the bench itself warns when they do not)."""
    series = bench_run["report"]["series"][0]
    assert series["warnings"] == []
    for name, rt in _ok(bench_run["report"]).items():
        assert rt["result"]["eligible"] and rt["result"]["n_classified"] >= 10, (name, rt["result"])
        assert rt["warm"]["classify"]["p50"] > 0.0
    assert series["goal"]["comparable"] is True


def test_product_stages_are_triage_timings_regrouped(bench_run) -> None:
    """With --repeat 1 the warm numbers are one Triage call: decode + HU must add up to its
    ``load``, resample to its resample + classifier_inputs, and so on (0.01 ms rounding)."""
    for name, rt in _ok(bench_run["report"]).items():
        t = rt.get("triage_timings_ms_last")
        if not t:
            continue
        w = {k: v["p50"] for k, v in rt["warm"].items()}
        assert w["decode"] + w["hu"] == pytest.approx(t["load"], abs=0.05), name
        assert w["decode"] > 0.0
        assert w["resample"] == pytest.approx(t.get("resample", 0.0) + t.get("classifier_inputs", 0.0), abs=0.05)
        assert w["lungs"] == pytest.approx(t["lungs"], abs=0.05)
        assert w["classify"] == pytest.approx(t["classification"], abs=0.05)
        assert w["total"] >= t["total"] - 0.05  # the bench's wall clock encloses Triage's own total


def test_report_names_the_product_default_and_what_the_numbers_are_over(bench_run) -> None:
    """The reader learns which runtime the product runs by default, how many calls a p95 is over,
    and each runtime's own peak RSS (not the bench process's, shared by every runtime)."""
    from sdk.cli.bench_cmd import _human

    report = bench_run["report"]
    default = report["product_default_cpu"]["runtime"]
    assert default in ("ort-fp32", "ort-int8") and report["product_default_cpu"]["reason"]
    goal = report["series"][0]["goal"]
    assert goal["default_runtime"] == default
    assert set(goal["by_runtime"]) == {k for k in _ok(report) if k.startswith("ort-")}
    assert goal["default_met"] == goal["by_runtime"][default]["met"]
    md = (bench_run["out"] / "bench.md").read_text()
    assert f"{default} (CPU default)" in md and "1 measured call per runtime" in md and "synthetic phantom" in md
    text = _human(report)
    assert f"{default}*" in text and "fresh-process peak RSS" in text and "(n=1)" in text
    fresh = _ok(report)[default]["cold"]["fresh_process"]["max_rss_mb"]
    assert f"fresh-process peak RSS {fresh:.0f} MiB" in text


def test_cpu_use_of_every_runtime_is_consistent_with_its_wall_time(bench_run) -> None:
    """Process CPU per call is positive, at most wall x usable cores (a process cannot use more), the
    floor is CPU / cores, and the markdown has the table."""
    report = bench_run["report"]
    cores = report["machine"]["usable_cores"]
    for name, rt in _ok(report).items():
        c = rt["cpu"]
        assert c["cores"] == cores and c["per_call_p50_ms"] > 0, name
        wall = rt["warm"]["total"]["p50"]
        assert c["per_call_p50_ms"] <= wall * cores * 1.05 + 5.0, (name, c, wall)  # clock granularity
        assert 0 < c["cores_busy_p50"] <= cores * 1.05 + 0.05, (name, c)
        assert c["floor_ms"] == pytest.approx(c["per_call_p50_ms"] / cores, abs=0.02)
    md = (bench_run["out"] / "bench.md").read_text()
    assert "### CPU use" in md and "floor: CPU / usable cores" in md

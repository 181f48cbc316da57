"""Bad argument values - of every ``ctsdk`` command and of the public Python API - are typed errors
naming the argument and what to give, never a raw Python exception.

- CLI: exit code 2 and exactly one ``ctsdk: error: ...`` line on stderr, checked before any work
  (run through ``sdk.cli.main``, the console script, so click's own usage errors are one line too);
- API: a :class:`~sdk.errors.CtsdkError` subclass (ConfigError for a bad value, NotDicomError /
  SourceNotFoundError for a source that is no series, ResultWriteError for an output folder that
  cannot be written).

Each case here was found by fuzzing the arguments (a traceback, a silent wrong behaviour or a hang
before the fix). Everything is written under tmp_path; one phantom series per module.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdk
from sdk.errors import ConfigError, NotDicomError, ResultWriteError, SourceNotFoundError
from conftest import ctsdk_error as _error, ctsdk_in_process as _ctsdk

INGEST = "sdk.integration.triage_fns:ingest_check"  # decode + eligibility, no model


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A 32 x 64 x 64 phantom: read in a blink, eligible, so it gets heat maps."""
    from sdk.phantom import write_phantom_series

    d = tmp_path_factory.mktemp("argument_errors")
    write_phantom_series(d, n_slices=32, size=64, spacing=(2.5, 4.0, 4.0))
    return d


@pytest.fixture(scope="module")
def result(series) -> "sdk.TriageResult":
    res = sdk.Triage(device="cpu", precision="fp32", threads=1).run(series)
    assert res.eligible and res.slice_scores, res.reasons
    return res


# --- ctsdk triage ------------------------------------------------------------------------------
def test_triage_threads_past_the_int_range_is_a_usage_error(series):
    # was: TypeError from onnxruntime's SessionOptions (a traceback); 100000 kept ORT busy for minutes
    line = _error("triage", series, "--threads", "99999999999999999999")
    assert "--threads" in line and "1<=x<=1024" in line
    assert "1<=x<=1024" in _error("triage", series, "--threads", "100000")


def test_triage_empty_heatmaps_folder_is_refused(series, tmp_path, monkeypatch):
    # was: exit 0, one PNG per selected slice written into the working directory
    monkeypatch.chdir(tmp_path)
    line = _error("triage", series, "--heatmaps", "")
    assert "--heatmaps ''" in line and "empty path" in line
    assert list(tmp_path.iterdir()) == []


# --- ctsdk triage-batch ------------------------------------------------------------------------
def test_batch_resume_with_overwrite_is_refused(series, tmp_path):
    # was: exit 0, --resume silently won over --overwrite
    line = _error("triage-batch", series, "--out", tmp_path / "r.jsonl", "--resume", "--overwrite",
                  "--triage-fn", INGEST, "--no-progress")
    assert "--resume and --overwrite" in line
    assert not (tmp_path / "r.jsonl").exists()


def test_batch_triage_fn_that_is_not_callable_is_refused_before_the_run(series, tmp_path):
    # was: exit 1 and one TypeError line per series in --out
    line = _error("triage-batch", series, "--out", tmp_path / "r.jsonl", "--triage-fn", "os:path", "--no-progress")
    assert "--triage-fn 'os:path'" in line and "not callable" in line
    assert not (tmp_path / "r.jsonl").exists()


def test_batch_out_that_is_the_manifest_is_refused(series, tmp_path):
    # was: the manifest was read, then deleted by --overwrite and replaced by the results
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{series}\n")
    line = _error("triage-batch", "--manifest", manifest, "--out", manifest, "--overwrite", "--triage-fn", INGEST,
                  "--no-progress")
    assert "--out" in line and "is also --manifest" in line
    assert manifest.read_text() == f"path\n{series}\n"


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_batch_cpus_per_worker_must_be_a_finite_number(series, tmp_path, value):
    # was (nan): Ray started, then ValueError "cannot convert float NaN to integer" (a traceback)
    line = _error("triage-batch", series, "--out", tmp_path / "r.jsonl", "--engine", "ray", "--cpus-per-worker", value)
    assert "--cpus-per-worker" in line and "not a finite number" in line


# --- ctsdk bench -------------------------------------------------------------------------------
def test_bench_phantom_size_zero_is_a_config_error():
    # was: ZeroDivisionError in the phantom's pixel spacing (a traceback)
    line = _error("bench", "--phantom-size", "0", "--runtimes", "ort-fp32", "--repeat", "1", "--warmup", "0",
                  "--batch-sizes", "none", "--no-cold-fresh")
    assert "--phantom-size must be >= 8 and <= 2048" in line


def test_bench_empty_runtimes_is_refused():
    # was: '' meant the default list (naive baseline included: minutes of benchmarking)
    assert "--runtimes is empty" in _error("bench", "--runtimes", "")


@pytest.mark.parametrize("option, value, says", [
    ("--batch-sizes", "100000", "--batch-sizes must be positive integers <= 1024"),
    ("--scaling", "100000000", "--scaling slice counts must be >= 2 and <= 4096"),
    ("--phantom-slices", "100000", "--phantom-slices must be >= 1 and <= 4096"),
])
def test_bench_counts_that_cannot_fit_in_memory_are_refused(option, value, says):
    assert says in _error("bench", option, value, "--runtimes", "ort-fp32")


def test_bench_config_checks_the_phantom_and_threads():
    from sdk.bench import BenchConfig

    for kw in ({"phantom_size": 0}, {"phantom_slices": 0}, {"threads": 2 ** 40}, {"batch_sizes": [10 ** 7]}):
        with pytest.raises(ConfigError, match="must be"):
            BenchConfig(runtimes=["ort-fp32"], **kw).validate()


# --- ctsdk evaluate / calibrate / export / build-engine / train --------------------------------
def test_evaluate_negative_seed_is_a_usage_error(series, tmp_path):
    # was: the series were triaged, then NumPy's ValueError "expected non-negative integer"
    csv = tmp_path / "series.csv"
    csv.write_text(f"path,label\n{series},covid\n")
    line = _error("evaluate", "--series", csv, "--seed", "-1")
    assert "--seed" in line and "x>=0" in line


def test_calibrate_out_that_is_the_input_onnx_is_refused(tmp_path):
    # was: accepted - a finished calibration replaced the FP32 model it was made from
    onnx = tmp_path / "classifier_fp32.onnx"
    onnx.write_bytes(b"model")
    images = tmp_path / "images.csv"
    images.write_text("path,label\n")
    line = _error("calibrate", "--onnx", onnx, "--images", images, "--out", onnx)
    assert "--out" in line and "is also --onnx" in line
    line = _error("calibrate", "--onnx", onnx, "--images", images, "--out", tmp_path / "int8.onnx", "--report", images)
    assert "--report" in line and "is also --images" in line
    assert onnx.read_bytes() == b"model"


@pytest.mark.parametrize("args, says", [
    (("--percentile", "nan"), "not a finite number"),
    (("--percentile", "200"), "0<x<=100"),
    (("--max-test", "0"), "x>=1"),
    (("--threads", "0"), "1<=x<=1024"),
])
def test_calibrate_option_values_are_checked_first(tmp_path, args, says):
    # was: accepted; --percentile reached ONNX Runtime's calibrator after the slices were prepared
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model")
    images = tmp_path / "images.csv"
    images.write_text("path,label\n")
    line = _error("calibrate", "--onnx", onnx, "--images", images, "--out", tmp_path / "int8.onnx", *args)
    assert args[0] in line and says in line


def test_export_checkpoint_that_is_no_checkpoint_is_a_bundle_error(a_file, tmp_path):
    pytest.importorskip("torch")
    # was: _pickle.UnpicklingError (a traceback)
    line = _error("export", "--model", "effnet_lite0_mgap", "--checkpoint", a_file, "--out", tmp_path / "x.onnx")
    assert f"{a_file}: cannot be loaded as a PyTorch checkpoint (UnpicklingError" in line
    line = _error("export", "--model", "effnet_lite0_mgap", "--checkpoint", a_file, "--out", a_file)
    assert "is also --checkpoint" in line


def test_export_input_size_the_model_cannot_take_is_a_config_error(tmp_path):
    pytest.importorskip("torch")
    # was: RuntimeError from the U-Net's skip connection (33) / torch.rand (-1) - tracebacks
    line = _error("export", "--model", "unet2d_lung", "--out", tmp_path / "u.onnx", "--input-size", "33")
    assert "--input-size 33: model 'unet2d_lung' cannot run on 33x33 inputs" in line
    assert "x>=1" in _error("export", "--model", "unet2d_lung", "--out", tmp_path / "u.onnx", "--input-size", "-1")
    assert "x>=1" in _error("export", "--model", "unet2d_lung", "--out", tmp_path / "u.onnx", "--n-parity", "0")
    assert not (tmp_path / "u.onnx").exists()


def test_export_onnx_refuses_an_input_size_the_model_cannot_take(tmp_path):
    """Only ``ctsdk export --input-size`` checked this; export_onnx(model, input_size=33) raised
    torch's RuntimeError from the U-Net's skip connection (-1: from torch.rand; 1.5: a TypeError)."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from sdk.export import check_input_size, export_onnx
    from sdk.models import create_model

    unet = create_model("unet2d_lung", base=4, levels=3)
    out = tmp_path / "u.onnx"
    with pytest.raises(ConfigError) as err:
        export_onnx(unet, out, input_size=33, metadata={"model": "unet2d_lung"})
    assert "input_size 33: model 'unet2d_lung' cannot run on 33x33 inputs (" in str(err.value)
    assert "give a side its layers divide evenly" in str(err.value)
    with pytest.raises(ConfigError, match=r"input_size \[32, 30\]: model 'UNet' cannot run on 32x30 inputs"):
        export_onnx(unet, out, input_size=[32, 30])
    for bad in (-1, 0, 1.5, True, "64"):
        with pytest.raises(ConfigError, match=r"input_size must be a whole number >= 1 \(input side in pixels\), got"):
            export_onnx(unet, out, input_size=bad)
    assert list(tmp_path.iterdir()) == []
    # ctsdk export runs the same check, named as its option (the message test_export_input_size... reads)
    with pytest.raises(ConfigError, match="--input-size 33: model 'unet2d_lung' cannot run on 33x33 inputs"):
        check_input_size(unet, 33, name="unet2d_lung", option="--input-size")
    assert check_input_size(unet, 32) == [32, 32] and not unet.training


def test_build_engine_workspace_and_out_are_checked(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"model")
    assert "--workspace" in _error("build-engine", "--model", onnx, "--workspace", "0")
    line = _error("build-engine", "--model", onnx, "--out", onnx)
    assert "--out" in line and "is also --model" in line
    # was: --workspace 5 passed the CLI (x>=1) and reached BuildConfig only after the TensorRT import
    # ("needs TensorRT" here; elsewhere after the int8 pre-flight)
    line = _error("build-engine", "--model", onnx, "--workspace", "5")
    assert "workspace_mb (--workspace) must be a whole number >= 16 and <= 1048576" in line and "got 5 (int)" in line


@pytest.mark.parametrize("kw, says", [
    ({"workspace_mb": math.nan}, "got nan (float)"),        # was: ValueError from int()
    ({"workspace_mb": "4096"}, "got '4096' (str)"),         # was: accepted
    ({"workspace_mb": 100.5}, "got 100.5 (float)"),         # was: accepted (100 MB at build time)
    ({"workspace_mb": None}, "got None (NoneType)"),        # was: TypeError from int()
    ({"workspace_mb": 15}, "got 15 (int)"),
    ({"workspace_mb": 2 ** 21}, "got 2097152 (int)"),
    ({"batch": (1.5, 2, 3)}, "--batch must be MIN,OPT,MAX integers (e.g. 1,8,32), got (1.5, 2, 3)"),  # was: accepted
    ({"batch": ("a",)}, "--batch must be MIN,OPT,MAX integers"),     # was: ValueError from int()
    ({"onnx": None}, "onnx must be the path of an ONNX file, got None"),
])
def test_build_config_checks_its_fields_at_construction(kw, says):
    """Pure logic, no TensorRT: BuildConfig (and CachedEngine, the runtime's loader) refuse a bad
    value when made, whoever makes them."""
    from sdk.export.tensorrt import BuildConfig, CachedEngine

    args = {"onnx": "m.onnx", **kw}
    with pytest.raises(ConfigError) as info:
        BuildConfig(**args)
    assert says in str(info.value)
    if "workspace_mb" in kw:
        assert "workspace_mb (--workspace) must be a whole number >= 16 and <= 1048576" in str(info.value)
        with pytest.raises(ConfigError, match="workspace_mb"):
            CachedEngine("m.onnx", workspace_mb=kw["workspace_mb"])


def test_build_config_keeps_valid_values():
    from sdk.export.tensorrt import BuildConfig

    cfg = BuildConfig(onnx="m.onnx", workspace_mb=4096.0, batch=8)   # batch 8: was TypeError
    assert cfg.workspace_mb == 4096 and type(cfg.workspace_mb) is int
    assert BuildConfig(onnx="m.onnx", workspace_mb=16, batch=(1, 2, 4)).batch == (1, 2, 4)


@pytest.mark.parametrize("args", [("seg", "--lr", "nan"), ("aggregator", "--eta", "inf")])
def test_train_float_options_must_be_finite(args):
    # was: exit 0, nan / inf in the resolved config (a --config file with them is refused)
    line = _error("train", *args, "--print-config")
    assert args[1] in line and "not a finite number" in line


# --- ctsdk listen (argument checks only: the listener must never start here) --------------------
@pytest.mark.parametrize("args, says", [
    (("--bind", ""), "--bind '': an empty address would listen on every interface"),
    (("--allow-ip", "scanner.local"), "--allow-ip 'scanner.local': not an IP address"),
    (("--quiet-seconds", "nan"), "not a finite number"),
    (("--quiet-seconds", "inf"), "not a finite number"),
    (("--triage-fn", "os:path"), "not callable"),
    (("--engine", "ray", "--cpus-per-worker", "nan"), "not a finite number"),
    # was: the listener started (10**5 worker threads, one model each; 0: refused only inside it)
    (("--workers", "100000"), "--workers must be a whole number >= 1 and <= 1024 (worker processes, Ray actors or "
                              "listener threads, one model each), got 100000 (int)"),
    (("--workers", "0"), "--workers must be a whole number >= 1 and <= 1024"),
    (("--queue-size", "0"), "--queue-size 0: must be >= 1"),
])
def test_listen_bad_values_are_refused_before_it_listens(tmp_path, monkeypatch, args, says):
    import sdk.cli.listen_cmd as listen_cmd

    def must_not_start(*a: Any, **k: Any) -> None:  # was: the listener started (on 0.0.0.0 for --bind '')
        raise AssertionError("the listener was started")

    monkeypatch.setattr(listen_cmd, "_serve", must_not_start)
    line = _error("listen", "--port", "0", "--out", tmp_path / "lis", "--triage-fn",
                  "sdk.integration.triage_fns:inventory", *args)
    assert says in line


# --- sdk.Triage --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, says", [
    ({"threads": 2 ** 40}, "threads must be a whole number >= 1 and <= 1024"),   # was: ORT TypeError
    ({"threads": "x"}, "threads must be a whole number"),                          # was: ValueError from int()
    ({"threads": math.nan}, "threads must be a whole number"),                     # was: ValueError
    ({"threads": 1.5}, "got 1.5 (float)"),                                         # was: silently 1 thread
    ({"lanes": math.inf}, "lanes must be a whole number >= 1"),                    # was: OverflowError
    ({"classifier_batch": 10 ** 7}, "classifier_batch must be a whole number >= 1 and <= 1024"),  # MemoryError
    ({"bundle": 123}, "bundle must be a bundle folder"),                           # was: TypeError from os.fspath
    ({"bundle": ""}, "bundle must be a bundle folder"),                            # was: looked in the cwd
])
def test_triage_constructor_values_are_config_errors(kw, says):
    with pytest.raises(ConfigError, match="must be") as info:
        sdk.Triage(device="cpu", **kw)
    assert says in str(info.value)


# --- TriageResult.save_heatmaps / heatmap -------------------------------------------------------
@pytest.mark.parametrize("kw, says", [
    ({"top": 0}, "top must be a whole number >= 1"),     # was: silently no PNG
    ({"top": -1}, "top must be a whole number >= 1"),    # was: silently no PNG
    ({"top": math.nan}, "top must be a whole number"),   # was: ValueError from int()
    ({"alpha": 2.0}, "alpha must be a number from 0"),   # was: accepted
    ({"alpha": -1}, "alpha must be a number from 0"),    # was: accepted (negative colour weight)
    ({"alpha": math.nan}, "alpha must be a number from 0"),  # was: accepted (NaN pixels cast to uint8)
    ({"alpha": None}, "alpha must be a number from 0"),  # was: TypeError in the blend
])
def test_save_heatmaps_bad_top_or_alpha_is_a_config_error(result, tmp_path, kw, says):
    out = tmp_path / "heat"
    with pytest.raises(ConfigError, match="must be") as info:
        result.save_heatmaps(out, **kw)
    assert says in str(info.value)
    assert not out.exists()


def test_save_heatmaps_folder_that_cannot_be_made_is_a_result_write_error(result, a_file, tmp_path, monkeypatch):
    # was: FileExistsError / NotADirectoryError from Path.mkdir
    with pytest.raises(ResultWriteError, match="a file, not a folder"):
        result.save_heatmaps(a_file, top=1)
    with pytest.raises(ResultWriteError, match="cannot write heat maps there"):
        result.save_heatmaps(a_file / "sub", top=1)
    # was: '' wrote into the working directory
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="out_dir must be a folder path"):
        result.save_heatmaps("", top=1)
    with pytest.raises(ConfigError, match="out_dir must be a folder path"):
        result.save_heatmaps(None, top=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert [p.name for p in result.save_heatmaps(tmp_path / "ok", top=1)] == [p.name for p in (tmp_path / "ok").iterdir()]


@pytest.mark.parametrize("index", [1.5, "0", None, True])
def test_heatmap_index_that_is_not_a_whole_number_is_a_config_error(result, index):
    # was: TypeError from the range check / list index (True: a CAM shape error)
    with pytest.raises(ConfigError, match="heat map index must be a whole number"):
        result.heatmap(index)
    assert result.heatmap(np.int64(0)).shape == (64, 64)


def test_heatmap_helpers_check_alpha_and_the_png_folder(a_file):
    from sdk.heatmap import overlay, write_png

    grey = np.zeros((8, 8), np.float32)
    with pytest.raises(ConfigError, match="alpha must be a number from 0"):
        overlay(grey, np.ones((8, 8), np.float32), alpha=float("nan"))
    with pytest.raises(ResultWriteError, match="cannot make its folder"):  # was: NotADirectoryError
        write_png(a_file / "x.png", np.zeros((8, 8, 3), np.uint8))


# --- sdk.io.load_series and its siblings --------------------------------------------------------
@pytest.mark.parametrize("source, says", [
    (None, "unsupported source of type NoneType"),   # was: TypeError 'NoneType' object is not iterable
    (123, "unsupported source of type int"),         # was: TypeError
    (1.5, "unsupported source of type float"),       # was: TypeError
    (b"/tmp/x.dcm", "unsupported source of type bytes"),  # was: "unsupported source item of type int"
    ({"a": 1}, "unsupported source of type dict"),   # was: read the key 'a' as a file name
    (np.zeros((4, 8, 8)), "unsupported source of type ndarray"),
])
def test_load_series_source_of_the_wrong_kind_is_a_not_dicom_error(source, says):
    from sdk.io import inspect_and_load, list_series, load_series, series_files

    for fn in (load_series, list_series, series_files, inspect_and_load):
        with pytest.raises(NotDicomError) as info:
            fn(source)
        assert says in str(info.value)


def test_empty_source_path_is_not_the_working_directory(series, monkeypatch):
    # was: '' scanned (and loaded) the working directory
    from sdk.io import load_series

    monkeypatch.chdir(series)
    with pytest.raises(SourceNotFoundError, match="an empty path given"):
        load_series("")


@pytest.mark.parametrize("kw, says", [
    ({"workers": 0}, "workers must be a whole number >= 1"),     # was: accepted (serial)
    ({"workers": -1}, "workers must be a whole number >= 1"),    # was: accepted
    ({"workers": "x"}, "workers must be a whole number >= 1"),   # was: TypeError
    ({"timings": []}, "timings must be a dict"),                 # was: AttributeError after the load
    ({"alloc": "x"}, "alloc must be a callable"),                # was: TypeError 'str' object is not callable
    ({"alloc": lambda shape, dtype: np.zeros(3)}, "it must return an ndarray of exactly that shape"),  # ValueError
])
def test_load_series_bad_arguments_are_config_errors(series, kw, says):
    from sdk.io import load_series

    with pytest.raises(ConfigError) as info:
        load_series(series, **kw)
    assert says in str(info.value)


def test_regroup_single_files_needs_a_list_of_paths():
    from sdk.io import regroup_single_files

    for bad in (None, 123, "abc"):  # was: TypeError "object of type 'NoneType' has no len()" / [] for a str
        with pytest.raises(ConfigError, match="files must be a list of file paths"):
            regroup_single_files(bad)


# --- the API behind the CLI's float options --------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0])
def test_listener_and_ray_settings_refuse_nan_and_inf_in_the_api_too(tmp_path, value):
    """The CLI refuses nan / inf (FiniteFloat); the API objects behind it compared with '<', which
    NaN passes - so ListenerConfig(quiet_seconds=nan), a retry delay of inf or RayOptions with a NaN
    CPU count were accepted by Python callers."""
    from sdk.cluster.batch import RayOptions, run_batch_ray
    from sdk.integration.batch import BatchOptions
    from sdk.integration.listener import ListenerConfig

    with pytest.raises(ConfigError, match="--quiet-seconds .* must be a finite number >= 0"):
        ListenerConfig(out=tmp_path / "store", port=0, quiet_seconds=value).validate()
    with pytest.raises(ConfigError, match="--forward-retry .* each >= 0 seconds"):
        ListenerConfig(out=tmp_path / "store", port=0, forward_retry_s=(30.0, value)).validate()
    opts = BatchOptions(progress=False, png=False)
    with pytest.raises(ConfigError, match="--cpus-per-worker .* must be a finite number > 0"):
        run_batch_ray(tmp_path, tmp_path / "out.jsonl", opts, RayOptions(cpus_per_worker=value))
    with pytest.raises(ConfigError, match="--gpus-per-worker .* must be a finite number >= 0"):
        run_batch_ray(tmp_path, tmp_path / "out.jsonl", opts, RayOptions(gpus_per_worker=value))
    ListenerConfig(out=tmp_path / "store", port=0, quiet_seconds=0.0, forward_retry_s=(0.0, 30.0)).validate()


def test_evaluate_and_calibrate_check_their_numbers_in_the_api(tmp_path):
    """evaluate: a negative seed failed in NumPy after every series was triaged; calibrate: a NaN or
    out-of-range percentile and max_test 0 reached ONNX Runtime / meant 'all' (the CLI checked them,
    the Python functions did not)."""
    from sdk.calibration.quantize import CalibrationOptions, calibrate
    from sdk.evaluate import evaluate_images, evaluate_series

    csv_path = tmp_path / "series.csv"
    csv_path.write_text("path,label\ns1,covid\n")
    with pytest.raises(ConfigError, match="seed must be a whole number >= 0, got -1"):
        evaluate_series(csv_path, seed=-1, progress=False)
    with pytest.raises(ConfigError, match=r"n_boot must be a whole number >= 0 and <= 100000 .*, got 2.5"):
        evaluate_images(csv_path, n_boot=2.5)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    for opts, words in ((CalibrationOptions(percentile=math.nan), "--percentile nan"),
                        (CalibrationOptions(percentile=200.0), "--percentile 200.0"),
                        (CalibrationOptions(max_test=0), "--max-test 0")):
        with pytest.raises(ConfigError, match=words):
            calibrate(onnx, csv_path, tmp_path / "out.onnx", opts)


# --- upper bounds: bootstrap resamples and workers ----------------------------------------------------
def test_evaluate_n_boot_has_an_upper_bound(series, tmp_path):
    """n_boot / --n-bootstrap had no maximum: 10**9 triaged every series, then resampled for hours
    (and held tens of GB of resampled statistics)."""
    from sdk.evaluate import evaluate_images, evaluate_series
    from sdk.metrics import MAX_BOOTSTRAP

    assert MAX_BOOTSTRAP == 100_000
    says = ("n_boot must be a whole number >= 0 and <= 100000 (bootstrap resamples; ctsdk evaluate --n-bootstrap), "
            "got 1000000000 (int)")
    csv_path = tmp_path / "series.csv"
    csv_path.write_text("path,label\nnope,covid\n")   # fails fast after the check (the old code too)
    for fn in (evaluate_series, evaluate_images):
        with pytest.raises(ConfigError) as info:
            fn(csv_path, n_boot=10 ** 9, progress=False)
        assert says in str(info.value)
    assert says in _error("evaluate", "--series", csv_path, "--n-bootstrap", 10 ** 9)
    from sdk.evaluate import check_bootstrap

    check_bootstrap(MAX_BOOTSTRAP, 0)   # the bound itself is allowed


def test_batch_workers_have_an_upper_bound(series, tmp_path):
    """triage-batch --workers had no maximum (10**6: a process per series until memory ran out); 0
    was refused with another message by each of run_batch, run_batch_ray and ListenerConfig."""
    out = tmp_path / "r.jsonl"
    line = _error("triage-batch", series, "--out", out, "--workers", "1000000", "--triage-fn", INGEST, "--no-progress")
    assert "--workers must be a whole number >= 1 and <= 1024" in line and "got 1000000 (int)" in line
    assert not out.exists()
    from sdk.integration.batch import MAX_WORKERS, BatchOptions, check_workers, run_batch
    from sdk.integration.listener import ListenerConfig

    assert MAX_WORKERS == 1024 and check_workers(MAX_WORKERS) == 1024 and check_workers(2.0) == 2
    opts = BatchOptions(progress=False, png=False)
    for bad in (0, 1025, 10 ** 6, 1.5, "2", None):
        with pytest.raises(ConfigError, match="--workers must be a whole number >= 1 and <= 1024"):
            run_batch(series, out, opts, workers=bad)
        with pytest.raises(ConfigError, match="--workers must be a whole number >= 1 and <= 1024"):
            ListenerConfig(out=tmp_path / "store", port=0, workers=bad).validate()
    assert not out.exists() and not (tmp_path / "store").exists()


def test_ray_workers_have_an_upper_bound(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import sdk.cluster._ray as ray_helpers
    from sdk.cluster.batch import RayOptions, run_batch_ray
    from sdk.integration.batch import BatchOptions

    def past_the_checks(*a: Any, **k: Any) -> None:   # was: reached (and then started a Ray with 10**6 actors asked)
        raise AssertionError("run_batch_ray went past its argument checks")

    monkeypatch.setattr(ray_helpers, "check_address", past_the_checks)
    with pytest.raises(ConfigError, match=r"--workers must be a whole number >= 1 and <= 1024 .*got 1000000 \(int\)"):
        run_batch_ray(tmp_path, tmp_path / "out.jsonl", BatchOptions(progress=False, png=False),
                      RayOptions(workers=10 ** 6))


def test_help_documents_the_upper_bounds():
    from sdk.integration.batch import MAX_WORKERS
    from sdk.metrics import MAX_BOOTSTRAP

    for command, words in ((("triage-batch",), f"1 to {MAX_WORKERS}"), (("listen",), f"1 to {MAX_WORKERS}"),
                           (("evaluate",), f"1 to {MAX_BOOTSTRAP}")):
        code, out, _ = _ctsdk(*command, "--help")
        assert code == 0 and words in " ".join(out.split()), (command, out)

"""The CLI's error contract (README: "exits 2 with one line on stderr"), through click's CliRunner.

- an OSError (file, folder, socket, TLS) is one ``ctsdk: error:`` line and exit 2, never a
  traceback; any other exception is a bug and keeps its traceback;
- output locations (--heatmaps, --dicom-out, triage-batch --out, ...) are checked before the work
  starts, and a failed check leaves nothing behind;
- with --json an error is also one ``{"error": {...}}`` object on stdout;
- triage-batch exit codes: 0 results, 1 no series got a result (or --fail-on-error and a failure),
  2 nothing to triage;
- every command's --help renders, every option has a help line, every "Examples:" line parses.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import re
import shlex
import signal
import socket
from pathlib import Path
from typing import Any, Dict, List

import click
import pytest
from click.testing import CliRunner

from conftest import SDK_HOME, shared_path
from sdk.cli import cli
from sdk.cli._common import handle_errors, json_option

INGEST = "sdk.integration.triage_fns:ingest_check"  # decode + eligibility, no model: fast


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="ctsdk")


def _one_error_line(res: Any) -> str:
    assert "Traceback" not in res.output, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("ctsdk: error: "), lines[0]
    return lines[0]


def _json_error(res: Any) -> Dict[str, Any]:
    """stdout is exactly one JSON object {"error": {...}} (json.loads fails on a second object)."""
    d = json.loads(res.stdout)
    assert set(d) == {"error"}, d
    assert d["error"]["exit_code"] == res.exit_code == 2
    assert d["error"]["type"] and d["error"]["message"]
    return d["error"]


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> Path:
    """A 64 x 64 phantom: reads fast, not eligible (too small for the lungs)."""
    from sdk.phantom import write_phantom_series

    d = tmp_path_factory.mktemp("cli_small")
    write_phantom_series(d, n_slices=12, size=64, series_uid="1.2.826.0.1.3680043.8.498.501")
    return d


@pytest.fixture()
def blocked(a_file) -> Path:
    """A regular file (conftest's ``a_file``): any folder 'under' it can be neither created nor written."""
    return a_file


def _tree(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- handle_errors ------------------------------------------------------------------------------
def _raiser(exc: BaseException) -> click.Command:
    @click.command()
    @json_option
    @handle_errors
    def cmd(as_json: bool) -> None:
        raise exc

    return cmd


def test_oserror_is_one_line_naming_path_and_reason():
    exc = FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/forbidden/slice_0001.png")
    res = CliRunner().invoke(_raiser(exc), [])
    assert res.exit_code == 2 and res.stdout == ""
    line = _one_error_line(res)
    assert "/proc/forbidden/slice_0001.png" in line and "No such file or directory" in line
    res = CliRunner().invoke(_raiser(exc), ["--json"])
    err = _json_error(res)
    assert err["type"] == "FileNotFoundError" and err["path"] == "/proc/forbidden/slice_0001.png"
    _one_error_line(res)


def test_socket_oserror_is_one_line():
    res = CliRunner().invoke(_raiser(OSError(errno.EADDRINUSE, "Address already in use")), [])
    assert res.exit_code == 2 and "Address already in use" in _one_error_line(res)


def test_a_bug_keeps_its_traceback():
    res = CliRunner().invoke(_raiser(ZeroDivisionError("a real bug")), ["--json"])
    assert isinstance(res.exception, ZeroDivisionError)  # not swallowed into exit 2
    assert res.stdout == ""


# --- output locations, checked first ---------------------------------------------------------------
@pytest.mark.parametrize("option", ["--heatmaps", "--dicom-out"])
def test_triage_unwritable_output_folder_fails_before_triage(small_series, blocked, option):
    before = _tree(blocked.parent)
    res = _invoke("triage", small_series, "--device", "cpu", option, blocked / "out")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert f"{option} {blocked / 'out'}" in line and "is not a folder" in line and "nothing was run" in line
    assert res.stdout == ""  # no result printed: the triage never ran
    assert _tree(blocked.parent) == before and blocked.read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (the audit's case)")
def test_triage_heatmaps_in_proc(small_series):
    res = _invoke("triage", small_series, "--device", "cpu", "--heatmaps", "/proc/forbidden", "--json")
    err = _json_error(res)
    assert err["type"] == "ResultWriteError" and "/proc/forbidden" in err["message"]
    assert "/proc/forbidden" in _one_error_line(res)
    assert not Path("/proc/forbidden").exists()


def test_batch_unwritable_out_fails_before_discovery(small_series, blocked):
    before = _tree(blocked.parent)
    res = _invoke("triage-batch", small_series, "--out", blocked / "r.jsonl", "--triage-fn", INGEST, "--no-progress")
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert f"--out {blocked / 'r.jsonl'}" in line and "nothing was run" in line
    assert res.stdout == "" and _tree(blocked.parent) == before


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (the audit's case)")
def test_batch_out_in_proc(small_series):
    res = _invoke("triage-batch", small_series, "--out", "/proc/nope/r.jsonl", "--no-progress")
    assert res.exit_code == 2 and "/proc/nope" in _one_error_line(res)


def test_output_checks_leave_no_folder_behind(tmp_path):
    from sdk.cli._common import check_output_dir, check_output_file

    check_output_dir(str(tmp_path / "a" / "b" / "c"), "--out")
    check_output_file(str(tmp_path / "d" / "r.jsonl"), "--out")
    existing = tmp_path / "keep.jsonl"
    existing.write_text('{"key": "x"}\n')
    check_output_file(str(existing), "--out")
    assert _tree(tmp_path) == ["keep.jsonl"] and existing.read_text() == '{"key": "x"}\n'


@pytest.mark.parametrize("args", [
    ["bench", "--out", "{blocked}/b"],
    ["bench", "--gpu-report", "{blocked}/g"],
    ["evaluate", "--images", "{blocked}", "--out", "{blocked}/e"],
    ["calibrate", "--onnx", "{blocked}", "--images", "{blocked}", "--out", "{blocked}/m.onnx"],
    ["export", "--model", "effnet_lite0_mgap", "--out", "{blocked}/m.onnx"],
    ["listen", "--port", "0", "--out", "{blocked}/l"],
    ["train", "aggregator", "--out", "{blocked}/a.json"],
], ids=lambda a: " ".join(a[:2]))
def test_every_output_option_is_checked_first(blocked, args):
    res = _invoke(*[a.replace("{blocked}", str(blocked)) for a in args], "--json")
    err = _json_error(res)
    assert err["type"] == "ResultWriteError" and str(blocked) in err["message"], err
    _one_error_line(res)


# --- listen: the socket and TLS errors of the audit -----------------------------------------------
@pytest.fixture()
def listen_args(tmp_path) -> List[str]:
    pytest.importorskip("pynetdicom")
    return ["listen", "--out", str(tmp_path / "store"), "--triage-fn", "sdk.integration.triage_fns:inventory"]


def test_listen_port_in_use(listen_args):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        res = _invoke(*listen_args, "--port", port)
    assert res.exit_code == 2
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # a failed start leaves the handlers alone
    line = _one_error_line(res)
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line and "--port" in line


def test_listen_bad_bind_address(listen_args):
    res = _invoke(*listen_args, "--port", "0", "--bind", "999.1.1.1", "--json")
    err = _json_error(res)
    assert err["type"] == "ConfigError" and "--bind 999.1.1.1" in err["message"]
    _one_error_line(res)


def test_listen_tls_files_not_pem(listen_args, tmp_path):
    bad = tmp_path / "not.pem"
    bad.write_text("this is not a PEM file\n")
    res = _invoke(*listen_args, "--port", "0", "--tls-cert", bad, "--tls-key", bad)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "--tls-cert" in line and str(bad) in line and "PEM" in line


# --- --json: one error object on stdout, for every command that has --json ---------------------------
@pytest.mark.parametrize("args", [
    ["inspect", "{empty}"],
    ["triage", "{empty}"],
    ["triage-batch", "{empty}", "--out", "{tmp}/r.jsonl", "--no-progress"],
    ["evaluate"],
    ["bench", "--runtimes", "naive,warp-drive"],
    ["build-engine", "--model", "x.onnx", "--batch", "8,4,2"],
    ["info", "--bundle", "{empty}", "--no-open"],
    ["train", "classifier", "--config", "{tmp}/bad.json"],
], ids=lambda a: " ".join(a[:2]))
def test_json_error_object_on_stdout(tmp_path, args):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    res = _invoke(*[a.replace("{empty}", str(empty)).replace("{tmp}", str(tmp_path)) for a in args], "--json")
    err = _json_error(res)
    assert err["message"] in _one_error_line(res)


def test_json_error_keeps_the_exit_code_and_names_the_path(tmp_path):
    res = _invoke("triage", tmp_path, "--json")
    err = _json_error(res)
    assert err["type"] == "NoImageSeriesError" and err["path"] == str(tmp_path)


def test_without_json_stdout_stays_empty_on_error(tmp_path):
    res = _invoke("triage", tmp_path)
    assert res.exit_code == 2 and res.stdout == ""
    _one_error_line(res)


# --- triage-batch exit codes ----------------------------------------------------------------------
def test_batch_empty_folder_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "README.md").write_text("notes\n")
    out = tmp_path / "r.jsonl"
    res = _invoke("triage-batch", tmp_path / "in", "--out", out, "--no-progress")
    assert res.exit_code == 2
    assert "nothing to triage" in _one_error_line(res)
    assert not out.exists() and not (tmp_path / "r.labels.png").exists()


def test_batch_good_folder_exits_0(small_series, tmp_path):
    out = tmp_path / "r.jsonl"
    res = _invoke("triage-batch", small_series, "--out", out, "--triage-fn", INGEST, "--no-progress", "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["discovered"] == s["processed"] == 1 and not s["errors"]
    assert sum(s["labels"].values()) == 1  # a result (ingest_check: not_triaged; not_eligible also counts)
    assert res.stderr == ""


def test_batch_some_failed_exits_0_or_1_with_fail_on_error(small_series, tmp_path):
    from sdk.phantom import write_phantom_series

    root = tmp_path / "archive"
    write_phantom_series(root / "ok", n_slices=8, size=64, series_uid="1.2.826.0.1.3680043.8.498.502")
    (root / "junk").mkdir()
    (root / "junk" / "text.dcm").write_text("not DICOM\n")
    res = _invoke("triage-batch", root, "--out", tmp_path / "a.jsonl", "--triage-fn", INGEST, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "error NotDicomError" in res.stdout
    res = _invoke("triage-batch", root, "--out", tmp_path / "b.jsonl", "--triage-fn", INGEST, "--no-progress",
                  "--fail-on-error")
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines() == [f"ctsdk: 1 of 2 series failed (--fail-on-error); the error lines "
                                               f"are in {tmp_path / 'b.jsonl'}"]


def test_batch_bad_inputs_exit_1(tmp_path):
    bad = shared_path("dicom", "bad-inputs")
    out = tmp_path / "bad.jsonl"
    res = _invoke("triage-batch", bad, "--out", out, "--triage-fn", INGEST, "--no-progress", "--json")
    assert res.exit_code == 1, res.output
    s = json.loads(res.stdout)  # the summary is still printed, and the lines written
    assert s["discovered"] == sum(s["errors"].values()) > 0 and not s["labels"]
    assert len(out.read_text().splitlines()) == s["discovered"]
    assert "no series got a result" in res.stderr


# --- human output ---------------------------------------------------------------------------------
def test_inspect_rounds_the_z_range():
    from sdk.cli.inspect_cmd import _mm

    assert _mm([-346.1, -52.10000000000002]) == "[-346.1, -52.1]"


def test_triage_human_renders_hu_terms():
    from sdk.cli.triage_cmd import _human

    lung = {"opacity_fraction": 0.01}
    d = {"label": "non_covid", "eligible": True, "probabilities": {"non_covid": 0.93, "covid": 0.07}, "threshold": 0.5,
         "bundle": {"positive_class": "covid"}, "slice_scores": [], "lung_volume_ml": 4000.0,
         "lung_opacity": {"ggo_fraction": 0.0, "consolidation_fraction": 0.0, "per_lung": {"left": lung, "right": lung},
                          "pattern": {"peripheral_index": 0.0, "lower_index": 0.0},
                          "decision": {"p_cnn": 0.069, "hu_terms": {"no_opacity": -0.75, "bilateral": 0.0}}},
         "reasons": [], "runtime": {}, "timings_ms": {"total": 1.0}, "warnings": []}
    text = _human(d)
    assert "decision: CNN P 0.069; HU terms: no_opacity -0.75" in text and "{" not in text


def test_triage_top_without_heatmaps_warns_and_not_eligible_says_why(small_series, tmp_path):
    res = _invoke("triage", small_series, "--device", "cpu", "--top", "2")
    assert res.exit_code == 0, res.output
    assert res.stderr.strip().splitlines() == ["ctsdk: warning: --top 2 has no effect without --heatmaps DIR (ignored)"]
    hm = tmp_path / "hm"
    res = _invoke("triage", small_series, "--device", "cpu", "--heatmaps", hm, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["label"] == "not_eligible" and d["heatmaps"] == []
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ctsdk: warning: no heat maps written to {hm}: the series is not eligible (")
    assert not hm.exists()


# --- help -----------------------------------------------------------------------------------------
def _commands() -> Dict[str, click.Command]:
    ctx = click.Context(cli)
    out: Dict[str, click.Command] = {"": cli}

    def walk(group: click.Group, prefix: str) -> None:
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            out[f"{prefix}{name}"] = cmd
            if isinstance(cmd, click.Group):
                walk(cmd, f"{prefix}{name} ")

    walk(cli, "")
    return out


COMMANDS = _commands()
MAIN = ["", "triage", "triage-batch", "listen", "bench", "inspect", "evaluate", "build-engine", "calibrate", "export",
        "info", "train", "train seg", "train classifier", "train seg3d", "train aggregator"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_renders_every_option_has_help(name):
    res = _invoke(*name.split(), "--help")
    assert res.exit_code == 0, res.output
    assert "Usage: ctsdk" in res.stdout
    for p in COMMANDS[name].params:
        if isinstance(p, click.Option):
            text = (p.help or "").strip()
            assert text and not text.startswith("[default"), f"ctsdk {name} {p.opts[0]}: no help text"
    if name in MAIN:
        assert "Examples:" in res.stdout and "\n    ctsdk " in res.stdout, res.stdout


def test_every_train_field_has_its_help_line():
    from sdk.cli.train_cmd import SUBCOMMANDS, field_help

    for sub, (module, cls_name, *_rest) in SUBCOMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        missing = [f.name for f in dataclasses.fields(cls) if not field_help(sub, f.name)]
        assert not missing, f"ctsdk train {sub}: add a help line to sdk/cli/train_cmd.py FIELD_HELP for {missing}"


def _example_lines(epilog: str) -> List[str]:
    """The ``ctsdk ...`` commands of an "Examples:" epilog (continuation lines joined)."""
    out: List[str] = []
    pending = ""
    for raw in epilog.splitlines():
        line = raw.strip()
        if pending:
            pending += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(pending)
                pending = ""
        elif line.startswith("ctsdk "):
            if line.endswith("\\"):
                pending = line.rstrip("\\").strip()
            else:
                out.append(line)
    return out


def _is_placeholder(word: str) -> bool:
    """SERIES_DIR, FP32_ONNX, ...: what the user fills in."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", word) is not None


def _parse_example(words: List[str], stand_in: Path) -> str:
    """'' when ``ctsdk WORDS`` parses (placeholders replaced by ``stand_in``), else click's message."""
    ctx = click.Context(cli, info_name="ctsdk")
    cmd: click.Command = cli
    rest = list(words)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return "" if _is_placeholder(rest[0]) else f"unknown command {rest[0]}"
        ctx = click.Context(sub, info_name=rest[0], parent=ctx)
        cmd, rest = sub, rest[1:]
    rest = [str(stand_in) if _is_placeholder(w) else w for w in rest]
    try:
        cmd.make_context(ctx.info_name, rest, parent=ctx.parent)
    except click.exceptions.Exit:  # an example that is `... --help`
        pass
    except click.UsageError as exc:  # unknown option, missing value or option, path that does not exist
        return exc.format_message()
    return ""


@pytest.mark.parametrize("name", MAIN)
def test_examples_parse_and_name_real_paths(name, tmp_path, monkeypatch):
    """Every example, run from the repository root, names real options of a real command with their
    values, and its repository / shared-data paths exist; what the user must fill in is an
    UPPER_CASE placeholder (parsed here as an existing file, else an existing folder)."""
    monkeypatch.chdir(SDK_HOME)
    examples = _example_lines(COMMANDS[name].epilog or "")
    assert examples, f"ctsdk {name}: no examples"
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    for ex in examples:
        words = shlex.split(ex)[1:]
        for w in words:
            if w.startswith("../shared/data"):
                shared_path(*Path(w).parts[3:])  # skips when the shared data is absent
            elif w.startswith(("sdk/", "docs/")):
                assert Path(w).exists(), f"{ex}: {w} does not exist in the repository"
        errors = [_parse_example(words, tmp_path / kind) for kind in ("file", "dir")]
        assert "" in errors, f"{ex}: {errors[0]}"


def test_console_script_usage_error_is_a_json_object_with_json(tmp_path):
    """Click's own usage errors (here: SOURCE does not exist, an unknown option) through the console
    script entry point: one ``ctsdk: error:`` line naming the command's help and exit 2, plus one
    {"error": ...} object on stdout with --json; ``ctsdk`` alone still prints the help."""
    import subprocess
    import sys

    code = "import sys; from sdk.cli import main; main(sys.argv[1:])"
    missing = str(tmp_path / "nope")
    with_json = subprocess.run([sys.executable, "-c", code, "triage", missing, "--json"], capture_output=True,
                               text=True, cwd=SDK_HOME, timeout=60)
    assert with_json.returncode == 2 and "does not exist" in with_json.stderr
    err = json.loads(with_json.stdout)["error"]
    assert err["exit_code"] == 2 and "does not exist" in err["message"] and missing in err["message"]
    plain = subprocess.run([sys.executable, "-c", code, "triage", missing], capture_output=True, text=True,
                           cwd=SDK_HOME, timeout=60)
    assert plain.returncode == 2 and plain.stdout == "" and "does not exist" in plain.stderr
    assert plain.stderr.splitlines() == [f"ctsdk: error: Invalid value for 'SOURCE': Path '{missing}' does not exist. "
                                         "(see 'ctsdk triage --help')"]
    unknown = subprocess.run([sys.executable, "-c", code, "bench", "--repeats", "3"], capture_output=True, text=True,
                             cwd=SDK_HOME, timeout=60)
    (line,) = unknown.stderr.splitlines()
    assert unknown.returncode == 2 and line.startswith("ctsdk: error: No such option '--repeats'.")
    assert "'--repeat'" in line and line.endswith("(see 'ctsdk bench --help')")  # click's suggestions kept
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SDK_HOME, timeout=60)
    assert bare.returncode == 2 and "Usage: ctsdk [OPTIONS] COMMAND" in bare.stdout + bare.stderr
    version = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True,
                             cwd=SDK_HOME, timeout=60)
    assert version.returncode == 0 and "ctsdk, version" in version.stdout

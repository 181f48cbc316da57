"""Every ``ctsdk ...`` command in a fenced code block of README.md, docs/ and examples/ markdown
names a real (sub)command and only options that command has, each with its value: a renamed or
removed option fails here instead of in a user's terminal. Values are not checked (paths such as
``runs/...`` exist only after the documented run); the help examples are parsed fully in
tests/test_cli_errors.py."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import click

from conftest import SDK_HOME
from sdk.cli import cli

FENCE = re.compile(r"^\s*```")
#: a command line: `ctsdk ...`, `.venv/bin/ctsdk ...`, `$ ctsdk ...`
START = re.compile(r"^\s*(?:\$\s+)?(?:\S*/)?ctsdk\s")
#: shell words that end the ctsdk command (a pipe, a redirect, the next command)
SHELL = ("|", "||", "&&", "&", ";", "<", ">", ">>")


def _pages() -> List[Path]:
    root = Path(SDK_HOME)
    return [root / "README.md", *sorted((root / "docs").rglob("*.md")), *sorted((root / "examples").rglob("*.md"))]


def _fenced_commands(md: Path) -> Iterator[Tuple[int, str]]:
    """(line number, command) of each ctsdk command inside a fenced block; backslash continuations joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            inside, pending = not inside, ""
            continue
        if not inside or not (pending or START.match(line)):
            continue
        if not pending:
            start = n
        pending = f"{pending} {line.strip()}" if pending else line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        yield start, pending
        pending = ""


def _options(cmd: click.Command, ctx: click.Context) -> Dict[str, click.Parameter]:
    """Every spelling of every option of ``cmd``, --help included."""
    params = list(cmd.params) + [p for p in [cmd.get_help_option(ctx)] if p is not None]
    return {o: p for p in params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def _check_options(cmd: click.Command, ctx: click.Context, words: List[str]) -> Tuple[str, List[str]]:
    """('' or the problem, the words left) after ``cmd``'s leading options (a group: up to its subcommand)."""
    opts = _options(cmd, ctx)
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("-") or len(w) == 1 or re.fullmatch(r"-\d[\d.]*", w):
            if isinstance(cmd, click.Group):
                return "", words[i:]
            i += 1
            continue
        name = w.split("=", 1)[0]
        if re.fullmatch(r"-[a-zA-Z]{2,}", name) and all(f"-{c}" in opts for c in name[1:]):  # -vv
            i += 1
            continue
        if name not in opts:
            return f"{cmd.name or 'ctsdk'} has no option {name}", []
        p = opts[name]
        if not (p.is_flag or p.count) and "=" not in w:
            if i + 1 >= len(words):
                return f"{name} needs a value", []
            i += 1
        i += 1
    return "", []


def _problem(line: str) -> str:
    """'' when ``line`` names a real ctsdk command and only its options, else what is wrong."""
    words = shlex.split(line, comments=True)
    end = next((i for i, w in enumerate(words) if w in SHELL or re.match(r"\d?>", w)), len(words))
    words = words[1:end]
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="ctsdk")
    while True:
        err, rest = _check_options(cmd, ctx, words)
        if err or not isinstance(cmd, click.Group) or not rest:
            return err
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return f"no command {rest[0]!r} in {ctx.command_path}"
        ctx = click.Context(sub, info_name=rest[0], parent=ctx)
        cmd, words = sub, rest[1:]


def test_checker_catches_what_it_is_for():
    assert _problem("ctsdk bench ../x --runtimes ort-fp32 --repeat 3 --out /tmp/b") == ""
    assert _problem(".venv/bin/ctsdk -vv listen --help") == ""
    assert _problem("ctsdk triage SERIES --json | jq .label") == ""
    assert "no option --repeats" in _problem("ctsdk bench ../x --repeats 3")
    assert "needs a value" in _problem("ctsdk bench ../x --repeat")
    assert "no command 'bogus'" in _problem("ctsdk bogus ../x")


def test_documented_commands_name_real_options():
    found, bad = 0, []
    root = Path(SDK_HOME)
    for md in _pages():
        for n, line in _fenced_commands(md):
            found += 1
            err = _problem(line)
            if err:
                bad.append(f"{md.relative_to(root)}:{n}: {err}: {line[:120]}")
    assert found >= 40, f"only {found} documented ctsdk commands found: is the extraction broken?"
    assert bad == []

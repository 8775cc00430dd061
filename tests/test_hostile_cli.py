"""The command line names only things that exist, and ends cleanly in every case.

- every ``--flag`` a message of the package names is a flag of some command (or of the
  launchers the README names), and every ``hyperfeatures CMD ... --flag`` line of the README
  uses flags of that command;
- on/off options read as flags in ``--help`` (no ``<bool>``), ``--version`` exists;
- a closed pipe (``hyperfeatures layers | head -1``) ends quietly (no message).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hyperfeatures.cli import app

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hyperfeatures"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]")
runner = CliRunner()


def _commands() -> dict[str, Any]:
    root = typer.main.get_command(app)
    out: dict[str, Any] = {"": root}

    def walk(prefix: str, group: Any) -> None:
        for name, sub in getattr(group, "commands", {}).items():
            key = f"{prefix} {name}".strip()
            out[key] = sub
            walk(key, sub)

    walk("", root)
    return out


def _flags(command: Any) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o[:2] == "--"}


COMMANDS = _commands()
ALL_FLAGS = set().union(*(_flags(c) for c in COMMANDS.values())) | {"--help"}


def test_every_flag_named_in_the_package_exists() -> None:
    unknown = {}
    for path in PACKAGE.rglob("*.py"):
        for match in FLAG.finditer(path.read_text(encoding="utf-8")):
            flag = match.group(0)
            if "_" in flag:  # launcher flags (accelerate's --num_processes, torchrun's ...)
                continue
            if flag not in ALL_FLAGS:
                unknown.setdefault(flag, []).append(path.relative_to(ROOT).as_posix())
    assert not unknown, f"messages name flags no command has: {unknown}"


def test_readme_command_lines_use_flags_of_their_command() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    names = sorted((k for k in COMMANDS if k), key=len, reverse=True)
    checked = 0
    for line in text.splitlines():
        found = re.search(r"(?:^|[\s`(])hyperfeatures ((?:[a-z]+ ?)+)", line)
        if found is None:
            continue
        words = found.group(1).strip()
        command = next((n for n in names if words == n or words.startswith(n + " ")), None)
        if command is None:
            continue
        rest = line[found.end() :].split("`")[0].split("#")[0]
        for flag in FLAG.findall(rest):
            assert flag in _flags(COMMANDS[command]) | {"--help"}, (
                f"README: `hyperfeatures {command}` has no {flag}: {line.strip()}"
            )
            checked += 1
    assert checked >= 20  # the README shows many command lines


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_flags_as_flags(command: str) -> None:
    result = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help" in result.output


def test_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"hyperfeatures {version('hyperfeatures')}"


def test_a_closed_pipe_ends_quietly() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = (
        "import sys; from hyperfeatures.cli import main; "
        "sys.argv = ['hyperfeatures', 'layers', '--model', 'tiny-sd']; main()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # read one line, then leave, as `| head -1` does
    proc.stdout.close()
    err = proc.stderr.read().decode()
    # click's convention for a reader that left: exit 1 with nothing printed
    assert proc.wait(timeout=120) in (0, 1), err
    assert first.startswith(b"# taps of tiny-sd")
    assert err.strip() == "", err

"""The root CLI: --version, --help on every command, exit 2 with one line on user errors, --debug."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from cllama_deploy import __version__
from cllama_deploy.cli import app, main
from cllama_deploy.errors import CllamaError


def _command_paths() -> list[list[str]]:
    """Every command and group of the app, as argument lists (walks the Click tree)."""
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd, prefix: list[str]) -> None:
        paths.append(prefix)
        if hasattr(cmd, "commands"):  # a group (typer may vendor its own click)
            for name, sub in cmd.commands.items():
                walk(sub, prefix + [name])

    walk(root, [])
    return paths


COMMANDS = _command_paths()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cllama-deploy {__version__}"


def test_the_main_commands_exist():
    names = {" ".join(p) for p in COMMANDS}
    for expected in ("tokenizer train", "tokenizer merge", "tokenizer stats", "tokenizer from-gguf", "quickstart"):
        assert expected in names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_help_on_every_command(path, capsys):
    assert main(path + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower()
    if path:  # options of leaf commands show their defaults
        cmd = typer.main.get_command(app)
        for name in path:
            cmd = cmd.commands[name]
        for param in cmd.params:
            if param.param_type_name == "option" and not param.required and param.default not in (None, False, ()) \
                    and not param.hidden and param.name != "help":
                assert "default" in out.lower(), f"{' '.join(path)}: --help does not show defaults"
                break


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    code = main(["tokenizer", "stats", "--base", str(tmp_path / "a.model"), "--tokenizer",
                 str(tmp_path / "b.model"), str(tmp_path / "x.txt")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]


def test_bad_usage_exits_2(capsys):
    assert main(["tokenizer", "merge", "--bogus-flag"]) == 2
    assert main(["no-such-command"]) == 2


def test_debug_shows_the_traceback(tmp_path):
    args = ["tokenizer", "stats", "--base", str(tmp_path / "a.model"), "--tokenizer", str(tmp_path / "b"), "x"]
    with pytest.raises(CllamaError):
        main(["--debug"] + args)


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).with_name("cllama-deploy")
    exe = str(script) if script.exists() else shutil.which("cllama-deploy")
    assert exe, "the cllama-deploy console script is not installed (pip install -e .)"
    env = dict(os.environ, CLLAMA_DEBUG="")
    ok = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert ok.returncode == 0 and ok.stdout.strip() == f"cllama-deploy {__version__}"
    bad = subprocess.run([exe, "tokenizer", "from-gguf", str(tmp_path / "missing.gguf")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1

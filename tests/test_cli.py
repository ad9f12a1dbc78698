"""The root CLI: --version, --help on every command, exit 2 with one line on user errors, --debug."""

from __future__ import annotations

import dataclasses
import os
import re
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


def _command(path: list[str]):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


LEAVES = [p for p in COMMANDS if p and not hasattr(_command(p), "commands")]
# `train pt|sft` hand their flags to training/config.py's argparse parser (shared with torchrun).
ARGPARSE_COMMANDS = {("train", "pt"): "pt", ("train", "sft"): "sft"}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "root")
def test_help_on_every_command(path, capsys):
    assert main(path + ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower()


def _help_lines(path: list[str], monkeypatch, capsys) -> list[str]:
    import typer.rich_utils

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 2000)  # one line per option
    assert main(path + ["--help"]) == 0
    return capsys.readouterr().out.splitlines()


def _line_of(lines: list[str], name: str) -> str:
    # the row that starts with the name (after the box edge and the "required" star)
    pattern = re.compile(rf"^\s*│\s*(\*\s+)?{re.escape(name)}(?![\w-])")
    found = [line for line in lines if pattern.search(line)]
    assert found, f"{name} is not in --help"
    return found[0]


@pytest.mark.parametrize("path", [p for p in LEAVES if tuple(p) not in ARGPARSE_COMMANDS], ids=" ".join)
def test_help_shows_every_options_default(path, monkeypatch, capsys):
    """Every option and argument of every command: its default is in --help (or it is [required], or a
    flag that is off unless given)."""
    cmd = _command(path)
    lines = _help_lines(path, monkeypatch, capsys)
    for param in cmd.params:
        if param.name == "help" or getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            line = _line_of(lines, param.metavar or param.name.upper())
        else:
            line = _line_of(lines, param.opts[0])
        if param.required:
            assert "[required]" in line, f"{' '.join(path)} {param.opts}: {line.strip()}"
            continue
        if getattr(param, "is_flag", False) and not param.secondary_opts and param.default is False:
            continue  # a plain on/off flag: off unless given
        shown = re.search(r"\[default: ([^\]]*)\]", line)
        assert shown and shown.group(1).strip(), f"{' '.join(path)} {param.opts}: no default in {line.strip()!r}"
        if isinstance(param.show_default, str):
            assert shown.group(1) == f"({param.show_default})"
        elif isinstance(param.default, (list, tuple)):
            assert shown.group(1) == ", ".join(map(str, param.default))
        elif not getattr(param, "is_flag", False):
            assert shown.group(1) == str(param.default), line


def test_every_command_is_generated_from_its_config():
    """One registration style: each leaf command's options are its config's fields (plus display-only
    extras), with the fields' defaults."""
    import dataclasses

    from cllama_deploy.options import field_default

    for path in LEAVES:
        if tuple(path) in ARGPARSE_COMMANDS:
            continue
        cmd = _command(path)
        generated = getattr(cmd.callback, "generated", None)
        assert generated is not None, f"`{' '.join(path)}` is not registered with config_command"
        params = {p.name: p for p in cmd.params}
        fields = {f.name: f for f in dataclasses.fields(generated.config)}
        for name in generated.fields:
            f, p = fields[name], params[name]
            default = field_default(f)
            if default is dataclasses.MISSING:
                assert p.required, f"{' '.join(path)} {name}"
                continue
            if f.metadata.get("invert"):
                default = not default
            got = list(p.default) if isinstance(p.default, (list, tuple)) else p.default
            want = list(default) if isinstance(default, (list, tuple)) else default
            assert got == want, f"{' '.join(path)} {name}: option default {got!r} != field default {want!r}"
            assert p.help and p.help.strip(), f"{' '.join(path)} {name}: no help text"
        missing = [f.name for f in dataclasses.fields(generated.config)
                   if f.metadata.get("cli", True) and f.init and f.name not in generated.fields]
        assert not missing, f"{' '.join(path)}: fields without an option: {missing}"


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_train_help_shows_every_field_with_its_default(stage, capsys):
    from cllama_deploy.training.config import CONFIGS

    assert main(["train", stage, "--help"]) == 0
    out = "".join(capsys.readouterr().out.split())  # argparse wraps long values anywhere
    for f in dataclasses.fields(CONFIGS[stage]):
        assert f"--{f.name}" in out, f"train {stage}: --{f.name} is not in --help"
        if f.default not in (None, [], "", dataclasses.MISSING) and not isinstance(f.default, bool):
            assert "".join(f"[default: {f.default}]".split()) in out, f"train {stage}: default of --{f.name} not shown"


def _all_flags() -> set[str]:
    from cllama_deploy.training.config import build_parser

    flags = {"--help", "-h", "--version", "--debug"}
    for path in COMMANDS:
        for param in getattr(_command(path), "params", []):
            flags.update(getattr(param, "opts", []))
            flags.update(getattr(param, "secondary_opts", []))
    for stage in ("pt", "sft"):
        for action in build_parser(stage)._actions:
            flags.update(action.option_strings)
    return flags


def _flag_mentions() -> dict[str, list[str]]:
    """Every ``--flag`` named in a string of the package (error messages, help), docstrings left out."""
    import ast

    import cllama_deploy

    pattern = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*[a-zA-Z0-9](?![\w-])")
    found: dict[str, list[str]] = {}
    root = Path(cllama_deploy.__file__).parent
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docstrings.add(id(first.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for flag in pattern.findall(node.value):
                    found.setdefault(flag, []).append(f"{path.relative_to(root.parent)}:{node.lineno}")
    return found


# Flags of other tools that our messages tell users to pass there.
OTHER_TOOLS_FLAGS = {
    "--tokenizer-mode": "vLLM (tokenizer/hf.py: load our HF tokenizer dir with --tokenizer-mode slow)",
}


def test_every_flag_named_in_the_package_exists():
    """Error messages (and any other string) name only flags that some command accepts."""
    known = _all_flags() | set(OTHER_TOOLS_FLAGS)
    wrong = {flag: where for flag, where in _flag_mentions().items() if flag not in known}
    assert not wrong, f"flags named in messages that no command has: {wrong}"


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


EXAMPLE_SETTINGS = Path(__file__).resolve().parents[1] / "server" / "settings.example.yaml"
EXAMPLE_MODELS = ["chinese-alpaca-7b=/srv/models/chinese-alpaca-7b-q4_k_m.gguf",
                  "chinese-alpaca-2-7b=/srv/models/chinese-alpaca-2-7b-q4_k_m.gguf"]


def test_settings_example_is_what_print_settings_writes(capsys):
    """server/settings.example.yaml is generated (`make settings-example`), so it cannot drift."""
    assert main(["serve", "--print-settings", *EXAMPLE_MODELS]) == 0
    assert capsys.readouterr().out == EXAMPLE_SETTINGS.read_text(encoding="utf-8"), \
        "server/settings.example.yaml is stale: run `make settings-example`"


def test_settings_example_holds_the_real_defaults():
    """Loading the example gives exactly the defaults (sampling included), so it documents them."""
    from cllama_deploy.engine.base import SamplingParams
    from cllama_deploy.server.settings import Settings, load_settings, parse_model_arg

    loaded = load_settings(str(EXAMPLE_SETTINGS))
    assert loaded == Settings(models=[parse_model_arg(m) for m in EXAMPLE_MODELS])
    defaults = SamplingParams()
    assert loaded.sampling and all(v == getattr(defaults, k) for k, v in loaded.sampling.items())
    assert all(m.embeddings for m in loaded.models)


def test_serve_flags_override_the_settings_file(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "s.yaml"
    cfg.write_text("port: 9000\nmax_queue: 3\nmodels: [a.gguf]\n")
    assert main(["serve", "--config", str(cfg), "--print-settings", "--max-queue", "5", "--no-access-log"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["port"] == 9000 and printed["max_queue"] == 5 and printed["access_log"] is False
    assert printed["models"][0]["path"] == str(tmp_path / "a.gguf")

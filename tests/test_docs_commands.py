"""Every ``cllama-deploy ...`` command line the docs show names a real command and only flags it has.

The docs' commands run on the reader's own models (paths a test cannot have), so what is checked here is
what drifts: a renamed command or flag, an option shown for the wrong command. What the commands do is
tested where each command is (and end to end by the quickstart, which runs the same stages).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cllama_deploy.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "training" / "README.md",
        ROOT / "server" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _command_lines(text: str) -> list[str]:
    """Lines of shell code blocks that run cllama-deploy (continuations joined, comments dropped)."""
    out: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        for line in joined.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"\s+#.*$", "", line)
            m = re.search(r"(?:^|[\s;&|(])(?:\S*/)?cllama-deploy(\s.*)?$", line)
            if m and not line.startswith("#"):
                out.append("cllama-deploy" + (m.group(1) or ""))
    return out


def _cases() -> list[tuple[str, str]]:
    cases = []
    for doc in DOCS:
        if doc.is_file():
            cases += [(doc.relative_to(ROOT).as_posix(), line) for line in _command_lines(doc.read_text("utf-8"))]
    return cases


CASES = _cases()


def _resolve(words: list[str]):
    """The Click command the words name, and the words after it."""
    cmd = typer.main.get_command(app)
    rest = list(words)
    while rest and rest[0].startswith("-"):  # root options (--debug)
        rest.pop(0)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"no command {name!r} (has {sorted(cmd.commands)})"
        cmd = cmd.commands[name]
    assert not hasattr(cmd, "commands"), "names a group, not a command"
    return cmd, rest


def _flags_of(cmd, path: list[str]) -> set[str]:
    if path[:1] == ["train"]:  # argparse (shared with torchrun)
        from cllama_deploy.training.config import build_parser

        return {s for a in build_parser(path[1])._actions for s in a.option_strings}
    flags = {"--help", "-h"}
    for param in cmd.params:
        flags.update(getattr(param, "opts", []))
        flags.update(getattr(param, "secondary_opts", []))
    return flags


def test_the_docs_show_commands():
    assert len(CASES) >= 20, CASES  # the extraction finds the docs' command lines


@pytest.mark.parametrize("doc,line", CASES, ids=[f"{d}:{i}" for i, (d, _) in enumerate(CASES)])
def test_doc_command_exists_with_its_flags(doc, line):
    words = shlex.split(line.replace("|", " ").split(" > ")[0])[1:]
    cmd, rest = _resolve(words)
    path = [w for w in words if not w.startswith("-")][: len(words) - len(rest)]
    known = _flags_of(cmd, path)
    used = {w.split("=", 1)[0] for w in rest if re.match(r"^--?[a-zA-Z]", w)}
    unknown = sorted(used - known)
    assert not unknown, f"{doc}: `{line}` uses {unknown}, which `cllama-deploy {' '.join(path)}` does not have"

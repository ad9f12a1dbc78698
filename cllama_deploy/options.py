"""Config fields that carry their command-line option: help, default and flag name in one place.

A stage's config dataclass declares each option once, as a field made with :func:`option` (or with
``dataclasses.field(metadata={...})`` using the same keys); ``cllama_deploy.cli.from_config`` turns
the fields into the command's options, and ``cllama_deploy.training.config`` builds its argparse parser from the
same ``help`` / ``choices`` keys. This module imports nothing heavy, so stage modules can use it freely.

Metadata keys (all optional except ``help``):

``help``
    One sentence for ``--help``. Do not restate the default: it is shown from the field's default.
``flag``
    The option's names: ``"--lora"`` or ``("--out", "-o")``; a boolean may name both sides, as
    ``"--shuffle/--no-shuffle"``. Default: ``--`` + the field name with dashes.
``argument``
    True for a positional argument (``metavar`` names it in the usage line).
``metavar``
    The value's name in the usage line (``IN``, ``MODEL.gguf``).
``default_text``
    What the default means when it is worked out at run time (``None`` → ``"half the CPUs"``); shown as
    the default in ``--help``. Every optional field whose default is None needs one.
``invert``
    For a boolean that defaults to True and is switched off by the flag (``show_progress`` is
    ``--quiet``): the flag stores ``not value``.
``choices``
    The allowed values (listed in ``--help``; the config's ``__post_init__`` still checks them, so the
    error names the flag and says what to do).
``cli``
    False for a field that is set by code, never on the command line.
``hidden``
    True to accept the option but leave it out of ``--help`` (kept for compatibility).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

_MISSING = dataclasses.MISSING

def option(default: Any = _MISSING, help: str = "", *, flag: str | Sequence[str] | None = None,
           argument: bool = False, metavar: str | None = None, default_text: str | None = None,
           invert: bool = False, choices: Sequence[str] | None = None, cli: bool = True,
           hidden: bool = False, default_factory: Any = _MISSING, **field_kw: Any) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring for the keys).

    A list default is copied per instance (``option(["Q4_K_M"], ...)`` is safe). Leave ``default`` out
    for a required option or argument.
    """
    meta: dict[str, Any] = {"help": help}
    for key, value, unset in (("flag", flag, None), ("argument", argument, False), ("metavar", metavar, None),
                              ("default_text", default_text, None), ("invert", invert, False),
                              ("choices", tuple(choices) if choices else None, None), ("cli", cli, True),
                              ("hidden", hidden, False)):
        if value != unset:
            meta[key] = value
    meta.update(field_kw.pop("metadata", None) or {})
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **field_kw)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta, **field_kw)
    return dataclasses.field(default=default, metadata=meta, **field_kw)


def field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from a factory); ``dataclasses.MISSING`` when required."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options (``cli`` not False)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True) and f.init]


def _yaml_scalar(value: Any) -> str:
    import json
    from pathlib import PurePath

    if isinstance(value, PurePath):
        value = str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import yaml

        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
        return text[:-4].rstrip() if text.endswith("\n...") else text.removesuffix("...").strip()
    return json.dumps(value, ensure_ascii=False)


def _comment(f: dataclasses.Field, value: Any) -> str:
    text = str(f.metadata.get("help", "")).strip()
    if value is None and f.metadata.get("default_text"):
        text += f" (null: {f.metadata['default_text']})"
    return text


def _yaml_lines(obj: Any, indent: str, first_prefix: str | None = None, width: int = 40) -> list[str]:
    lines: list[str] = []
    for i, f in enumerate(dataclasses.fields(obj)):
        prefix = first_prefix if (first_prefix is not None and i == 0) else indent
        value = getattr(obj, f.name)
        comment = _comment(f, value)
        if isinstance(value, dict) and value:
            lines.append(_with_comment(f"{prefix}{f.name}:", comment, width))
            lines += [f"{indent}  {k}: {_yaml_scalar(v)}" for k, v in value.items()]
        elif isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
            lines.append(_with_comment(f"{prefix}{f.name}:", comment, width))
            for item in value:
                lines += _yaml_lines(item, indent + "    ", first_prefix=indent + "  - ", width=width)
        else:
            shown = "[]" if isinstance(value, (list, tuple)) and not value else \
                ("{}" if isinstance(value, dict) else
                 "[" + ", ".join(_yaml_scalar(v) for v in value) + "]" if isinstance(value, (list, tuple))
                 else _yaml_scalar(value))
            lines.append(_with_comment(f"{prefix}{f.name}: {shown}", comment, width))
    return lines


def _with_comment(line: str, comment: str, width: int) -> str:
    if not comment:
        return line
    return f"{line.ljust(width - 1)} # {comment}"


def to_yaml(obj: Any, header: str = "") -> str:
    """A config instance as a YAML file: every field with its value and its help as a comment.

    Reading the text back (``yaml.safe_load``) gives the same values; fields that are lists of
    dataclasses (e.g. the served models) are written as lists of mappings. ``header`` lines are
    written first as comments.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += _yaml_lines(obj, "")
    return "\n".join(lines) + "\n"

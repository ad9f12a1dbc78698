"""Config fields that carry their command-line option: help, default and flag name in one place.

A stage's config dataclass declares each option once, as a field made with :func:`option` (or with
``dataclasses.field(metadata={...})`` using the same keys); ``cllama_deploy.cli.from_config`` turns
the fields into the command's options, and ``training/config.py`` builds its argparse parser from the
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

METADATA_KEYS = ("help", "flag", "argument", "metavar", "default_text", "invert", "choices", "cli", "hidden")


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


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The option names of a field (``("--out", "-o")``); both sides of a ``--a/--b`` boolean."""
    decl = f.metadata.get("flag")
    if decl is None:
        return (f"--{f.name.replace('_', '-')}",)
    decls = (decl,) if isinstance(decl, str) else tuple(decl)
    return tuple(name for d in decls for name in d.split("/"))


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

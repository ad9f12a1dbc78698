"""Commands whose options are generated from a stage's config dataclass (see ``cllama_deploy.options``).

Every command of the CLI is registered with :func:`config_command`::

    from cllama_deploy.cli.from_config import config_command
    from cllama_deploy.gguf.convert import ConvertConfig

    @config_command(app, "convert", ConvertConfig)
    def convert_cmd(config: ConvertConfig) -> None:
        \"\"\"Convert an HF LLaMA model to GGUF.\"\"\"
        result = convert(config)
        ...

One option (or argument) per field: its names, help and default come from the field, so ``--help``
shows exactly what the config does. Options that only change what the command prints (``--json``,
``--tensors``) are ordinary Typer parameters after the first one; they must not share a field's name.

``given_only=True`` hands the function a dict of the options given on the command line (field name →
value) instead of a built config, for commands that merge them over a settings file (``serve``).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable

import typer

from cllama_deploy.options import cli_fields, field_default

_MISSING = dataclasses.MISSING
_CTX = "_cllama_ctx"
_GIVEN = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


@dataclasses.dataclass(frozen=True)
class GeneratedCommand:
    """What :func:`config_command` registered, kept on the callback as ``.generated`` (the tests walk
    the command tree and check each one)."""

    name: str
    config: type
    fields: tuple[str, ...]
    given_only: bool


def _escape(text: str) -> str:
    # Typer renders help as Rich markup: "[default: x]" or "[a|b]" would vanish without escaping.
    from typer import core

    if getattr(core, "HAS_RICH", False):
        from rich.markup import escape

        return escape(text)
    return text


def _unwrap(tp: Any) -> tuple[type, bool]:
    """(click-level value type, repeatable) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
        return str, False  # e.g. ``str | int`` (a size like 5GB): the config parses the text
    if origin in (list, tuple, typing.Sequence, set) or tp in (list, tuple) or \
            (origin is not None and getattr(origin, "__name__", "") == "Sequence"):
        inner = typing.get_args(tp)
        item, _ = _unwrap(inner[0]) if inner else (str, False)
        return item, True
    if tp in (bool, int, float, str, Path):
        return tp, False
    return str, False


@dataclasses.dataclass
class _Spec:
    field: str
    param: str
    invert: bool
    repeat: bool


def _param(f: dataclasses.Field, tp: Any) -> tuple[inspect.Parameter, _Spec]:
    meta = f.metadata
    item, repeat = _unwrap(tp)
    default = field_default(f)
    required = default is _MISSING
    invert = bool(meta.get("invert"))
    help_text = _escape(str(meta.get("help", "")))
    decl = meta.get("flag")
    decls = [f"--{f.name.replace('_', '-')}"] if decl is None else ([decl] if isinstance(decl, str) else list(decl))
    default_text = meta.get("default_text")
    kw: dict[str, Any] = {"help": help_text, "hidden": bool(meta.get("hidden", False))}
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    elif meta.get("choices"):
        kw["metavar"] = "|".join(map(str, meta["choices"]))  # the allowed values, in the type column
    if default_text is not None:
        kw["show_default"] = str(default_text)
    elif repeat and not required and not default:
        kw["show_default"] = "none"

    if item is bool:
        if invert:
            default = not default
        elif default is True and decl is None:
            decls = [f"--{f.name.replace('_', '-')}/--no-{f.name.replace('_', '-')}"]
        annotation: Any = bool
    else:
        annotation = list[item] if repeat else (item if required or default is not None else typing.Optional[item])
    cli_default: Any = ... if required else (list(default) if repeat else default)
    if meta.get("argument"):
        info = typer.Argument(cli_default, **kw)
    else:
        info = typer.Option(cli_default, *decls, **kw)
    param = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
    return param, _Spec(f.name, f.name, invert, repeat)


def config_command(parent: typer.Typer, name: str, config: type, *, given_only: bool = False,
                   exclude: tuple[str, ...] = (), **command_kw: Any) -> Callable[[Callable], Callable]:
    """Register the decorated function as command ``name`` of ``parent`` with options from ``config``.

    Args:
        parent: the Typer app or group the command belongs to.
        name: the command's name.
        config: the stage's config dataclass; one option per field (``cli`` not False).
        given_only: pass a dict of the options given on the command line instead of a built config.
        exclude: field names not to offer on the command line here (their defaults apply).
        command_kw: passed to ``Typer.command`` (``context_settings``, ``hidden``...).

    The function's first parameter receives the config (or dict); its other parameters are extra
    Typer options. Returns the function unchanged.
    """
    hints = typing.get_type_hints(config)
    specs: list[_Spec] = []
    params: list[inspect.Parameter] = [
        inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    fields = [f for f in cli_fields(config) if f.name not in exclude]
    # positional arguments keep their declaration order, ahead of the options in --help
    for f in sorted(fields, key=lambda f: not f.metadata.get("argument")):
        p, s = _param(f, hints[f.name])
        params.append(p)
        specs.append(s)

    def decorate(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        fn_hints = typing.get_type_hints(fn)
        extras = list(sig.parameters.values())[1:]
        clash = {p.name for p in extras} & {s.param for s in specs} | ({p.name for p in extras} & {_CTX})
        if clash:
            raise TypeError(f"{fn.__name__}: parameter(s) {sorted(clash)} clash with {config.__name__} fields")
        extra_params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=fn_hints.get(p.name, p.annotation))
                        for p in extras]

        def command(**kwargs: Any) -> Any:
            ctx = kwargs.pop(_CTX)
            values: dict[str, Any] = {}
            for s in specs:
                value = kwargs.pop(s.param)
                if given_only:
                    source = ctx.get_parameter_source(s.param)
                    if getattr(source, "name", None) not in _GIVEN:
                        continue
                if s.invert:
                    value = not value
                elif s.repeat and value is not None:
                    value = list(value)
                values[s.field] = value
            return fn(values if given_only else config(**values), **kwargs)

        command.__signature__ = inspect.Signature(params + extra_params)  # type: ignore[attr-defined]
        command.__name__ = fn.__name__
        command.__qualname__ = fn.__qualname__
        command.__doc__ = fn.__doc__
        command.__module__ = fn.__module__
        command.generated = GeneratedCommand(name, config, tuple(s.field for s in specs),  # type: ignore
                                             given_only)
        parent.command(name, **command_kw)(command)
        return fn

    return decorate

"""The ``cllama-deploy`` command line: a thin Typer layer over the stage functions.

Errors a user can cause (:class:`cllama_deploy.errors.CllamaError`) print one line and exit 2;
``--debug`` (or ``CLLAMA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

import click
import typer

# typer >= 0.2x runs on a vendored copy of click (typer._click): catch both copies' exceptions.
try:
    from typer._click.exceptions import ClickException as _VendoredClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    _VendoredClickException = click.ClickException
_EXIT = (typer.Exit, click.exceptions.Exit)
_ABORT = (typer.Abort, click.exceptions.Abort)
_USAGE = (_VendoredClickException, click.ClickException)

from cllama_deploy import __version__
from cllama_deploy.errors import CllamaError

app = typer.Typer(
    name="cllama-deploy",
    help="Extend LLaMA's vocabulary, train LoRA adapters, merge, convert to GGUF, quantize and serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": bool(os.environ.get("CLLAMA_DEBUG"))}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cllama-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        _state["debug"] = True


def _register() -> None:
    # Each module adds its commands; modules import heavy libraries only inside commands.
    from cllama_deploy.cli import convert, deploy, inspect, merge, quantize, quickstart, serve, tokenizer, train
    from cllama_deploy.cli import chat, generate

    app.add_typer(tokenizer.app, name="tokenizer")
    app.add_typer(train.app, name="train")
    merge.register(app)
    convert.register(app)
    quantize.register(app)
    inspect.register(app)
    deploy.register(app)
    serve.register(app)
    quickstart.register(app)
    chat.register(app)
    generate.register(app)
    __import__("cllama_deploy.cli.eval", fromlist=["register"]).register(app)  # eval ppl|quant|choice, bench


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # per call, so one --debug run (e.g. in a test process) does not leak into the next
    _state["debug"] = bool(os.environ.get("CLLAMA_DEBUG")) or "--debug" in args
    try:
        rv = app(args=args, prog_name="cllama-deploy", standalone_mode=False)
    except CllamaError as exc:
        if _state["debug"]:
            raise
        typer.secho(f"error: {exc}", err=True, fg="red")
        return exc.exit_code
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        typer.secho("aborted", err=True, fg="red")
        return 130
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True, fg="red")
        return 130
    except _USAGE as exc:
        exc.show()
        return exc.exit_code
    # non-standalone Typer returns the exit code of typer.Exit (e.g. --help, --version)
    return rv if isinstance(rv, int) else 0


def run() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())

"""`cllama-deploy serve`: the OpenAI-compatible server and web chat page (options from
:class:`~cllama_deploy.server.settings.Settings`; flags given on the command line override ``--config``)."""

from __future__ import annotations

from typing import Any, Optional

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.server.settings import Settings


SETTINGS_HEADER = """cllama-deploy serve --config FILE.yaml
Every key is optional except `models`; flags given on the command line override this file.
Relative model paths are relative to this file. Written by `cllama-deploy serve --print-settings`."""


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "serve", Settings, given_only=True)
    def serve_cmd(
        overrides: dict[str, Any],
        config: Optional[str] = typer.Option(None, "--config", show_default="none",
                                             help="Settings file (YAML or JSON); flags given here override it."),
        print_settings: bool = typer.Option(False, "--print-settings",
                                            help="Print the resulting settings as YAML (every key, with its "
                                                 "default) and exit."),
    ) -> None:
        """Serve GGUF models over an OpenAI-compatible HTTP API with a web chat page at /."""
        from cllama_deploy.server import load_settings, serve

        settings = load_settings(config, **overrides)
        if print_settings:
            from cllama_deploy.options import to_yaml

            typer.echo(to_yaml(settings, header=SETTINGS_HEADER), nl=False)
            return
        serve(settings)

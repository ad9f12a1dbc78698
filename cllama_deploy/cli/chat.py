"""`cllama-deploy chat`: an interactive terminal chat with a GGUF or an HF model with adapters (options from
:class:`~cllama_deploy.inference.chat.ChatConfig`)."""

from __future__ import annotations

import typer

from cllama_deploy.cli.from_config import config_command
from cllama_deploy.inference.chat import ChatConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @config_command(app, "chat", ChatConfig)
    def chat_cmd(config: ChatConfig) -> None:
        """Chat in the terminal with streamed replies: /reset forgets, /exit leaves; the history is trimmed to
        fit the context."""
        from cllama_deploy.inference.chat import run_chat

        run_chat(config)

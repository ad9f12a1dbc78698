"""`cllama-deploy serve`: the OpenAI-compatible server and web chat page."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command("serve")
    def serve_cmd(
        models: Optional[List[str]] = typer.Argument(
            None, metavar="[MODEL.gguf | NAME=MODEL.gguf]...",
            help="GGUF files to serve; clients pick one with the `model` field (default id: the file "
                 "name without .gguf)."),
        config: Optional[str] = typer.Option(None, "--config", help="Settings file (YAML or JSON); "
                                             "flags given here override it."),
        host: Optional[str] = typer.Option(None, "--host", help="Listen address [default: 127.0.0.1]."),
        port: Optional[int] = typer.Option(None, "--port", help="TCP port; 0 picks a free one "
                                           "[default: 8000]."),
        api_key: Optional[List[str]] = typer.Option(None, "--api-key", help="Accepted API key "
                                                    "(repeat for several)."),
        api_key_file: Optional[str] = typer.Option(None, "--api-key-file",
                                                   help="File with one API key per line."),
        cors_origin: Optional[List[str]] = typer.Option(None, "--cors-origin", help="Browser origin "
                                                        "allowed to call the API (repeat; '*' = any)."),
        max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes",
                                                     help="Largest request body [default: 4 MiB]."),
        max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Requests that may wait "
                                                "while the model is busy; more get 429 [default: 64]."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="Per-request timeout in "
                                                "seconds, queue wait included [default: 600]."),
        graceful_timeout: Optional[float] = typer.Option(None, "--graceful-timeout", help="Seconds "
                                                         "in-flight requests get on shutdown [default: 30]."),
        n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Context window; 0 = the model's "
                                            "trained context [default: 0]."),
        threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads [default: "
                                              "half the CPUs; see docs/serving.md]."),
        n_batch: Optional[int] = typer.Option(None, "--n-batch", help="Prompt tokens per decode call "
                                              "[default: 512]."),
        chat_template: Optional[str] = typer.Option(None, "--chat-template", help="alpaca, alpaca-2 "
                                                    "or FILE.jinja; default: the template in the GGUF."),
        max_n: Optional[int] = typer.Option(None, "--max-n", help="Largest `n` accepted [default: 8]."),
        no_access_log: bool = typer.Option(False, "--no-access-log", help="Do not log each request."),
        log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning or "
                                                "error [default: info]."),
    ) -> None:
        """Serve GGUF models over an OpenAI-compatible HTTP API with a web chat page at /."""
        from cllama_deploy.server import load_settings, serve
        from cllama_deploy.server.settings import parse_model_arg

        settings = load_settings(
            config,
            models=[parse_model_arg(m) for m in models or []] or None,
            host=host, port=port, api_keys=api_key or None, api_key_file=api_key_file,
            cors_origins=cors_origin or None, max_body_bytes=max_body_bytes, max_queue=max_queue,
            request_timeout=timeout, graceful_timeout=graceful_timeout, n_ctx=n_ctx, threads=threads,
            n_batch=n_batch, chat_template=chat_template, max_n=max_n,
            access_log=False if no_access_log else None, log_level=log_level,
        )
        serve(settings)

"""``serve(settings)``: run the server with uvicorn until SIGINT/SIGTERM.

The socket is bound before the models load, so health checks get 503 (not "connection refused")
while loading. A model that does not load is the operator's mistake: every file is checked for the GGUF
magic before the port is bound, and a file that still fails to load in llama.cpp stops the server, so
``serve`` raises the one-line error (the CLI exits with code 2; systemd's ``Restart=on-failure`` and
balancers see a dead process, not a server answering 503 forever). On SIGTERM uvicorn stops accepting
connections and lets in-flight requests finish (up to ``graceful_timeout`` seconds) before the
engines close.
"""

from __future__ import annotations

import functools
import logging
import socket
import sys
from dataclasses import dataclass

from cllama_deploy.server.settings import Settings

log = logging.getLogger("cllama_deploy.server")


@dataclass
class ServeResult:
    host: str
    port: int


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after setup)."""

    _cllama = True

    def __init__(self, fmt: str):
        super().__init__()
        self.setFormatter(logging.Formatter(fmt))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(level: str) -> None:
    """Plain lines for our loggers on stderr; access records are JSON lines already."""
    root = logging.getLogger("cllama_deploy")
    if not any(getattr(h, "_cllama", False) for h in root.handlers):
        root.addHandler(_StderrHandler("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        access = logging.getLogger("cllama_deploy.access")
        access.propagate = False
        access.addHandler(_StderrHandler("%(message)s"))
    root.setLevel(level.upper())
    logging.getLogger("cllama_deploy.access").setLevel(logging.INFO)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from cllama_deploy.errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                          "or --host") from exc
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> ServeResult:
    """Load the models (in the background) and serve HTTP until interrupted.

    Raises:
        InputError: a model file is missing, is not a GGUF, or llama.cpp cannot load it (then the
            server stops right after start-up instead of answering 503 forever).
    """
    import uvicorn

    from cllama_deploy.engine.llamacpp import LlamaCppEngine
    from cllama_deploy.errors import CllamaError, InputError
    from cllama_deploy.gguf.reader import check_gguf_file
    from cllama_deploy.server.app import create_app

    configs = settings.engine_configs()  # checks the files before binding the port
    for c in configs:
        check_gguf_file(c.model_path, "MODEL")
    configure_logging(settings.log_level)
    loaders = [functools.partial(LlamaCppEngine.load, c) for c in configs]
    failure: list[BaseException] = []

    def stop(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    app = create_app(settings, None, loaders=loaders, on_load_failure=stop)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout), timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info("listening on http://%s:%d (models: %s)", shown, port,
             ", ".join(c.model_id for c in configs))
    server.run(sockets=[sock])
    if failure:
        exc = failure[0]
        if isinstance(exc, CllamaError):
            raise exc
        raise InputError(f"could not load the model: {type(exc).__name__}: {exc}") from exc
    return ServeResult(host=host, port=port)

"""The OpenAI-compatible HTTP server: ``create_app(settings, engine)`` and ``serve(settings)``."""

from cllama_deploy.server.settings import ModelSettings, Settings, load_settings


def create_app(*args, **kwargs):  # lazy: FastAPI imports only when a server is built
    from cllama_deploy.server.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve(settings):
    from cllama_deploy.server.run import serve as _serve

    return _serve(settings)


__all__ = ["ModelSettings", "Settings", "create_app", "load_settings", "serve"]

"""Several models in one server, selected by the request's ``model`` field, and their loading state."""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Callable, Iterable, Optional

from cllama_deploy.engine.base import Engine
from cllama_deploy.errors import CllamaError

log = logging.getLogger("cllama_deploy.engine")


class RegistryState(str, enum.Enum):
    """Where the registry's models stand (the value is what ``/health`` reports as ``status``)."""

    LOADING = "loading"  # loaders are running: requests get 503 with Retry-After
    READY = "ready"      # every model loaded
    FAILED = "failed"    # a loader raised: requests get 500 model_load_failed, no retry helps


class ModelNotFound(CllamaError):
    def __init__(self, model: str, available: Iterable[str]):
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"The model '{model}' does not exist on this server; available: {names}")
        self.model = model


class ModelNotReady(CllamaError):
    """The server is still loading its models; retrying shortly helps."""


class ModelLoadFailed(CllamaError):
    """Loading the models failed; retrying does not help until the operator fixes the file."""


class ModelRegistry:
    """Maps model ids to engines. Starts :attr:`RegistryState.LOADING` until :meth:`load` finishes
    (or is ready at once when built with engines). ``get(None)`` returns the first model."""

    def __init__(self, engines: Optional[Iterable[Engine]] = None):
        self._engines: dict[str, Engine] = {}
        self.state = RegistryState.LOADING
        self.error: Optional[str] = None
        self.exception: Optional[BaseException] = None
        if engines is not None:
            for e in engines:
                self.add(e)
            self.state = RegistryState.READY

    def add(self, engine: Engine) -> None:
        if engine.info.id in self._engines:
            raise CllamaError(f"two models share the id {engine.info.id!r}; give each a distinct id")
        self._engines[engine.info.id] = engine

    @property
    def ready(self) -> bool:
        return self.state is RegistryState.READY

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def ids(self) -> list[str]:
        return list(self._engines)

    def get(self, model: Optional[str]) -> Engine:
        if not self.ready:
            if self.state is RegistryState.FAILED:
                raise ModelLoadFailed(f"the server failed to load its models: {self.error}")
            raise ModelNotReady("the server is still loading its models; retry shortly")
        if model is None or model == "":
            return next(iter(self._engines.values()))
        engine = self._engines.get(model)
        if engine is None:
            raise ModelNotFound(model, self._engines)
        return engine

    async def load(self, loaders: Iterable[Callable[[], Engine]]) -> None:
        """Run each (blocking) loader in a worker thread; the server answers 503 meanwhile.

        A loader that raises leaves the registry :attr:`RegistryState.FAILED` with the error's
        message (logged as one line; the traceback only at debug level, since a file that does not
        load is the operator's mistake, not a bug).
        """
        try:
            for loader in loaders:
                self.add(await asyncio.to_thread(loader))
            self.state = RegistryState.READY
        except Exception as exc:  # reported by /health and every request
            log.error("loading models failed: %s", exc)
            log.debug("loading models failed", exc_info=exc)
            self.error = str(exc)
            self.exception = exc
            self.state = RegistryState.FAILED

    async def aclose(self) -> None:
        for engine in self._engines.values():
            try:
                await engine.aclose()
            except Exception:  # pragma: no cover
                log.exception("closing %s failed", engine.info.id)

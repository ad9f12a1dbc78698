"""Loaded models shared by LangChain components: one engine per (GGUF file, engine options).

A :class:`ChatCLlama`, a :class:`CLlamaLLM` and a :class:`CLlamaEmbeddings` built on the same file with
the same options use ONE :class:`~cllama_deploy.engine.llamacpp.LlamaCppEngine`: the weights load
once, on first use (construction stays cheap), and the engine's scheduler batches their requests
together. The engine is thread-safe and serves sync and async callers at once (llama-cpp-python's
``Llama`` object is not: one shared by two threads crashes).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from cllama_deploy.engine.base import Engine

log = logging.getLogger("cllama_deploy.langchain")

# LlamaCppConfig fields a component may set (the rest of the config keeps its defaults)
ENGINE_OPTIONS = ("model_id", "n_ctx", "n_threads", "n_batch", "chat_template", "parallel",
                  "prefix_cache", "prefill_chunk", "kv_cache_type", "flash_attn", "max_queue",
                  "embeddings")

_lock = threading.Lock()
_engines: dict[tuple, Engine] = {}


def _key(model_path: str, options: dict[str, Any]) -> tuple:
    # an option given with its default value names the same engine as the option left out
    # (ChatCLlama passes n_ctx=0 explicitly; shared_engine(path) does not)
    from dataclasses import MISSING, fields

    from cllama_deploy.engine.llamacpp import LlamaCppConfig

    defaults = {f.name: f.default for f in fields(LlamaCppConfig) if f.default is not MISSING}
    options = {k: v for k, v in options.items() if k not in defaults or defaults[k] != v}
    return (os.path.realpath(model_path),) + tuple(sorted(options.items()))


def shared_engine(model_path: str, **options: Any) -> Engine:
    """The loaded engine for ``model_path`` with these ``LlamaCppConfig`` options (loading it once).

    Options left out (or None) keep ``LlamaCppConfig``'s defaults: ``n_ctx`` 0 = the model's trained
    context; the model's own RoPE parameters are used as the GGUF states them.
    """
    unknown = set(options) - set(ENGINE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown engine option(s) {sorted(unknown)}; known: {list(ENGINE_OPTIONS)}")
    options = {k: v for k, v in options.items() if v is not None}
    key = _key(model_path, options)
    with _lock:  # loading under the lock: two components asking at once must not load twice
        engine = _engines.get(key)
        if engine is None:
            from cllama_deploy.engine.llamacpp import LlamaCppConfig, LlamaCppEngine

            engine = LlamaCppEngine.load(LlamaCppConfig(model_path=str(model_path), **options))
            _engines[key] = engine
        return engine


def loaded_engines() -> list[Engine]:
    with _lock:
        return list(_engines.values())


def close_engines(timeout: Optional[float] = 10.0) -> None:
    """Close every shared engine (they load again on next use). Registered at exit."""
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        close = getattr(engine, "close", None)
        if close is not None:
            try:
                close(timeout)
            except Exception:  # pragma: no cover - best effort at exit
                log.exception("closing %s failed", engine.info.id)


atexit.register(close_engines)


class EngineOptions(BaseModel):
    """Fields shared by the components: which GGUF, how to load it, or an engine already loaded."""

    model_path: Optional[str] = Field(None, description="The GGUF file (loaded on first use).")
    model_name: Optional[str] = Field(None, alias="model", description=(
        "The model id reported in response_metadata (default: the file name without .gguf)."))
    n_ctx: int = Field(0, ge=0, description="Context window per sequence; 0 = the model's trained context.")
    n_threads: Optional[int] = Field(None, ge=1, description="llama.cpp threads (default: half the CPUs).")
    n_batch: Optional[int] = Field(None, ge=1, description="Most tokens in one decode step.")
    parallel: Optional[int] = Field(None, ge=1, le=64, description=(
        "Sequences decoded together (requests of every component on this engine share them)."))
    chat_template: Optional[str] = Field(None, description=(
        "alpaca, alpaca-2 or a .jinja file (default: the GGUF's own template)."))
    prefix_cache: Optional[bool] = Field(None, description="Reuse the KV cache of shared prompt prefixes.")
    engine_options: dict[str, Any] = Field(default_factory=dict, description=(
        "Other LlamaCppConfig options (kv_cache_type, flash_attn, prefill_chunk, max_queue)."))
    engine: Optional[Any] = Field(None, exclude=True, description=(
        "An Engine already loaded (for example a server's); model_path and the options are then unused."))

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True,
                              protected_namespaces=())

    _engine: Optional[Engine] = PrivateAttr(None)

    def _engine_option_values(self) -> dict[str, Any]:
        opts = {"model_id": self.model_name, "n_ctx": self.n_ctx, "n_threads": self.n_threads,
                "n_batch": self.n_batch, "parallel": self.parallel, "chat_template": self.chat_template,
                "prefix_cache": self.prefix_cache}
        opts.update(self.engine_options)
        return opts

    def _check_source(self) -> None:
        if self.engine is None and not self.model_path:
            raise ValueError("pass model_path= (a GGUF file), or engine= (an engine already loaded)")

    def get_engine(self) -> Engine:
        """The engine this component runs on (loading the shared one on first use)."""
        if self.engine is not None:
            return self.engine
        if self._engine is None:
            self._check_source()
            self._engine = shared_engine(self.model_path, **self._engine_option_values())
        return self._engine

    async def aget_engine(self) -> Engine:
        """:meth:`get_engine` from an event loop: a first load runs in a worker thread."""
        if self.engine is not None or self._engine is not None:
            return self.get_engine()
        import asyncio

        return await asyncio.to_thread(self.get_engine)

    @property
    def model_id(self) -> str:
        """The model's name, without loading it."""
        if self.engine is not None:
            return self.engine.info.id
        if self.model_name:
            return self.model_name
        name = os.path.basename(self.model_path or "")
        return name[:-5] if name.endswith(".gguf") else name

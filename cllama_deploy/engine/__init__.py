"""Inference engines: the :class:`Engine` protocol, :class:`LlamaCppEngine` on llama.cpp with
continuous batching and a prefix cache, the streams it returns (``async for`` and plain ``for``), and
the model registry. Heavy imports (llama_cpp) happen only when a model loads."""

from cllama_deploy.engine.base import (
    Chunk,
    ContextLengthExceeded,
    Embeddings,
    Engine,
    EngineClosed,
    EngineError,
    GenerationRequest,
    GenerationStream,
    InvalidRequest,
    ModelInfo,
    QueueFull,
    RequestTimeout,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from cllama_deploy.engine.detok import TextAssembler
from cllama_deploy.engine.registry import ModelNotFound, ModelNotReady, ModelRegistry
from cllama_deploy.engine.stream import ChunkStream
from cllama_deploy.engine.threads import default_n_threads

__all__ = [
    "Chunk", "ChunkStream", "ContextLengthExceeded", "Embeddings", "Engine", "EngineClosed",
    "EngineError", "GenerationRequest", "GenerationStream", "InvalidRequest", "ModelInfo",
    "ModelNotFound", "ModelNotReady", "ModelRegistry", "QueueFull", "RequestTimeout", "SamplingParams",
    "TextAssembler", "TokenLogprob", "TopLogprob", "Usage",
    "default_n_threads", "LlamaCppConfig", "LlamaCppEngine",
]


def __getattr__(name):  # lazy: importing the package must not load llama_cpp
    if name in ("LlamaCppConfig", "LlamaCppEngine"):
        from cllama_deploy.engine import llamacpp

        return getattr(llamacpp, name)
    raise AttributeError(name)

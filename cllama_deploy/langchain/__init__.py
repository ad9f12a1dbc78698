"""LangChain components over the engine (extra ``[langchain]``).

* :class:`ChatCLlama` (chat model), :class:`CLlamaLLM` (text completion) and
  :class:`CLlamaEmbeddings` (one vector per text), each ``model_path=`` a GGUF file, in this process,
  through the same request layer as the HTTP server; components on the same file and options share
  one loaded model (:func:`shared_engine`).
* :func:`chat_openai` / :func:`openai_embeddings`: LangChain's OpenAI classes pointed at a running
  ``cllama-deploy serve``.

Imports are lazy: importing this package does not import langchain or llama.cpp.
"""

from __future__ import annotations

_EXPORTS = {
    "ChatCLlama": "cllama_deploy.langchain.chat_models",
    "CLlamaLLM": "cllama_deploy.langchain.llms",
    "CLlamaEmbeddings": "cllama_deploy.langchain.embeddings",
    "chat_openai": "cllama_deploy.langchain.clients",
    "openai_embeddings": "cllama_deploy.langchain.clients",
    "shared_engine": "cllama_deploy.langchain.engines",
    "close_engines": "cllama_deploy.langchain.engines",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(name)
    from cllama_deploy.errors import require

    require("langchain_core", "langchain")
    import importlib

    return getattr(importlib.import_module(module), name)

"""ChatOpenAI / OpenAIEmbeddings configured for a running ``cllama-deploy serve``."""

from __future__ import annotations

import os
from typing import Any, Optional


def _base(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _key(api_key: Optional[str]) -> str:
    # the server without --api-key accepts any key; the OpenAI client insists on one
    return api_key or os.environ.get("CLLAMA_API_KEY") or "not-needed"


def _first_model(base: str, key: str, timeout: float = 10.0) -> str:
    import httpx

    r = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise ValueError(f"{base}/models lists no model")
    return data[0]["id"]


def chat_openai(base_url: str = "http://127.0.0.1:8000", model: Optional[str] = None, *,
                api_key: Optional[str] = None, **kwargs: Any):
    """A ``ChatOpenAI`` for the server at ``base_url`` (``/v1`` is added when missing).

    Args:
        model: the model id (default: the first one the server's ``/v1/models`` lists).
        api_key: the server's ``--api-key`` (default: ``$CLLAMA_API_KEY``, or a placeholder for a
            server without a key).
        kwargs: any other ``ChatOpenAI`` field (temperature, max_tokens, ...).

    Streams report token usage (``stream_usage=True``).
    """
    from langchain_openai import ChatOpenAI

    base, key = _base(base_url), _key(api_key)
    kwargs.setdefault("stream_usage", True)
    return ChatOpenAI(base_url=base, api_key=key, model=model or _first_model(base, key), **kwargs)


def openai_embeddings(base_url: str = "http://127.0.0.1:8000", model: Optional[str] = None, *,
                      api_key: Optional[str] = None, **kwargs: Any):
    """An ``OpenAIEmbeddings`` for the server's ``/v1/embeddings``.

    Texts are sent as text (``check_embedding_ctx_length=False``: the server tokenizes with the
    model's own tokenizer, not tiktoken's).
    """
    from langchain_openai import OpenAIEmbeddings

    base, key = _base(base_url), _key(api_key)
    kwargs.setdefault("check_embedding_ctx_length", False)
    return OpenAIEmbeddings(base_url=base, api_key=key, model=model or _first_model(base, key),
                            **kwargs)
